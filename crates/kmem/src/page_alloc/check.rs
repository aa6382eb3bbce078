//! Reports of bad input and of misuse, in the kernel's words.
//!
//! Freeing a page that is already free, with the wrong order, that is a compound tail, that
//! is reserved, or an address that is not a page of RAM is reported as "BUG: Bad page state"
//! (`bad_page`), and the free is dropped: the allocator's state is unchanged. A sleeping
//! allocation from atomic context is reported as `__might_sleep` does, and goes on.

use core::sync::atomic::Ordering::Relaxed;

use super::PageAlloc;
use super::page::{Page, pg};
use crate::platform::{LogLevel, Platform};

impl<P: Platform> PageAlloc<P> {
    /// `bad_page`: the report for a descriptor, then the reason.
    #[cold]
    pub(crate) fn bad_page(&self, page: &Page, reason: core::fmt::Arguments<'_>) {
        self.bad_pages.fetch_add(1, Relaxed);
        let p = &self.platform;
        let pfn = self.mm.page_to_pfn(page).0;
        let t = p.current_task();
        p.log(
            LogLevel::Err,
            format_args!("BUG: Bad page state in process {}  pfn:{pfn:05x}", t.comm()),
        );
        let refcount = u32::from(page.is_allocated());
        p.log(
            LogLevel::Err,
            format_args!(
                "page: refcount:{refcount} mapcount:0 mapping:0000000000000000 index:0x0 pfn:{pfn:#x}"
            ),
        );
        p.log(
            LogLevel::Err,
            format_args!(
                "flags: {:#x}({}|zone={}) order:{}",
                page.flags(),
                page.flag_names(),
                page.zone_index(),
                page.order()
            ),
        );
        p.log(LogLevel::Err, format_args!("page dumped because: {reason}"));
    }

    /// A free of an address (or pointer) that names no page of RAM.
    #[cold]
    pub(crate) fn bad_address(&self, addr: usize, reason: &str) {
        self.bad_pages.fetch_add(1, Relaxed);
        let t = self.platform.current_task();
        self.platform.log(
            LogLevel::Err,
            format_args!(
                "BUG: Bad page state in process {}  addr:{addr:#x}",
                t.comm()
            ),
        );
        self.platform
            .log(LogLevel::Err, format_args!("page dumped because: {reason}"));
    }

    /// Explains why `page` could not be freed at `order`.
    #[cold]
    #[inline(never)]
    pub(super) fn free_pages_check_failed(&self, page: &Page, order: u32) {
        let state = page.state();
        if state & pg::RESERVED != 0 {
            self.bad_page(
                page,
                format_args!("PAGE_FLAGS_CHECK_AT_FREE flag(s) set: page is reserved"),
            );
        } else if state & (pg::BUDDY | pg::PCP) != 0 {
            self.bad_page(page, format_args!("page is already free (double free)"));
        } else if state & pg::TAIL != 0 {
            self.bad_page(page, format_args!("freeing a tail page of a compound page"));
        } else if state & pg::SLAB != 0 {
            self.bad_page(page, format_args!("page belongs to the slab allocator"));
        } else if state & pg::LARGE_KMALLOC != 0 {
            self.bad_page(
                page,
                format_args!("page is a large kmalloc: free it with kfree"),
            );
        } else if state & pg::ALLOCATED != 0 {
            self.bad_page(
                page,
                format_args!(
                    "freed with order {order} but allocated with order {}",
                    page.order()
                ),
            );
        } else {
            self.bad_page(
                page,
                format_args!(
                    "not the first page of an allocation (inside a free block or a larger allocation)"
                ),
            );
        }
    }

    /// Checks and clears the tails of a compound page about to be freed; `false` (after a
    /// report) when a tail is not what the head says.
    pub(super) fn free_tail_pages(&self, idx: u32, order: u32) -> bool {
        for i in 1..(1u32 << order) {
            let t = self.mm.at(idx + i);
            if t.state() != pg::TAIL || t.head.load(Relaxed) != idx as usize {
                self.bad_page(t, format_args!("corrupted compound tail"));
                return false;
            }
        }
        for i in 1..(1u32 << order) {
            self.mm.at(idx + i).set_state(0);
        }
        true
    }

    /// `__might_sleep`'s report: a sleeping allocation from atomic context.
    #[cold]
    #[inline(never)]
    pub(crate) fn report_atomic_sleep(&self) {
        let p = &self.platform;
        let t = p.current_task();
        p.log(
            LogLevel::Err,
            format_args!("BUG: sleeping function called from invalid context at mm/page_alloc.c"),
        );
        p.log(
            LogLevel::Err,
            format_args!(
                "in_atomic(): 1, irqs_disabled(): 0, non_block: 0, pid: {}, name: {}",
                t.pid,
                t.comm()
            ),
        );
        p.log(LogLevel::Err, format_args!("preempt_count: 1, expected: 0"));
    }
}
