//! kmem in user space: a simulated machine with memfd memory, real mappings and virtual CPUs.
//!
//! * [`platform::HostedPlatform`] implements the core's platform trait: physical memory is a
//!   sparse memfd, the direct map and the kmap and vmalloc windows are real mappings of it,
//!   threads run on virtual CPUs, sleeping is a futex, and reports go to an in-memory log.
//! * [`machine::Machine`] boots kmem on such a platform from a memory map and a
//!   configuration, and prints the `/proc` reports; [`boot_params`] maps a kernel command
//!   line onto that configuration.
//! * [`trace`] is a text format for workloads and a [`Replayer`](trace::Replayer) that runs
//!   one on a machine step by step; [`recorder`] writes a Rust program's allocations in it.

pub mod boot_params;
pub mod machine;
pub mod platform;
pub mod recorder;
pub mod trace;

pub use machine::{Machine, MachineConfig, MachineError};
