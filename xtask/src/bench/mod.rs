//! `cargo xtask bench`: MCR next to the kernel's multicast forwarding and socat, in network
//! namespaces.

use clap::Args;

#[derive(Args)]
pub struct BenchArgs {
    /// A short run (under two minutes) that checks the benchmark still works.
    #[arg(long)]
    pub quick: bool,
}

pub fn run(_args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("the benchmark is not built yet")
}
