//! kmem: the Linux kernel's memory-allocation subsystem as a `#![no_std]` Rust core.
//!
//! A short tour, bottom up (each floor uses only the floors below it):
//!
//! 1. [`gfp`], [`addr`], [`platform`], [`sync`], [`config`]: GFP flags and zones, addresses,
//!    the [`Platform`](platform::Platform) trait the core runs on, spinlocks, boot settings.
//! 2. [`memblock`]: the boot-time allocator; memory and reserved ranges, early allocations.
//! 3. [`page_alloc`]: zones with watermarks, the buddy allocator, per-CPU page lists and the
//!    page descriptor array (`mem_map`).
//! 4. [`slab`]: lookaside caches (`kmem_cache_*`), SLUB-style with per-CPU sheaves.
//! 5. [`kmalloc`]: size classes over slab caches, large sizes from the page allocator.
//! 7. [`report`]: `/proc/buddyinfo`, `zoneinfo`, `meminfo` and `slabinfo` in Linux's formats.
//! 6. [`mempool`]: reserves that keep allocations working when memory runs out;
//!    [`vmalloc`]: virtually contiguous areas of scattered pages, mapped through the platform;
//!    [`sg`]: scatter/gather tables and big buffers from the highest orders available.
//!    [`percpu`]: per-CPU variables, static ([`PerCpu`](percpu::PerCpu)) and dynamic
//!    (`alloc_percpu`, chunks with a unit per CPU), and `percpu_counter`.
//! 8. [`boxed`]: typed owners (`KBox`, `KVec`, `KmemCache<T>`, `CacheBox`) that free on drop.
//!
//! [`Kmem::boot`] runs the kernel's boot order: memblock hands its
//! memory map over, `mem_map` and the per-CPU page sets are carved out of it, zones are sized
//! and given watermarks, every unreserved page is freed into the buddy allocator, and the
//! kmalloc caches are created.
#![no_std]
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(test)]
extern crate std;

pub mod addr;
pub mod boxed;
pub mod cmdline;
pub mod config;
pub mod fault;
pub mod fmt_util;
pub mod gfp;
pub mod kmalloc;
mod kmem;
pub mod kvmalloc;
pub mod memblock;
pub mod mempool;
pub mod page_alloc;
pub mod percpu;
pub mod platform;
pub mod report;
pub mod sg;
pub mod slab;
pub mod sync;
pub mod vmalloc;

pub use crate::kmem::Kmem;
