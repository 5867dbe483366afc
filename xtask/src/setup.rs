//! `cargo xtask setup`: brings a bare machine to the point where MCR builds and its tests run.
//!
//! Each step checks first and does nothing when its tool is already there, so running it
//! before every build costs seconds.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{output, run};

/// Debian packages the tests, the demonstration and the benchmark use.
const DEBIAN_PACKAGES: [&str; 10] = [
    "bpftool",     // map inspection in the tests
    "iproute2",    // namespaces and veth pairs
    "util-linux",  // nsenter
    "nftables",    // kernel-side packet counters at the benchmark sink
    "ethtool",     // no UDP segmentation offload on relays' veths (bench/topology.rs)
    "smcroute",    // the kernel's multicast forwarding, the benchmark's reference
    "socat",       // the user-space reference relay
    "netsniff-ng", // trafgen, the benchmark's generator
    "tcpdump",     // debugging captures
    // Prometheus's own parser of the exposition formats, for the metrics endpoint's tests.
    "python3-prometheus-client",
];

/// bpf-linker version known to build against rustc's LLVM here.
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn ensure_all() -> anyhow::Result<()> {
    nightly_rust_src()?;
    bpf_linker()?;
    debian_packages(&DEBIAN_PACKAGES)?;
    eprintln!("xtask: setup complete");
    Ok(())
}

/// The eBPF crate builds with `-Z build-std=core`, which needs the nightly's library sources.
fn nightly_rust_src() -> anyhow::Result<()> {
    let Some(sysroot) = nightly_sysroot() else {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
        return Ok(());
    };
    if !Path::new(sysroot.trim())
        .join("lib/rustlib/src/rust/library")
        .exists()
    {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn nightly_sysroot() -> Option<String> {
    output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
}

/// bpf-linker must use the same LLVM as the nightly rustc that emits the bitcode. No prebuilt
/// binary can be downloaded and the distribution's LLVM is older, so it is built against the
/// `libLLVM` that the nightly toolchain ships, through a minimal LLVM prefix that points at it.
fn bpf_linker() -> anyhow::Result<()> {
    let sysroot = PathBuf::from(nightly_sysroot().context("no nightly toolchain")?.trim());
    let libllvm = find_libllvm(&sysroot.join("lib"))?;
    let soname = libllvm
        .file_name()
        .context("libLLVM path has no file name")?
        .to_string_lossy()
        .into_owned();
    let verbose = output(Command::new("rustc").args(["+nightly", "-vV"])).unwrap_or_default();
    let llvm_major = verbose
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|version| version.split('.').next())
        .context("rustc +nightly -vV does not name its LLVM version")?
        .to_owned();

    let prefix = cache_dir()?.join("rust-llvm");
    let stamp = prefix.join("built-for");
    let wanted = format!("{BPF_LINKER_VERSION} {soname}");
    let linker_runs = output(Command::new("bpf-linker").arg("--version")).is_some();
    if linker_runs && fs::read_to_string(&stamp).is_ok_and(|built| built.trim() == wanted) {
        return Ok(());
    }

    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against {soname} (a few minutes)");
    fs::create_dir_all(prefix.join("bin"))?;
    fs::create_dir_all(prefix.join("lib"))?;
    // bpf-linker's build script only asks llvm-config for the version and the library dir.
    let llvm_config = prefix.join("bin/llvm-config");
    fs::write(&llvm_config, format!("#!/bin/sh\necho {llvm_major}.1.0\n"))?;
    set_executable(&llvm_config)?;
    for link in [
        prefix.join("lib/libLLVM.so"),
        prefix.join("lib").join(&soname),
    ] {
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{llvm_major}"))
        .env("LLVM_PREFIX", &prefix))?;
    if output(Command::new("bpf-linker").arg("--version")).is_none() {
        bail!("bpf-linker was built but does not run (is ~/.cargo/bin on PATH?)");
    }
    fs::write(&stamp, wanted)?;
    Ok(())
}

fn find_libllvm(lib_dir: &Path) -> anyhow::Result<PathBuf> {
    let entries =
        fs::read_dir(lib_dir).with_context(|| format!("reading {}", lib_dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if name.starts_with("libLLVM.so.") {
            return Ok(path);
        }
    }
    bail!("no libLLVM.so.* in {}", lib_dir.display())
}

fn cache_dir() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".cache/mcr"))
}

fn set_executable(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", path.display()))
}

/// Installs those of `packages` that are not installed.
pub fn debian_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
                .is_some_and(|status| status.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}
