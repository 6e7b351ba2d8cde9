//! Exists so the crate has a library target for host-side `cargo check`;
//! the programs are in the `agent-ebpf` binary (`src/main.rs`).
#![no_std]
