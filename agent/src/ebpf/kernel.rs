//! Where the running kernel keeps the socket fields the datapath reads
//! ([`KernelLayout`]), from its BTF: the eBPF programs read them with
//! `bpf_probe_read_kernel` at these offsets, which stay right across
//! kernel versions and configurations (CO-RE's idea, resolved here in
//! userspace).

use std::path::Path;

use agent_common::KernelLayout;
use btf_rs::{Btf, Struct, Type};

/// The kernel's own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("reading the kernel's BTF at {path}: {reason}")]
    Btf { path: String, reason: String },
    #[error("the kernel's BTF has no `{0}`, which the short-circuit reads")]
    Field(String),
}

/// The layout of the kernel whose BTF is at `path` (flags unset).
pub fn layout_from(path: &Path) -> Result<KernelLayout, LayoutError> {
    let btf = Btf::from_file(path).map_err(|e| LayoutError::Btf {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let at = |s: &str, field: &str| offset(&btf, s, field);
    Ok(KernelLayout {
        flags: KernelLayout::VALID,
        sock_cookie: at("sock", "__sk_common.skc_cookie")?,
        sock_socket: at("sock", "sk_socket")?,
        sock_rmem_alloc: at("sock", "sk_backlog.rmem_alloc")?,
        sock_user_data: at("sock", "sk_user_data")?,
        socket_file: at("socket", "file")?,
        file_flags: at("file", "f_flags")?,
        tcp_copied_seq: at("tcp_sock", "copied_seq")?,
        tcp_rcv_nxt: at("tcp_sock", "rcv_nxt")?,
        tcp_write_seq: at("tcp_sock", "write_seq")?,
        tcp_snd_una: at("tcp_sock", "snd_una")?,
        psock_ingress_msg: at("sk_psock", "ingress_msg")?,
    })
}

/// The running kernel's layout.
pub fn layout() -> Result<KernelLayout, LayoutError> {
    layout_from(Path::new(VMLINUX_BTF))
}

/// A layout with made-up offsets, to put the programs through the
/// verifier on a kernel whose BTF lacks a field (flags unset).
#[must_use]
pub const fn placeholder() -> KernelLayout {
    KernelLayout {
        flags: 0,
        sock_cookie: 8,
        sock_socket: 16,
        sock_rmem_alloc: 24,
        sock_user_data: 32,
        socket_file: 40,
        file_flags: 48,
        tcp_copied_seq: 56,
        tcp_rcv_nxt: 64,
        tcp_write_seq: 72,
        tcp_snd_una: 80,
        psock_ingress_msg: 88,
    }
}

/// The byte offset of `path` (`a.b.c`, through named and anonymous
/// members) in struct `name`.
fn offset(btf: &Btf, name: &str, path: &str) -> Result<u32, LayoutError> {
    let missing = || LayoutError::Field(format!("struct {name}.{path}"));
    let mut current = btf
        .resolve_types_by_name(name)
        .map_err(|_| missing())?
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) => Some(s),
            _ => None,
        })
        .ok_or_else(missing)?;
    let mut bits = 0;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let (off, inner) = member(btf, &current, part).ok_or_else(missing)?;
        bits += off;
        if parts.peek().is_some() {
            current = inner.ok_or_else(missing)?;
        }
    }
    if bits % 8 != 0 {
        return Err(missing());
    }
    Ok(bits / 8)
}

/// The bit offset of member `name` of `st` (looked for in anonymous
/// members too), and its type if it is a struct or union.
fn member(btf: &Btf, st: &Struct, name: &str) -> Option<(u32, Option<Struct>)> {
    for m in &st.members {
        let mname = btf.resolve_name(m).unwrap_or_default();
        let inner = aggregate(btf, btf.resolve_chained_type(m).ok()?);
        if mname == name {
            return Some((m.bit_offset(), inner));
        }
        if mname.is_empty()
            && let Some(anon) = &inner
            && let Some((off, found)) = member(btf, anon, name)
        {
            return Some((m.bit_offset() + off, found));
        }
    }
    None
}

/// The struct or union a type is, through typedefs and qualifiers.
fn aggregate(btf: &Btf, mut t: Type) -> Option<Struct> {
    loop {
        t = match t {
            Type::Struct(s) | Type::Union(s) => return Some(s),
            Type::Typedef(_) | Type::Volatile(_) | Type::Const(_) | Type::Restrict(_) => {
                btf.resolve_chained_type(t.as_btf_type()?).ok()?
            }
            _ => return None,
        }
    }
}
