//! Builds the eBPF object (unless `NODEMESH_EBPF_OBJECT` names a prebuilt one) so the
//! agent embeds it and ships as a single binary, and generates the gRPC client and
//! server of Istio's certificate API from Rust definitions (no protoc needed).
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
    generate_istio_certificate_service();
}

/// `istio.v1.auth.IstioCertificateService/CreateCertificate`, whose messages are
/// written by hand in `src/identity/istio_ca.rs` (two messages, four fields).
fn generate_istio_certificate_service() {
    let create_certificate = tonic_build::manual::Method::builder()
        .name("create_certificate")
        .route_name("CreateCertificate")
        .input_type("crate::identity::istio_ca::IstioCertificateRequest")
        .output_type("crate::identity::istio_ca::IstioCertificateResponse")
        .codec_path("tonic_prost::ProstCodec")
        .build();
    let service = tonic_build::manual::Service::builder()
        .name("IstioCertificateService")
        .package("istio.v1.auth")
        .method(create_certificate)
        .build();
    tonic_build::manual::Builder::new().compile(&[service]);
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
