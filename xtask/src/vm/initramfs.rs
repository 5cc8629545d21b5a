//! The guest's root filesystem as an initramfs (a newc cpio archive, uncompressed: the kernel
//! unpacks it faster than it inflates it under emulation). Host binaries come with the shared
//! libraries `ldd` lists, at the same paths.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

enum Node {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
}

#[derive(Default)]
pub struct Initramfs {
    nodes: BTreeMap<String, Node>,
}

impl Initramfs {
    pub fn new() -> Initramfs {
        let mut fs = Initramfs::default();
        for dir in [
            "bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "run", "root", "lib", "lib64",
            "usr/bin", "usr/sbin", "usr/lib", "var",
        ] {
            fs.dir(dir);
        }
        fs.symlink("var/run", "/run");
        fs
    }

    /// A directory and its parents.
    pub fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        let mut at = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            self.nodes.entry(at.clone()).or_insert(Node::Dir);
        }
    }

    fn parent(&mut self, path: &str) {
        if let Some((dir, _)) = path.trim_matches('/').rsplit_once('/') {
            self.dir(dir);
        }
    }

    pub fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        self.parent(path);
        self.nodes
            .insert(path.trim_matches('/').to_owned(), Node::File { data, mode });
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.parent(path);
        self.nodes.insert(
            path.trim_matches('/').to_owned(),
            Node::Symlink(target.to_owned()),
        );
    }

    /// A host file at `path` in the guest.
    pub fn copy(&mut self, path: &str, from: &Path) -> anyhow::Result<()> {
        let data = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(from)?.permissions());
        self.file(path, data, mode & 0o7777);
        Ok(())
    }

    /// A host program, at `path` in the guest, with the shared libraries it links.
    pub fn program(&mut self, path: &str, from: &Path) -> anyhow::Result<()> {
        self.copy(path, from)?;
        self.libraries(from)
    }

    /// The shared libraries (and the dynamic loader) `ldd` lists for a host binary.
    pub fn libraries(&mut self, binary: &Path) -> anyhow::Result<()> {
        let out = Command::new("ldd").arg(binary).output().context("ldd")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if text.contains("not a dynamic executable") || text.contains("statically linked") {
            return Ok(());
        }
        for line in text.lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            let Some(path) = path.filter(|p| p.starts_with('/')) else {
                continue;
            };
            if self.nodes.contains_key(path.trim_start_matches('/')) {
                continue;
            }
            let real = std::fs::canonicalize(path)?;
            self.copy(path, &real)?;
        }
        Ok(())
    }

    /// Writes the archive.
    pub fn write(self, to: &Path) -> anyhow::Result<PathBuf> {
        use cpio::newc::{Builder, ModeFileType};
        let file =
            std::fs::File::create(to).with_context(|| format!("creating {}", to.display()))?;
        let mut entries = Vec::new();
        for (ino, (path, node)) in self.nodes.into_iter().enumerate() {
            let builder = Builder::new(&path).ino(ino as u32 + 1).uid(0).gid(0);
            let (builder, data) = match node {
                Node::Dir => (
                    builder
                        .mode(0o755)
                        .set_mode_file_type(ModeFileType::Directory)
                        .nlink(2),
                    Vec::new(),
                ),
                Node::File { data, mode } => (
                    builder
                        .mode(mode)
                        .set_mode_file_type(ModeFileType::Regular)
                        .nlink(1),
                    data,
                ),
                Node::Symlink(target) => (
                    builder
                        .mode(0o777)
                        .set_mode_file_type(ModeFileType::Symlink)
                        .nlink(1),
                    target.into_bytes(),
                ),
            };
            entries.push((builder, std::io::Cursor::new(data)));
        }
        cpio::write_cpio(entries.into_iter(), std::io::BufWriter::new(file))?;
        Ok(to.to_path_buf())
    }
}
