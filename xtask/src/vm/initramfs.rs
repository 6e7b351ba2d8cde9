//! The guest's whole filesystem, as an initramfs (a newc cpio archive the
//! kernel unpacks into RAM): the host's own programs that the tests run,
//! with their shared libraries at the host's paths, the test binaries and
//! the agent, the kernel's modules, and a small init.
//!
//! Files are laid out exactly as on the host, symlinks included (merged
//! `/usr`, `/etc/alternatives`), so multi-call binaries such as
//! `xtables-legacy-multi` see the name they were called by.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{self, BufWriter},
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Component, Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir {
        mode: u32,
    },
    /// Contents read from `source` on the host when the archive is written.
    File {
        source: PathBuf,
        mode: u32,
    },
    Bytes {
        data: Vec<u8>,
        mode: u32,
    },
    Symlink {
        target: PathBuf,
    },
    CharDev {
        major: u32,
        minor: u32,
    },
}

/// A filesystem tree to pack, keyed by absolute guest path. The map's order
/// (by path components) puts every directory before what it holds, which
/// the kernel's unpacker needs.
#[derive(Debug, Default)]
pub struct Image {
    entries: BTreeMap<PathBuf, Entry>,
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

impl Image {
    pub fn new() -> Self {
        let mut image = Self::default();
        image.entries.insert("/".into(), Entry::Dir { mode: 0o755 });
        image
    }

    /// `/dev/console`, which the kernel opens for init before devtmpfs is
    /// mounted.
    pub fn add_console(&mut self) {
        self.add_dir("/dev");
        self.entries
            .insert("/dev/console".into(), Entry::CharDev { major: 5, minor: 1 });
    }

    /// An empty directory (and its parents).
    pub fn add_dir(&mut self, guest: impl AsRef<Path>) {
        let guest = self.resolve(guest.as_ref());
        for dir in guest.ancestors().collect::<Vec<_>>().into_iter().rev() {
            self.entries
                .entry(dir.to_owned())
                .or_insert(Entry::Dir { mode: 0o755 });
        }
    }

    /// A directory with `mode` (e.g. `/tmp`, 0o1777), parents as usual.
    pub fn add_dir_mode(&mut self, guest: impl AsRef<Path>, mode: u32) {
        let guest = self.resolve(guest.as_ref());
        self.add_dir(&guest);
        self.entries.insert(guest, Entry::Dir { mode });
    }

    pub fn add_bytes(&mut self, guest: impl AsRef<Path>, data: impl Into<Vec<u8>>, mode: u32) {
        let guest = self.resolve(guest.as_ref());
        if let Some(parent) = guest.parent() {
            self.add_dir(parent);
        }
        self.entries.insert(
            guest,
            Entry::Bytes {
                data: data.into(),
                mode,
            },
        );
    }

    /// The host file `source` at `guest`.
    pub fn add_file_as(&mut self, guest: impl AsRef<Path>, source: &Path) -> Result<()> {
        let meta = fs::metadata(source).with_context(|| format!("{}", source.display()))?;
        let guest = self.resolve(guest.as_ref());
        if let Some(parent) = guest.parent() {
            self.add_dir(parent);
        }
        self.entries.insert(
            guest,
            Entry::File {
                source: source.to_owned(),
                mode: meta.permissions().mode() & 0o7777,
            },
        );
        Ok(())
    }

    /// Everything under the host directory `source`, at `guest`.
    pub fn add_tree_as(&mut self, guest: impl AsRef<Path>, source: &Path) -> Result<()> {
        let guest = guest.as_ref();
        self.add_dir(guest);
        for entry in fs::read_dir(source).with_context(|| format!("{}", source.display()))? {
            let entry = entry?;
            let (from, to) = (entry.path(), guest.join(entry.file_name()));
            let kind = entry.file_type()?;
            if kind.is_dir() {
                self.add_tree_as(&to, &from)?;
            } else if kind.is_symlink() {
                let target = fs::read_link(&from)?;
                let to = self.resolve(&to);
                self.entries.insert(to, Entry::Symlink { target });
            } else if kind.is_file() {
                self.add_file_as(&to, &from)?;
            }
        }
        Ok(())
    }

    /// A symlink at `guest` pointing to `target`.
    pub fn add_symlink(&mut self, guest: impl AsRef<Path>, target: impl Into<PathBuf>) {
        let guest = self.resolve(guest.as_ref());
        if let Some(parent) = guest.parent() {
            self.add_dir(parent);
        }
        self.entries.insert(
            guest,
            Entry::Symlink {
                target: target.into(),
            },
        );
    }

    /// The host path `path` at the same place in the guest, with every
    /// symlink met on the way (and what it points to).
    pub fn add_host_path(&mut self, path: &Path) -> Result<()> {
        self.add_host_path_depth(path, 0)
    }

    fn add_host_path_depth(&mut self, path: &Path, depth: u32) -> Result<()> {
        if depth > 40 {
            bail!("too many levels of symlinks at {}", path.display());
        }
        if !path.is_absolute() {
            bail!("{} is not an absolute path", path.display());
        }
        let parts: Vec<Component> = path.components().skip(1).collect();
        let mut cur = PathBuf::from("/");
        for (i, part) in parts.iter().enumerate() {
            let next = cur.join(part);
            let meta = fs::symlink_metadata(&next)
                .with_context(|| format!("{} (for {})", next.display(), path.display()))?;
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&next)?;
                let resolved = normalize(&cur.join(&target));
                self.entries.insert(next, Entry::Symlink { target });
                let rest: PathBuf = parts[i + 1..].iter().collect();
                return self.add_host_path_depth(&resolved.join(rest), depth + 1);
            }
            let last = i + 1 == parts.len();
            if meta.is_dir() {
                self.entries
                    .entry(next.clone())
                    .or_insert(Entry::Dir { mode: 0o755 });
            } else if last && meta.is_file() {
                self.entries.insert(
                    next.clone(),
                    Entry::File {
                        source: next.clone(),
                        mode: meta.permissions().mode() & 0o7777,
                    },
                );
            } else {
                bail!("{} is neither a directory nor a file", next.display());
            }
            cur = next;
        }
        Ok(())
    }

    /// The shared libraries `elf` loads (as `ldd` lists them), at the
    /// host's paths. Statically linked files and non-ELF files need none.
    pub fn add_libraries_of(&mut self, elf: &Path) -> Result<()> {
        self.add_libraries_of_searching(elf, None)
    }

    /// [`Self::add_libraries_of`] for a library whose siblings the program
    /// that loads it finds in `dir` (ldd is told with `LD_LIBRARY_PATH`);
    /// those already in the image are not added again.
    pub fn add_libraries_of_searching(&mut self, elf: &Path, dir: Option<&Path>) -> Result<()> {
        if !is_elf(elf) {
            return Ok(());
        }
        let mut ldd = Command::new("ldd");
        ldd.arg(elf);
        if let Some(dir) = dir {
            ldd.env("LD_LIBRARY_PATH", dir);
        }
        let out = cmd::output(&mut ldd)?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            if text.contains("not a dynamic executable")
                || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
            {
                return Ok(());
            }
            bail!("ldd {} failed: {}", elf.display(), out.status);
        }
        for lib in parse_ldd(&text).with_context(|| format!("ldd {}", elf.display()))? {
            if dir.is_some_and(|d| lib.starts_with(d)) {
                continue;
            }
            self.add_host_path(&lib)?;
        }
        Ok(())
    }

    /// `guest` with the image's own symlinks in its directories followed,
    /// so that a file added at `/lib/modules/...` lands under `/usr/lib`
    /// when `/lib` is a symlink in the image.
    fn resolve(&self, guest: &Path) -> PathBuf {
        let mut cur = PathBuf::from("/");
        let parts: Vec<Component> = guest.components().skip(1).collect();
        for (i, part) in parts.iter().enumerate() {
            let next = cur.join(part);
            match self.entries.get(&next) {
                Some(Entry::Symlink { target }) if i + 1 < parts.len() => {
                    let rest: PathBuf = parts[i + 1..].iter().collect();
                    return self.resolve(&normalize(&cur.join(target)).join(rest));
                }
                _ => cur = next,
            }
        }
        cur
    }

    /// Writes the archive; returns its size in bytes.
    pub fn write(&self, out: &Path) -> Result<u64> {
        let file = fs::File::create(out).with_context(|| format!("{}", out.display()))?;
        let mut w = Newc::new(BufWriter::new(file));
        for (path, entry) in &self.entries {
            let name = path.strip_prefix("/").expect("absolute guest path");
            if name.as_os_str().is_empty() {
                continue;
            }
            let name = name.to_str().context("non-UTF-8 guest path")?;
            match entry {
                Entry::Dir { mode } => {
                    w.entry(name, S_IFDIR | mode, 0, &mut io::empty(), (0, 0))?;
                }
                Entry::Bytes { data, mode } => {
                    w.entry(name, S_IFREG | mode, data.len(), &mut &data[..], (0, 0))?;
                }
                Entry::File { source, mode } => {
                    let mut f =
                        fs::File::open(source).with_context(|| format!("{}", source.display()))?;
                    let len = usize::try_from(f.metadata()?.size())?;
                    w.entry(name, S_IFREG | mode, len, &mut f, (0, 0))
                        .with_context(|| format!("packing {}", source.display()))?;
                }
                Entry::Symlink { target } => {
                    let t = target.to_str().context("non-UTF-8 symlink")?.as_bytes();
                    w.entry(name, S_IFLNK | 0o777, t.len(), &mut &t[..], (0, 0))?;
                }
                Entry::CharDev { major, minor } => {
                    w.entry(name, S_IFCHR | 0o600, 0, &mut io::empty(), (*major, *minor))?;
                }
            }
        }
        w.finish()
    }
}

/// Lexically removes `.` and `..` (symlink targets such as `../lib`).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for part in path.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(p) => out.push(p),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

fn is_elf(path: &Path) -> bool {
    use std::io::Read as _;
    let mut magic = [0u8; 4];
    fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| magic == *b"\x7fELF")
}

/// The absolute paths in `ldd` output (`libc.so.6 => /lib/... (0x...)`,
/// `/lib64/ld-linux-x86-64.so.2 (0x...)`); a library ldd could not find is
/// an error.
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        let path = match line.split_once(" => ") {
            Some((name, rest)) => {
                if rest.starts_with("not found") {
                    bail!("{name} not found");
                }
                rest.split(" (").next().unwrap_or_default()
            }
            None => line.split(" (").next().unwrap_or_default(),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// The "new ASCII" cpio format the kernel unpacks
/// (Documentation/driver-api/early-userspace/buffer-format.rst).
struct Newc<W: io::Write> {
    out: W,
    written: u64,
    ino: u32,
}

impl<W: io::Write> Newc<W> {
    fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            ino: 1,
        }
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - self.written % 4) % 4;
        self.put(&[0; 3][..usize::try_from(pad).expect("pad < 4")])
    }

    /// One entry: header, name, then exactly `len` bytes from `data`.
    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        len: usize,
        data: &mut dyn io::Read,
        (rmajor, rminor): (u32, u32),
    ) -> Result<()> {
        let len32 = u32::try_from(len).context("file larger than 4 GiB")?;
        let nlink = if mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
        let namesize = u32::try_from(name.len() + 1)?;
        let fields = [
            self.ino, mode, 0, 0, nlink, 0, len32, 0, 0, rmajor, rminor, namesize, 0,
        ];
        self.ino += 1;
        let mut header = String::from("070701");
        for f in fields {
            let _ = write!(header, "{f:08x}");
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        let mut limited = <&mut dyn io::Read as io::Read>::take(data, len as u64);
        let copied = io::copy(&mut limited, &mut self.out)?;
        self.written += copied;
        if copied != len as u64 {
            bail!("{name}: {copied} bytes read, {len} expected (file changed while packing?)");
        }
        self.pad()?;
        Ok(())
    }

    fn finish(mut self) -> Result<u64> {
        self.entry("TRAILER!!!", 0, 0, &mut io::empty(), (0, 0))?;
        self.out.flush()?;
        Ok(self.written)
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::{Entry, Image, Newc, normalize, parse_ldd};

    #[test]
    fn ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
    }

    #[test]
    fn symlink_targets_are_normalized() {
        assert_eq!(
            normalize(Path::new("/usr/sbin/../lib/./x")),
            Path::new("/usr/lib/x")
        );
    }

    #[test]
    fn files_follow_the_images_directory_symlinks() {
        let mut image = Image::new();
        image.entries.insert(
            "/lib".into(),
            Entry::Symlink {
                target: "usr/lib".into(),
            },
        );
        image.add_bytes("/lib/modules/x/modules.dep", "", 0o644);
        assert!(image.entries.contains_key(Path::new("/usr/lib/modules/x")));
        assert!(
            image
                .entries
                .contains_key(Path::new("/usr/lib/modules/x/modules.dep"))
        );
        // Directories come before their contents.
        let order: Vec<_> = image.entries.keys().collect();
        let dir = order
            .iter()
            .position(|p| *p == Path::new("/usr/lib"))
            .unwrap();
        let file = order
            .iter()
            .position(|p| *p == Path::new("/usr/lib/modules/x/modules.dep"))
            .unwrap();
        assert!(dir < file);
    }

    #[test]
    fn newc_layout() {
        let mut out = Vec::new();
        let mut w = Newc::new(&mut out);
        w.entry("ab", 0o100_644, 3, &mut &b"xyz"[..], (0, 0))
            .unwrap();
        let len = w.finish().unwrap();
        assert_eq!(usize::try_from(len).unwrap(), out.len());
        assert_eq!(len % 4, 0);
        let header = std::str::from_utf8(&out[..110]).unwrap();
        assert!(header.starts_with("070701"));
        // mode, then file size 3, then name size 3 ("ab\0").
        assert_eq!(&header[14..22], "000081a4");
        assert_eq!(&header[54..62], "00000003");
        assert_eq!(&header[94..102], "00000003");
        // Name padded to a multiple of 4 (110 + 3 -> 116), then the data.
        assert_eq!(&out[110..113], b"ab\0");
        assert_eq!(&out[116..119], b"xyz");
        assert!(out[120..].windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
