//! A `#![no_std]` user of the kmem core (see Cargo.toml).
#![no_std]

use kmem::gfp::{GFP_KERNEL, ZoneType, gfp_zone};

/// Uses the core so that it is really linked.
#[unsafe(no_mangle)]
pub extern "C" fn kmem_nostd_check() -> u32 {
    let mut mb = kmem::memblock::Memblock::new();
    let _ = mb.add(0, 1 << 20);
    let zone = gfp_zone(GFP_KERNEL).unwrap_or(ZoneType::Dma);
    zone as u32 + mb.phys_alloc(4096, 4096).map_or(0, |_| 1)
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
