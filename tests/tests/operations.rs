//! Running MCR as a service: the metrics endpoint (scraped during traffic and parsed by
//! Prometheus's own Python parser, abused by slow, huge and malformed requests), the
//! readiness protocol systemd speaks with `Type=notify`, and journal priorities on log lines.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::unix::net::UnixDatagram,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use mcr_tests::{
    Datagram, Expected, Lab, Launch, Mcr, Netns, RELAY_OUT0, Receiver, RulesFile, SINK, Stream,
    assert_delivered, in_netns, mcr_binary, send_udp, unique_name, wait_for,
};

/// Debian's interpreter, which has `python3-prometheus-client` (installed by `cargo xtask
/// setup`); a `python3` earlier on the PATH may not.
const PYTHON: &str = "/usr/bin/python3";

/// Parses an exposition from standard input with the Prometheus client library's parser
/// (`OpenMetrics`, or the classic text format with `classic`) and prints its samples as JSON.
const PARSER: &str = r#"
import json, sys
if sys.argv[1] == "openmetrics":
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
else:
    from prometheus_client.parser import text_string_to_metric_families
samples = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for sample in family.samples:
        samples.append({"family": family.name, "type": family.type, "name": sample.name,
                        "labels": sample.labels, "value": sample.value})
json.dump(samples, sys.stdout)
"#;

const METRICS: &str = "127.0.0.1:9433";

/// An HTTP response as a client saw it.
struct HttpResponse {
    status: String,
    content_type: String,
    body: String,
}

/// Sends `request` to `address` inside `netns` and reads until the server closes.
fn http(netns: &Netns, address: &str, request: &[u8]) -> anyhow::Result<HttpResponse> {
    let address: SocketAddr = address.parse()?;
    let raw = in_netns(netns, || -> anyhow::Result<Vec<u8>> {
        let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(request)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        Ok(raw)
    })??;
    let text = String::from_utf8(raw).context("a response that is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of the response head: {text:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_once(' '))
        .map(|(_, status)| status.to_owned())
        .context("no status line")?;
    let content_type = lines
        .find_map(|line| line.strip_prefix("Content-Type: "))
        .unwrap_or_default()
        .to_owned();
    Ok(HttpResponse {
        status,
        content_type,
        body: body.to_owned(),
    })
}

/// The samples of one scrape, as the Python parser read them.
struct Scrape(Vec<serde_json::Value>);

impl Scrape {
    /// The value of sample `name` whose labels include `labels`; fails unless exactly one
    /// sample matches.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        let matching: Vec<&serde_json::Value> = self
            .0
            .iter()
            .filter(|sample| {
                sample["name"] == name
                    && labels
                        .iter()
                        .all(|(key, value)| sample["labels"][key] == *value)
            })
            .collect();
        ensure!(
            matching.len() == 1,
            "{} samples {name}{labels:?} in the scrape",
            matching.len()
        );
        matching[0]["value"]
            .as_f64()
            .with_context(|| format!("{name}{labels:?} has no number"))
    }

    /// [`Scrape::value`] of a sample that counts something: a whole number.
    fn count(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<u64> {
        let value = self.value(name, labels)?;
        format!("{value}")
            .parse()
            .with_context(|| format!("{name}{labels:?} is {value}, not a count"))
    }

    /// The sum of every sample `name`.
    fn sum(&self, name: &str) -> u64 {
        self.0
            .iter()
            .filter(|sample| sample["name"] == name)
            .filter_map(|sample| format!("{}", sample["value"].as_f64()?).parse::<u64>().ok())
            .sum()
    }

    fn family_type(&self, family: &str) -> Option<String> {
        self.0
            .iter()
            .find(|sample| sample["family"] == family)
            .and_then(|sample| sample["type"].as_str().map(str::to_owned))
    }
}

/// Parses `text` with the Python client library (`openmetrics` or `classic`).
fn parse_exposition(text: &str, format: &str) -> anyhow::Result<Scrape> {
    let mut child = Command::new(PYTHON)
        .args(["-c", PARSER, format])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {PYTHON}"))?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(text.as_bytes())?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!(
            "the {format} parser refused the exposition: {}\n{text}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(Scrape(serde_json::from_slice(&output.stdout)?))
}

/// Scrapes `address` asking for `OpenMetrics`, as Prometheus does, and parses the answer.
fn scrape_at(netns: &Netns, address: &str) -> anyhow::Result<Scrape> {
    let response = http(
        netns,
        address,
        b"GET /metrics HTTP/1.1\r\nHost: mcr\r\nAccept: application/openmetrics-text; \
          version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n\r\n",
    )?;
    ensure!(response.status == "200 OK", "scrape: {}", response.status);
    ensure!(
        response
            .content_type
            .starts_with("application/openmetrics-text; version=1.0.0"),
        "content type {}",
        response.content_type
    );
    parse_exposition(&response.body, "openmetrics")
}

fn metrics_rules(extra_settings: &str) -> String {
    format!(
        "settings:\n  workers: 2\n{extra_settings}rules:
  - name: kernel-cam
    path: kernel
    input: {{interface: in0, group: 239.1.1.1, port: 5000}}
    outputs:
      - {{interface: out0, destination: 239.2.2.1, port: 6000}}
  - name: worker-cam
    path: worker
    input: {{interface: in0, group: 239.1.1.2, port: 5000}}
    outputs:
      - {{interface: out0, destination: 239.2.2.2, port: 6000}}
  - name: later
    input: {{interface: in9, group: 239.1.1.3, port: 5000}}
    outputs:
      - {{interface: out0, destination: 239.2.2.3, port: 6000}}
"
    )
}

fn wait_until_active(mcr: &Mcr) -> anyhow::Result<()> {
    wait_for(Duration::from_secs(5), || {
        let stats = mcr.stats().ok()?;
        let path = |name: &str| {
            stats
                .iter()
                .find(|rule| rule["name"] == name)
                .map(|rule| rule["path"].clone())
        };
        (path("kernel-cam")? == "kernel" && path("worker-cam")? == "worker").then_some(())
    })
    .with_context(|| format!("rules never ran on their paths: {:?}", mcr.stats()))
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64())
}

/// Scrapes every 150 ms while `streams` are sent; returns what each scrape counted as
/// received over the rules `kernel-cam` and `worker-cam`.
fn scrape_during(lab: &Lab, streams: &[Stream]) -> anyhow::Result<Vec<u64>> {
    let mut seen = Vec::new();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let senders: Vec<_> = streams
            .iter()
            .map(|stream| scope.spawn(|| send_udp(&lab.generator, stream)))
            .collect();
        while senders.iter().any(|sender| !sender.is_finished()) {
            let scrape = scrape_at(&lab.relay, METRICS)?;
            seen.push(
                scrape.count("mcr_rule_received_packets_total", &[("rule", "kernel-cam")])?
                    + scrape.count("mcr_rule_received_packets_total", &[("rule", "worker-cam")])?,
            );
            std::thread::sleep(Duration::from_millis(150));
        }
        senders.into_iter().try_for_each(|sender| {
            sender
                .join()
                .map_err(|_| anyhow::anyhow!("sender panicked"))?
        })
    })?;
    Ok(seen)
}

/// Checks a rule's counters and its output's against what the sink `received`, and against
/// `mcr stats`.
fn check_rule_counters(
    scrape: &Scrape,
    mcr: &Mcr,
    (rule, input, output): (&str, &str, &str),
    received: &[Datagram],
) -> anyhow::Result<()> {
    let count = u64::try_from(received.len())?;
    let bytes = received
        .iter()
        .map(|datagram| datagram.payload.len() as u64)
        .sum::<u64>();
    let rule_labels = [("rule", rule), ("input", input)];
    let output_labels = [("rule", rule), ("output", output)];
    assert_eq!(
        scrape.count("mcr_rule_received_packets_total", &rule_labels)?,
        count
    );
    assert_eq!(
        scrape.count("mcr_rule_received_bytes_total", &rule_labels)?,
        bytes
    );
    assert_eq!(
        scrape.count("mcr_output_sent_packets_total", &output_labels)?,
        count
    );
    assert_eq!(
        scrape.count("mcr_output_sent_bytes_total", &output_labels)?,
        bytes
    );
    assert_eq!(
        scrape.count("mcr_output_send_errors_total", &output_labels)?,
        0
    );
    let dropped = [("rule", rule), ("output", output), ("reason", "queue_full")];
    assert_eq!(
        scrape.count("mcr_output_dropped_packets_total", &dropped)?,
        0
    );
    // The same numbers `mcr stats` shows: one snapshot, not a second set of counters.
    let stats = mcr.rule_stats(rule)?;
    assert_eq!(stats["rx_packets"].as_u64(), Some(count));
    assert_eq!(stats["outputs"][0]["tx_packets"].as_u64(), Some(count));
    Ok(())
}

/// Checks the states of rules and workers, and the classifier's skips, after the traffic.
fn check_states(scrape: &Scrape) -> anyhow::Result<()> {
    let path = |rule, path| scrape.count("mcr_rule_path", &[("rule", rule), ("path", path)]);
    assert_eq!(path("kernel-cam", "kernel")?, 1);
    assert_eq!(path("kernel-cam", "worker")?, 0);
    assert_eq!(path("worker-cam", "worker")?, 1);
    let state = |rule, state| scrape.count("mcr_rule_state", &[("rule", rule), ("state", state)]);
    assert_eq!(state("later", "waiting")?, 1);
    assert_eq!(state("later", "active")?, 0);
    assert_eq!(state("kernel-cam", "active")?, 1);
    assert_eq!(scrape.count("mcr_rules", &[("state", "active")])?, 2);
    assert_eq!(scrape.count("mcr_rules", &[("state", "waiting")])?, 1);
    // Only the worker path's packets reach the workers.
    assert_eq!(scrape.sum("mcr_worker_received_packets_total"), 2000);
    for worker in ["0", "1"] {
        let running = [("worker", worker), ("state", "running")];
        assert_eq!(scrape.count("mcr_worker_state", &running)?, 1);
        assert_eq!(
            scrape.count("mcr_worker_restarts_total", &[("worker", worker)])?,
            0
        );
        let kernel_drops = [("worker", worker), ("reason", "kernel_drops")];
        assert_eq!(
            scrape.count("mcr_worker_dropped_packets_total", &kernel_drops)?,
            0
        );
    }
    for reason in ["malformed", "fragments", "vlan", "bad_checksum"] {
        let labels = [("reason", reason)];
        assert_eq!(
            scrape.count("mcr_classifier_skipped_packets_total", &labels)?,
            0
        );
    }
    assert_eq!(
        scrape.family_type("mcr_rule_received_packets").as_deref(),
        Some("counter")
    );
    Ok(())
}

/// Checks the build information and the last reload; returns when the rules were applied.
fn check_build_and_config(scrape: &Scrape, started: f64) -> anyhow::Result<f64> {
    assert_eq!(scrape.family_type("mcr_build").as_deref(), Some("info"));
    let version = Command::new(mcr_binary()).arg("--version").output()?;
    let version = String::from_utf8_lossy(&version.stdout);
    let version = version.trim().rsplit(' ').next().unwrap_or_default();
    assert_eq!(scrape.count("mcr_build_info", &[("version", version)])?, 1);
    assert_eq!(scrape.count("mcr_config_last_reload_successful", &[])?, 1);
    let applied = scrape.value("mcr_config_last_reload_success_timestamp_seconds", &[])?;
    ensure!(
        (started - 1.0..=unix_now()).contains(&applied),
        "rules applied at {applied}, started at {started}"
    );
    Ok(applied)
}

#[test]
fn metrics_scraped_during_traffic_match_what_the_sink_received() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let file = RulesFile::new(&metrics_rules(&format!(
        "  metrics:\n    listen: {METRICS}\n"
    )))?;
    let started = unix_now();
    let mcr = Mcr::start(&lab.relay, file.path())?;
    wait_until_active(&mcr)?;

    let groups = [Ipv4Addr::new(239, 2, 2, 1), Ipv4Addr::new(239, 2, 2, 2)];
    let receivers = groups.map(|group| Receiver::start(&lab.sink, Some(group), SINK, 6000));
    // About 1.3 s each: 2000 datagrams in bursts of 32 every 20 ms.
    let streams = [
        Stream::new(Ipv4Addr::new(239, 1, 1, 1), 5000, 200, 2000).paced(Duration::from_millis(20)),
        Stream::new(Ipv4Addr::new(239, 1, 1, 2), 5000, 200, 2000).paced(Duration::from_millis(20)),
    ];
    let seen = scrape_during(&lab, &streams)?;
    ensure!(
        seen.len() >= 3,
        "only {} scrapes during the traffic",
        seen.len()
    );
    ensure!(
        seen.is_sorted(),
        "counters went backwards between scrapes: {seen:?}"
    );
    ensure!(
        seen.iter().any(|&value| value > 0 && value < 4000),
        "no scrape saw the traffic under way: {seen:?}"
    );

    let mut received = Vec::new();
    for ((receiver, stream), group) in receivers.into_iter().zip(&streams).zip(groups) {
        let datagrams = receiver?.finish()?;
        let expected = Expected {
            destination: group.into(),
            source: RELAY_OUT0.into(),
            ttl: 16,
        };
        assert_delivered(&datagrams, stream, expected)
            .with_context(|| format!("relay counters: {:?}", mcr.stats()))?;
        received.push(datagrams);
    }
    // Counters settle once the last packets are through; the endpoint's snapshots are at most
    // a quarter of a second old.
    let scrape = wait_for(Duration::from_secs(5), || {
        let scrape = scrape_at(&lab.relay, METRICS).ok()?;
        (scrape.sum("mcr_output_sent_packets_total") >= 4000).then_some(scrape)
    })
    .context("the output counters never reached what the sink received")?;
    let kernel = ("kernel-cam", "in0:239.1.1.1:5000", "out0:239.2.2.1:6000");
    check_rule_counters(&scrape, &mcr, kernel, &received[0])?;
    let worker = ("worker-cam", "in0:239.1.1.2:5000", "out0:239.2.2.2:6000");
    check_rule_counters(&scrape, &mcr, worker, &received[1])?;
    check_states(&scrape)?;
    let applied = check_build_and_config(&scrape, started)?;

    // A rejected file shows; the last success stays when it was.
    file.write("rules: [\n")?;
    let reload = mcr.cli_output(&["reload"])?;
    ensure!(!reload.status.success(), "a broken file was accepted");
    let rejected = wait_for(Duration::from_secs(3), || {
        let scrape = scrape_at(&lab.relay, METRICS).ok()?;
        (scrape
            .count("mcr_config_last_reload_successful", &[])
            .ok()?
            == 0)
            .then_some(scrape)
    })
    .context("the rejected reload never showed in the metrics")?;
    let still = rejected.value("mcr_config_last_reload_success_timestamp_seconds", &[])?;
    ensure!(
        still.to_bits() == applied.to_bits(),
        "the last success moved from {applied} to {still} with a rejected file"
    );
    // The rules before it still run, and are still counted.
    assert_eq!(rejected.count("mcr_rules", &[("state", "active")])?, 2);

    // Scrapers that do not ask for OpenMetrics get the classic text format.
    let classic = http(&lab.relay, METRICS, b"GET /metrics HTTP/1.0\r\n\r\n")?;
    ensure!(classic.status == "200 OK", "{}", classic.status);
    assert_eq!(
        classic.content_type,
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let classic = parse_exposition(&classic.body, "classic")?;
    assert_eq!(
        classic.count("mcr_rule_received_packets_total", &[("rule", "worker-cam")])?,
        2000
    );
    Ok(())
}

/// Holds a connection open by sending a request head one header line at a time, as a
/// slowloris client does; returns how long the server took to end it, and what it answered.
fn slow_client(netns: &Netns, address: SocketAddr) -> anyhow::Result<(Duration, String)> {
    in_netns(netns, || -> anyhow::Result<(Duration, String)> {
        let started = Instant::now();
        let mut stream = TcpStream::connect(address)?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\n")?;
        stream.set_read_timeout(Some(Duration::from_millis(300)))?;
        let mut answer = Vec::new();
        while started.elapsed() < Duration::from_secs(15) {
            let mut buffer = [0_u8; 512];
            match stream.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => answer.extend_from_slice(&buffer[..n]),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    // Another header, never the blank line that ends the head.
                    if stream.write_all(b"X-Slow: 1\r\n").is_err() {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        Ok((
            started.elapsed(),
            String::from_utf8_lossy(&answer).into_owned(),
        ))
    })?
}

/// Sends what no scraper sends: a request with too many headers, a request larger than any
/// scrape, a TLS handshake, another method, another page, and a burst of connections that
/// close at once. Each is answered with its error, or closed.
fn misbehave(relay: &Netns, address: SocketAddr) -> anyhow::Result<()> {
    let target = address.to_string();
    let headers = "X-Many: y\r\n".repeat(40);
    let many = http(
        relay,
        &target,
        format!("GET /metrics HTTP/1.1\r\n{headers}\r\n").as_bytes(),
    )?;
    assert_eq!(many.status, "431 Request Header Fields Too Large");
    let mut huge = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
    huge.resize(1 << 20, b'a');
    if let Ok(response) = http(relay, &target, &huge) {
        assert_eq!(response.status, "431 Request Header Fields Too Large");
    }
    let tls = http(
        relay,
        &target,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    )?;
    assert_eq!(tls.status, "400 Bad Request");
    let post = http(relay, &target, b"POST /metrics HTTP/1.1\r\n\r\n")?;
    assert_eq!(post.status, "405 Method Not Allowed");
    let other = http(relay, &target, b"GET /debug HTTP/1.1\r\n\r\n")?;
    assert_eq!(other.status, "404 Not Found");
    in_netns(relay, || {
        for _ in 0..200 {
            let _ = TcpStream::connect(address);
        }
    })?;
    Ok(())
}

/// Checks that every slow client was cut off within the request timeout, those that had a
/// connection slot with 408.
fn check_slow_clients(slow: &[(Duration, String)]) -> anyhow::Result<()> {
    for (held, answer) in slow {
        ensure!(
            *held < Duration::from_secs(8),
            "a slow client kept its connection for {held:?}"
        );
        ensure!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 408 Request Timeout"),
            "a slow client got {answer:?}"
        );
    }
    ensure!(
        slow.iter()
            .filter(|(_, answer)| answer.starts_with("HTTP/1.1 408"))
            .count()
            >= 8,
        "fewer slow clients than connection slots were answered 408: {slow:?}"
    );
    Ok(())
}

#[test]
fn slow_huge_and_malformed_requests_do_not_disturb_forwarding() -> anyhow::Result<()> {
    const OVERRIDE: &str = "127.0.0.1:9434";
    let lab = Lab::new()?;
    // The file names one address, the command line another: the command line wins.
    let file = RulesFile::new(&format!(
        "settings:\n  metrics:\n    listen: {METRICS}\nrules:
  - name: cam
    input: {{interface: in0, group: 239.1.1.1, port: 5000}}
    outputs:
      - {{interface: out0, destination: 239.2.2.1, port: 6000}}
"
    ))?;
    let mcr = Mcr::start_with(
        &lab.relay,
        file.path(),
        Launch {
            args: vec!["--metrics-listen".into(), OVERRIDE.into()],
            ..Launch::default()
        },
    )?;
    scrape_at(&lab.relay, OVERRIDE)?;
    ensure!(
        http(&lab.relay, METRICS, b"GET /metrics HTTP/1.0\r\n\r\n").is_err(),
        "the file's address serves though --metrics-listen overrides it"
    );
    let address: SocketAddr = OVERRIDE.parse()?;

    let group = Ipv4Addr::new(239, 2, 2, 1);
    let receiver = Receiver::start(&lab.sink, Some(group), SINK, 6000)?;
    // About 3.8 s: 6000 datagrams in bursts of 32 every 20 ms, while clients misbehave.
    let stream =
        Stream::new(Ipv4Addr::new(239, 1, 1, 1), 5000, 200, 6000).paced(Duration::from_millis(20));
    let slow = std::thread::scope(|scope| -> anyhow::Result<Vec<(Duration, String)>> {
        let sender = scope.spawn(|| send_udp(&lab.generator, &stream));
        // More slow clients than the endpoint serves at once.
        let slow: Vec<_> = (0..10)
            .map(|_| scope.spawn(|| slow_client(&lab.relay, address)))
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        // Every slot is taken: a new connection is closed at once, not left hanging.
        let refused = Instant::now();
        let answer = http(&lab.relay, OVERRIDE, b"GET /metrics HTTP/1.0\r\n\r\n");
        ensure!(
            answer.is_err() && refused.elapsed() < Duration::from_secs(1),
            "a connection over the limit was served or held: {:?} after {:?}",
            answer.map(|response| response.status),
            refused.elapsed()
        );
        // The control socket answers meanwhile.
        let asked = Instant::now();
        mcr.stats()?;
        ensure!(
            asked.elapsed() < Duration::from_secs(1),
            "mcr stats took {:?} while slow clients held the endpoint",
            asked.elapsed()
        );
        let slow = slow
            .into_iter()
            .map(|client| {
                client
                    .join()
                    .map_err(|_| anyhow::anyhow!("client panicked"))?
            })
            .collect::<anyhow::Result<Vec<_>>>()?;

        misbehave(&lab.relay, address)?;
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))??;
        Ok(slow)
    })?;
    check_slow_clients(&slow)?;
    assert_delivered(
        &receiver.finish()?,
        &stream,
        Expected {
            destination: group.into(),
            source: RELAY_OUT0.into(),
            ttl: 16,
        },
    )
    .with_context(|| format!("relay counters: {:?}", mcr.stats()))?;
    let after = scrape_at(&lab.relay, OVERRIDE)?;
    assert_eq!(
        after.count("mcr_output_sent_packets_total", &[("rule", "cam")])?,
        6000
    );
    Ok(())
}

/// What arrived on the notification socket, one datagram per message.
fn notifications(socket: &UnixDatagram, until: Instant) -> Vec<String> {
    let mut messages = Vec::new();
    let mut buffer = [0_u8; 4096];
    while Instant::now() < until {
        let _ = socket.set_read_timeout(Some(
            until
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ));
        match socket.recv(&mut buffer) {
            Ok(n) => messages.push(String::from_utf8_lossy(&buffer[..n]).into_owned()),
            Err(_) => break,
        }
    }
    messages
}

/// The value of `key` in a notification.
fn field<'a>(message: &'a str, key: &str) -> Option<&'a str> {
    message
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
}

fn monotonic_usec() -> anyhow::Result<u64> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    Ok(u64::try_from(now.tv_sec())? * 1_000_000 + u64::try_from(now.tv_nsec())? / 1_000)
}

/// Checks the notifications of a run with two reloads (a valid file, then a rejected one)
/// around `before` and `after` (`CLOCK_MONOTONIC`, µs): watchdog pings all along; `READY=1`,
/// then `RELOADING=1` and `READY=1` for each reload, then `STOPPING=1`.
fn check_notifications(messages: &[String], before: u64, after: u64) -> anyhow::Result<()> {
    let pings = messages
        .iter()
        .filter(|message| message.as_str() == "WATCHDOG=1\n")
        .count();
    ensure!(
        pings >= 10,
        "{pings} watchdog pings in about 4.5 s with WATCHDOG_USEC=500000"
    );
    let states: Vec<&String> = messages
        .iter()
        .filter(|message| message.as_str() != "WATCHDOG=1\n")
        .collect();
    // READY=1, then a RELOADING=1 and a READY=1 for each reload, then STOPPING=1.
    ensure!(
        states.len() >= 6 && states.len().is_multiple_of(2),
        "unexpected notifications: {states:#?}"
    );
    ensure!(field(states[0], "READY") == Some("1"), "{states:#?}");
    ensure!(
        states.last().map(|message| message.as_str()) == Some("STOPPING=1\n"),
        "{states:#?}"
    );
    let reloads = &states[1..states.len() - 1];
    for pair in reloads.chunks(2) {
        ensure!(
            field(pair[0], "RELOADING") == Some("1")
                && field(pair[1], "READY") == Some("1")
                && field(pair[1], "STATUS").is_some(),
            "a reload was not RELOADING=1 then READY=1 with a status: {pair:#?}"
        );
        let stamp: u64 = field(pair[0], "MONOTONIC_USEC")
            .context("RELOADING=1 without MONOTONIC_USEC")?
            .parse()?;
        ensure!(
            stamp > before - 2_000_000 && stamp < after + 3_000_000,
            "MONOTONIC_USEC={stamp} is not the time of a reload (around {before})"
        );
    }
    // The valid file's reload says what runs; the rejected file's says it was rejected.
    ensure!(
        reloads.iter().any(|message| {
            field(message, "STATUS") == Some("1 rule active, 1 waiting; 2 of 2 workers running")
        }),
        "{reloads:#?}"
    );
    let last = field(reloads[reloads.len() - 1], "STATUS").unwrap_or_default();
    ensure!(
        last.starts_with("1 rule active, 1 waiting; 2 of 2 workers running; rules file rejected"),
        "{last}"
    );
    Ok(())
}

#[test]
fn systemd_hears_ready_reloading_and_stopping_in_order() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let dir = std::env::temp_dir().join(unique_name("notify"));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = RemoveOnDrop(dir.clone());
    let path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path)?;
    let one = "settings:\n  workers: 2\nrules:
  - name: cam
    input: {interface: in0, group: 239.1.1.1, port: 5000}
    outputs:
      - {interface: out0, destination: 239.2.2.1, port: 6000}
";
    let file = RulesFile::new(one)?;
    let mut mcr = Mcr::start_with(
        &lab.relay,
        file.path(),
        Launch {
            env: vec![
                ("NOTIFY_SOCKET".into(), path.display().to_string()),
                // Pings every 250 ms.
                ("WATCHDOG_USEC".into(), "500000".into()),
            ],
            ..Launch::default()
        },
    )?;
    let mut messages = notifications(&socket, Instant::now() + Duration::from_secs(2));
    let ready = messages
        .iter()
        .find(|message| field(message, "READY").is_some())
        .context("no READY=1")?
        .clone();
    assert_eq!(
        field(&ready, "STATUS"),
        Some("1 rule active, 0 waiting; 2 of 2 workers running")
    );
    // READY=1 comes once the workers run.
    let workers = mcr.workers()?;
    ensure!(
        workers.iter().all(|worker| worker["state"] == "running"),
        "{workers:?}"
    );

    // A valid change, then a rejected one, each picked up on save and by `mcr reload`.
    file.write(&format!(
        "{one}  - name: later
    input: {{interface: in9, group: 239.1.1.3, port: 5000}}
    outputs:
      - {{interface: out0, destination: 239.2.2.3, port: 6000}}
"
    ))?;
    let before_reload = monotonic_usec()?;
    let reload = mcr.cli_output(&["reload"])?;
    ensure!(reload.status.success(), "{reload:?}");
    let after_reload = monotonic_usec()?;
    messages.extend(notifications(
        &socket,
        Instant::now() + Duration::from_secs(1),
    ));
    file.write("rules: [\n")?;
    let reload = mcr.cli_output(&["reload"])?;
    ensure!(
        !reload.status.success(),
        "`mcr reload` (ExecReload) succeeded for a rejected file"
    );
    messages.extend(notifications(
        &socket,
        Instant::now() + Duration::from_secs(1),
    ));
    ensure!(mcr.stop()?.success(), "mcr did not exit cleanly");
    messages.extend(notifications(
        &socket,
        Instant::now() + Duration::from_millis(500),
    ));

    check_notifications(&messages, before_reload, after_reload)
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The journal priority at the start of `line`.
fn priority(line: &str) -> Option<u8> {
    line.strip_prefix('<')?.split_once('>')?.0.parse().ok()
}

#[test]
fn under_systemd_each_log_line_carries_its_journal_priority() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    let good = "rules:
  - name: cam
    input: {interface: in0, group: 239.1.1.1, port: 5000}
    outputs:
      - {interface: out0, destination: 239.2.2.1, port: 6000}
";
    let file = RulesFile::new(good)?;
    let mcr = Mcr::start_with(
        &lab.relay,
        file.path(),
        Launch {
            journal_stream: true,
            ..Launch::default()
        },
    )?;
    // Two problems, each on a line of its own in the error.
    file.write(
        "rules:
  - name: cam
    input: {interface: in0, group: 10.1.1.1, port: 5000}
    outputs:
      - {interface: out0, destination: 239.2.2.1, port: 0}
",
    )?;
    ensure!(!mcr.cli_output(&["reload"])?.status.success());
    let log = wait_for(Duration::from_secs(3), || {
        let log = mcr.log_text();
        log.contains("port 0").then_some(log)
    })
    .context("the rejection never reached the log")?;
    for line in log.lines() {
        ensure!(
            priority(line).is_some(),
            "a line without a priority: {line:?}\n{log}"
        );
        // The journal has its own timestamps.
        ensure!(!line[3..].starts_with("20"), "a timestamp: {line:?}");
    }
    let at = |needle: &str| {
        log.lines()
            .find(|line| line.contains(needle))
            .and_then(priority)
    };
    assert_eq!(at("rules file rejected"), Some(3), "{log}");
    // The problems listed under it are errors too, not info lines of their own.
    assert_eq!(at("is not a multicast group"), Some(3), "{log}");
    assert_eq!(at("port 0"), Some(3), "{log}");
    assert_eq!(at("running"), Some(6), "{log}");
    assert_eq!(at("DEBUG "), Some(7), "{log}");
    // Worker lines, relayed by the supervisor, too.
    ensure!(
        log.lines()
            .any(|line| line.contains("worker=") && priority(line).is_some()),
        "{log}"
    );
    drop(mcr);

    // Standard error that is not the stream `JOURNAL_STREAM` names: plain lines, as before.
    file.write(good)?;
    let mcr = Mcr::start_with(
        &lab.relay,
        file.path(),
        Launch {
            env: vec![("JOURNAL_STREAM".into(), "1:1".into())],
            ..Launch::default()
        },
    )?;
    let log = wait_for(Duration::from_secs(3), || {
        let log = mcr.log_text();
        log.contains("ready").then_some(log)
    })
    .context("no log")?;
    ensure!(
        log.lines().all(|line| priority(line).is_none()),
        "prefixes without the journal:\n{log}"
    );
    Ok(())
}
