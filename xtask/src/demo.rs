//! `cargo xtask demo`: MCR running in network namespaces with a rules file from `examples/`,
//! fed by a generator, with `mcr stats` shown while the streams run and what the sink
//! received at the end.

use std::{
    net::Ipv4Addr,
    path::Path,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use mcr_tests::{Lab, Mcr, Receiver, SINK, Stream, send_udp};

use crate::build_mcr;

/// Packets per burst of each stream; a burst every 100 ms makes about 1000 packets/s.
const BURST: u64 = 100;

pub fn run(rules: &Path, seconds: u64) -> anyhow::Result<()> {
    let rules = rules
        .canonicalize()
        .with_context(|| format!("rules file {}", rules.display()))?;
    let mcr_bin = build_mcr()?;
    // SAFETY: nothing else runs yet; the harness reads MCR_BIN to find the binary.
    unsafe { std::env::set_var("MCR_BIN", &mcr_bin) };

    let lab = Lab::new()?;
    println!(
        "demo: generator {} -> relay {} -> sink {}",
        lab.generator.name(),
        lab.relay.name(),
        lab.sink.name()
    );
    let mcr = Mcr::start(&lab.relay, &rules)?;
    println!(
        "demo: mcr run --config {} (pid {:?})",
        rules.display(),
        mcr.pid()
    );

    // What examples/demo.yaml publishes towards the sink.
    let camera_1_group = Receiver::start(&lab.sink, Some(Ipv4Addr::new(239, 2, 2, 1)), SINK, 6000)?;
    let camera_1_unicast = Receiver::start(&lab.sink, None, SINK, 7000)?;
    let camera_2_group = Receiver::start(&lab.sink, Some(Ipv4Addr::new(239, 2, 2, 2)), SINK, 6000)?;

    let stop = AtomicBool::new(false);
    let sent = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let sender = scope.spawn(|| -> anyhow::Result<()> {
            let camera_1 = Stream::new(Ipv4Addr::new(239, 1, 1, 1), 5000, 1000, BURST);
            let camera_2 = Stream::new(Ipv4Addr::new(239, 1, 1, 2), 5000, 1000, BURST);
            while !stop.load(Ordering::Relaxed) {
                send_udp(&lab.generator, &camera_1)?;
                send_udp(&lab.generator, &camera_2)?;
                sent.fetch_add(BURST, Ordering::Relaxed);
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

    let sent = sent.load(Ordering::Relaxed);
    println!("\ndemo: each stream sent {sent} packets of 1000 bytes; the sink received:");
    for (what, receiver) in [
        ("camera-1 on 239.2.2.1:6000", camera_1_group),
        ("camera-1 on 10.2.0.2:7000 (unicast)", camera_1_unicast),
        ("camera-2 on 239.2.2.2:6000", camera_2_group),
    ] {
        let received = receiver.finish()?;
        let from: Vec<String> = received
            .first()
            .map(|d| vec![d.source.ip().to_string(), format!("TTL {}", d.ttl)])
            .unwrap_or_default();
        println!(
            "  {what:<38} {:>6} packets  (from {})",
            received.len(),
            from.join(", ")
        );
    }
    println!("\ndemo: stopping mcr and removing the namespaces");
    drop(mcr);
    Ok(())
}
