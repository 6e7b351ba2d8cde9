//! `cargo xtask manifests` (and part of `cargo xtask test`): the
//! Kubernetes manifests under `deploy/` are linted (yamllint, the
//! repository's `.yamllint`) and every resource is validated, strictly (an
//! unknown field is an error), against the schemas of a current Kubernetes
//! release with `kubernetes-validate` (from `PyPI`, in a virtualenv under
//! `target/`). A kustomization's resources must exist.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{build, cmd, setup};

/// The validator, pinned; its newest schemas are the release below.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// The Kubernetes release the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.37.0";

pub fn run() -> Result<()> {
    setup::ensure_packages(&[setup::Need::Manifests])?;
    let root = build::root();
    let deploy = root.join("deploy");
    let files = yaml_files(&deploy)?;
    if files.is_empty() {
        bail!("{}: no manifests", deploy.display());
    }
    cmd::run(
        Command::new("yamllint")
            .args(["--strict", "--config-file"])
            .arg(root.join(".yamllint"))
            .arg(&deploy),
    )?;
    let (kustomizations, resources): (Vec<PathBuf>, Vec<PathBuf>) = files
        .into_iter()
        .partition(|f| f.file_name().is_some_and(|n| n == "kustomization.yaml"));
    for k in &kustomizations {
        check_kustomization(k)?;
    }
    for r in &resources {
        check_image_tags(r)?;
    }
    let validate = validator(&root.join("target/tools/kubernetes-validate"))?;
    cmd::run(
        Command::new(validate)
            .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
            .args(&resources),
    )?;
    eprintln!(
        "manifests: {} resources valid for Kubernetes {KUBERNETES_VERSION}, {} kustomizations complete",
        resources.len(),
        kustomizations.len()
    );
    Ok(())
}

/// Every `*.yaml` below `dir`, sorted.
fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).with_context(|| d.display().to_string())? {
            let path = e?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|x| x == "yaml") {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Every image of ours a manifest names is the one `cargo xtask image`
/// builds (this version's tag).
fn check_image_tags(path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let want = crate::image::reference();
    let name = want.split(':').next().expect("name:tag");
    for (n, line) in text.lines().enumerate() {
        if let Some(image) = line.trim().strip_prefix("image: ")
            && image.starts_with(name)
            && image != want
        {
            bail!(
                "{}:{}: image {image}, but `cargo xtask image` builds {want}",
                path.display(),
                n + 1
            );
        }
    }
    Ok(())
}

/// Each resource a kustomization lists is a file beside it.
fn check_kustomization(path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let dir = path.parent().expect("a file has a directory");
    let mut listed = 0;
    let mut in_resources = false;
    for line in text.lines() {
        if !line.starts_with(' ') && !line.starts_with('-') {
            in_resources = line.trim_end() == "resources:";
            continue;
        }
        if let Some(item) = line.trim().strip_prefix("- ").filter(|_| in_resources) {
            listed += 1;
            if !dir.join(item).is_file() {
                bail!("{}: resource {item} does not exist", path.display());
            }
        }
    }
    if listed == 0 {
        bail!("{}: lists no resources", path.display());
    }
    Ok(())
}

/// `kubernetes-validate` in its own virtualenv at `venv`, installed once.
fn validator(venv: &Path) -> Result<PathBuf> {
    let bin = venv.join("bin/kubernetes-validate");
    if bin.is_file() {
        return Ok(bin);
    }
    cmd::run(Command::new("python3").args(["-m", "venv"]).arg(venv))?;
    cmd::run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(KUBERNETES_VALIDATE),
    )
    .context("installing kubernetes-validate from PyPI")?;
    Ok(bin)
}
