//! kmem in user space.
