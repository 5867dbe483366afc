//! `cargo xtask demo`: MCR running in network namespaces with a rules file from `examples/`,
//! fed by a generator, with `mcr stats` shown while the streams run.

use std::{
    net::Ipv4Addr,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use mcr_tests::{Mcr, Netns, Stream, send_udp, veth};

use crate::build_mcr;

pub fn run(rules: &Path, seconds: u64) -> anyhow::Result<()> {
    let rules = rules
        .canonicalize()
        .with_context(|| format!("rules file {}", rules.display()))?;
    let mcr_bin = build_mcr()?;
    // The harness runs the binary named by MCR_BIN.
    // SAFETY: single-threaded at this point; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("MCR_BIN", &mcr_bin) };

    let generator = Netns::new("demo-gen")?;
    let relay = Netns::new("demo-relay")?;
    let sink = Netns::new("demo-sink")?;
    veth(&generator, "gen0", &relay, "in0")?;
    veth(&relay, "out0", &sink, "sink0")?;
    generator.address("gen0", "10.1.0.1/24")?;
    generator.ip(&["route", "add", "224.0.0.0/4", "dev", "gen0"])?;
    relay.address("in0", "10.1.0.2/24")?;
    relay.address("out0", "10.2.0.1/24")?;
    sink.address("sink0", "10.2.0.2/24")?;
    println!(
        "demo: namespaces {} -> {} -> {}",
        generator.name(),
        relay.name(),
        sink.name()
    );

    let mcr = Mcr::start(&relay, &rules)?;
    println!(
        "demo: mcr run --config {} (pid {:?})",
        rules.display(),
        mcr.pid()
    );

    let stop = AtomicBool::new(false);
    let started = Instant::now();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let sender = scope.spawn(|| -> anyhow::Result<()> {
            // 1000-byte payloads, about a thousand packets a second per stream.
            let camera_1 = Stream::new(Ipv4Addr::new(239, 1, 1, 1), 5000, 1000, 100);
            let camera_2 = Stream::new(Ipv4Addr::new(239, 1, 1, 2), 5000, 1000, 100);
            while !stop.load(Ordering::Relaxed) {
                send_udp(&generator, &camera_1)?;
                send_udp(&generator, &camera_2)?;
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        });
        while started.elapsed() < Duration::from_secs(seconds) {
            std::thread::sleep(Duration::from_secs(2));
            println!("\n$ mcr stats   (after {} s)", started.elapsed().as_secs());
            print!("{}", mcr.cli(&["stats"])?);
        }
        stop.store(true, Ordering::Relaxed);
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("the sender panicked"))?
    })?;
    println!("\ndemo: stopping mcr and removing the namespaces");
    drop(mcr);
    Ok(())
}
