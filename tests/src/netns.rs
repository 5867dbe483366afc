//! Network namespaces and veth pairs, removed when their guard drops.

use std::{
    fs::File,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};
use nix::sched::{CloneFlags, setns};

use crate::PREFIX;

/// A name no other test of this run uses: `mcrt-<pid>-<n>-<label>`.
pub fn unique_name(label: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{PREFIX}{}-{n}-{label}", std::process::id())
}

/// Runs a command and fails with its stderr when it does.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("starting {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A network namespace, deleted (with every interface in it) when dropped.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(label: &str) -> anyhow::Result<Self> {
        let name = unique_name(label);
        run("ip", &["netns", "add", &name])?;
        let netns = Self { name };
        // Interfaces created from here on use IPv6 addresses at once, instead of after a
        // second or more of duplicate address detection: the namespace's links are the test's
        // own veth pairs, where no address can clash.
        for scope in ["all", "default"] {
            netns.exec(
                "sysctl",
                &["-qw", &format!("net.ipv6.conf.{scope}.accept_dad=0")],
            )?;
        }
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, for `nsenter --net=`.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs `ip -n <name> args…`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs `program args…` inside the namespace (network namespace only, so bpffs stays
    /// visible).
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let net = format!("--net={}", self.path());
        let mut full = vec![net.as_str(), program];
        full.extend_from_slice(args);
        run("nsenter", &full)
    }

    /// Gives `interface` an address and brings it up.
    pub fn address(&self, interface: &str, cidr: &str) -> anyhow::Result<()> {
        self.ip(&["addr", "add", cidr, "dev", interface])?;
        self.ip(&["link", "set", interface, "up"])?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(error) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("cleanup: {error}");
        }
    }
}

/// Creates a veth pair with one end in each namespace.
pub fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str) -> anyhow::Result<()> {
    run(
        "ip",
        &[
            "link",
            "add",
            a_name,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            b_name,
            "netns",
            b.name(),
        ],
    )?;
    Ok(())
}

/// Runs `f` on a thread that has entered `netns`; sockets it opens live in that namespace.
pub fn in_netns<T: Send>(netns: &Netns, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let file = File::open(netns.path()).with_context(|| format!("opening {}", netns.path()))?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                setns(&file, CloneFlags::CLONE_NEWNET).context("entering the namespace")?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the thread inside {} panicked", netns.name()))?
    })
}
