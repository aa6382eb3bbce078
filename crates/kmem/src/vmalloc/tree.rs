//! The augmented AVL tree that holds vmap areas (Linux uses an augmented red-black tree).
//!
//! Nodes are [`VmapArea`]s living in slab objects; the tree links them through their `left`
//! and `right` fields and keys them by `va_start`. Areas in one tree never overlap, so the
//! key is unique and in-order traversal is address order. Each node also carries
//!
//! * `height`: of its subtree (a leaf is 1), for AVL balancing: the heights of a node's two
//!   subtrees differ by at most one, so a tree of `n` nodes is at most
//!   `1.44 * log2(n + 2)` high (46 for four billion areas): every walk below is `O(log n)`
//!   and the recursive ones use a bounded stack;
//! * `subtree_max_size`: the largest `va_end - va_start` in its subtree (Linux's
//!   `subtree_max_size`). Only the free tree needs it (it guides the lowest-fit search in
//!   `O(log n)`); the busy and purge trees keep it too, since it costs one `max` per update.
//!
//! # Invariants (checked by [`Tree::check`])
//!
//! * in-order: for every node, the areas in its left subtree end at or before its start,
//!   those in its right subtree start at or after its end;
//! * `height == 1 + max(height(left), height(right))`, `|height(left) - height(right)| <= 1`;
//! * `subtree_max_size == max(size, subtree_max_size(left), subtree_max_size(right))`;
//! * `len` is the number of nodes.
//!
//! # Safety model
//!
//! A [`Tree`] owns the nodes linked into it: [`Tree::insert`] is the one `unsafe` entry
//! (the caller hands over a valid, unlinked node), and every node reachable from `root` is
//! then valid and touched only through the tree, whose owner (the vmap lock) serializes all
//! access. That makes the read-only walks safe functions; [`Tree::remove`] and
//! [`Tree::update`] take a node pointer and are `unsafe` (it must be one of the tree's).
//! Changing a node's `va_start`/`va_end` in place is done by the owner through the raw
//! pointer, keeping the in-order invariant, followed by [`Tree::update`].

use core::ptr;

use super::area::VmapArea;

/// A possibly null pointer to a node.
pub(crate) type Link = *mut VmapArea;

/// An AVL tree of vmap areas keyed by start address.
pub(crate) struct Tree {
    root: Link,
    len: usize,
}

// --------------------------------------------------------------------------- node helpers

/// Height of a subtree (0 for an empty one).
///
/// # Safety
///
/// `n` is null or a valid node.
#[inline]
unsafe fn height(n: Link) -> u32 {
    if n.is_null() {
        return 0;
    }
    // SAFETY: the caller's contract; `n` is not null.
    unsafe { (*n).height }
}

/// Largest area size in a subtree (0 for an empty one).
///
/// # Safety
///
/// `n` is null or a valid node.
#[inline]
unsafe fn max_size(n: Link) -> usize {
    if n.is_null() {
        return 0;
    }
    // SAFETY: the caller's contract; `n` is not null.
    unsafe { (*n).subtree_max_size }
}

/// Recomputes `n`'s height and `subtree_max_size` from its children.
///
/// # Safety
///
/// `n` and its children are valid nodes (children may be null).
#[inline]
unsafe fn recompute(n: Link) {
    // SAFETY: the caller's contract: `n` and its children are valid.
    unsafe {
        let (l, r) = ((*n).left, (*n).right);
        (*n).height = 1 + height(l).max(height(r));
        (*n).subtree_max_size = (*n).size().max(max_size(l)).max(max_size(r));
    }
}

/// Rotates right around `n` (its left child becomes the subtree's root).
///
/// # Safety
///
/// `n` is a valid node with a left child; the subtree is valid.
unsafe fn rotate_right(n: Link) -> Link {
    // SAFETY: the caller's contract; only links inside the subtree are rewritten.
    unsafe {
        let l = (*n).left;
        (*n).left = (*l).right;
        (*l).right = n;
        recompute(n);
        recompute(l);
        l
    }
}

/// Rotates left around `n` (its right child becomes the subtree's root).
///
/// # Safety
///
/// `n` is a valid node with a right child; the subtree is valid.
unsafe fn rotate_left(n: Link) -> Link {
    // SAFETY: the caller's contract; only links inside the subtree are rewritten.
    unsafe {
        let r = (*n).right;
        (*n).right = (*r).left;
        (*r).left = n;
        recompute(n);
        recompute(r);
        r
    }
}

/// Restores the AVL balance at `n`, whose subtrees are balanced and differ in height by at
/// most two, and returns the subtree's new root (with fresh augmented fields).
///
/// # Safety
///
/// `n` is a valid node whose subtrees are valid AVL trees.
unsafe fn rebalance(n: Link) -> Link {
    // SAFETY: the caller's contract; rotations only happen on the side that is two higher,
    // which therefore has the child each rotation needs.
    unsafe {
        recompute(n);
        let (l, r) = ((*n).left, (*n).right);
        let (hl, hr) = (height(l), height(r));
        if hl > hr + 1 {
            if height((*l).left) < height((*l).right) {
                (*n).left = rotate_left(l);
            }
            return rotate_right(n);
        }
        if hr > hl + 1 {
            if height((*r).right) < height((*r).left) {
                (*n).right = rotate_right(r);
            }
            return rotate_left(n);
        }
        n
    }
}

/// Inserts `n` into the subtree `t`; returns the new root.
///
/// # Safety
///
/// `t` is a valid subtree; `n` a valid unlinked node (no children, height 1) that overlaps
/// no node of `t`.
unsafe fn insert_at(t: Link, n: Link) -> Link {
    if t.is_null() {
        return n;
    }
    // SAFETY: the caller's contract; `t` is non-null.
    unsafe {
        if (*n).va_start < (*t).va_start {
            (*t).left = insert_at((*t).left, n);
        } else {
            (*t).right = insert_at((*t).right, n);
        }
        rebalance(t)
    }
}

/// Unlinks the leftmost node of the non-empty subtree `t`: returns (new root, that node).
///
/// # Safety
///
/// `t` is a valid non-empty subtree.
unsafe fn remove_min(t: Link) -> (Link, Link) {
    // SAFETY: the caller's contract.
    unsafe {
        if (*t).left.is_null() {
            return ((*t).right, t);
        }
        let (l, m) = remove_min((*t).left);
        (*t).left = l;
        (rebalance(t), m)
    }
}

/// Unlinks the node starting at `key` (which must be in `t`); returns the new root.
///
/// # Safety
///
/// `t` is a valid subtree containing a node whose `va_start` is `key`.
unsafe fn remove_at(t: Link, key: usize) -> Link {
    // SAFETY: the caller's contract; the node with `key` is on the search path, so `t`
    // is never null here.
    unsafe {
        if key < (*t).va_start {
            (*t).left = remove_at((*t).left, key);
            return rebalance(t);
        }
        if key > (*t).va_start {
            (*t).right = remove_at((*t).right, key);
            return rebalance(t);
        }
        let (l, r) = ((*t).left, (*t).right);
        if l.is_null() {
            return r;
        }
        if r.is_null() {
            return l;
        }
        // The successor takes `t`'s place: nodes are relinked, never copied, because
        // their identity matters to the caller.
        let (r, m) = remove_min(r);
        (*m).left = l;
        (*m).right = r;
        rebalance(m)
    }
}

/// Recomputes the augmented fields on the path from `t` down to the node at `key`.
///
/// # Safety
///
/// `t` is a valid subtree.
unsafe fn update_at(t: Link, key: usize) {
    if t.is_null() {
        return;
    }
    // SAFETY: the caller's contract; `t` is non-null.
    unsafe {
        if key < (*t).va_start {
            update_at((*t).left, key);
        } else if key > (*t).va_start {
            update_at((*t).right, key);
        }
        recompute(t);
    }
}

/// Turns the subtree `t` into a list linked through `left`, in descending address order
/// pushed onto `head` (so `head` ends up ascending).
///
/// # Safety
///
/// `t` is a valid subtree that nothing else links to any more.
unsafe fn flatten(t: Link, head: &mut Link) {
    if t.is_null() {
        return;
    }
    // SAFETY: the caller's contract; children are read before `t`'s links are rewritten.
    unsafe {
        flatten((*t).right, head);
        let l = (*t).left;
        (*t).left = *head;
        (*t).right = ptr::null_mut();
        *head = t;
        flatten(l, head);
    }
}

/// The lowest node of `t` that can hold `size` bytes at `align`, searching every subtree
/// whose largest area is at least `size` (exact, but not `O(log n)` in the worst case).
///
/// # Safety
///
/// `t` is a valid subtree.
unsafe fn lowest_fit_exhaustive(t: Link, size: usize, align: usize) -> Link {
    // SAFETY: the caller's contract.
    unsafe {
        if max_size(t) < size {
            return ptr::null_mut();
        }
        let l = lowest_fit_exhaustive((*t).left, size, align);
        if !l.is_null() {
            return l;
        }
        if (*t).fits(size, align) {
            return t;
        }
        lowest_fit_exhaustive((*t).right, size, align)
    }
}

/// Checks the invariants of subtree `t`, whose areas must lie in `[lo, hi)`; returns its
/// node count.
///
/// # Safety
///
/// `t` is a valid subtree.
unsafe fn check_at(t: Link, lo: usize, hi: usize) -> Result<usize, &'static str> {
    if t.is_null() {
        return Ok(0);
    }
    // SAFETY: the caller's contract.
    unsafe {
        let n = &*t;
        if n.va_start >= n.va_end {
            return Err("vmap tree: empty or inverted area");
        }
        if n.va_start < lo || n.va_end > hi {
            return Err("vmap tree: areas out of order or overlapping");
        }
        let nl = check_at(n.left, lo, n.va_start)?;
        let nr = check_at(n.right, n.va_end, hi)?;
        let (hl, hr) = (height(n.left), height(n.right));
        if n.height != 1 + hl.max(hr) {
            return Err("vmap tree: wrong height");
        }
        if hl > hr + 1 || hr > hl + 1 {
            return Err("vmap tree: unbalanced");
        }
        if n.subtree_max_size != n.size().max(max_size(n.left)).max(max_size(n.right)) {
            return Err("vmap tree: wrong subtree_max_size");
        }
        Ok(1 + nl + nr)
    }
}

// --------------------------------------------------------------------------- the tree

impl Tree {
    /// An empty tree.
    pub(crate) const fn new() -> Tree {
        Tree {
            root: ptr::null_mut(),
            len: 0,
        }
    }

    /// Number of areas.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// True when the tree holds no area.
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.root.is_null()
    }

    /// Size of the largest area (0 when empty).
    #[inline]
    pub(crate) fn max_size(&self) -> usize {
        // SAFETY: the root is null or a node this tree owns.
        unsafe { max_size(self.root) }
    }

    /// Height of the tree (0 when empty).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn height(&self) -> u32 {
        // SAFETY: the root is null or a node this tree owns.
        unsafe { height(self.root) }
    }

    /// Links `n` in. `O(log n)`.
    ///
    /// # Safety
    ///
    /// `n` is a valid node with `va_start < va_end`, linked into no tree, that overlaps no
    /// area of this tree; the tree owns it from now on (until [`Tree::remove`] or
    /// [`Tree::pop_first`] / [`Tree::take_list`] hand it back).
    pub(crate) unsafe fn insert(&mut self, n: Link) {
        // SAFETY: the caller hands over a valid unlinked node; the tree is valid.
        unsafe {
            (*n).left = ptr::null_mut();
            (*n).right = ptr::null_mut();
            recompute(n);
            self.root = insert_at(self.root, n);
        }
        self.len += 1;
    }

    /// Unlinks `n` and hands it back to the caller. `O(log n)`.
    ///
    /// # Safety
    ///
    /// `n` is a node of this tree.
    pub(crate) unsafe fn remove(&mut self, n: Link) {
        // SAFETY: the caller's contract: `n` is a node of this tree, so `remove_at` finds
        // its key on the search path.
        unsafe {
            let key = (*n).va_start;
            debug_assert!(ptr::eq(self.find(key), n), "vmap tree: removing a stranger");
            self.root = remove_at(self.root, key);
            (*n).left = ptr::null_mut();
            (*n).right = ptr::null_mut();
        }
        self.len -= 1;
    }

    /// Recomputes the augmented fields above `n` after its `va_start`/`va_end` changed in
    /// place (the in-order invariant still holding). `O(log n)`.
    ///
    /// # Safety
    ///
    /// `n` is a node of this tree.
    pub(crate) unsafe fn update(&mut self, n: Link) {
        // SAFETY: the caller's contract; `update_at` dereferences only nodes reachable from
        // the root.
        unsafe { update_at(self.root, (*n).va_start) }
    }

    /// The area starting exactly at `start`, or null.
    pub(crate) fn find(&self, start: usize) -> Link {
        let n = self.find_containing(start);
        // SAFETY: a non-null result is a node of this tree.
        if !n.is_null() && unsafe { (*n).va_start } == start {
            n
        } else {
            ptr::null_mut()
        }
    }

    /// The area with `va_start <= addr < va_end`, or null. `O(log n)`.
    pub(crate) fn find_containing(&self, addr: usize) -> Link {
        let mut t = self.root;
        while !t.is_null() {
            // SAFETY: every node reachable from the root is valid.
            let n = unsafe { &*t };
            if addr < n.va_start {
                t = n.left;
            } else if addr >= n.va_end {
                t = n.right;
            } else {
                return t;
            }
        }
        ptr::null_mut()
    }

    /// The areas around `addr` (which starts no area of this tree): the last one starting
    /// below it and the first one starting above it (either may be null). `O(log n)`.
    pub(crate) fn neighbours(&self, addr: usize) -> (Link, Link) {
        let (mut prev, mut next) = (ptr::null_mut(), ptr::null_mut());
        let mut t = self.root;
        while !t.is_null() {
            // SAFETY: every node reachable from the root is valid.
            let n = unsafe { &*t };
            if n.va_start < addr {
                prev = t;
                t = n.right;
            } else {
                next = t;
                t = n.left;
            }
        }
        (prev, next)
    }

    /// The first area starting at or after `addr`, or null (address-order iteration).
    pub(crate) fn first_from(&self, addr: usize) -> Link {
        let mut best = ptr::null_mut();
        let mut t = self.root;
        while !t.is_null() {
            // SAFETY: every node reachable from the root is valid.
            let n = unsafe { &*t };
            if n.va_start >= addr {
                best = t;
                t = n.left;
            } else {
                t = n.right;
            }
        }
        best
    }

    /// The lowest area, or null.
    pub(crate) fn first(&self) -> Link {
        self.first_from(0)
    }

    /// The highest area, or null.
    pub(crate) fn last(&self) -> Link {
        let mut t = self.root;
        // SAFETY: every node reachable from the root is valid.
        while !t.is_null() && unsafe { !(*t).right.is_null() } {
            // SAFETY: as above.
            t = unsafe { (*t).right };
        }
        t
    }

    /// The lowest-addressed area that can hold `size` bytes aligned to `align` (a power of
    /// two; areas start page aligned), or null (`find_vmap_lowest_match`).
    ///
    /// With `align` up to a page every area of at least `size` bytes fits, and the walk goes
    /// left whenever the left subtree has one: `O(log n)`, and the result is the lowest fit.
    /// With a larger `align`, an area of `size + align - 1` bytes is sure to fit wherever it
    /// starts, so the same `O(log n)` walk looks for one; only if there is none does an
    /// exhaustive (pruned) search look for a smaller area that happens to be aligned well.
    pub(crate) fn lowest_fit(&self, size: usize, align: usize, page: usize) -> Link {
        let length = if align <= page {
            size
        } else {
            size.saturating_add(align - 1)
        };
        let mut t = self.root;
        // SAFETY: the root is null or a node of this tree.
        if unsafe { max_size(t) } >= length {
            while !t.is_null() {
                // SAFETY: every node reachable from the root is valid.
                let n = unsafe { &*t };
                // SAFETY: children of a valid node are null or valid nodes.
                let (ml, mr) = unsafe { (max_size(n.left), max_size(n.right)) };
                if ml >= length {
                    t = n.left;
                } else if n.fits(size, align) {
                    return t;
                } else if mr >= length {
                    t = n.right;
                } else {
                    // The subtree's maximum is this node's own size, so it fits: unreachable
                    // unless the augmented fields are wrong.
                    debug_assert!(false, "vmap tree: subtree_max_size out of date");
                    break;
                }
            }
        }
        if align <= page {
            return ptr::null_mut();
        }
        // SAFETY: the root is a valid subtree.
        unsafe { lowest_fit_exhaustive(self.root, size, align) }
    }

    /// Unlinks and returns the lowest area, or null. `O(log n)`.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn pop_first(&mut self) -> Link {
        if self.root.is_null() {
            return ptr::null_mut();
        }
        // SAFETY: the root is a valid non-empty subtree.
        let (root, m) = unsafe { remove_min(self.root) };
        self.root = root;
        self.len -= 1;
        // SAFETY: `m` was a node of this tree, now unlinked and handed back.
        unsafe {
            (*m).left = ptr::null_mut();
            (*m).right = ptr::null_mut();
        }
        m
    }

    /// Empties the tree into a list of its areas in ascending address order, linked through
    /// `left` (null-terminated); the caller owns every node of it. `O(n)`.
    pub(crate) fn take_list(&mut self) -> Link {
        let mut head = ptr::null_mut();
        // SAFETY: the whole tree is handed over: the root is reset below, so nothing links
        // to its nodes any more.
        unsafe { flatten(self.root, &mut head) };
        self.root = ptr::null_mut();
        self.len = 0;
        head
    }

    /// Checks every invariant (see the module docs); areas must lie in `[lo, hi)`.
    pub(crate) fn check(&self, lo: usize, hi: usize) -> Result<(), &'static str> {
        // SAFETY: the root is a valid subtree.
        let n = unsafe { check_at(self.root, lo, hi)? };
        if n != self.len {
            return Err("vmap tree: wrong node count");
        }
        Ok(())
    }
}
