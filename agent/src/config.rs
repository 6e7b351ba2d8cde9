//! A command's settings from a TOML file (`run --config FILE`), for
//! deployments that keep them in a Kubernetes `ConfigMap` or a unit file.
//!
//! Each key is a long flag of the command without its dashes, with the
//! flag's type: a string, an integer, `true`/`false` for a switch, an array
//! (or the flag's comma-separated string) for a list. [`ConfigFile`] checks
//! a file before anything is attached or written: its syntax, that every
//! key is a flag, the type of each value (deserialized into the command's
//! own settings struct) and the value itself (through the flag's own
//! parser, so the file and the command line refuse the same values). Every
//! error names the file, the line and the key. [`ConfigFile::overlay`]
//! then merges it under the command line by value source.

use std::{
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
};

use serde::{Serialize, de::DeserializeOwned};
use thiserror::Error;
use toml::de::{DeTable, DeValue};

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
    #[error("config {}: line {line}: unknown key `{key}`: not a flag of `{command}`", path.display())]
    UnknownKey {
        path: PathBuf,
        line: usize,
        key: String,
        command: String,
    },
    #[error("config {}: line {line}: `{key}`: {message}", path.display())]
    BadValue {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}

/// A key of the file: its name, its line, and its value as the command
/// line would spell it.
#[derive(Debug, Clone)]
struct Entry {
    key: String,
    line: usize,
    /// `None` for a value no flag could take (a table, a nested array).
    as_arg: Option<String>,
}

/// A parsed config file.
#[derive(Debug)]
pub struct ConfigFile {
    path: PathBuf,
    text: String,
    entries: Vec<Entry>,
}

/// 1-based line of byte offset `at`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

/// A value as the command line writes it: scalars as text, an array of
/// scalars comma-separated.
fn as_arg(v: &DeValue<'_>) -> Option<String> {
    let scalar = |v: &DeValue<'_>| match v {
        DeValue::String(s) => Some(s.to_string()),
        DeValue::Integer(i) => Some(i.to_string()),
        DeValue::Boolean(b) => Some(b.to_string()),
        _ => None,
    };
    match v {
        DeValue::Array(items) => items
            .iter()
            .map(|i| scalar(i.get_ref()))
            .collect::<Option<Vec<_>>>()
            .map(|v| v.join(",")),
        other => scalar(other),
    }
}

impl ConfigFile {
    /// Reads and parses `path`.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let table = DeTable::parse(&text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            line: e.span().map_or(1, |s| line_of(&text, s.start)),
            message: e.message().to_owned(),
        })?;
        let mut entries: Vec<Entry> = table
            .get_ref()
            .iter()
            .map(|(k, v)| Entry {
                key: k.get_ref().to_string(),
                line: line_of(&text, k.span().start),
                as_arg: as_arg(v.get_ref()),
            })
            .collect();
        entries.sort_by_key(|e| e.line);
        Ok(Self {
            path: path.to_owned(),
            text,
            entries,
        })
    }

    fn bad(&self, e: &Entry, message: String) -> ConfigError {
        ConfigError::BadValue {
            path: self.path.clone(),
            line: e.line,
            key: e.key.clone(),
            message,
        }
    }

    /// Every key is a long flag of `cmd` (but `not_in_files`), and every
    /// value one its parser takes.
    pub fn check(&self, cmd: &clap::Command, not_in_files: &[&str]) -> Result<(), ConfigError> {
        for e in &self.entries {
            let known = !not_in_files.contains(&e.key.as_str())
                && cmd
                    .get_arguments()
                    .any(|a| a.get_long() == Some(e.key.as_str()));
            if !known {
                return Err(ConfigError::UnknownKey {
                    path: self.path.clone(),
                    line: e.line,
                    key: e.key.clone(),
                    command: cmd.get_name().to_owned(),
                });
            }
            let value = e.as_arg.as_deref().ok_or_else(|| {
                self.bad(e, "a string, a number, true/false or a list of them".into())
            })?;
            // The flag's own parser, as the command line would run it.
            let word = format!("--{}={value}", e.key);
            cmd.clone()
                .try_get_matches_from([OsStr::new(cmd.get_name()), OsStr::new(&word)])
                .map(drop)
                .map_err(|err| {
                    let msg = err.to_string();
                    let msg = msg.lines().next().unwrap_or_default();
                    self.bad(e, msg.trim_start_matches("error: ").to_owned())
                })?;
        }
        Ok(())
    }

    /// The file as `T` (keys it lacks take `T`'s defaults), or the first
    /// value of the wrong type, with its line.
    pub fn typed<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        toml::from_str(&self.text).map_err(|e| {
            let line = e.span().map_or(1, |s| line_of(&self.text, s.start));
            let entry = self.entries.iter().rev().find(|en| en.line <= line);
            match entry {
                Some(en) => self.bad(en, e.message().to_owned()),
                None => ConfigError::Syntax {
                    path: self.path.clone(),
                    line,
                    message: e.message().to_owned(),
                },
            }
        })
    }

    /// `cli`, with every value the file sets and `from_cli(key)` says the
    /// command line did not, taken from `file` (the file as `T`).
    pub fn overlay<T: Serialize + DeserializeOwned>(
        &self,
        cli: &T,
        file: &T,
        from_cli: &dyn Fn(&str) -> bool,
    ) -> Result<T, ConfigError> {
        let internal = |what: &str, e: &dyn std::fmt::Display| ConfigError::Syntax {
            path: self.path.clone(),
            line: 1,
            message: format!("{what}: {e}"),
        };
        let mut merged = toml::Table::try_from(cli).map_err(|e| internal("settings", &e))?;
        let theirs = toml::Table::try_from(file).map_err(|e| internal("settings", &e))?;
        for e in &self.entries {
            if let Some(v) = theirs.get(&e.key)
                && !from_cli(&e.key)
            {
                merged.insert(e.key.clone(), v.clone());
            }
        }
        merged
            .try_into()
            .map_err(|e| internal("merged settings", &e))
    }
}
