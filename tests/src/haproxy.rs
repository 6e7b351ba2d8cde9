//! HAProxy, from Debian, as a real third-party transparent proxy.

use std::{
    fs,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{TestNetns, Topology};

/// HAProxy as a transparent proxy on the outbound and inbound ports, as
/// uid 1337, in the pod's namespace and cgroup: original destinations via
/// `SO_ORIGINAL_DST`, the app reached from 127.0.0.6.
pub struct Haproxy {
    child: Child,
    config: std::path::PathBuf,
}

impl Haproxy {
    /// Starts it in the pod's namespace and cgroup; returns once it listens.
    #[must_use]
    pub fn start(topo: &Topology) -> Self {
        Self::start_in(&topo.pod, topo.cgroup.path())
    }

    /// [`Self::start`] in any namespace and cgroup.
    #[must_use]
    pub fn start_in(netns: &TestNetns, cgroup: &Path) -> Self {
        let config = std::env::temp_dir().join(format!("{}.cfg", crate::unique("mrt-haproxy")));
        fs::write(
            &config,
            "global\n  nbthread 1\n  uid 1337\n  gid 1337\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             listen outbound\n  bind 127.0.0.1:15001\n  server original 0.0.0.0:0\n\
             listen inbound\n  bind 0.0.0.0:15006\n  source 127.0.0.6\n  server original 0.0.0.0:0\n",
        )
        .unwrap();
        let mut cmd = Command::new("haproxy");
        // HAProxy drops to uid/gid 1337 itself (`global` section): `Command::uid`
        // would drop before we enter the namespace and cgroup.
        cmd.arg("-db")
            .arg("-f")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = crate::spawn_in_cgroup(&mut cmd, Some(netns), Some(cgroup));
        let proxy = Self { child, config };
        // Ready once both ports listen. (Not by connecting: a transparent
        // proxy reached directly forwards to its own address, forever.)
        let deadline = Instant::now() + Duration::from_secs(10);
        while netns
            .sh("ss -Hltn '( sport = :15001 or sport = :15006 )'")
            .lines()
            .count()
            < 2
        {
            assert!(Instant::now() < deadline, "haproxy did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        proxy
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.config);
    }
}
