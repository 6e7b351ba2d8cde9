//! Compiles the Java clients (`clients/*.java`, `clients/conformance/*.java`)
//! with the JDK's `javac`, and the Go client (`clients/conformance/*.go`)
//! with `go build` (the standard library only, nothing fetched); the tests
//! embed the class files and the Go binary and run them, on the host and in
//! the qemu guests alike. Without a `javac` or a `go` the tests that run
//! such a client fail (or skip outside CI) naming what is missing.

use std::{
    env,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let clients = Path::new("clients");
    println!("cargo::rerun-if-changed={}", clients.display());
    println!("cargo::rerun-if-env-changed=PATH");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let classes = out.join("java");
    let _ = fs::remove_dir_all(&classes);
    fs::create_dir_all(&classes).expect("create OUT_DIR/java");
    let sources: Vec<PathBuf> = [clients, &clients.join("conformance")]
        .into_iter()
        .flat_map(|dir| sources_in(dir, "java"))
        .collect();
    let compiled = Command::new("javac")
        .args(["--release", "17", "-Xlint:all", "-Werror", "-d"])
        .arg(&classes)
        .args(&sources)
        .output();
    let generated = match compiled {
        Ok(o) if o.status.success() => embed(&classes),
        Ok(o) => panic!(
            "javac failed on tests/clients:\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => format!(
            "/// Why there are no Java clients.\npub const JAVA_CLASSES: Result<&[(&str, &[u8])], &str> = Err({:?});\n",
            format!(
                "javac could not run ({e}) when the tests were built: `cargo xtask setup` installs openjdk-17-jdk-headless"
            )
        ),
    };
    fs::write(out.join("java_classes.rs"), generated).expect("write java_classes.rs");
    fs::write(
        out.join("go_client.rs"),
        go_client(&clients.join("conformance"), &out),
    )
    .expect("write go_client.rs");
}

/// The files in `dir` whose extension is `ext`.
fn sources_in(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    found.sort();
    found
}

/// `GO_CLIENT`: the Go client built into `OUT_DIR` (its build cache and
/// GOPATH there too; no modules, no network), embedded.
fn go_client(dir: &Path, out: &Path) -> String {
    let binary = out.join("conformance-go");
    let built = Command::new("go")
        .args(["build", "-trimpath", "-o"])
        .arg(&binary)
        .args(sources_in(dir, "go"))
        .env("GOCACHE", out.join("go-cache"))
        .env("GOPATH", out.join("gopath"))
        .env("GO111MODULE", "off")
        .env("GOPROXY", "off")
        .env("GOENV", "off")
        .env("GOFLAGS", "")
        // A static binary: the guests have no C library to spare for it.
        .env("CGO_ENABLED", "0")
        .output();
    match built {
        Ok(o) if o.status.success() => format!(
            "/// The Go conformance client (`clients/conformance/*.go`), built.\npub const GO_CLIENT: Result<&[u8], &str> = Ok(include_bytes!({:?}));\n",
            binary.display().to_string()
        ),
        Ok(o) => panic!(
            "go build failed on tests/clients/conformance:\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => format!(
            "/// Why there is no Go client.\npub const GO_CLIENT: Result<&[u8], &str> = Err({:?});\n",
            format!(
                "go could not run ({e}) when the tests were built: `cargo xtask setup` installs golang-go"
            )
        ),
    }
}

/// `JAVA_CLASSES`: every class file, by name, embedded.
fn embed(dir: &Path) -> String {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read compiled classes")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| Path::new(n).extension().is_some_and(|e| e == "class"))
        .collect();
    names.sort();
    let mut s = String::from(
        "/// The compiled Java clients: class file name, bytes.\npub const JAVA_CLASSES: Result<&[(&str, &[u8])], &str> = Ok(&[\n",
    );
    for n in names {
        let path = dir.join(&n);
        let _ = writeln!(
            s,
            "    ({n:?}, include_bytes!({:?})),",
            path.display().to_string()
        );
    }
    s.push_str("]);\n");
    s
}
