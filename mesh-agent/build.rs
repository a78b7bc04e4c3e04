//! Builds the eBPF object (unless `NODEMESH_EBPF_OBJECT` names a prebuilt one) so the
//! agent embeds it and ships as a single binary.
//!
//! BPF targets are Tier 3 and rustup has no `rust-src` here, so the object is built with
//! Debian's rustc (which ships `core` for `bpfel-unknown-none`) and bpf-linker; `cargo
//! xtask setup` installs both.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=NODEMESH_EBPF_OBJECT");
    println!("cargo:rerun-if-env-changed=NODEMESH_BPF_RUSTC");
    let object = match std::env::var_os("NODEMESH_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => build_ebpf(),
    };
    println!("cargo:rerun-if-changed={}", object.display());
    println!("cargo:rustc-env=MESH_EBPF_OBJECT={}", object.display());
}

fn build_ebpf() -> PathBuf {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap();
    let ebpf = root.join("mesh-ebpf");
    for dir in [ebpf.join("src"), root.join("mesh-common/src")] {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        ebpf.join("Cargo.toml").display()
    );
    let rustc = std::env::var("NODEMESH_BPF_RUSTC").unwrap_or_else(|_| "/usr/bin/rustc".into());
    if !Path::new(&rustc).exists() {
        panic!("{rustc} not found: the eBPF programs need Debian's rustc; run `cargo xtask setup`");
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&ebpf)
        .args(["build", "--release", "--target", "bpfel-unknown-none"])
        .env("RUSTC", &rustc)
        .env("RUSTC_BOOTSTRAP", "aya_ebpf");
    // The outer build's settings (clippy's wrapper, host flags, its target dir) must not leak in.
    for var in [
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("running cargo for mesh-ebpf");
    if !status.success() {
        panic!("building mesh-ebpf failed (is bpf-linker installed? run `cargo xtask setup`)");
    }
    ebpf.join("target/bpfel-unknown-none/release/mesh-ebpf")
}
