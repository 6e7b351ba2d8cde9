//! Exists so the crate has a library target for host-side `cargo check`;
//! the programs are in the `agent-ebpf` binary (`src/main.rs`).
#![cfg_attr(target_arch = "bpf", no_std)]
