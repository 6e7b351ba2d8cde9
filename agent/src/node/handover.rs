//! Upgrading the node agent without refusing a connection in any pod.
//!
//! The new agent asks the running one for every pod's listening sockets
//! (`{"op":"takeover"}` on the node socket). The running one answers one
//! message per pod, `POD <netns cookie> <n>` with its `n` sockets attached,
//! then `END`. The new agent serves those sockets alongside it (the same
//! sockets: nothing queued on them is lost) and says `READY`; the old agent
//! commits (`GO`: it will not serve again), and only then does the new one
//! move the node socket's path over to itself, take out what it no longer
//! serves and open its admin port; the old one stops accepting, drains and
//! exits. Until `GO` the old agent serves on, and it refuses `enroll` and
//! `unenroll` (the CNI plugin asks again), so no pod is enrolled with one
//! agent and missed by the other. If the new agent dies or stalls before
//! `READY`, the old one carries on as before, and a new agent that gets no
//! `GO` gives up without touching anything the old one uses.

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    net::TcpListener,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use super::api::Request;
use crate::handoff::{recv_with_fds, send_with_fds};

/// The end of the pods' sockets.
const END: &str = "END";
/// The successor serves: the old agent may go.
const READY: &str = "READY";
/// The old agent lets go: the successor may take the socket's path.
const GO: &str = "GO";
/// How long a running agent waits for its successor's `READY` (it loads
/// the datapath and starts a proxy per pod meanwhile).
pub const SUCCESSOR_WAIT: Duration = Duration::from_mins(1);

/// Listening sockets handed over by the node agent we take over from, by
/// the netns cookie of the pod they listen in.
pub type Handed = std::collections::HashMap<u64, Vec<TcpListener>>;

/// Every pod's listening sockets, by netns cookie, as they are handed over.
pub type PodSockets = Vec<(u64, Vec<OwnedFd>)>;

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("node socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("node socket {path}: the running node agent did not hand over: {answer}")]
    Refused { path: PathBuf, answer: String },
}

/// A takeover under way: the running agent's listening sockets are ours
/// too, and it serves on until [`NodeTakeover::confirm`].
#[derive(Debug)]
pub struct NodeTakeover {
    /// Every pod's sockets, by netns cookie.
    pub handed: Handed,
    stream: UnixStream,
}

impl NodeTakeover {
    /// Tells the running agent we serve now and waits for it to let go
    /// (then it stops accepting, drains and exits). An error: it did not
    /// (it gave up on us, or died): we must not take its place.
    pub fn confirm(mut self, socket: &Path) -> Result<(), HandoverError> {
        let io_err = |source| HandoverError::Io {
            path: socket.to_owned(),
            source,
        };
        self.stream
            .write_all(format!("{READY}\n").as_bytes())
            .map_err(io_err)?;
        let mut line = String::new();
        BufReader::new(&self.stream)
            .read_line(&mut line)
            .map_err(io_err)?;
        if line.trim() == GO {
            Ok(())
        } else {
            Err(HandoverError::Refused {
                path: socket.to_owned(),
                answer: format!("no {GO} after {READY}: {:?}", line.trim()),
            })
        }
    }
}

/// Takes over from the node agent answering on `socket`, if any; `None`:
/// nobody answers there.
pub fn take_over(socket: &Path) -> Result<Option<NodeTakeover>, HandoverError> {
    let io_err = |source| HandoverError::Io {
        path: socket.to_owned(),
        source,
    };
    let mut stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(io_err(e)),
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io_err)?;
    let mut line = serde_json::to_string(&Request::Takeover).expect("requests serialize");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io_err)?;
    let mut handed = Handed::new();
    loop {
        let (data, fds) = recv_with_fds(&stream).map_err(io_err)?;
        let text = String::from_utf8_lossy(&data).trim().to_owned();
        if text == END {
            return Ok(Some(NodeTakeover { handed, stream }));
        }
        let pod = text.strip_prefix("POD ").and_then(|rest| {
            let mut w = rest.split_whitespace().map(str::parse::<u64>);
            match (w.next(), w.next(), w.next()) {
                (Some(Ok(cookie)), Some(Ok(n)), None) => Some((cookie, n)),
                _ => None,
            }
        });
        match pod {
            Some((cookie, n)) if n == fds.len() as u64 => {
                handed.insert(cookie, fds.into_iter().map(TcpListener::from).collect());
            }
            _ => {
                // An error answer is a JSON line; read the rest of it.
                let mut rest = String::new();
                let _ = BufReader::new(&stream).read_line(&mut rest);
                return Err(HandoverError::Refused {
                    path: socket.to_owned(),
                    answer: format!("{text}{}", rest.trim_end()),
                });
            }
        }
    }
}

/// The running agent's side: sends `pods`' sockets to the successor on
/// `stream`, then waits up to `wait` for its `READY` and answers `GO`.
/// `Ok(true)`: it serves now and we have let go; `Ok(false)`: it went away
/// or stalled first (it hears no `GO`, and gives up).
pub fn hand_over(
    stream: &UnixStream,
    pods: &[(u64, Vec<OwnedFd>)],
    wait: Duration,
) -> io::Result<bool> {
    for (cookie, fds) in pods {
        let raw: Vec<_> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        send_with_fds(
            stream,
            format!("POD {cookie} {}\n", raw.len()).as_bytes(),
            &raw,
        )?;
    }
    (&*stream).write_all(format!("{END}\n").as_bytes())?;
    stream.set_read_timeout(Some(wait))?;
    let mut line = String::new();
    match BufReader::new(stream).read_line(&mut line) {
        Ok(_) if line.trim() == READY => {
            Ok((&*stream).write_all(format!("{GO}\n").as_bytes()).is_ok())
        }
        Ok(_) => Ok(false),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pods_sockets_cross_and_ready_ends_it() {
        let dir = std::env::temp_dir().join(format!("mr-handover-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let b = TcpListener::bind("127.0.0.1:0").unwrap();
        let ports = [a.local_addr().unwrap(), b.local_addr().unwrap()];
        let old = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            assert!(matches!(
                serde_json::from_str(line.trim()).unwrap(),
                Request::Takeover
            ));
            let pods = vec![(7, vec![OwnedFd::from(a)]), (9, vec![OwnedFd::from(b)])];
            hand_over(&stream, &pods, Duration::from_secs(5)).unwrap()
        });
        let t = take_over(&path).unwrap().expect("someone answers");
        assert_eq!(t.handed.len(), 2);
        assert_eq!(t.handed[&7][0].local_addr().unwrap(), ports[0]);
        assert_eq!(t.handed[&9][0].local_addr().unwrap(), ports[1]);
        t.confirm(&path).unwrap();
        assert!(old.join().unwrap(), "the old side hears READY and lets go");
        // A successor that goes away unconfirmed leaves the old one serving.
        let listener = std::os::unix::net::UnixListener::bind(dir.join("b.sock")).unwrap();
        let old = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            hand_over(&stream, &[], Duration::from_secs(5)).unwrap()
        });
        drop(take_over(&dir.join("b.sock")).unwrap());
        assert!(!old.join().unwrap());
        assert!(take_over(&dir.join("none.sock")).unwrap().is_none());
        let _ = std::fs::remove_dir_all(dir);
    }
}
