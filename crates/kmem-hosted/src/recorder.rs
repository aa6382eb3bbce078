//! Recording a Rust program's heap traffic as a [trace](crate::trace).
//!
//! [`Recorder`] is a [`GlobalAlloc`] over the system allocator. Installed as a program's
//! global allocator, it turns each allocation made while recording into a trace line:
//!
//! | Rust | trace line |
//! |---|---|
//! | `alloc` | `kmalloc <id> <size> GFP_KERNEL` |
//! | `alloc_zeroed` | `kmalloc <id> <size> GFP_KERNEL\|__GFP_ZERO` |
//! | `realloc` | `krealloc <id> <new size> GFP_KERNEL` |
//! | `dealloc` | `kfree <id>` |
//!
//! so that `kmem run` can replay the program's pattern on a simulated kernel:
//!
//! ```no_run
//! use kmem_hosted::recorder::Recorder;
//!
//! #[global_allocator]
//! static RECORDER: Recorder = Recorder::new();
//!
//! fn main() {
//!     RECORDER.start();
//!     let v: Vec<u64> = (0..1000).collect();
//!     drop(v);
//!     let trace = RECORDER.take(); // stops recording
//!     std::fs::write("program.trace", trace).unwrap();
//! }
//! ```
//!
//! # How it stays out of its own way
//!
//! Recording never allocates: lines are formatted on the stack and appended to a buffer
//! inside the recorder (`N` bytes, 64 KiB by default), or, after
//! [`Recorder::start_to_file`], written to the file with raw `write` calls whenever the
//! buffer fills. A thread-local flag marks a thread inside the recorder, so an allocation
//! made from within it (a signal handler, say) is served without being recorded instead of
//! deadlocking on the recorder's lock. Lines are appended under a spinlock, in the order the
//! calls happened: an allocation is logged before its pointer is returned and a free before
//! the memory goes back, so the trace never frees an id before allocating it.
//!
//! # Ids
//!
//! Every block carries a 16-byte header (more for larger alignments) holding the recording
//! session and the id it was given, so a free can tell a block recorded in this session
//! from one allocated before [`Recorder::start`] (whose free is not recorded, since the
//! trace never saw it allocated). A `realloc` of such a block is recorded as a fresh
//! `kmalloc`. Ids are decimal numbers, never reused within a session.
//!
//! # Limits
//!
//! When the buffer is full and there is no file, recording stops (see
//! [`Recorder::truncated`]): the trace so far stays well formed, blocks allocated before the
//! stop simply stay live in it. Alignment is not recorded (kmalloc aligns power-of-two
//! sizes naturally), and blocks above `KMALLOC_MAX_SIZE` (4 MiB) fail on replay, as they
//! would in the kernel.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, UnsafeCell};
use std::fs::File;
use std::os::fd::{BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

/// The smallest header: session and id, 8 bytes each.
const HEADER: usize = 16;

thread_local! {
    /// True while this thread is inside the recorder's logging.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// A recording global allocator over [`System`]; see the [module docs](self).
pub struct Recorder<const N: usize = 65536> {
    recording: AtomicBool,
    truncated: AtomicBool,
    lock: AtomicBool,
    session: AtomicU64,
    next_id: AtomicU64,
    fd: AtomicI32,
    write_failed: AtomicBool,
    len: UnsafeCell<usize>,
    buf: UnsafeCell<[u8; N]>,
}

// SAFETY: `len` and `buf` are only touched with `lock` held; everything else is atomic.
unsafe impl<const N: usize> Sync for Recorder<N> {}

impl<const N: usize> Default for Recorder<N> {
    fn default() -> Self {
        Recorder::new()
    }
}

/// A line being formatted on the stack.
struct Line {
    buf: [u8; 96],
    len: usize,
}

impl Line {
    fn new() -> Line {
        Line {
            buf: [0; 96],
            len: 0,
        }
    }

    fn str(&mut self, s: &str) -> &mut Line {
        let b = s.as_bytes();
        self.buf[self.len..self.len + b.len()].copy_from_slice(b);
        self.len += b.len();
        self
    }

    fn num(&mut self, mut v: u64) -> &mut Line {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        let n = digits.len() - i;
        self.buf[self.len..self.len + n].copy_from_slice(&digits[i..]);
        self.len += n;
        self
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The header size and the underlying layout for a caller's `layout`.
fn outer(layout: Layout) -> Option<(usize, Layout)> {
    let header = layout.align().max(HEADER);
    let size = layout.size().checked_add(header)?;
    Some((header, Layout::from_size_align(size, header).ok()?))
}

impl<const N: usize> Recorder<N> {
    /// A recorder that is not recording.
    pub const fn new() -> Recorder<N> {
        Recorder {
            recording: AtomicBool::new(false),
            truncated: AtomicBool::new(false),
            lock: AtomicBool::new(false),
            session: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
            fd: AtomicI32::new(-1),
            write_failed: AtomicBool::new(false),
            len: UnsafeCell::new(0),
            buf: UnsafeCell::new([0; N]),
        }
    }

    /// Starts a recording session into the recorder's buffer (what an earlier session left
    /// there is discarded). Blocks allocated before this call are not recorded.
    pub fn start(&self) {
        self.begin(-1);
    }

    /// Starts a recording session that streams into `file` (the buffer is written out each
    /// time it fills, and at [`Recorder::stop`], which closes the file).
    pub fn start_to_file(&self, file: File) {
        self.begin(file.into_raw_fd());
    }

    fn begin(&self, fd: i32) {
        self.stop();
        self.with_lock(|len, _| *len = 0);
        self.truncated.store(false, Ordering::Relaxed);
        self.write_failed.store(false, Ordering::Relaxed);
        self.session.fetch_add(1, Ordering::Relaxed);
        self.next_id.store(1, Ordering::Relaxed);
        self.fd.store(fd, Ordering::Relaxed);
        self.recording.store(true, Ordering::Release);
    }

    /// Stops recording. With a file, writes out what is buffered and closes it.
    pub fn stop(&self) {
        self.recording.store(false, Ordering::Release);
        let fd = self.fd.swap(-1, Ordering::Relaxed);
        if fd >= 0 {
            self.with_lock(|len, buf| {
                Self::flush(fd, &buf[..*len], &self.write_failed);
                *len = 0;
            });
            // SAFETY: `fd` came from `into_raw_fd` in `start_to_file` and was taken out of
            // `self.fd` above, so it is closed exactly once.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }

    /// True while recording.
    pub fn recording(&self) -> bool {
        self.recording.load(Ordering::Relaxed)
    }

    /// True when the buffer filled up (without a file) and recording stopped early.
    pub fn truncated(&self) -> bool {
        self.truncated.load(Ordering::Relaxed)
    }

    /// True when writing to the file failed (the rest of that session was lost).
    pub fn write_failed(&self) -> bool {
        self.write_failed.load(Ordering::Relaxed)
    }

    /// Stops recording and returns the buffered trace, emptying the buffer.
    pub fn take(&self) -> String {
        self.stop();
        // Allocating here is fine: nothing is recorded any more, so the allocation does not
        // come back to the lock.
        let mut out = Vec::with_capacity(N);
        self.with_lock(|len, buf| {
            out.extend_from_slice(&buf[..*len]);
            *len = 0;
        });
        String::from_utf8(out).expect("the recorder writes ASCII")
    }

    fn with_lock<R>(&self, f: impl FnOnce(&mut usize, &mut [u8; N]) -> R) -> R {
        while self
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        // SAFETY: the lock is held, so this is the only reference to `len` and `buf`.
        let r = f(unsafe { &mut *self.len.get() }, unsafe {
            &mut *self.buf.get()
        });
        self.lock.store(false, Ordering::Release);
        r
    }

    fn flush(fd: i32, mut data: &[u8], failed: &AtomicBool) {
        // SAFETY: `fd` is the file handed to `start_to_file`, open until `stop` closes it,
        // and `stop` flushes before closing.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        while !data.is_empty() {
            match rustix::io::write(fd, data) {
                Ok(0) | Err(_) => {
                    failed.store(true, Ordering::Relaxed);
                    return;
                }
                Ok(n) => data = &data[n..],
            }
        }
    }

    /// Appends a line made by `make` from a fresh id (if `new_id`), under the lock; returns
    /// the id, or `None` if nothing was recorded.
    fn log(&self, new_id: bool, make: impl FnOnce(u64, &mut Line)) -> Option<u64> {
        if !self.recording.load(Ordering::Acquire) {
            return None;
        }
        let entered = INSIDE
            .try_with(|inside| !inside.replace(true))
            .unwrap_or(false);
        if !entered {
            return None; // re-entered (or the thread is exiting): not recorded
        }
        let id = self.with_lock(|len, buf| {
            if !self.recording.load(Ordering::Relaxed) {
                return None;
            }
            let id = if new_id {
                self.next_id.fetch_add(1, Ordering::Relaxed)
            } else {
                0
            };
            let mut line = Line::new();
            make(id, &mut line);
            line.str("\n");
            let bytes = line.bytes();
            if *len + bytes.len() > N {
                let fd = self.fd.load(Ordering::Relaxed);
                if fd < 0 {
                    self.truncated.store(true, Ordering::Relaxed);
                    self.recording.store(false, Ordering::Release);
                    return None;
                }
                Self::flush(fd, &buf[..*len], &self.write_failed);
                *len = 0;
            }
            buf[*len..*len + bytes.len()].copy_from_slice(bytes);
            *len += bytes.len();
            Some(id)
        });
        let _ = INSIDE.try_with(|inside| inside.set(false));
        id
    }

    /// Writes the header in front of `user` (a block of `header` bytes before it).
    ///
    /// # Safety
    ///
    /// `user` is `header >= 16` bytes into a live block.
    unsafe fn set_header(user: *mut u8, session: u64, id: u64) {
        // SAFETY: the caller's contract: the 16 bytes before `user` are the block's, and
        // `user` is at least 16-aligned (the block is aligned to `header`).
        unsafe {
            user.sub(16).cast::<u64>().write(session);
            user.sub(8).cast::<u64>().write(id);
        }
    }

    /// Reads the header in front of `user`: `(session, id)`.
    ///
    /// # Safety
    ///
    /// As [`Recorder::set_header`], and the header was written.
    unsafe fn header(user: *mut u8) -> (u64, u64) {
        // SAFETY: the caller's contract.
        unsafe {
            (
                user.sub(16).cast::<u64>().read(),
                user.sub(8).cast::<u64>().read(),
            )
        }
    }

    /// Allocates with `alloc_fn` and records it.
    ///
    /// # Safety
    ///
    /// As [`GlobalAlloc::alloc`].
    unsafe fn alloc_with(
        &self,
        layout: Layout,
        zero: bool,
        alloc_fn: unsafe fn(&System, Layout) -> *mut u8,
    ) -> *mut u8 {
        let Some((header, outer)) = outer(layout) else {
            return std::ptr::null_mut();
        };
        // SAFETY: `outer` has a non-zero size (it includes the header).
        let base = unsafe { alloc_fn(&System, outer) };
        if base.is_null() {
            return base;
        }
        // SAFETY: `base` is a block of `outer.size() >= header` bytes.
        let user = unsafe { base.add(header) };
        let session = self.session.load(Ordering::Relaxed);
        let id = self.log(true, |id, l| {
            l.str("kmalloc ").num(id).str(" ").num(layout.size() as u64);
            l.str(if zero {
                " GFP_KERNEL|__GFP_ZERO"
            } else {
                " GFP_KERNEL"
            });
        });
        // SAFETY: `user` is `header` bytes into the block just allocated.
        unsafe { Self::set_header(user, session, id.unwrap_or(0)) };
        user
    }
}

// SAFETY: every block handed out is `header` bytes into a `System` block allocated with the
// layout `outer(layout)` computes, aligned to at least `layout.align()`, with at least
// `layout.size()` bytes after it; `dealloc` and `realloc` undo exactly that.
unsafe impl<const N: usize> GlobalAlloc for Recorder<N> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is `System::alloc`'s.
        unsafe { self.alloc_with(layout, false, <System as GlobalAlloc>::alloc) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe { self.alloc_with(layout, true, <System as GlobalAlloc>::alloc_zeroed) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some((header, outer)) = outer(layout) else {
            return;
        };
        // SAFETY: `ptr` came from `alloc` with this layout, so it has our header.
        let (session, id) = unsafe { Self::header(ptr) };
        if id != 0 && session == self.session.load(Ordering::Relaxed) {
            self.log(false, |_, l| {
                l.str("kfree ").num(id);
            });
        }
        // SAFETY: the block starts `header` bytes before `ptr` and was allocated as `outer`.
        unsafe { System.dealloc(ptr.sub(header), outer) };
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Some((header, outer)) = outer(layout) else {
            return std::ptr::null_mut();
        };
        let Some(new_outer) = new_size.checked_add(header) else {
            return std::ptr::null_mut();
        };
        // SAFETY: `ptr` came from `alloc` with `layout`: the block starts `header` bytes
        // before it, was allocated as `outer`, and `new_outer` keeps its alignment.
        let base = unsafe { System.realloc(ptr.sub(header), outer, new_outer) };
        if base.is_null() {
            return base;
        }
        // SAFETY: the new block has `new_outer >= header` bytes; the header moved with it.
        let user = unsafe { base.add(header) };
        // SAFETY: as above.
        let (session, id) = unsafe { Self::header(user) };
        let current = self.session.load(Ordering::Relaxed);
        if id != 0 && session == current {
            self.log(false, |_, l| {
                l.str("krealloc ")
                    .num(id)
                    .str(" ")
                    .num(new_size as u64)
                    .str(" GFP_KERNEL");
            });
        } else if let Some(id) = self.log(true, |id, l| {
            l.str("kmalloc ")
                .num(id)
                .str(" ")
                .num(new_size as u64)
                .str(" GFP_KERNEL");
        }) {
            // Allocated before this session: from now on it is a recorded block.
            // SAFETY: as above.
            unsafe { Self::set_header(user, current, id) };
        }
        user
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{Op, Replayer, Trace};
    use crate::{Machine, MachineConfig};

    fn layout(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn lines_for_each_call() {
        let r: Recorder<4096> = Recorder::new();
        // SAFETY: blocks are used within their layouts and freed with the layout they were
        // made with.
        unsafe {
            let before = r.alloc(layout(10, 8));
            r.start();
            let a = r.alloc(layout(24, 8));
            let z = r.alloc_zeroed(layout(100, 16));
            assert!(std::slice::from_raw_parts(z, 100).iter().all(|&b| b == 0));
            a.write_bytes(0x5a, 24);
            let a2 = r.realloc(a, layout(24, 8), 4000);
            assert!(
                std::slice::from_raw_parts(a2, 24)
                    .iter()
                    .all(|&b| b == 0x5a)
            );
            let big = r.alloc(layout(64, 4096));
            assert_eq!(big as usize % 4096, 0, "alignment kept");
            let b2 = r.realloc(before, layout(10, 8), 20);
            r.dealloc(a2, layout(4000, 8));
            r.dealloc(z, layout(100, 16));
            r.dealloc(big, layout(64, 4096));
            let text = r.take();
            r.dealloc(b2, layout(20, 8));
            assert_eq!(
                text,
                "kmalloc 1 24 GFP_KERNEL\n\
                 kmalloc 2 100 GFP_KERNEL|__GFP_ZERO\n\
                 krealloc 1 4000 GFP_KERNEL\n\
                 kmalloc 3 64 GFP_KERNEL\n\
                 kmalloc 4 20 GFP_KERNEL\n\
                 kfree 1\n\
                 kfree 2\n\
                 kfree 3\n"
            );
            assert!(!r.recording());
            let t = Trace::parse(&text).unwrap();
            assert!(matches!(t.ops()[2], Op::Krealloc { size: 4000, .. }));
        }
    }

    #[test]
    fn blocks_from_before_a_session_are_not_freed_in_it() {
        let r: Recorder<4096> = Recorder::new();
        // SAFETY: as above.
        unsafe {
            r.start();
            let a = r.alloc(layout(8, 8));
            let first = r.take();
            assert_eq!(first, "kmalloc 1 8 GFP_KERNEL\n");
            r.start();
            r.dealloc(a, layout(8, 8)); // allocated in the previous session
            let b = r.alloc(layout(16, 8));
            r.dealloc(b, layout(16, 8));
            let second = r.take();
            assert_eq!(second, "kmalloc 1 16 GFP_KERNEL\nkfree 1\n");
            Trace::parse(&second).unwrap();
        }
    }

    #[test]
    fn a_full_buffer_stops_recording_and_keeps_the_trace_well_formed() {
        let r: Recorder<100> = Recorder::new();
        let mut blocks = Vec::new();
        // SAFETY: as above.
        unsafe {
            r.start();
            for _ in 0..10 {
                blocks.push(r.alloc(layout(1000, 8)));
            }
            assert!(r.truncated());
            assert!(!r.recording());
            for b in blocks {
                r.dealloc(b, layout(1000, 8));
            }
        }
        let text = r.take();
        assert!(text.len() <= 100);
        // "kmalloc 1 1000 GFP_KERNEL\n" is 26 bytes: three fit in 100, the fourth does not.
        assert_eq!(text.lines().count(), 3, "{text}");
        let t = Trace::parse(&text).unwrap();
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn streams_into_a_file() {
        let r: Recorder<64> = Recorder::new();
        let path = std::env::temp_dir().join(format!("kmem-recorder-{}.trace", std::process::id()));
        // SAFETY: as above.
        unsafe {
            r.start_to_file(File::create(&path).unwrap());
            for i in 0..50 {
                let p = r.alloc(layout(32 + i, 8));
                r.dealloc(p, layout(32 + i, 8));
            }
            r.stop();
        }
        assert!(!r.truncated() && !r.write_failed());
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(text.lines().count(), 100);
        assert!(text.ends_with("kfree 50\n"), "{text}");
        let t = Trace::parse(&text).unwrap();
        let m = Machine::boot(MachineConfig::x86_64(64 << 20)).unwrap();
        let mut rp = Replayer::new(&m, &t);
        let s = *rp.run_to_end();
        assert_eq!((s.allocs, s.frees, s.failures, s.live), (50, 50, 0, 0));
    }
}
