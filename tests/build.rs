//! Compiles the Java clients (`clients/*.java`) with the JDK's `javac`;
//! the tests embed the class files and run them with `java`, on the host
//! and in the qemu guests alike. Without a `javac` the tests that run a
//! Java client fail (or skip outside CI) naming what is missing.

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
    let sources: Vec<PathBuf> = fs::read_dir(clients)
        .expect("read tests/clients")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "java"))
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
