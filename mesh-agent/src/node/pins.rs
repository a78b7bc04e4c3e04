//! Where the kernel side lives when no agent runs: pinned maps and links under
//! a bpffs directory, one subdirectory per program build ("generation"), so an
//! agent adopts exactly what its own build would have created and recognises
//! anything else as a different layout to take over.
//!
//! ```text
//! <root>/                        --bpf-dir, default /sys/fs/bpf/nodemesh
//!   <stamp>/maps/<MAP>           one per map in the object
//!   <stamp>/links/<hook>         connect4, connect6, sock_ops (on the attach cgroup)
//!   <stamp>/links/netns-<cookie> sk_lookup on one meshed pod's network namespace
//! ```

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// Where pinned objects live by default (the bpffs mount systemd creates).
pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/nodemesh";
/// `statfs` magic of a bpffs mount.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// The bpffs mount point the agent may create when a node has none.
const BPF_MOUNT: &str = "/sys/fs/bpf";

/// Why the pin directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The directory is not on bpffs and cannot be made so.
    #[error(
        "{0} is not on a BPF filesystem: mount one (`mount -t bpf bpf /sys/fs/bpf`) or pass a --bpf-dir below one"
    )]
    NotBpffs(PathBuf),
    /// A filesystem operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PinError + 'a {
    move |source| PinError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Makes sure `root` is a directory on bpffs, mounting bpffs at `/sys/fs/bpf`
/// when the node has none there (as Cilium does) and `root` is below it.
pub fn ensure_bpffs(root: &Path) -> Result<(), PinError> {
    let mut existing = root;
    while !existing.exists() {
        existing = existing
            .parent()
            .ok_or_else(|| PinError::NotBpffs(root.to_owned()))?;
    }
    if !is_bpffs(existing) {
        let mount = Path::new(BPF_MOUNT);
        if !root.starts_with(mount) || !mount.is_dir() {
            return Err(PinError::NotBpffs(root.to_owned()));
        }
        nix::mount::mount(
            Some("bpf"),
            mount,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| PinError::Io {
            what: "mounting bpffs at",
            path: mount.to_owned(),
            source: e.into(),
        })?;
        tracing::info!(path = BPF_MOUNT, "mounted a BPF filesystem");
    }
    std::fs::create_dir_all(root).map_err(io_err("creating", root))
}

/// A stamp of a program build: FNV-1a over the object's bytes, so any change to
/// the programs or map layouts gives a different generation directory.
pub fn stamp(object: &[u8]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in object {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// One generation's directories.
#[derive(Debug, Clone)]
pub struct Generation {
    /// `<root>/<stamp>`.
    pub dir: PathBuf,
}

impl Generation {
    /// The generation for `stamp` under `root` (not created).
    pub fn new(root: &Path, stamp: &str) -> Self {
        Generation {
            dir: root.join(stamp),
        }
    }

    /// Pin path of a map.
    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join("maps").join(name)
    }

    /// Pin path of a link.
    pub fn link(&self, name: &str) -> PathBuf {
        self.dir.join("links").join(name)
    }

    /// Pin path of a pod network namespace's `sk_lookup` link.
    pub fn netns_link(&self, cookie: u64) -> PathBuf {
        self.link(&format!("netns-{cookie}"))
    }

    /// Creates the directories.
    pub fn create(&self) -> Result<(), PinError> {
        for sub in ["maps", "links"] {
            let path = self.dir.join(sub);
            std::fs::create_dir_all(&path).map_err(io_err("creating", &path))?;
        }
        Ok(())
    }

    /// Netns cookies that have a pinned `sk_lookup` link.
    pub fn netns_links(&self) -> Vec<u64> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("links")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("netns-")?.parse().ok())
            .collect()
    }
}

/// Generation directories under `root` other than `stamp`: older (or newer)
/// builds' kernel state, to be taken over.
pub fn other_generations(root: &Path, stamp: &str) -> Vec<Generation> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut found: Vec<Generation> = entries
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .filter(|e| e.file_name() != stamp)
        .map(|e| Generation { dir: e.path() })
        .collect();
    found.sort_by(|a, b| a.dir.cmp(&b.dir));
    found
}

/// Removes a pinned tree (bpffs allows unlink and rmdir). Links and maps go
/// away once no process holds them either.
pub fn remove_tree(path: &Path) -> Result<(), PinError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(PinError::Io {
            what: "removing",
            path: path.to_owned(),
            source: e,
        }),
    }
}

/// Pinned objects under `root`, for the soak and crash tests' leak checks.
pub fn count_pins(root: &Path) -> usize {
    fn walk(path: &Path) -> usize {
        std::fs::read_dir(path)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| {
                        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                            walk(&e.path())
                        } else {
                            1
                        }
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(root)
}

/// Opens a pinned object (`BPF_OBJ_GET`); aya's link types do not lend their fd.
pub fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    /// `BPF_OBJ_GET` from `enum bpf_cmd`.
    const BPF_OBJ_GET: libc::c_long = 7;
    /// The `obj_get` member of `union bpf_attr`.
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let name = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = ObjGetAttr {
        pathname: name.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: bpf(2) reads the attribute struct and the NUL-terminated path it points to.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGetAttr,
            std::mem::size_of::<ObjGetAttr>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd the kernel just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Atomically replaces the program a bpf_link runs (`BPF_LINK_UPDATE`): the
/// hook is never without a program, which is how a new build takes over
/// capture from an older one. aya keeps this call to itself.
pub fn update_link_program(link: &impl AsFd, program: &impl AsFd) -> io::Result<()> {
    /// `BPF_LINK_UPDATE` from `enum bpf_cmd`.
    const BPF_LINK_UPDATE: libc::c_long = 29;
    /// The `link_update` member of `union bpf_attr`.
    #[repr(C)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr = LinkUpdateAttr {
        link_fd: link.as_fd().as_raw_fd() as u32,
        new_prog_fd: program.as_fd().as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: bpf(2) reads `size` bytes of a fully initialised attribute struct.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &attr as *const LinkUpdateAttr,
            std::mem::size_of::<LinkUpdateAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_changes_with_any_byte_of_the_object() {
        let a = stamp(b"programs v1");
        assert_eq!(a.len(), 16);
        assert_eq!(a, stamp(b"programs v1"));
        assert_ne!(a, stamp(b"programs v2"));
    }

    #[test]
    fn generation_paths_are_under_their_stamp() {
        let g = Generation::new(Path::new("/sys/fs/bpf/nodemesh"), "00ff");
        assert_eq!(
            g.map("WORKLOADS"),
            Path::new("/sys/fs/bpf/nodemesh/00ff/maps/WORKLOADS")
        );
        assert_eq!(
            g.netns_link(42),
            Path::new("/sys/fs/bpf/nodemesh/00ff/links/netns-42")
        );
    }

    #[test]
    fn other_generations_and_netns_links_are_read_from_the_tree() {
        let root = tempfile::tempdir().unwrap();
        let mine = Generation::new(root.path(), "aaaa");
        mine.create().unwrap();
        std::fs::write(mine.netns_link(7), b"").unwrap();
        std::fs::write(mine.link("connect4"), b"").unwrap();
        Generation::new(root.path(), "bbbb").create().unwrap();
        assert_eq!(mine.netns_links(), vec![7]);
        let others = other_generations(root.path(), "aaaa");
        assert_eq!(others.len(), 1);
        assert!(others[0].dir.ends_with("bbbb"));
        assert_eq!(count_pins(root.path()), 2);
    }
}
