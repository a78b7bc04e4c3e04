//! cgroup v2 discovery and the start-up checks that turn a missing privilege,
//! mount or kernel feature into one clear sentence instead of an errno.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Oldest kernel with every hook and helper the programs use
/// (`bpf_get_netns_cookie` in sock_ops arrived in 5.15).
pub const MIN_KERNEL: (u32, u32) = (5, 15);

/// Why the agent cannot run on this host.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// No cgroup2 filesystem is mounted.
    #[error(
        "no cgroup2 filesystem is mounted (checked /proc/self/mountinfo); nodemesh attaches its programs to cgroup v2: mount one with `mount -t cgroup2 none /sys/fs/cgroup` or boot with systemd.unified_cgroup_hierarchy=1"
    )]
    NoCgroup2,
    /// The kernel is too old for the programs.
    #[error("kernel {release} is too old: nodemesh needs Linux {}.{} or newer", MIN_KERNEL.0, MIN_KERNEL.1)]
    OldKernel {
        /// `uname -r`.
        release: String,
    },
    /// The process lacks capabilities it needs.
    #[error(
        "missing capabilities {missing}: run mesh-agent as root or grant CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_SYS_PTRACE"
    )]
    Capabilities {
        /// Names of the missing capabilities.
        missing: String,
    },
    /// A file the checks read could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: &'static str,
        /// The I/O error.
        source: io::Error,
    },
}

/// Where cgroup v2 is mounted on this host (`/sys/fs/cgroup` on pure v2 hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup2 {
    /// The mount point.
    pub mount: PathBuf,
}

impl Cgroup2 {
    /// Finds the cgroup2 mount from `/proc/self/mountinfo`.
    pub fn detect() -> Result<Self, PreflightError> {
        let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| {
            PreflightError::Read {
                path: "/proc/self/mountinfo",
                source,
            }
        })?;
        parse_mountinfo(&text)
            .map(|mount| Cgroup2 { mount })
            .ok_or(PreflightError::NoCgroup2)
    }

    /// An absolute path for `path`, which may be relative to the mount.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.mount.join(path)
        }
    }

    /// The cgroup this process belongs to (from `/proc/self/cgroup`).
    pub fn own_cgroup(&self) -> io::Result<PathBuf> {
        let text = std::fs::read_to_string("/proc/self/cgroup")?;
        let relative = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or_else(|| io::Error::other("no cgroup v2 entry in /proc/self/cgroup"))?;
        Ok(self.mount.join(relative.trim_start_matches('/')))
    }
}

/// The kernel's cgroup id for a cgroup directory: its inode on cgroup2, the
/// same number `bpf_get_current_cgroup_id` returns.
pub fn cgroup_id(dir: &Path) -> io::Result<u64> {
    if !dir.join("cgroup.procs").exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} is not a cgroup v2 directory", dir.display()),
        ));
    }
    Ok(std::fs::metadata(dir)?.ino())
}

/// The first cgroup2 mount point in a mountinfo text.
pub fn parse_mountinfo(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(unescape_octal(mount_point)))
    })
}

/// mountinfo escapes spaces and friends as `\040`; other bytes (UTF-8 included) pass through.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `major.minor` from a kernel release string.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Checks kernel version and capabilities before touching the kernel.
pub fn preflight() -> Result<Cgroup2, PreflightError> {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    match kernel_version(&release) {
        Some(v) if v >= MIN_KERNEL => {}
        _ => return Err(PreflightError::OldKernel { release }),
    }
    let status =
        std::fs::read_to_string("/proc/self/status").map_err(|source| PreflightError::Read {
            path: "/proc/self/status",
            source,
        })?;
    let missing = missing_capabilities(&status);
    if !missing.is_empty() {
        return Err(PreflightError::Capabilities {
            missing: missing.join(", "),
        });
    }
    Cgroup2::detect()
}

/// Capabilities the agent needs that `CapEff` in a `/proc/PID/status` text lacks.
pub fn missing_capabilities(status: &str) -> Vec<&'static str> {
    const NEEDED: [(&str, u32); 4] = [
        ("CAP_NET_ADMIN", 12),
        ("CAP_SYS_ADMIN", 21),
        ("CAP_SYS_PTRACE", 19),
        ("CAP_BPF", 39),
    ];
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    NEEDED
        .iter()
        .filter(|(_, bit)| eff & (1u64 << bit) == 0)
        .map(|(name, _)| *name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_and_pure_layouts() {
        let hybrid = "35 25 0:30 / /sys/fs/cgroup/memory rw,relatime shared:14 - cgroup cgroup rw,memory\n\
                      36 25 0:31 / /sys/fs/cgroup/unified rw,relatime shared:15 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_mountinfo(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pure =
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(parse_mountinfo(pure), Some(PathBuf::from("/sys/fs/cgroup")));
        let spaced = "30 23 0:26 / /mnt/my\\040cg\u{e9} rw - cgroup2 none rw\n";
        assert_eq!(
            parse_mountinfo(spaced),
            Some(PathBuf::from("/mnt/my cg\u{e9}"))
        );
        assert_eq!(
            parse_mountinfo("22 1 0:5 / /proc rw - proc proc rw\n"),
            None
        );
    }

    #[test]
    fn kernel_versions() {
        assert_eq!(kernel_version("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(kernel_version("5.4.0-150-generic"), Some((5, 4)));
        assert!(kernel_version("5.4.0").unwrap() < MIN_KERNEL);
        assert_eq!(kernel_version("garbage"), None);
    }

    #[test]
    fn capabilities_from_status() {
        assert!(missing_capabilities("CapEff:\t000001ffffffffff\n").is_empty());
        assert_eq!(
            missing_capabilities("CapEff:\t0000000000000000\n"),
            vec![
                "CAP_NET_ADMIN",
                "CAP_SYS_ADMIN",
                "CAP_SYS_PTRACE",
                "CAP_BPF"
            ]
        );
    }
}
