//! Map layouts and decision logic shared by the eBPF programs and the agent.
//!
//! Everything here is `no_std`, `#[repr(C)]` with explicit padding, so the
//! kernel and userspace agree byte for byte; the pure functions are what the
//! hooks decide with, and plain `cargo test` covers them.
#![no_std]

pub mod addr;
pub mod maps;
pub mod verdict;

pub use addr::*;
pub use maps::*;
pub use verdict::*;

#[cfg(test)]
mod tests;
