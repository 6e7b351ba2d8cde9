//! `cargo xtask demo`: two throwaway network namespaces joined by a veth
//! pair, an HTTP server in one, the agent serving the other; a real HTTP
//! client (curl) sends keep-alive requests, and a table shows what happened.
//! Everything is torn down at the end, also on Ctrl-C.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{build, cmd, setup};

const APP_NS: &str = "mrdemo-app";
const WEB_NS: &str = "mrdemo-web";
const APP_IP: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 1);
const WEB_IP: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 2);
const WEB_PORT: u16 = 8080;
const REQUESTS: u32 = 100;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Everything the demo created; dropping it removes all of it.
struct Environment {
    cgroup: PathBuf,
    agent: Option<Child>,
    server_stop: Arc<AtomicBool>,
}

impl Drop for Environment {
    fn drop(&mut self) {
        self.stop_agent();
        self.server_stop.store(true, Ordering::SeqCst);
        for ns in [APP_NS, WEB_NS] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        let _ = fs::remove_dir(&self.cgroup);
        eprintln!(
            "demo: cleaned up (namespaces {APP_NS}, {WEB_NS}, cgroup {})",
            self.cgroup.display()
        );
    }
}

impl Environment {
    fn stop_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            if let Ok(pid) = i32::try_from(agent.id()) {
                // SAFETY: kill(2) on our own child.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let _ = agent.wait();
        }
    }
}

/// One row of the result table.
struct Row {
    setup: &'static str,
    ok: u32,
    connections: u32,
    lo_packets_per_request: f64,
    connect_redirected: u64,
    msg_redirected: u64,
    msg_passed: u64,
}

pub fn run() -> Result<()> {
    if !cmd::is_root() {
        bail!("the demo needs root (network namespaces, cgroups, eBPF)");
    }
    let tc = setup::ensure(&[setup::Need::Tests, setup::Need::Demo])?;
    let agent = build::build(&tc, true)?;
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_sigint as extern "C" fn(libc::c_int) as libc::sighandler_t,
        )
    };

    let cgroup = crate::host::cgroup2_root()?.join("mrdemo-app");
    let mut env = Environment {
        cgroup: cgroup.clone(),
        agent: None,
        server_stop: Arc::new(AtomicBool::new(false)),
    };
    create_topology(&cgroup)?;
    start_http_server(Arc::clone(&env.server_stop))?;
    eprintln!(
        "demo: {APP_NS} ({APP_IP}, cgroup {}) --veth-- {WEB_NS} ({WEB_IP}:{WEB_PORT}, HTTP server)",
        cgroup.display()
    );

    let mut rows = Vec::new();
    for (label, extra) in [
        ("eBPF: connect4 + sockmap", &[][..]),
        ("eBPF: connect4 only", &["--no-sockmap"][..]),
    ] {
        check_interrupted()?;
        env.agent = Some(start_agent(&agent, &cgroup, extra)?);
        rows.push(measure(label, &agent, &cgroup)?);
        env.stop_agent();
    }
    print_table(&rows);
    let good = &rows[0];
    if good.ok != REQUESTS || good.msg_passed != 0 || good.msg_redirected < u64::from(REQUESTS) {
        bail!("the short-circuit did not carry every request (see the table)");
    }
    Ok(())
}

fn create_topology(cgroup: &Path) -> Result<()> {
    for ns in [APP_NS, WEB_NS] {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
    }
    let script = format!(
        "set -e
         ip netns add {APP_NS}; ip netns add {WEB_NS}
         ip link add mrdemo0 type veth peer name mrdemo1
         ip link set mrdemo0 netns {APP_NS}; ip link set mrdemo1 netns {WEB_NS}
         ip -n {APP_NS} addr add {APP_IP}/24 dev mrdemo0; ip -n {WEB_NS} addr add {WEB_IP}/24 dev mrdemo1
         ip -n {APP_NS} link set mrdemo0 up; ip -n {WEB_NS} link set mrdemo1 up
         ip -n {APP_NS} link set lo up; ip -n {WEB_NS} link set lo up"
    );
    cmd::run(Command::new("sh").args(["-c", &script]))?;
    if !cgroup.exists() {
        fs::create_dir(cgroup).with_context(|| format!("creating {}", cgroup.display()))?;
    }
    Ok(())
}

/// A small keep-alive HTTP/1.1 server on a thread inside the web namespace.
fn start_http_server(stop: Arc<AtomicBool>) -> Result<()> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let listener = (|| -> Result<TcpListener> {
            let ns = fs::File::open(format!("/var/run/netns/{WEB_NS}"))?;
            // SAFETY: setns on this thread only, with a valid netns fd.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {WEB_NS}: {}", std::io::Error::last_os_error());
            }
            let l = TcpListener::bind((WEB_IP, WEB_PORT))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })();
        let listener = match listener {
            Ok(l) => {
                let _ = tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        while !stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((conn, _)) => {
                    std::thread::spawn(move || serve_http(conn));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    rx.recv().context("HTTP server thread")?
}

fn serve_http(mut conn: TcpStream) {
    let _ = conn.set_nonblocking(false);
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
        }
        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            pending.drain(..end + 4);
            let body = "hello from the web namespace\n";
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n{body}",
                body.len()
            );
            if conn.write_all(resp.as_bytes()).is_err() {
                return;
            }
        }
    }
}

fn start_agent(agent: &Path, cgroup: &Path, extra: &[&str]) -> Result<Child> {
    let mut child = Command::new(agent)
        .args([
            "run",
            "--netns",
            &format!("/var/run/netns/{APP_NS}"),
            "--cgroup",
        ])
        .arg(cgroup)
        .args(extra)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the agent")?;
    let stderr = child.stderr.take().context("agent stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("mesh-redirect ready") {
                let _ = tx.send(());
            }
            if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("agent: {line}");
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if rx.recv_timeout(Duration::from_millis(50)).is_ok() {
            eprintln!("demo: agent ready: mesh-redirect run {}", extra.join(" "));
            return Ok(child);
        }
        if let Some(status) = child.try_wait()? {
            bail!("the agent exited before it was ready ({status})");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the agent was not ready after 20 s");
        }
        check_interrupted()?;
    }
}

fn measure(label: &'static str, agent: &Path, cgroup: &Path) -> Result<Row> {
    let before = lo_tx_packets()?;
    // Every URL over one keep-alive connection (curl's URL globbing).
    let url = format!("http://{WEB_IP}:{WEB_PORT}/req[1-{REQUESTS}]");
    let script = format!(
        "echo $$ > {procs} && exec ip netns exec {APP_NS} curl -sS -o /dev/null -w '%{{http_code}} %{{num_connects}}\\n' '{url}'",
        procs = cgroup.join("cgroup.procs").display()
    );
    let out = cmd::output(Command::new("sh").args(["-c", &script]))?;
    check_interrupted()?;
    if !out.status.success() {
        bail!("curl failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let packets = lo_tx_packets()? - before;
    let (mut ok, mut connections) = (0, 0);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut f = line.split_whitespace();
        if f.next() == Some("200") {
            ok += 1;
        }
        connections += f.next().and_then(|n| n.parse::<u32>().ok()).unwrap_or(0);
    }
    let status = cmd::output(
        Command::new(agent)
            .args(["status", "--json", "--cgroup"])
            .arg(cgroup),
    )?;
    let json: serde_json::Value =
        serde_json::from_slice(&status.stdout).context("mesh-redirect status --json")?;
    let counter = |name: &str| json["datapath"]["counters"][name].as_u64().unwrap_or(0);
    Ok(Row {
        setup: label,
        ok,
        connections,
        lo_packets_per_request: f64::from(u32::try_from(packets).unwrap_or(u32::MAX))
            / f64::from(REQUESTS),
        connect_redirected: counter("connect_redirected"),
        msg_redirected: counter("msg_redirected"),
        msg_passed: counter("msg_passed"),
    })
}

/// Packets sent on the app namespace's loopback.
fn lo_tx_packets() -> Result<u64> {
    let out =
        cmd::output(Command::new("ip").args(["-n", APP_NS, "-j", "-s", "link", "show", "lo"]))?;
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("ip -j -s link show lo")?;
    json[0]["stats64"]["tx"]["packets"]
        .as_u64()
        .context("lo tx packets")
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{REQUESTS} HTTP requests with curl over one keep-alive connection, {APP_NS} -> {WEB_IP}:{WEB_PORT}"
    );
    println!();
    println!(
        "| setup                    | 200 OK | connections | lo packets/request | connects redirected | msgs redirected | msgs passed |"
    );
    println!(
        "|--------------------------|-------:|------------:|-------------------:|--------------------:|----------------:|------------:|"
    );
    for r in rows {
        println!(
            "| {:<24} | {:>6} | {:>11} | {:>18.2} | {:>19} | {:>15} | {:>11} |",
            r.setup,
            r.ok,
            r.connections,
            r.lo_packets_per_request,
            r.connect_redirected,
            r.msg_redirected,
            r.msg_passed
        );
    }
    println!();
    println!(
        "lo packets/request counts every packet on the app namespace's loopback, including the"
    );
    println!("connection's handshake; with the sockmap the requests themselves put none there.");
}
