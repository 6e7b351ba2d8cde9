//! Debian's podman as the container runtime of the node and image tests:
//! its CNI network backend (for the node tests, our plugin chained after
//! `bridge`), and a test image built offline (busybox and curl from this
//! machine, imported as a rootfs) besides the agent's own image when a test
//! loads it.
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

/// Where `cargo xtask test` says the agent's image (`cargo xtask image`,
/// an OCI archive) is.
pub const AGENT_IMAGE_ENV: &str = "MESH_REDIRECT_IMAGE";

/// A podman of the test's own, with a bridge network of its own; for the
/// node tests `mesh-redirect-cni` (enrolling with the node agent at
/// `socket`) is chained after `bridge`, put there by `mesh-redirect
/// install-cni`.
pub struct Podman {
    dir: PathBuf,
    bridge: String,
    network: String,
}

impl Podman {
    /// Sets podman up with our plugin in its network, and imports [`IMAGE`].
    #[must_use]
    pub fn new(socket: &Path) -> Self {
        let podman = Self::plain();
        podman.install_cni(socket);
        podman
    }

    /// Sets podman up (its network only `bridge`), and imports [`IMAGE`].
    #[must_use]
    pub fn plain() -> Self {
        // Before anything is made: without podman there is nothing to clean.
        which("podman");
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
        let podman = Self {
            dir,
            bridge,
            network,
        };
        podman.import_image();
        podman
    }

    /// The plugin goes in as a node's installer puts it: copied into the
    /// CNI bin directory (run by its name, the agent's binary is the
    /// plugin) and chained after `bridge`.
    fn install_cni(&self, socket: &Path) {
        let out = crate::agent_proc::run_to_end(&[
            "install-cni",
            "--cni-bin-dir",
            self.dir.join("cni-bin").to_str().unwrap(),
            "--cni-conf-dir",
            self.dir.join("cni-conf").to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "install-cni: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// [`Podman::new`]'s plugin, put in place as the daemon set's init
    /// container does: `install-cni` in the agent's `image`, with no
    /// capability, a read-only root and the two CNI directories mounted.
    pub fn install_cni_from(&self, image: &str, socket: &Path) {
        let bin = format!("{}:/host/opt/cni/bin", self.dir.join("cni-bin").display());
        let conf = format!(
            "{}:/host/etc/cni/net.d",
            self.dir.join("cni-conf").display()
        );
        let socket = format!("--socket={}", socket.display());
        self.ok(&[
            "run",
            "--rm",
            "--network",
            "host",
            "--read-only",
            "--read-only-tmpfs=false",
            "--cap-drop",
            "ALL",
            "-v",
            &bin,
            "-v",
            &conf,
            image,
            "install-cni",
            "--cni-bin-dir=/host/opt/cni/bin",
            "--cni-conf-dir=/host/etc/cni/net.d",
            &socket,
        ]);
        assert_eq!(
            self.conflist()["plugins"][1]["type"],
            "mesh-redirect-cni",
            "chained by the image's install-cni"
        );
    }

    /// `podman load` of the agent's image ([`AGENT_IMAGE_ENV`]); its name,
    /// or `None` when no archive was given.
    #[must_use]
    pub fn load_agent_image(&self) -> Option<String> {
        let archive = std::env::var_os(AGENT_IMAGE_ENV)?;
        let loaded = self.stdout(&["load", "--quiet", "--input", archive.to_str()?]);
        Some(
            loaded
                .strip_prefix("Loaded image: ")
                .unwrap_or_else(|| panic!("podman load said {loaded:?}"))
                .to_owned(),
        )
    }

    /// A server in pod `name` (a new pod) that serves 3 MiB of random bytes
    /// at `http://<address>:8080/blob`; the pod's address and the body's
    /// `sha256sum`.
    #[must_use]
    pub fn blob_server(&self, name: &str) -> (PathBuf, String, String) {
        let netns = self.pod(name);
        self.ok(&[
            "run", "-d", "--pod", name, "--name", &format!("{name}-httpd"), IMAGE, "/bin/sh", "-c",
            "mkdir -p /www && dd if=/dev/urandom of=/www/blob bs=1M count=3 2>/dev/null && exec httpd -f -p 8080 -h /www",
        ]);
        let ns = netns.file_name().unwrap().to_str().unwrap().to_owned();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while crate::sh(&format!("ip netns exec {ns} ss -Hltn 'sport = :8080'")).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "httpd did not come up"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let sha = self.stdout(&["exec", &format!("{name}-httpd"), "sha256sum", "/www/blob"]);
        let ip = crate::sh(&format!("ip -n {ns} -4 -o addr show eth0"))
            .split_whitespace()
            .nth(3)
            .and_then(|a| a.split('/').next())
            .expect("the server pod's address")
            .to_owned();
        (netns, ip, sha.split_whitespace().next().unwrap().to_owned())
    }

    /// A container in pod `pod` downloads the blob of [`Podman::blob_server`]
    /// at `ip` with curl; the `sha256sum` of what it got.
    #[must_use]
    pub fn download_blob(&self, pod: &str, ip: &str) -> String {
        let got = self.stdout(&[
            "run",
            "--rm",
            "--pod",
            pod,
            IMAGE,
            "/bin/sh",
            "-c",
            &format!("curl -sS -o /tmp/blob http://{ip}:8080/blob && sha256sum /tmp/blob"),
        ]);
        got.split_whitespace().next().unwrap_or_default().to_owned()
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

    /// `podman <args>`, on this fixture's configuration and storage.
    fn command(&self, args: &[&str]) -> Command {
        let mut podman = Command::new("podman");
        podman
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args);
        podman
    }

    /// `podman <args>`.
    #[must_use]
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("podman runs")
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
        // Never a panic here: one while a test's own is unwinding aborts
        // the binary, and the test's message is lost.
        let _ = self
            .command(&["pod", "rm", "--all", "--force", "--time", "0"])
            .output();
        let _ = self
            .command(&["rm", "--all", "--force", "--time", "0"])
            .output();
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
