//! `mesh-redirect install-cni`: puts the CNI plugin in place on a node, as
//! istio-cni's install-cni does, and takes it away again (`--uninstall`).
//!
//! Installing copies this binary as `mesh-redirect-cni` into the CNI bin
//! directory and chains `{"type": "mesh-redirect-cni", ...}` after the
//! plugins of the node's network configuration: the first file of the
//! configuration directory in name order (the one the runtime uses); a
//! single-plugin `.conf` becomes a `.conflist` of the same name. Both are
//! written to a temporary file first and renamed over, so the runtime never
//! reads half a file. Installing again replaces our entry with the one
//! asked for, nothing else changes; uninstalling removes exactly our entry
//! and the binary.

use std::{
    fs,
    path::{Path, PathBuf},
};

use serde_json::{Map, Value, json};
use tracing::info;

use super::cni::{DEFAULT_PENDING_DIR, FailPolicy};

/// The plugin's name in the CNI bin directory and its `type`.
pub const PLUGIN: &str = "mesh-redirect-cni";

/// `mesh-redirect install-cni`.
#[derive(Debug, Clone, clap::Args)]
pub struct InstallArgs {
    /// The node's CNI bin directory (in a `DaemonSet`, the host's, mounted).
    #[arg(long, value_name = "PATH", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The node's CNI configuration directory.
    #[arg(long, value_name = "PATH", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The node agent's socket, as the plugin reaches it on the node.
    #[arg(long, value_name = "PATH", default_value = super::api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// With the node agent down: `closed` (the pod does not start) or
    /// `open` (it starts, and is enrolled when the agent returns).
    #[arg(long, value_enum, default_value_t = FailPolicy::Closed)]
    pub fail_policy: FailPolicy,
    /// Where the plugin queues enrollments under `--fail-policy open`.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_PENDING_DIR)]
    pub pending_dir: PathBuf,
    /// Pods of these Kubernetes namespaces are left alone (comma-separated;
    /// empty: none).
    #[arg(
        long,
        value_name = "NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system"
    )]
    pub exclude_namespaces: Vec<String>,
    /// Remove our entry from the configuration and the plugin binary.
    #[arg(long)]
    pub uninstall: bool,
}

/// Why installing failed; each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{dir}: no CNI network configuration (*.conflist, *.conf, *.json): the node's network plugin must be installed first"
    )]
    NoConfig { dir: PathBuf },
    #[error("{path}: not a CNI network configuration: {why}")]
    BadConfig { path: PathBuf, why: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What was done, for the log and the tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The configuration file written (or, uninstalling, edited; none if
    /// no file had our entry).
    pub config: Option<PathBuf>,
    pub binary: PathBuf,
}

/// Installs, or with `--uninstall` removes, the plugin.
pub fn run(args: &InstallArgs) -> Result<Installed, InstallError> {
    if args.uninstall {
        return uninstall(&args.cni_bin_dir, &args.cni_conf_dir);
    }
    // Everything is checked before anything is written.
    let config = primary_config(&args.cni_conf_dir)?;
    let text = fs::read_to_string(&config).map_err(io_err(&config))?;
    let list = as_conflist(&config, &text)?;
    let target = config.with_extension("conflist");
    if target != config && target.exists() {
        return Err(InstallError::BadConfig {
            path: config,
            why: format!(
                "a single plugin's configuration beside {}: which one is the network's?",
                target.display()
            ),
        });
    }
    let chained = with_entry(list, &entry(args));
    let binary = args.cni_bin_dir.join(PLUGIN);
    let exe = std::env::current_exe().map_err(io_err(Path::new("/proc/self/exe")))?;
    write_atomically(&binary, &fs::read(&exe).map_err(io_err(&exe))?, 0o755)?;
    let body = serde_json::to_vec_pretty(&chained).expect("JSON values serialize");
    write_atomically(&target, &body, 0o644)?;
    if target != config {
        fs::remove_file(&config).map_err(io_err(&config))?;
    }
    info!(config = %target.display(), binary = %binary.display(), "CNI plugin installed");
    Ok(Installed {
        config: Some(target),
        binary,
    })
}

/// Our plugin's entry in the chain.
fn entry(args: &InstallArgs) -> Value {
    json!({
        "type": PLUGIN,
        "socket": args.socket,
        "failPolicy": args.fail_policy,
        "pendingDir": args.pending_dir,
        "excludeNamespaces": args.exclude_namespaces.iter().filter(|n| !n.is_empty()).collect::<Vec<_>>(),
    })
}

/// The configuration the runtime uses: the first by name, as libcni picks.
fn primary_config(dir: &Path) -> Result<PathBuf, InstallError> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_err(dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|e| e == "conflist" || e == "conf" || e == "json")
        })
        .collect();
    found.sort();
    found
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoConfig {
            dir: dir.to_owned(),
        })
}

/// `text` (from `path`) as a configuration list: a list as it is, a single
/// plugin's configuration as a list of one.
fn as_conflist(path: &Path, text: &str) -> Result<Map<String, Value>, InstallError> {
    let bad = |why: String| InstallError::BadConfig {
        path: path.to_owned(),
        why,
    };
    let Value::Object(mut conf) = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?
    else {
        return Err(bad("not a JSON object".into()));
    };
    if conf.contains_key("plugins") {
        if !conf["plugins"].is_array() {
            return Err(bad("\"plugins\" is not a list".into()));
        }
        return Ok(conf);
    }
    if !conf.contains_key("type") {
        return Err(bad("neither \"plugins\" nor \"type\"".into()));
    }
    let mut list = Map::new();
    for key in ["cniVersion", "name"] {
        if let Some(v) = conf.remove(key) {
            list.insert(key.into(), v);
        }
    }
    list.insert("plugins".into(), Value::Array(vec![Value::Object(conf)]));
    Ok(list)
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN)
}

/// `list` with `ours` chained last (replacing any entry of ours).
fn with_entry(mut list: Map<String, Value>, ours: &Value) -> Map<String, Value> {
    if let Some(Value::Array(plugins)) = list.get_mut("plugins") {
        plugins.retain(|p| !is_ours(p));
        plugins.push(ours.clone());
    }
    list
}

/// `list` without our entry, and whether it had one.
fn without_entry(mut list: Map<String, Value>) -> (Map<String, Value>, bool) {
    let mut had = false;
    if let Some(Value::Array(plugins)) = list.get_mut("plugins") {
        let before = plugins.len();
        plugins.retain(|p| !is_ours(p));
        had = plugins.len() != before;
    }
    (list, had)
}

/// Removes our entry from every configuration list that has one, then the
/// binary.
fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<Installed, InstallError> {
    let mut edited = None;
    for entry in fs::read_dir(conf_dir).map_err(io_err(conf_dir))?.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "conflist") {
            continue;
        }
        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
        let Ok(list) = as_conflist(&path, &text) else {
            continue;
        };
        let (list, had) = without_entry(list);
        if had {
            let body = serde_json::to_vec_pretty(&list).expect("JSON values serialize");
            write_atomically(&path, &body, 0o644)?;
            info!(config = %path.display(), "CNI plugin removed from the chain");
            edited = Some(path);
        }
    }
    let binary = bin_dir.join(PLUGIN);
    match fs::remove_file(&binary) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(InstallError::Io {
                path: binary,
                source,
            });
        }
    }
    Ok(Installed {
        config: edited,
        binary,
    })
}

/// Writes `path` whole: a temporary file beside it, renamed over.
fn write_atomically(path: &Path, body: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = path.with_extension(format!("{PLUGIN}.tmp"));
    fs::write(&tmp, body).map_err(io_err(&tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path) -> InstallArgs {
        InstallArgs {
            cni_bin_dir: dir.join("bin"),
            cni_conf_dir: dir.join("net.d"),
            socket: "/run/mesh-redirect/node.sock".into(),
            fail_policy: FailPolicy::Closed,
            pending_dir: DEFAULT_PENDING_DIR.into(),
            exclude_namespaces: vec!["kube-system".into()],
            uninstall: false,
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mr-install-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(d.join("bin")).unwrap();
        fs::create_dir_all(d.join("net.d")).unwrap();
        d
    }

    const BRIDGE: &str = r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge","bridge":"cni0"},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    #[test]
    fn install_chains_us_last_once_and_uninstall_restores_the_list() {
        let d = dir("list");
        let conf = d.join("net.d/10-k8s.conflist");
        fs::write(&conf, BRIDGE).unwrap();
        fs::write(d.join("net.d/99-other.conflist"), BRIDGE).unwrap();
        let done = run(&args(&d)).unwrap();
        assert_eq!(done.config.as_deref(), Some(conf.as_path()));
        assert!(d.join("bin").join(PLUGIN).exists());
        let again = run(&args(&d)).unwrap();
        assert_eq!(again, done, "installing again is idempotent");
        let list: Value = serde_json::from_str(&fs::read_to_string(&conf).unwrap()).unwrap();
        let types: Vec<&str> = list["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["bridge", "portmap", PLUGIN]);
        assert_eq!(list["plugins"][2]["failPolicy"], "closed");
        assert_eq!(
            list["plugins"][2]["excludeNamespaces"],
            json!(["kube-system"])
        );
        assert_eq!(
            fs::read_to_string(d.join("net.d/99-other.conflist")).unwrap(),
            BRIDGE,
            "only the configuration in use"
        );
        let removed = run(&InstallArgs {
            uninstall: true,
            ..args(&d)
        })
        .unwrap();
        assert_eq!(removed.config.as_deref(), Some(conf.as_path()));
        let back: Value = serde_json::from_str(&fs::read_to_string(&conf).unwrap()).unwrap();
        assert_eq!(back, serde_json::from_str::<Value>(BRIDGE).unwrap());
        assert!(!d.join("bin").join(PLUGIN).exists());
        assert!(
            fs::read_dir(d.join("net.d"))
                .unwrap()
                .flatten()
                .all(|e| !e.file_name().to_string_lossy().ends_with(".tmp")),
            "no temporary file left"
        );
        let _ = fs::remove_dir_all(d);
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_list() {
        let d = dir("conf");
        fs::write(
            d.join("net.d/10-bridge.conf"),
            r#"{"cniVersion":"0.4.0","name":"net","type":"bridge","bridge":"cni0"}"#,
        )
        .unwrap();
        let done = run(&args(&d)).unwrap();
        assert_eq!(
            done.config.as_deref(),
            Some(d.join("net.d/10-bridge.conflist").as_path())
        );
        assert!(!d.join("net.d/10-bridge.conf").exists());
        let list: Value =
            serde_json::from_str(&fs::read_to_string(done.config.unwrap()).unwrap()).unwrap();
        assert_eq!(list["name"], "net");
        assert_eq!(list["cniVersion"], "0.4.0");
        assert_eq!(
            list["plugins"][0],
            json!({"type": "bridge", "bridge": "cni0"})
        );
        assert_eq!(list["plugins"][1]["type"], PLUGIN);
        let _ = fs::remove_dir_all(d);
    }

    #[test]
    fn bad_or_missing_configurations_are_named_and_nothing_is_written() {
        let d = dir("bad");
        let none = run(&args(&d)).unwrap_err().to_string();
        assert!(
            none.contains("net.d") && none.contains("no CNI network"),
            "{none}"
        );
        fs::write(d.join("net.d/10-x.conflist"), "{not json").unwrap();
        let bad = run(&args(&d)).unwrap_err().to_string();
        assert!(bad.contains("10-x.conflist"), "{bad}");
        fs::write(
            d.join("net.d/10-x.conflist"),
            r#"{"name":"x","plugins":{}}"#,
        )
        .unwrap();
        let bad = run(&args(&d)).unwrap_err().to_string();
        assert!(bad.contains("\"plugins\" is not a list"), "{bad}");
        assert!(!d.join("bin").join(PLUGIN).exists(), "nothing written");
        let _ = fs::remove_dir_all(d);
    }
}
