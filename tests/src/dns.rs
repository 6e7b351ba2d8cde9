//! DNS for the tests: a small DNS server (Python, UDP and TCP) that logs
//! every query it answers, the pod's own `resolv.conf`, and queries made
//! the ways apps make them.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use crate::{TestCgroup, TestNetns, clients::PYTHON};

pub const DNS_SERVER_PY: &str = include_str!("../clients/dns_server.py");
pub const DNS_QUERY_PY: &str = include_str!("../clients/dns_query.py");

/// The name the tests resolve (any name gets the same answers).
pub const NAME: &str = "echo.mesh.test";

/// A running `dns_server.py`, killed on drop.
pub struct DnsServer {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl DnsServer {
    /// Answers every A query with `a` and AAAA with `aaaa` on each of
    /// `listen` (`ip:port`, `[ip6]:port`), UDP and TCP, inside `netns` (and
    /// `cgroup`, as `uid`, if given); once it is ready.
    ///
    /// # Panics
    /// If it does not start.
    #[must_use]
    pub fn start(
        netns: &TestNetns,
        cgroup: Option<&TestCgroup>,
        uid: Option<u32>,
        tag: &str,
        (a, aaaa): (&str, &str),
        listen: &[&str],
    ) -> Self {
        let mut cmd = Command::new(PYTHON);
        cmd.args(["-u", "-c", DNS_SERVER_PY]);
        // It changes ids itself, once in the namespace and cgroup.
        if let Some(uid) = uid {
            cmd.args(["--uid", &uid.to_string()]);
        }
        cmd.args([tag, a, aaaa])
            .args(listen)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = crate::spawn_in(&mut cmd, Some(netns), cgroup);
        let stdout = child.stdout.take().expect("piped stdout");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let lines = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line == "ready" {
                    let _ = ready_tx.send(());
                } else {
                    lines.lock().unwrap().push(line);
                }
            }
        });
        ready_rx
            .recv_timeout(crate::scaled(Duration::from_secs(20)))
            .unwrap_or_else(|_| panic!("DNS server {tag} on {listen:?} did not start"));
        Self { child, log }
    }

    /// The queries answered so far: `TAG udp|tcp NAME TYPE PEER` each.
    #[must_use]
    pub fn queries(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `/etc/netns/<netns>/resolv.conf`, which `ip netns exec` shows the
/// namespace's processes as `/etc/resolv.conf` (and the agent reads as
/// the pod's); removed on drop.
pub struct ResolvConf {
    dir: PathBuf,
}

impl ResolvConf {
    /// # Panics
    /// If it cannot be written.
    #[must_use]
    pub fn write(netns: &TestNetns, text: &str) -> Self {
        let dir = PathBuf::from("/etc/netns").join(netns.name());
        fs::create_dir_all(&dir).expect("create /etc/netns/<name>");
        fs::write(dir.join("resolv.conf"), text).expect("write resolv.conf");
        Self { dir }
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A command run the way `ip netns exec` runs it: with the namespace's own
/// `resolv.conf`.
#[must_use]
pub fn netns_exec(netns: &TestNetns, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", netns.name(), program]);
    c
}

/// `dns_query.py` under `ip netns exec` (as `uid`, if given), then `args`.
#[must_use]
pub fn python_query(netns: &TestNetns, uid: Option<u32>, args: &[&str]) -> Command {
    let mut c = netns_exec(netns, PYTHON);
    c.args(["-c", DNS_QUERY_PY]);
    if let Some(uid) = uid {
        c.args(["--uid", &uid.to_string()]);
    }
    c.args(args);
    c
}

/// An A query for [`NAME`] with this id.
#[must_use]
pub fn query(id: u16) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in NAME.split('.') {
        q.push(u8::try_from(label.len()).unwrap());
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The A record of a reply to [`query`]`(id)`.
///
/// # Panics
/// If it is not one.
#[must_use]
pub fn answer_of(reply: &[u8], id: u16) -> std::net::Ipv4Addr {
    assert_eq!(reply[..2], id.to_be_bytes(), "a reply to another query");
    assert!(reply.len() >= 4, "short reply");
    let a: [u8; 4] = reply[reply.len() - 4..].try_into().unwrap();
    a.into()
}

/// How a query travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `connect` then `send`/`recv` (glibc's way).
    ConnectedUdp,
    /// `sendto`/`recvfrom` on an unconnected socket.
    UnconnectedUdp,
    /// TCP, length-prefixed.
    Tcp,
}

/// One query to `server` the way `transport` says, from the calling
/// thread's namespace; the answer and where the reply came from.
///
/// # Panics
/// On any I/O error.
#[must_use]
pub fn ask(server: SocketAddr, transport: Transport, id: u16) -> (std::net::Ipv4Addr, SocketAddr) {
    let timeout = Some(crate::scaled(Duration::from_secs(5)));
    let q = query(id);
    let any: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    match transport {
        Transport::ConnectedUdp | Transport::UnconnectedUdp => {
            let s = UdpSocket::bind(any).unwrap();
            s.set_read_timeout(timeout).unwrap();
            let mut buf = [0u8; 512];
            if transport == Transport::ConnectedUdp {
                s.connect(server).unwrap();
                s.send(&q).unwrap();
                let n = s.recv(&mut buf).expect("a reply");
                (answer_of(&buf[..n], id), s.peer_addr().unwrap())
            } else {
                s.send_to(&q, server).unwrap();
                let (n, from) = s.recv_from(&mut buf).expect("a reply");
                (answer_of(&buf[..n], id), from)
            }
        }
        Transport::Tcp => {
            let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(5)).unwrap();
            s.set_read_timeout(timeout).unwrap();
            let len = u16::try_from(q.len()).unwrap().to_be_bytes();
            s.write_all(&[&len[..], &q].concat()).unwrap();
            let mut head = [0u8; 2];
            s.read_exact(&mut head).unwrap();
            let mut reply = vec![0u8; usize::from(u16::from_be_bytes(head))];
            s.read_exact(&mut reply).unwrap();
            (answer_of(&reply, id), s.peer_addr().unwrap())
        }
    }
}
