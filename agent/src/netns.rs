//! Network namespaces: opening one by path, running code inside it on a
//! dedicated thread (namespaces are per thread), and its cookie, which is
//! how the eBPF programs recognise a served namespace.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

const NSFS_MAGIC: i64 = 0x6e73_6673;
/// `SO_NETNS_COOKIE` (Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("netns {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error(
        "netns {path}: not a network namespace file (expected e.g. /var/run/netns/NAME or /proc/PID/ns/net)"
    )]
    NotNetns { path: PathBuf },
    #[error("entering netns {path}: {source}")]
    Enter { path: PathBuf, source: io::Error },
    #[error("netns {path}: reading its cookie (SO_NETNS_COOKIE, Linux 5.14+): {source}")]
    Cookie { path: PathBuf, source: io::Error },
    #[error("netns {path}: listing its IPv6 addresses: {source}")]
    Addresses { path: PathBuf, source: io::Error },
}

/// An open network namespace.
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    file: File,
}

impl Netns {
    /// Opens the namespace at `path`, checking it is one. Errors name `path`.
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?;
        // SAFETY: zeroed statfs is a valid out-buffer; fd is open.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstatfs(file.as_raw_fd(), &raw mut st) } != 0 {
            return Err(NetnsError::Open {
                path: path.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        if st.f_type != NSFS_MAGIC {
            return Err(NetnsError::NotNetns {
                path: path.to_owned(),
            });
        }
        // nsfs also holds other namespace kinds: ask which one this is.
        // SAFETY: NS_GET_NSTYPE takes no argument.
        let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
        if kind >= 0 && kind != libc::CLONE_NEWNET {
            return Err(NetnsError::NotNetns {
                path: path.to_owned(),
            });
        }
        Ok(Self {
            path: path.to_owned(),
            file,
        })
    }

    /// The calling thread's own namespace.
    pub fn current() -> Result<Self, NetnsError> {
        Self::open(Path::new("/proc/thread-self/ns/net"))
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the calling thread into this namespace.
    pub fn enter(&self) -> Result<(), NetnsError> {
        // SAFETY: a valid netns fd; only this thread's namespace changes.
        if unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(NetnsError::Enter {
                path: self.path.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Runs `f` on a new thread inside this namespace and returns its result.
    pub fn run<R: Send, F: FnOnce() -> R + Send>(&self, f: F) -> Result<R, NetnsError> {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter()?;
                Ok(f())
            })
            .join()
            .expect("netns worker thread panicked")
        })
    }

    /// The namespace's cookie, as `bpf_get_netns_cookie()` reports it.
    pub fn cookie(&self) -> Result<u64, NetnsError> {
        self.run(current_cookie)?
            .map_err(|source| NetnsError::Cookie {
                path: self.path.clone(),
                source,
            })
    }

    /// Whether an interface of the namespace has a global IPv6 address
    /// (what istio's IPv6 detection looks for), from the kernel's own list
    /// (`if_inet6`, scope 00), without running a program.
    pub fn has_global_ipv6(&self) -> Result<bool, NetnsError> {
        self.run(|| {
            std::fs::read_to_string("/proc/thread-self/net/if_inet6")
                .map(|t| t.lines().any(|l| l.split_whitespace().nth(3) == Some("00")))
        })?
        .or_else(|e| {
            // No IPv6 in this kernel at all.
            if e.kind() == io::ErrorKind::NotFound {
                Ok(false)
            } else {
                Err(NetnsError::Addresses {
                    path: self.path.clone(),
                    source: e,
                })
            }
        })
    }

    /// A command that runs inside this namespace (it enters it between fork
    /// and exec), e.g. `iptables-restore` for the served namespace.
    #[must_use]
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
        use std::os::unix::process::CommandExt as _;
        let mut cmd = std::process::Command::new(program);
        let fd = self.file.as_raw_fd();
        // SAFETY: only setns(2) runs between fork and exec; the fd stays open
        // for as long as `self` lives, which outlives the spawn call.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Duplicates the handle (for a thread that must enter it later).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            path: self.path.clone(),
            file: self.file.try_clone()?,
        })
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// `NS_GET_NSTYPE` = `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// The cookie of the calling thread's network namespace.
pub fn current_cookie() -> io::Result<u64> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<u64>()).expect("8");
    // SAFETY: valid socket, out-pointer to a u64 and its length.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
