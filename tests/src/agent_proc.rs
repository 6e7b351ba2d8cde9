//! The agent binary as a child process, as a user runs it.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use crate::{TestCgroup, agent_bin};

pub struct Agent {
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    /// Starts `mesh-redirect run <args>` and waits for its ready line.
    /// `cgroup`: put the agent there (default: the test's own cgroup).
    /// Unless the test sets one, the drain deadline is 1 s.
    #[must_use]
    pub fn run(args: &[&str], cgroup: Option<&TestCgroup>) -> Self {
        let mut all = vec!["run"];
        if !args.contains(&"--drain-timeout-secs") {
            all.extend(["--drain-timeout-secs", "1"]);
        }
        all.extend(args);
        Self::start(&all, cgroup, "info")
    }

    /// Starts the agent with any arguments and `RUST_LOG` filter.
    #[must_use]
    pub fn start(args: &[&str], cgroup: Option<&TestCgroup>, rust_log: &str) -> Self {
        Self::start_in(args, cgroup.map(TestCgroup::path), rust_log)
    }

    /// [`Agent::run`] with the agent in any cgroup2 directory.
    #[must_use]
    pub fn run_in(args: &[&str], cgroup: &std::path::Path) -> Self {
        let mut all = vec!["run"];
        if !args.contains(&"--drain-timeout-secs") {
            all.extend(["--drain-timeout-secs", "1"]);
        }
        all.extend(args);
        Self::start_in(&all, Some(cgroup), "info")
    }

    fn start_in(args: &[&str], cgroup: Option<&std::path::Path>, rust_log: &str) -> Self {
        let mut cmd = Command::new(agent_bin());
        cmd.args(args)
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = crate::spawn_in_cgroup(&mut cmd, None, cgroup);
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let stderr = child.stderr.take().expect("piped stderr");
        let thread_log = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[agent] {line}");
                let ready = line.contains("mesh-redirect ready");
                // Stored before the ready signal, so a test that looks at the
                // log right after start sees the ready line too.
                thread_log.lock().unwrap().push(line);
                if ready {
                    let _ = ready_tx.send(());
                }
            }
        });
        let mut agent = Self {
            child: Some(child),
            log,
        };
        let deadline = Instant::now() + crate::scaled(Duration::from_secs(20));
        loop {
            if ready_rx.recv_timeout(Duration::from_millis(50)).is_ok() {
                return agent;
            }
            if let Some(status) = agent.child_mut().try_wait().unwrap() {
                panic!(
                    "agent exited before ready ({status}):\n{}",
                    agent.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready after 20 s:\n{}",
                agent.log_text()
            );
        }
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("agent running")
    }

    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// Which sockets the short-circuit carries, from the ready line:
    /// `nonblocking` where this kernel's sockmap readers are unsafe for
    /// blocking reads (those sockets stay on plain TCP), `all`, or `none`.
    #[must_use]
    pub fn short_circuits(&self) -> String {
        let log = self.log_text();
        let line = log
            .lines()
            .find(|l| l.contains("mesh-redirect ready"))
            .unwrap_or_else(|| panic!("no ready line in the agent's log:\n{log}"));
        let at = line
            .find("short_circuits=\"")
            .unwrap_or_else(|| panic!("no short_circuits in {line}"))
            + "short_circuits=\"".len();
        line[at..].split('"').next().unwrap_or_default().to_owned()
    }

    /// Whether a socket whose reads block is short-circuited here.
    #[must_use]
    pub fn short_circuits_blocking(&self) -> bool {
        match self.short_circuits().as_str() {
            "all" => true,
            "nonblocking" | "none" => false,
            other => panic!("unknown short_circuits={other}"),
        }
    }

    /// Everything the agent logged so far.
    #[must_use]
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Sends `signal` and waits (up to 10 s) for the agent to exit.
    #[must_use = "the agent's exit status"]
    pub fn stop_with(self, signal: i32) -> ExitStatus {
        let pid = i32::try_from(self.pid()).unwrap();
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid, signal) };
        self.wait_exit(Duration::from_secs(10))
    }

    /// Waits (up to `within`) for the agent to exit by itself.
    #[must_use = "the agent's exit status"]
    pub fn wait_exit(mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child_mut().try_wait().unwrap() {
                self.child = None;
                // Let the reader thread drain the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit within {within:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    /// Stops the agent as a user would (SIGTERM: it detaches and unpins
    /// everything); SIGKILL only if it does not exit, since a killed agent
    /// leaves its pinned datapath running, by design.
    fn drop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(c.id()) {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if !matches!(c.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "agent ignored SIGTERM for 15 s: killing it (its pins stay; `mesh-redirect cleanup` removes them)"
        );
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Runs the agent to completion (for commands that exit on their own);
/// panics if it is still running after 20 s.
#[must_use]
pub fn run_to_end(args: &[&str]) -> std::process::Output {
    let mut child = Command::new(agent_bin())
        .args(args)
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run agent");
    let deadline = Instant::now() + crate::scaled(Duration::from_secs(20));
    while child.try_wait().expect("wait agent").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("agent output");
            panic!(
                "`mesh-redirect {}` still running after 20 s:\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("agent output")
}
