//! `cargo xtask setup|build|test|demo|bench|scale`: installs the toolchain, builds the eBPF
//! object and the agent, and runs the suite or the demo. Every step is
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
/// container runtime does), Python's venv for `kubernetes-validate`, and the
/// benchmark's sidecar baseline (haproxy).
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
    /// Build, then run a small local mesh, send traffic through it, show the debug views.
    Demo,
    /// Build, then measure the mesh against no mesh and a sidecar pair (see docs/performance.md).
    Bench {
        /// Shorter runs (under two minutes) for quick comparisons.
        #[arg(long)]
        quick: bool,
        /// Only the paths whose name contains this text (repeatable).
        #[arg(long)]
        only: Vec<String>,
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
        Cmd::Build => build(&root).map(|_| ()),
        Cmd::Test { args } => test(&root, &args),
        Cmd::Demo => demo(&root),
        Cmd::Bench { quick, only } => bench(&root, quick, &only),
        Cmd::Scale { args } => scale(&root, &args),
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

fn setup(root: &Path) -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
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

fn build(root: &Path) -> anyhow::Result<Built> {
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
    status(
        cargo()
            .current_dir(root)
            .args(["build", "--release", "--bins"])
            .args([
                "-p",
                "mesh-agent",
                "-p",
                "nodemesh-tests",
                "-p",
                "nodemesh-bench",
            ])
            .env("NODEMESH_EBPF_OBJECT", &ebpf_object),
    )?;
    let release_dir = root.join("target/release");
    Ok(Built {
        ebpf_object,
        agent: release_dir.join("mesh-agent"),
        release_dir,
    })
}

fn test(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let built = build(root)?;
    // --all-targets: unit, integration and binary tests (no doctests: there are none,
    // and an empty doctest run would be the last word of the log).
    let mut child = cargo()
        .current_dir(root)
        .args(["test", "--release", "--workspace", "--all-targets", "--"])
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

fn bench(root: &Path, quick: bool, only: &[String]) -> anyhow::Result<()> {
    let built = build(root)?;
    let mut cmd = Command::new(built.release_dir.join("nodemesh-bench"));
    if quick {
        cmd.arg("--quick");
    }
    for path in only {
        cmd.args(["--only", path]);
    }
    status(
        cmd.current_dir(root)
            .env("NODEMESH_AGENT_BIN", &built.agent)
            .env("NODEMESH_PODTOOL_BIN", built.release_dir.join("podtool"))
            .env("NODEMESH_LOADGEN_BIN", built.release_dir.join("loadgen")),
    )
}

fn scale(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let built = build(root)?;
    status(
        Command::new(built.release_dir.join("kube-scale"))
            .args(args)
            .current_dir(root)
            .env("NODEMESH_AGENT_BIN", &built.agent)
            .env("NODEMESH_PODTOOL_BIN", built.release_dir.join("podtool")),
    )
}

fn demo(root: &Path) -> anyhow::Result<()> {
    let built = build(root)?;
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
