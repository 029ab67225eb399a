//! meshcap's eBPF programs: one file per hook. Each hook is a thin
//! `#[hook] fn x(ctx)` that calls `try_x(&ctx)` and decides, on error, whether
//! to fail open or closed (documented per hook), counting every error.
#![no_std]
#![no_main]

mod connect;
mod ctx;
mod getpeername;
mod kubelet;
mod maps;
mod sk_lookup;
mod sk_msg;
mod sock_ops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves programs cannot panic; this is never reached.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
