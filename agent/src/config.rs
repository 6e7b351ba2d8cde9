//! `run --config FILE`: the same settings as `run`'s flags, from a TOML
//! file, for deployments that keep them in a Kubernetes `ConfigMap` or a unit file.
//!
//! Each key is a long flag of `run` without its dashes, with the flag's
//! type: a string, an integer, `true` for a switch (`false` leaves it off),
//! or an array for a list flag (`outbound-ip-ranges-exclude = ["10.0.0.0/8"]`).
//! The file's settings come first and flags on the command line override
//! them, so `--config base.toml --outbound-port 15101` works as expected.
//!
//! The file is turned into those flags before clap sees the command line,
//! so every value is checked by the same parser, with the same messages,
//! as on the command line. Before anything is attached or written: a
//! syntax error, an unknown key or a value of the wrong type is reported
//! with the file's path and line; a value the flag's parser refuses with
//! the path and the flag; a bad rule list (checked later) with the flag.
//! A switch set in the file cannot be unset on the command line (but
//! `--fail-open`/`--fail-closed` override each other).

use std::{
    ffi::{OsStr, OsString},
    fs,
    path::{Path, PathBuf},
};

use thiserror::Error;
use toml::Value;

/// The flag that names the file.
pub const FLAG: &str = "config";

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {}: line {line}: {message}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("config {}: line {line}: unknown key `{key}`: not a flag of `run`", path.display())]
    UnknownKey {
        path: PathBuf,
        line: usize,
        key: String,
    },
    #[error("config {}: line {line}: `{key}`: {reason}", path.display())]
    BadValue {
        path: PathBuf,
        line: usize,
        key: String,
        reason: String,
    },
    #[error("--{FLAG} needs a file path")]
    MissingPath,
    /// A value the flag's own parser refused.
    #[error("config {}: {message}", path.display())]
    Rejected { path: PathBuf, message: String },
}

/// What a key of the file may be: `run`'s long flag, and whether it takes
/// a value (else it is a switch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flag {
    pub long: String,
    pub takes_value: bool,
}

/// Replaces `--config FILE` (or `--config=FILE`) in `args`, which hold the
/// words after `run`, by the file's settings as flags, placed before every
/// other word so that the command line overrides the file. `args` without
/// it come back unchanged.
///
/// # Errors
/// The file cannot be read, is not TOML, has a key that is not one of
/// `flags`, or a value of the wrong shape.
pub fn expand(args: Vec<OsString>, flags: &[Flag]) -> Result<Expanded, ConfigError> {
    let mut path = None;
    let mut rest = Vec::with_capacity(args.len());
    let mut words = args.into_iter();
    while let Some(word) = words.next() {
        if word == OsStr::new("--") {
            rest.push(word);
            rest.extend(words.by_ref());
            break;
        }
        let text = word.to_string_lossy();
        if text == format!("--{FLAG}") {
            path = Some(PathBuf::from(words.next().ok_or(ConfigError::MissingPath)?));
        } else if let Some(p) = text.strip_prefix(&format!("--{FLAG}=")) {
            path = Some(PathBuf::from(p));
        } else {
            rest.push(word);
        }
    }
    let Some(path) = path else {
        return Ok(Expanded {
            file: None,
            from_file: Vec::new(),
            rest,
        });
    };
    let text = fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let from_file = to_flags(&path, &text, flags)?;
    Ok(Expanded {
        file: Some(path),
        from_file,
        rest,
    })
}

/// A command line with its `--config` taken apart.
#[derive(Debug, PartialEq, Eq)]
pub struct Expanded {
    /// The file, if one was named.
    pub file: Option<PathBuf>,
    /// The flags it sets.
    pub from_file: Vec<OsString>,
    /// The command line's other words.
    pub rest: Vec<OsString>,
}

impl Expanded {
    /// The file's flags, then the command line's.
    #[must_use]
    pub fn words(self) -> Vec<OsString> {
        let mut all = self.from_file;
        all.extend(self.rest);
        all
    }
}

/// The flags a file's text stands for, in the file's order.
///
/// # Errors
/// As [`expand`].
pub fn to_flags(path: &Path, text: &str, flags: &[Flag]) -> Result<Vec<OsString>, ConfigError> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: path.to_owned(),
            line: e.span().map_or(1, |s| line_of(text, s.start)),
            message: e.message().to_owned(),
        })?;
    let mut keys: Vec<(&String, &Value)> = table.iter().collect();
    keys.sort_by_key(|(k, _)| key_line(text, k));
    let mut out = Vec::new();
    for (key, value) in keys {
        let line = key_line(text, key);
        let bad = |reason: String| ConfigError::BadValue {
            path: path.to_owned(),
            line,
            key: key.clone(),
            reason,
        };
        let Some(flag) = flags.iter().find(|f| &f.long == key && f.long != FLAG) else {
            return Err(ConfigError::UnknownKey {
                path: path.to_owned(),
                line,
                key: key.clone(),
            });
        };
        let arg = format!("--{key}");
        match (value, flag.takes_value) {
            (Value::Boolean(true), false) => out.push(arg.into()),
            (Value::Boolean(false), false) => {}
            (_, false) => return Err(bad("a switch: true or false".to_owned())),
            (Value::Array(items), true) => {
                let items = items
                    .iter()
                    .map(scalar)
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad("a list of strings or integers".to_owned()))?;
                out.push(format!("{arg}={}", items.join(",")).into());
            }
            (v, true) => {
                let v = scalar(v).ok_or_else(|| bad("a string or an integer".to_owned()))?;
                out.push(format!("{arg}={v}").into());
            }
        }
    }
    Ok(out)
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Integer(i) => Some(i.to_string()),
        _ => None,
    }
}

/// 1-based line of byte offset `at`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

/// The line a top-level key is set on (1 if not found, e.g. quoted).
fn key_line(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|r| r.trim_start().starts_with('='))
        })
        .map_or(1, |i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> Vec<Flag> {
        [
            ("mode", true),
            ("outbound-port", true),
            ("no-inbound", false),
            ("outbound-ip-ranges-exclude", true),
            ("config", true),
        ]
        .into_iter()
        .map(|(l, v)| Flag {
            long: l.to_owned(),
            takes_value: v,
        })
        .collect()
    }

    fn words(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn expand_text(text: &str, args: &[&str]) -> Result<Vec<OsString>, ConfigError> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!("mesh-redirect-config-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("{n}.toml"));
        fs::write(&path, text).unwrap();
        let mut all = words(&["--config", path.to_str().unwrap()]);
        all.extend(words(args));
        let r = expand(all, &flags()).map(Expanded::words);
        let _ = fs::remove_file(&path);
        r
    }

    #[test]
    fn settings_become_flags_before_the_command_line() {
        let got = expand_text(
            "mode = \"ebpf\"\noutbound-port = 15101\nno-inbound = true\n\
             outbound-ip-ranges-exclude = [\"10.0.0.0/8\", \"192.168.0.0/16\"]\n",
            &["--outbound-port", "15201"],
        )
        .unwrap();
        assert_eq!(
            got,
            words(&[
                "--mode=ebpf",
                "--outbound-port=15101",
                "--no-inbound",
                "--outbound-ip-ranges-exclude=10.0.0.0/8,192.168.0.0/16",
                "--outbound-port",
                "15201",
            ])
        );
    }

    #[test]
    fn a_false_switch_is_left_out_and_no_config_changes_nothing() {
        assert_eq!(
            expand_text("no-inbound = false\n", &[]).unwrap(),
            words(&[])
        );
        let plain = words(&["--mode", "ebpf", "--", "--config", "x"]);
        assert_eq!(expand(plain.clone(), &flags()).unwrap().words(), plain);
    }

    #[test]
    fn an_unknown_key_is_named_with_its_line() {
        let e = expand_text("mode = \"ebpf\"\n\noutbund-port = 1\n", &[]).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("line 3") && msg.contains("`outbund-port`"),
            "{msg}"
        );
        // The file cannot name another file.
        let e = expand_text("config = \"other.toml\"\n", &[]).unwrap_err();
        assert!(matches!(e, ConfigError::UnknownKey { .. }), "{e}");
    }

    #[test]
    fn malformed_toml_names_the_file_and_line() {
        let e = expand_text("mode = \"ebpf\"\noutbound-port = = 3\n", &[]).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, ConfigError::Syntax { line: 2, .. }) && msg.contains(".toml: line 2"),
            "{msg}"
        );
    }

    #[test]
    fn values_of_the_wrong_shape_are_refused() {
        for text in [
            "no-inbound = \"yes\"\n",
            "mode = true\n",
            "outbound-port = 1.5\n",
            "outbound-ip-ranges-exclude = [[\"a\"]]\n",
            "mode = { a = 1 }\n",
        ] {
            let e = expand_text(text, &[]).unwrap_err();
            assert!(
                matches!(e, ConfigError::BadValue { line: 1, .. }),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn a_missing_file_is_named() {
        let e = expand(words(&["--config", "/nonexistent/agent.toml"]), &flags()).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/agent.toml"), "{e}");
        assert!(matches!(
            expand(words(&["--config"]), &flags()),
            Err(ConfigError::MissingPath)
        ));
    }
}
