//! `cargo xtask setup|build|test|demo|bench|scale|image`: installs the toolchain, builds the
//! eBPF object and the agent, and runs the suite or the demo, or makes the image. Every step is
//! idempotent and quick when there is nothing to do.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

/// Debian packages: Debian's rustc with `core` for bpfel-unknown-none (rustup has no
/// rust-src here, so `-Z build-std` is impossible), LLVM 22 for bpf-linker, the
/// tools the tests drive (ip, curl, tcpdump, openssl, kubectl for the manifests
/// in `deploy/`, the CNI `bridge` and `host-local` plugins that network pods as a
/// container runtime does), Python's venv for `kubernetes-validate`, a real
/// Prometheus (and promtool) that scrapes agents in the tests, and the
/// benchmark's sidecar baseline (haproxy) and system-call counter (perf).
const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "iproute2",
    "curl",
    "haproxy",
    "openssl",
    "tcpdump",
    "kubectl",
    "python3-venv",
    "containernetworking-plugins",
    "linux-perf",
    "prometheus",
];

/// `kubernetes-validate` (PyPI) checks the rendered manifests against the
/// Kubernetes schemas; it lives in a venv of its own under `target/`, as
/// Debian's Python is externally managed.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// Where `setup` installs `kubernetes-validate`.
fn kubernetes_validate(root: &Path) -> PathBuf {
    root.join("target/tools/venv/bin/kubernetes-validate")
}
const BPF_RUSTC: &str = "/usr/bin/rustc";
const BPF_LINKER_VERSION: &str = "0.13.0";

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: Debian packages and bpf-linker.
    Setup,
    /// Set up, then build the eBPF object and the agent (release) with it embedded.
    Build,
    /// Build, then run every unit and end-to-end test. Extra args go to the test binaries.
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then run Kubernetes mode on this machine (the API server double, pods made
    /// through the CNI chain, mTLS): a route split, a denial, the debug views, the metrics.
    Demo,
    /// Build, then measure the mesh against no mesh and a sidecar pair (see docs/performance.md).
    Bench {
        /// Shorter runs (under two minutes) for quick comparisons.
        #[arg(long)]
        quick: bool,
        /// Only the paths whose name contains this text (repeatable).
        #[arg(long)]
        only: Vec<String>,
        /// Write perf profiles of the proxies to this directory (the run's own
        /// figures then include perf's overhead; compare only unprofiled runs).
        #[arg(long)]
        profile: Option<PathBuf>,
    },
    /// Build, then make the OCI image of the agent and the CNI plugin with buildah
    /// (from scratch: the stripped binaries and the libraries `ldd` lists), and
    /// check it by running `mesh-agent --version` in it with podman.
    Image {
        /// The image name, in local container storage.
        #[arg(long, default_value = "localhost/nodemesh/mesh-agent:dev")]
        tag: String,
    },
    /// Build, then soak two nodes: 10,000 long-lived meshed connections and a
    /// steady stream of short ones through pod churn, config reloads, an agent
    /// upgrade and a kill -9. Writes target/soak/soak.md and soak.svg; fails on
    /// a leak or a lost byte. A short version runs in `cargo xtask test`.
    Soak {
        /// How long the load runs.
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Extra arguments for nodemesh-soak (e.g. `--connections 20000`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then measure the Kubernetes source at cluster scale (10,000 pods and
    /// 1,000 Services in the API server double): memory per pod and change latency.
    Scale {
        /// Extra arguments for kube-scale (e.g. `--pods 20000`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned();
    match Cli::parse().command {
        Cmd::Setup => setup(&root),
        Cmd::Image { tag } => image(&root, &tag),
        Cmd::Build => build(&root, Scope::Binaries).map(|_| ()),
        Cmd::Test { args } => test(&root, &args),
        Cmd::Demo => demo(&root),
        Cmd::Bench {
            quick,
            only,
            profile,
        } => bench(&root, quick, &only, profile.as_deref()),
        Cmd::Scale { args } => scale(&root, &args),
        Cmd::Soak { minutes, args } => soak(&root, minutes, &args),
    }
}

fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Installs the Debian packages of `packages` that are missing.
fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        if !is_root() {
            bail!(
                "missing Debian packages {missing:?}; run `cargo xtask setup` as root to install them"
            );
        }
        eprintln!("xtask: installing {missing:?}");
        status(Command::new("apt-get").arg("update").arg("-qq"))?;
        status(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    Ok(())
}

fn setup(root: &Path) -> anyhow::Result<()> {
    apt_install(APT_PACKAGES)?;
    if !Path::new(BPF_RUSTC).exists() {
        bail!("{BPF_RUSTC} is missing even though rustc-web is installed");
    }
    if which("bpf-linker").is_none() {
        eprintln!(
            "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
        );
        let path = format!(
            "/usr/lib/llvm-22/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        status(
            cargo()
                .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("PATH", path),
        )?;
    }
    let validate = kubernetes_validate(root);
    if !validate.exists() {
        let venv = root.join("target/tools/venv");
        eprintln!(
            "xtask: installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} into {}",
            venv.display()
        );
        status(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        status(
            Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "--disable-pip-version-check"])
                .arg(format!(
                    "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
                )),
        )?;
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn which(tool: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(tool)).find(|p| p.is_file())
}

/// Paths of what `build` produced.
struct Built {
    ebpf_object: PathBuf,
    agent: PathBuf,
    release_dir: PathBuf,
}

/// Which cargo targets `build` compiles.
#[derive(Clone, Copy)]
enum Scope {
    /// The programs only: what `build`, `bench`, `demo` and friends run.
    Binaries,
    /// Everything `cargo test --workspace --all-targets` runs, compiled once.
    /// Cargo turns on dev-dependencies' features (tokio's `test-util`, say)
    /// only when test targets are in the build, so building the binaries
    /// first and the tests after compiles every crate above tokio twice: twice
    /// the time and the disk (CI once ran out of disk doing so).
    Tests,
}

/// The targets `cargo xtask test` builds and then runs: one list for both
/// steps, so the test run never finds something the build step left out.
const TEST_TARGETS: [&str; 2] = ["--workspace", "--all-targets"];

fn build(root: &Path, scope: Scope) -> anyhow::Result<Built> {
    setup(root)?;
    let ebpf_dir = root.join("mesh-ebpf");
    let mut path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
        path = std::env::join_paths(dirs)?;
    }
    status(
        cargo()
            .current_dir(&ebpf_dir)
            .args(["build", "--release", "--target", "bpfel-unknown-none"])
            .env("RUSTC", BPF_RUSTC)
            .env("RUSTC_BOOTSTRAP", "aya_ebpf")
            .env("PATH", &path)
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR"),
    )?;
    let ebpf_object = ebpf_dir.join("target/bpfel-unknown-none/release/mesh-ebpf");
    let mut user_space = cargo();
    user_space.current_dir(root).args(["build", "--release"]);
    match scope {
        Scope::Binaries => user_space.args([
            "--bins",
            "-p",
            "mesh-agent",
            "-p",
            "nodemesh-tests",
            "-p",
            "nodemesh-bench",
        ]),
        Scope::Tests => user_space.args(TEST_TARGETS),
    };
    status(user_space.env("NODEMESH_EBPF_OBJECT", &ebpf_object))?;
    let release_dir = root.join("target/release");
    Ok(Built {
        ebpf_object,
        agent: release_dir.join("mesh-agent"),
        release_dir,
    })
}

fn test(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let built = build(root, Scope::Tests)?;
    // --all-targets: unit, integration and binary tests (no doctests: there are none,
    // and an empty doctest run would be the last word of the log).
    let mut child = cargo()
        .current_dir(root)
        .args(["test", "--release"])
        .args(TEST_TARGETS)
        .arg("--")
        .args(args)
        .env("NODEMESH_EBPF_OBJECT", &built.ebpf_object)
        .env("NODEMESH_AGENT_BIN", &built.agent)
        .env("NODEMESH_KUBERNETES_VALIDATE", kubernetes_validate(root))
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().expect("stdout is piped");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some((p, f)) = parse_test_result(&line) {
            passed += p;
            failed += f;
        }
    }
    let status = child.wait()?;
    println!("\nsummary: {passed} passed, {failed} failed");
    if !status.success() {
        bail!("tests failed: {status}");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// Counts from a libtest line such as `test result: ok. 14 passed; 0 failed; ...`.
fn parse_test_result(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let count = |word: &str| {
        rest.split(';')
            .find_map(|part| {
                part.trim()
                    .trim_start_matches(|c: char| !c.is_ascii_digit())
                    .strip_suffix(word)
            })
            .and_then(|n| n.trim().parse::<u64>().ok())
    };
    Some((count(" passed")?, count(" failed")?))
}

/// What `cargo xtask image` needs beyond the build: buildah makes the image,
/// podman and runc run it (runc, as crun refuses hybrid cgroup hosts).
const IMAGE_PACKAGES: &[&str] = &["buildah", "podman", "runc", "binutils"];

/// Both tools use the `vfs` storage driver: it works everywhere (overlay does
/// not inside every container), and an image is small.
const STORAGE: [&str; 2] = ["--storage-driver", "vfs"];

fn image(root: &Path, tag: &str) -> anyhow::Result<()> {
    let built = build(root, Scope::Binaries)?;
    apt_install(IMAGE_PACKAGES)?;
    let rootfs = root.join("target/image/rootfs");
    if rootfs.exists() {
        std::fs::remove_dir_all(&rootfs)?;
    }
    let bin = rootfs.join("usr/local/bin");
    std::fs::create_dir_all(&bin)?;
    let mut libraries = std::collections::BTreeSet::new();
    for name in ["mesh-agent", "nodemesh-cni"] {
        let from = built.release_dir.join(name);
        status(
            Command::new("strip")
                .arg("-o")
                .arg(bin.join(name))
                .arg(&from),
        )?;
        libraries.extend(shared_libraries(&from)?);
    }
    for lib in &libraries {
        let to = rootfs.join(lib.strip_prefix("/").unwrap_or(lib));
        std::fs::create_dir_all(to.parent().expect("a library path has a directory"))?;
        // Follows symlinks: the image holds the files themselves.
        std::fs::copy(lib, &to).with_context(|| format!("copying {}", lib.display()))?;
    }
    let buildah = || {
        let mut c = Command::new("buildah");
        c.args(STORAGE);
        c
    };
    let out = buildah().args(["from", "scratch"]).output()?;
    if !out.status.success() {
        bail!(
            "buildah from scratch: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let container = String::from_utf8(out.stdout)?.trim().to_owned();
    let made = (|| -> anyhow::Result<()> {
        status(
            buildah()
                .arg("copy")
                .arg(&container)
                .arg(&rootfs)
                .arg("/")
                .stdout(Stdio::null()),
        )?;
        status(buildah().args([
            "config",
            "--entrypoint",
            r#"["/usr/local/bin/mesh-agent"]"#,
            "--cmd",
            r#"["run", "--kubernetes"]"#,
            "--label",
            &format!("org.opencontainers.image.revision={}", git_rev(root)),
            "--label",
            "org.opencontainers.image.title=nodemesh node agent and CNI plugin",
            &container,
        ]))?;
        status(
            buildah()
                .args(["commit", "--quiet", &container, tag])
                .stdout(Stdio::null()),
        )
    })();
    let _ = buildah().args(["rm", &container]).output();
    made?;

    // The check: the agent and the plugin run in the image.
    let podman = |entrypoint: &str, args: &[&str], env: &[&str]| -> anyhow::Result<String> {
        let mut c = Command::new("podman");
        c.args(STORAGE)
            .args([
                "--runtime",
                "runc",
                "run",
                "--rm",
                "--pull=never",
                "--network=none",
            ])
            .args(["--cgroup-manager=cgroupfs", "--events-backend=file"])
            // Not above the limits this process has: raising them needs
            // CAP_SYS_RESOURCE, which a CI container may lack.
            .args([
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1024:1024",
            ])
            .arg(format!("--entrypoint={entrypoint}"));
        for e in env {
            c.args(["--env", e]);
        }
        let out = c.arg(tag).args(args).output()?;
        if !out.status.success() {
            bail!(
                "podman run {entrypoint} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let version = podman("/usr/local/bin/mesh-agent", &["--version"], &[])?;
    if !version.starts_with("mesh-agent ") {
        bail!("unexpected `mesh-agent --version` output: {version:?}");
    }
    let cni = podman("/usr/local/bin/nodemesh-cni", &[], &["CNI_COMMAND=VERSION"])?;
    if !cni.contains("supportedVersions") {
        bail!("unexpected `nodemesh-cni` VERSION output: {cni:?}");
    }
    let size = dir_size(&rootfs)?;
    println!(
        "built {tag} ({:.1} MB: mesh-agent, nodemesh-cni and {} libraries)\nin the image: {version}; nodemesh-cni VERSION: {cni}",
        size as f64 / 1e6,
        libraries.len()
    );
    Ok(())
}

/// The files of the shared libraries `binary` loads, its loader included (`ldd`).
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(binary).output()?;
    if !out.status.success() {
        bail!(
            "ldd {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"; linux-vdso has no file.
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => line.trim(),
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

fn dir_size(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

fn git_rev(root: &Path) -> String {
    Command::new("git")
        .current_dir(root)
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Builds the agent as a node runs it (`--profile dist`: one LTO unit), for
/// the figures that depend on the build: resident code is most of its idle RSS.
fn build_dist_agent(root: &Path, ebpf_object: &Path) -> anyhow::Result<PathBuf> {
    status(
        cargo()
            .current_dir(root)
            .args([
                "build",
                "--profile",
                "dist",
                "-p",
                "mesh-agent",
                "--bin",
                "mesh-agent",
            ])
            .env("NODEMESH_EBPF_OBJECT", ebpf_object),
    )?;
    Ok(root.join("target/dist/mesh-agent"))
}

fn bench(root: &Path, quick: bool, only: &[String], profile: Option<&Path>) -> anyhow::Result<()> {
    let built = build(root, Scope::Binaries)?;
    let agent = build_dist_agent(root, &built.ebpf_object)?;
    let mut cmd = Command::new(built.release_dir.join("nodemesh-bench"));
    if quick {
        cmd.arg("--quick");
    }
    if let Some(dir) = profile {
        cmd.arg("--profile").arg(root.join(dir));
    }
    for path in only {
        cmd.args(["--only", path]);
    }
    status(
        cmd.current_dir(root)
            .env("NODEMESH_AGENT_BIN", &agent)
            .env("NODEMESH_PODTOOL_BIN", built.release_dir.join("podtool"))
            .env("NODEMESH_LOADGEN_BIN", built.release_dir.join("loadgen")),
    )
}

fn scale(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let built = build(root, Scope::Binaries)?;
    status(
        Command::new(built.release_dir.join("kube-scale"))
            .args(args)
            .current_dir(root)
            .env("NODEMESH_AGENT_BIN", &built.agent)
            .env("NODEMESH_PODTOOL_BIN", built.release_dir.join("podtool")),
    )
}

fn soak(root: &Path, minutes: f64, args: &[String]) -> anyhow::Result<()> {
    let built = build(root, Scope::Binaries)?;
    status(
        Command::new(built.release_dir.join("nodemesh-soak"))
            .arg("--minutes")
            .arg(minutes.to_string())
            .args(args)
            .current_dir(root)
            .env("NODEMESH_AGENT_BIN", &built.agent)
            .env("NODEMESH_PODTOOL_BIN", built.release_dir.join("podtool")),
    )
}

fn demo(root: &Path) -> anyhow::Result<()> {
    let built = build(root, Scope::Binaries)?;
    status(
        Command::new(built.release_dir.join("nodemesh-demo"))
            .env("NODEMESH_AGENT_BIN", &built.agent)
            .env("NODEMESH_PODTOOL_BIN", built.release_dir.join("podtool")),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_libtest_summaries() {
        let ok = "test result: ok. 14 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 5.99s";
        assert_eq!(super::parse_test_result(ok), Some((14, 0)));
        let bad = "test result: FAILED. 10 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out";
        assert_eq!(super::parse_test_result(bad), Some((10, 1)));
        assert_eq!(super::parse_test_result("running 3 tests"), None);
    }
}
