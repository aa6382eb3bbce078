//! kmem: the Linux kernel's memory-allocation subsystem as a `#![no_std]` Rust core.
//!
//! A short tour, bottom up (each floor uses only the floors below it):
//!
//! 1. [`gfp`], [`addr`], [`platform`], [`sync`], [`config`]: GFP flags and zones, addresses,
//!    the [`Platform`](platform::Platform) trait the core runs on, spinlocks, boot settings.
//! 2. [`memblock`]: the boot-time allocator; memory and reserved ranges, early allocations.
//! 3. [`page_alloc`]: zones with watermarks, the buddy allocator, per-CPU page lists and the
//!    page descriptor array (`mem_map`).
//! 4. [`report`]: `/proc/buddyinfo`, `/proc/zoneinfo` and `/proc/meminfo` in Linux's formats.
//!
//! [`Kmem::boot`] runs the kernel's boot order: memblock hands its
//! memory map over, `mem_map` and the per-CPU page sets are carved out of it, zones are sized
//! and given watermarks, and every unreserved page is freed into the buddy allocator.
#![no_std]
#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(test)]
extern crate std;

pub mod addr;
pub mod config;
pub mod fmt_util;
pub mod gfp;
pub mod kmalloc;
mod kmem;
pub mod memblock;
pub mod page_alloc;
pub mod platform;
pub mod report;
pub mod slab;
pub mod sync;

pub use crate::kmem::Kmem;
