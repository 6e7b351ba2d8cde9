//! Debian's podman as the container runtime of the node tests: its CNI
//! network backend, our plugin chained after `bridge`, and an image built
//! offline (busybox and curl from this machine, imported as a rootfs).
//!
//! Everything is the fixture's own: a `containers.conf` (`CONTAINERS_CONF`),
//! storage and run directories, a CNI configuration directory and a bridge;
//! dropped, every pod goes and so does the rest.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// The image every container here runs.
pub const IMAGE: &str = "localhost/mesh-redirect-test:latest";

/// A podman of the test's own, whose network `NETWORK` chains
/// `mesh-redirect-cni` (enrolling with the node agent at `socket`) after
/// `bridge`, put there by `mesh-redirect install-cni`.
pub struct Podman {
    dir: PathBuf,
    bridge: String,
    network: String,
}

impl Podman {
    /// Sets podman up and imports [`IMAGE`].
    #[must_use]
    pub fn new(socket: &Path) -> Self {
        let dir = std::env::temp_dir().join(crate::unique("mr-podman"));
        let seq = std::process::id() % 200 + 20;
        let bridge = format!("mrp{seq}");
        let network = format!("meshnet{seq}");
        for d in ["cni-bin", "cni-conf", "rootfs/bin", "rootfs/tmp"] {
            fs::create_dir_all(dir.join(d)).unwrap();
        }
        fs::write(
            dir.join("containers.conf"),
            format!(
                "[network]\nnetwork_backend = \"cni\"\n\
                 cni_plugin_dirs = [\"{bin}\", \"/usr/lib/cni\"]\n\
                 network_config_dir = \"{conf}\"\n\
                 [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
                 [containers]\ndefault_ulimits = []\n",
                bin = dir.join("cni-bin").display(),
                conf = dir.join("cni-conf").display(),
            ),
        )
        .unwrap();
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": network,
            "plugins": [
                {
                    "type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": format!("10.90.{seq}.0/24")}]],
                        "routes": [{"dst": "0.0.0.0/0"}]
                    }
                }
            ]
        });
        fs::write(
            dir.join(format!("cni-conf/{network}.conflist")),
            conflist.to_string(),
        )
        .unwrap();
        // The plugin goes in as a node's installer puts it: copied into the
        // CNI bin directory (run by its name, the agent's binary is the
        // plugin) and chained after `bridge`.
        let out = crate::agent_proc::run_to_end(&[
            "install-cni",
            "--cni-bin-dir",
            dir.join("cni-bin").to_str().unwrap(),
            "--cni-conf-dir",
            dir.join("cni-conf").to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "install-cni: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let podman = Self {
            dir,
            bridge,
            network,
        };
        podman.import_image();
        podman
    }

    /// The image: busybox, and curl with the libraries it links.
    fn import_image(&self) {
        let root = self.dir.join("rootfs");
        fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static installed");
        for tool in ["sh", "sleep", "httpd", "dd", "sha256sum", "cat", "mkdir"] {
            symlink("busybox", root.join("bin").join(tool)).unwrap();
        }
        let curl = which("curl");
        let mut files = vec![curl.clone()];
        let ldd = Command::new("ldd").arg(&curl).output().unwrap();
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            let path = line
                .split("=>")
                .last()
                .and_then(|r| r.split_whitespace().next())
                .filter(|p| p.starts_with('/'));
            files.extend(path.map(PathBuf::from));
        }
        for f in files {
            let to = root.join(f.strip_prefix("/").unwrap());
            fs::create_dir_all(to.parent().unwrap()).unwrap();
            fs::copy(&f, &to).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        }
        let tar = self.dir.join("image.tar");
        crate::sh(&format!(
            "tar -C {} -cf {} .",
            root.display(),
            tar.display()
        ));
        self.ok(&["import", tar.to_str().unwrap(), IMAGE]);
    }

    /// The network's configuration list, as the runtime reads it.
    #[must_use]
    pub fn conflist(&self) -> serde_json::Value {
        let path = self.dir.join(format!("cni-conf/{}.conflist", self.network));
        serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
    }

    /// `install-cni --uninstall`: our plugin leaves the chain and the CNI
    /// bin directory.
    pub fn uninstall_cni(&self) {
        let out = crate::agent_proc::run_to_end(&[
            "install-cni",
            "--uninstall",
            "--cni-bin-dir",
            self.dir.join("cni-bin").to_str().unwrap(),
            "--cni-conf-dir",
            self.dir.join("cni-conf").to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "install-cni --uninstall: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!self.dir.join("cni-bin/mesh-redirect-cni").exists());
    }

    /// The CNI network our plugin is chained in.
    #[must_use]
    pub fn network(&self) -> &str {
        &self.network
    }

    /// `podman <args>`.
    #[must_use]
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new("podman")
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .output()
            .expect("podman runs")
    }

    /// `podman <args>`, which must succeed; its stdout, trimmed.
    #[must_use]
    pub fn stdout(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "podman {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `podman <args>`, which must succeed.
    pub fn ok(&self, args: &[&str]) {
        let _ = self.stdout(args);
    }

    /// A pod on our network, started (its infra container holds its
    /// namespace); the path of that namespace.
    #[must_use]
    pub fn pod(&self, name: &str) -> PathBuf {
        self.ok(&["pod", "create", "--name", name, "--network", &self.network]);
        self.ok(&["pod", "start", name]);
        let infra = self.stdout(&["pod", "inspect", name, "--format", "{{.InfraContainerID}}"]);
        PathBuf::from(self.stdout(&[
            "inspect",
            &infra,
            "--format",
            "{{.NetworkSettings.SandboxKey}}",
        ]))
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["pod", "rm", "--all", "--force", "--time", "0"]);
        let _ = self.run(&["rm", "--all", "--force", "--time", "0"]);
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
        let _ = fs::remove_dir_all(Path::new("/var/lib/cni/networks").join(&self.network));
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn which(tool: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{tool} on PATH"))
}
