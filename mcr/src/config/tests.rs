use super::*;

const GOOD: &str = "\
settings:
  workers: 2
rules:
  - name: camera-1
    input:
      interface: eth0
      group: 239.1.1.1
      port: 5000
      source: 10.0.0.5
    outputs:
      - interface: eth1
        destination: 239.2.2.2
        port: 6000
        ttl: 8
      - destination: 10.9.9.9
        port: 7000
  - name: camera-2
    input:
      interface: eth0
      group: 239.1.1.2
      port: 5000
    outputs:
      - interface: eth0
        destination: 239.1.1.2
        port: 5002
";

/// Parses `text`, expects exactly one problem, and returns it.
fn only_problem(text: &str) -> Problem {
    let problems = parse(text).expect_err("the file must be rejected");
    assert_eq!(problems.len(), 1, "expected one problem, got {problems:#?}");
    problems.into_iter().next().expect("one problem")
}

/// `GOOD` with the first occurrence of `from` replaced by `to`.
fn good_with(from: &str, to: &str) -> String {
    assert!(GOOD.contains(from), "{from:?} is not in the sample");
    GOOD.replacen(from, to, 1)
}

#[test]
fn accepts_the_documented_schema() {
    let config = parse(GOOD).expect("valid");
    assert_eq!(config.settings.workers, Some(2));
    assert_eq!(config.rules.len(), 2);
    let rule = &config.rules[0];
    assert_eq!(rule.name, "camera-1");
    assert_eq!(rule.input.group, Ipv4Addr::new(239, 1, 1, 1));
    assert_eq!(rule.input.source, Some(Ipv4Addr::new(10, 0, 0, 5).into()));
    assert_eq!(rule.outputs[0].ttl, 8);
    assert_eq!(rule.outputs[1].ttl, DEFAULT_TTL);
    assert_eq!(rule.outputs[1].interface, None);
    // Same interface as the input but another port: a translation, not a loop.
    assert_eq!(config.rules[1].outputs[0].port, 5002);
}

#[test]
fn settings_are_optional() {
    let text = GOOD.replacen("settings:\n  workers: 2\n", "", 1);
    assert_eq!(parse(&text).expect("valid").settings.workers, None);
}

#[test]
fn unknown_field() {
    let problem = only_problem(&good_with(
        "      port: 5000\n      source",
        "      prot: 5000\n      source",
    ));
    assert_eq!(problem.line, Some(8));
    assert_eq!(problem.field, "rules[0].input");
    assert!(
        problem.message.contains("unknown field `prot`"),
        "{problem:?}"
    );
}

#[test]
fn malformed_address() {
    let problem = only_problem(&good_with("group: 239.1.1.1", "group: 239.1.1"));
    assert_eq!(problem.line, Some(7));
    assert_eq!(problem.field, "rules[0].input.group");
    assert!(
        problem.message.contains("\"239.1.1\" is not an IP address"),
        "{problem:?}"
    );
}

#[test]
fn input_group_must_be_multicast() {
    let problem = only_problem(&good_with("group: 239.1.1.1", "group: 10.1.1.1"));
    assert_eq!(problem.line, Some(7));
    assert_eq!(problem.field, "rules[0].input.group");
    assert!(
        problem
            .message
            .contains("10.1.1.1 is not a multicast group (224.0.0.0/4 or ff00::/8)"),
        "{problem:?}"
    );
}

#[test]
fn port_zero() {
    let problem = only_problem(&good_with("port: 6000", "port: 0"));
    assert_eq!(problem.line, Some(13));
    assert_eq!(problem.field, "rules[0].outputs[0].port");
    assert!(problem.message.contains("port 0"));
}

#[test]
fn port_out_of_range() {
    let problem = only_problem(&good_with("port: 6000", "port: 70000"));
    assert_eq!(problem.line, Some(13));
    assert_eq!(problem.field, "rules[0].outputs[0].port");
}

#[test]
fn no_outputs() {
    let text = "rules:\n  - name: a\n    input: {interface: eth0, group: 239.1.1.1, port: 1}\n    outputs: []\n";
    let problem = only_problem(text);
    assert_eq!(problem.line, Some(4));
    assert_eq!(problem.field, "rules[0].outputs");
    assert!(problem.message.contains("no outputs"));
}

#[test]
fn missing_outputs_field() {
    let text = "rules:\n  - name: a\n    input: {interface: eth0, group: 239.1.1.1, port: 1}\n";
    let problem = only_problem(text);
    assert!(
        problem.message.contains("missing field `outputs`"),
        "{problem:?}"
    );
    assert_eq!(problem.line, Some(2));
}

#[test]
fn duplicate_rule_name() {
    let problem = only_problem(&good_with("name: camera-2", "name: camera-1"));
    assert_eq!(problem.line, Some(17));
    assert_eq!(problem.field, "rules[1].name");
    assert!(problem.message.contains("duplicate rule name \"camera-1\""));
}

#[test]
fn invalid_rule_name() {
    let problem = only_problem(&good_with("name: camera-2", "name: camera 2"));
    assert_eq!(problem.line, Some(17));
    assert!(problem.message.contains("invalid rule name"));
    let long = "x".repeat(MAX_NAME_LEN + 1);
    let problem = only_problem(&good_with("name: camera-2", &format!("name: {long}")));
    assert!(problem.message.contains("invalid rule name"));
}

#[test]
fn two_rules_with_the_same_input() {
    let text = good_with("group: 239.1.1.2", "group: 239.1.1.1").replacen(
        "      port: 5000\n      source: 10.0.0.5\n",
        "      port: 5000\n",
        1,
    );
    let problem = only_problem(&text);
    // One line shorter than GOOD: rule 0 lost its `source:` line.
    assert_eq!(problem.line, Some(17), "{problem:?}");
    assert_eq!(problem.field, "rules[1].input");
    assert!(
        problem
            .message
            .contains("same input eth0:239.1.1.1:5000 as rules[0] (camera-1)")
    );
}

#[test]
fn same_group_from_different_sources_is_not_a_duplicate() {
    let text = good_with("group: 239.1.1.2", "group: 239.1.1.1");
    assert!(parse(&text).is_ok());
}

#[test]
fn output_on_its_own_input_loops() {
    let problem = only_problem(&good_with("port: 5002", "port: 5000"));
    assert_eq!(problem.line, Some(23));
    assert_eq!(problem.field, "rules[1].outputs[0]");
    assert!(problem.message.contains("loop"));
}

#[test]
fn ttl_out_of_range() {
    for bad in ["0", "256", "-1"] {
        let problem = only_problem(&good_with("ttl: 8", &format!("ttl: {bad}")));
        assert_eq!(problem.line, Some(14));
        assert_eq!(problem.field, "rules[0].outputs[0].ttl");
        assert_eq!(problem.message, format!("TTL {bad}: use 1 to 255"));
    }
}

/// `GOOD` with `min_ttl: value` added to the first rule's input (line 10).
fn good_with_min_ttl(value: &str) -> String {
    good_with(
        "      source: 10.0.0.5\n",
        &format!("      source: 10.0.0.5\n      min_ttl: {value}\n"),
    )
}

#[test]
fn min_ttl_is_optional_and_kept_per_rule() {
    let config = parse(&good_with_min_ttl("2")).expect("valid");
    assert_eq!(config.rules[0].min_ttl, Some(2));
    assert_eq!(config.rules[1].min_ttl, None, "default: any TTL is relayed");
    assert_eq!(parse(GOOD).expect("valid").rules[0].min_ttl, None);
}

#[test]
fn min_ttl_out_of_range() {
    for bad in ["0", "256", "-1"] {
        let problem = only_problem(&good_with_min_ttl(bad));
        assert_eq!(problem.line, Some(10));
        assert_eq!(problem.field, "rules[0].input.min_ttl");
        assert_eq!(problem.message, format!("minimum TTL {bad}: use 1 to 255"));
    }
}

#[test]
fn multicast_destination_needs_an_interface() {
    let problem = only_problem(&good_with(
        "      - interface: eth1\n        destination",
        "      - destination",
    ));
    assert_eq!(problem.line, Some(11));
    assert_eq!(problem.field, "rules[0].outputs[0].interface");
    assert!(problem.message.contains("needs an interface"));
}

#[test]
fn yaml_syntax_error_has_a_line() {
    let problem = only_problem(&good_with(
        "    outputs:\n      - interface: eth1",
        "    outputs:\n      - interface: [eth1",
    ));
    assert!(problem.line.is_some(), "{problem:?}");
}

#[test]
fn cpus_and_user() {
    let config = parse(&good_with(
        "workers: 2",
        "workers: 2\n  cpus: [0]\n  user: daemon",
    ))
    .expect("valid");
    assert_eq!(config.settings.cpus, Some(vec![0]));
    assert_eq!(config.settings.user, "daemon");
    assert_eq!(parse(GOOD).expect("valid").settings.user, DEFAULT_USER);
    let problem = only_problem(&good_with("workers: 2", "workers: 2\n  cpus: [0, 5000]"));
    assert_eq!(problem.field, "settings.cpus[1]");
    assert_eq!(problem.line, Some(3));
    let problem = only_problem(&good_with("workers: 2", "workers: 2\n  user: root"));
    assert_eq!(problem.field, "settings.user");
    assert_eq!(problem.line, Some(3));
    assert!(problem.message.contains("is root (uid 0)"), "{problem:?}");
}

#[test]
fn the_worker_user_must_exist() {
    let problem = only_problem(&good_with(
        "workers: 2",
        "workers: 2\n  user: mcr-no-such-user",
    ));
    assert_eq!(problem.field, "settings.user");
    assert_eq!(problem.line, Some(3));
    assert_eq!(
        problem.message,
        "user \"mcr-no-such-user\" does not exist on this system: create it or name another \
         unprivileged user"
    );
    let problem = only_problem(&good_with("workers: 2", "workers: 2\n  user: ''"));
    assert!(problem.message.contains("does not exist"), "{problem:?}");
}

#[test]
fn too_many_outputs() {
    let output = "      - destination: 10.9.9.9\n        port: 7000\n";
    let text = good_with(output, &output.repeat(MAX_OUTPUTS_PER_RULE + 1));
    let problem = only_problem(&text);
    assert_eq!(problem.field, "rules[0].outputs");
    assert!(problem.message.contains("at most 64"));
}

#[test]
fn bad_worker_count() {
    let problem = only_problem(&good_with("workers: 2", "workers: 0"));
    assert_eq!(problem.line, Some(2));
    assert_eq!(problem.field, "settings.workers");
}

#[test]
fn several_problems_are_all_reported() {
    let text = good_with("port: 6000", "port: 0").replacen("ttl: 8", "ttl: 0", 1);
    let problems = parse(&text).expect_err("rejected");
    assert_eq!(problems.len(), 2);
}

#[test]
fn error_message_names_file_line_and_field() {
    let error = ConfigError::Invalid {
        path: "rules.yaml".into(),
        problems: parse(&good_with("ttl: 8", "ttl: 300")).expect_err("rejected"),
    };
    assert_eq!(
        error.to_string(),
        "rules.yaml:14: rules[0].outputs[0].ttl: TTL 300: use 1 to 255"
    );
}

/// The settings of `GOOD` with `line` (`key: value`) added, as `pick` reads them; the error
/// text of the file's problems, if any.
fn with_setting<T>(line: &str, pick: impl FnOnce(Settings) -> T) -> Result<T, String> {
    let text = good_with("workers: 2", &format!("workers: 2\n  {line}"));
    parse(&text)
        .map(|config| pick(config.settings))
        .map_err(|problems| {
            ConfigError::Invalid {
                path: "rules.yaml".into(),
                problems,
            }
            .to_string()
        })
}

/// `settings` of `GOOD` with `realtime` added; the error text of the one problem, if any.
fn realtime(value: &str) -> Result<Scheduling, String> {
    with_setting(&format!("realtime: {value}"), |settings| {
        settings.scheduling
    })
}

#[test]
fn realtime_scheduling_is_off_unless_asked_for() {
    assert_eq!(
        parse(GOOD).expect("valid").settings.scheduling,
        Scheduling::Normal
    );
    assert_eq!(realtime("false"), Ok(Scheduling::Normal));
    assert_eq!(
        realtime("true"),
        Ok(Scheduling::Fifo {
            priority: DEFAULT_REALTIME_PRIORITY
        })
    );
    assert_eq!(
        realtime("{priority: 1}"),
        Ok(Scheduling::Fifo { priority: 1 })
    );
    assert_eq!(
        realtime("\n    priority: 49"),
        Ok(Scheduling::Fifo { priority: 49 })
    );
    assert_eq!(
        realtime("{}"),
        Ok(Scheduling::Fifo {
            priority: DEFAULT_REALTIME_PRIORITY
        })
    );
}

#[test]
fn realtime_priorities_outside_1_to_49_are_rejected_with_their_line() {
    for bad in ["0", "50", "99", "-3", "300", "high"] {
        let expected = format!(
            "rules.yaml:3: settings.realtime.priority: priority {bad}: use 1 to 49 (from 50 up a \
             worker would get ahead of the kernel's interrupt threads, which bring it its \
             packets)"
        );
        assert_eq!(realtime(&format!("{{priority: {bad}}}")), Err(expected));
    }
    // On a line of its own, the error names that line.
    let error = realtime("\n    priority: 70").expect_err("rejected");
    assert!(
        error.starts_with("rules.yaml:4: settings.realtime.priority: priority 70:"),
        "{error}"
    );
}

#[test]
fn realtime_in_another_form_is_rejected_naming_the_forms_allowed() {
    assert_eq!(
        realtime("yes please"),
        Err(
            "rules.yaml:3: settings.realtime: yes please: use true, false or {priority: N} \
             with N from 1 to 49"
                .into()
        )
    );
    assert_eq!(
        realtime("{prio: 5}"),
        Err(
            "rules.yaml:3: settings.realtime: unknown field prio: use true, false or \
             {priority: N} with N from 1 to 49"
                .into()
        )
    );
}

#[test]
fn stall_timeout() {
    assert_eq!(
        parse(GOOD).expect("valid").settings.stall_timeout,
        DEFAULT_STALL_TIMEOUT
    );
    let config = parse(&good_with("workers: 2", "workers: 2\n  stall_timeout: 10")).expect("valid");
    assert_eq!(
        config.settings.stall_timeout,
        std::time::Duration::from_secs(10)
    );
    for bad in ["0", "-1", "3601"] {
        let error = ConfigError::Invalid {
            path: "rules.yaml".into(),
            problems: vec![only_problem(&good_with(
                "workers: 2",
                &format!("workers: 2\n  stall_timeout: {bad}"),
            ))],
        };
        assert_eq!(
            error.to_string(),
            format!("rules.yaml:3: settings.stall_timeout: {bad} seconds: use 1 to 3600")
        );
    }
}

/// `settings` of `GOOD` with `shed_window` added; the error text of the one problem, if any.
fn shed_window(value: &str) -> Result<u64, String> {
    with_setting(&format!("shed_window: {value}"), |settings| {
        settings.shed_window
    })
}

#[test]
fn shed_window_is_8192_packets_unless_set() {
    assert_eq!(parse(GOOD).expect("valid").settings.shed_window, 8192);
    assert_eq!(DEFAULT_SHED_WINDOW, 8192);
    assert_eq!(shed_window("2048"), Ok(2048));
    assert_eq!(shed_window("32768"), Ok(32_768));
    assert_eq!(shed_window("20000"), Ok(20_000));
}

#[test]
fn shed_windows_outside_2048_to_32768_are_rejected_with_their_line() {
    for bad in ["0", "-1", "2047", "32769", "1000000", "99999999999999"] {
        assert_eq!(
            shed_window(bad),
            Err(format!(
                "rules.yaml:3: settings.shed_window: {bad} packets: use 2048 to 32768 (below, \
                 the classifier would shed packets a worker has receive buffers for; above, an \
                 input socket could not hold a window)"
            ))
        );
    }
    // Not a number of packets at all: refused by the parser, with its line.
    for bad in ["lots", "8192.5", "[8192]"] {
        let error = shed_window(bad).expect_err("rejected");
        assert!(
            error.starts_with("rules.yaml:3: settings.shed_window: invalid type"),
            "{error}"
        );
    }
}

#[test]
fn a_reload_names_the_settings_that_wait_for_a_restart_and_only_those() {
    let running = |line: &str| with_setting(line, |settings| settings).expect("valid");
    let start = running("stall_timeout: 3");
    assert_eq!(start.waiting_for_restart(&start), Vec::<&str>::new());
    // Applied by the reload itself: the rules' path and the workers' scheduling.
    for applied in ["path: worker", "path: kernel", "realtime: true"] {
        let reloaded = running(&format!("stall_timeout: 3\n  {applied}"));
        assert_eq!(
            start.waiting_for_restart(&reloaded),
            Vec::<&str>::new(),
            "{applied}"
        );
    }
    for (line, name) in [
        ("stall_timeout: 5", "settings.stall_timeout"),
        ("shed_window: 4096", "settings.shed_window"),
        ("user: daemon", "settings.user"),
        ("cpus: [1]", "settings.cpus"),
        (
            "metrics: {listen: '127.0.0.1:9580'}",
            "settings.metrics.listen",
        ),
    ] {
        assert_eq!(start.waiting_for_restart(&running(line)), [name], "{line}");
    }
    let workers = parse(&good_with("workers: 2", "workers: 3")).expect("valid");
    assert_eq!(
        running("stall_timeout: 3").waiting_for_restart(&workers.settings),
        ["settings.workers"]
    );
    let several = running("stall_timeout: 5\n  shed_window: 4096");
    assert_eq!(
        start.waiting_for_restart(&several),
        ["settings.stall_timeout", "settings.shed_window"]
    );
}

/// A directory of its own under the system's temporary directory, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "mcr-config-test-{}-{unique}-{name}",
            std::process::id()
        ));
        std::fs::create_dir(&path).expect("creating a temporary directory");
        Self(path)
    }

    fn file(&self, name: &str, contents: &[u8]) -> std::path::PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("writing a test file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `load(path)` on a thread of its own, so that a read that blocks fails the test instead of
/// hanging it.
fn load_within(path: &Path, limit: std::time::Duration) -> Result<Config, ConfigError> {
    let (sender, receiver) = std::sync::mpsc::channel();
    let owned = path.to_owned();
    std::thread::spawn(move || {
        let _ = sender.send(load(&owned));
    });
    receiver
        .recv_timeout(limit)
        .unwrap_or_else(|_| panic!("loading {} took more than {limit:?}", path.display()))
}

#[test]
fn loads_a_regular_file_and_through_a_symlink() {
    let dir = TempDir::new("symlink");
    let file = dir.file("rules.yaml", GOOD.as_bytes());
    let link = dir.0.join("link.yaml");
    std::os::unix::fs::symlink(&file, &link).expect("symlink");
    assert_eq!(load(&file).expect("valid").rules.len(), 2);
    assert_eq!(load(&link).expect("valid through a symlink").rules.len(), 2);
}

#[test]
fn a_fifo_is_refused_without_waiting_for_a_writer() {
    let dir = TempDir::new("fifo");
    let fifo = dir.0.join("rules.yaml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    let error = load_within(&fifo, std::time::Duration::from_secs(2)).expect_err("a FIFO");
    assert!(
        matches!(error, ConfigError::NotRegularFile { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.starts_with(&fifo.display().to_string()),
        "{message}"
    );
    assert!(message.contains("is a FIFO"), "{message}");
}

#[test]
fn a_device_is_refused_without_reading_it() {
    let error = load_within(Path::new("/dev/zero"), std::time::Duration::from_secs(2))
        .expect_err("a device");
    assert_eq!(
        error.to_string(),
        "/dev/zero: is a character device, not a regular file: give the path of the rules file itself"
    );
}

#[test]
fn a_directory_is_refused() {
    let dir = TempDir::new("directory");
    let error = load(&dir.0).expect_err("a directory");
    assert!(
        matches!(
            error,
            ConfigError::NotRegularFile {
                kind: "a directory",
                ..
            }
        ),
        "{error:?}"
    );
}

#[test]
fn a_file_over_the_size_limit_is_refused() {
    let dir = TempDir::new("large");
    let path = dir.file("rules.yaml", GOOD.as_bytes());
    // Sparse: the size counts, not the blocks.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|file| file.set_len(MAX_FILE_SIZE + 1))
        .expect("growing the file");
    let error = load(&path).expect_err("too large");
    assert!(
        matches!(error, ConfigError::TooLarge { size, .. } if size == MAX_FILE_SIZE + 1),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("at most 16777216 bytes"),
        "{error}"
    );
}

#[test]
fn a_file_that_is_not_utf8_names_the_line_and_offset() {
    let dir = TempDir::new("latin1");
    // "camera-1" with a Latin-1 'é' (0xe9), as an editor set to Latin-1 would save it.
    let text = GOOD.replacen("name: camera-1", "name: cam\u{e9}ra-1", 1);
    let mut bytes = text.into_bytes();
    let at = bytes
        .windows(2)
        .position(|pair| pair == [0xc3, 0xa9])
        .expect("é in the text");
    bytes.splice(at..at + 2, [0xe9]);
    let path = dir.file("rules.yaml", &bytes);
    let error = load(&path).expect_err("not UTF-8");
    let message = error.to_string();
    assert_eq!(at, 43);
    assert!(
        message.starts_with(&format!(
            "{}:4: not UTF-8: byte 0xe9 at byte offset 43 (byte 14 of the line)",
            path.display()
        )),
        "{message}"
    );
}

#[test]
fn deep_nesting_is_refused_before_the_parse() {
    // Unclosed, as in a truncated file; closed, inside a field; block sequences in one line.
    let cases = [
        ("[".repeat(240_000), 1),
        (
            format!("rules: {}{}\n", "[".repeat(240_000), "]".repeat(240_000)),
            1,
        ),
        (format!("rules:\n{}x\n", "- ".repeat(100_000)), 2),
    ];
    for (text, line) in cases {
        let problem = only_problem(&text);
        assert_eq!(problem.line, Some(line), "{problem:?}");
        assert!(
            problem.message.contains("nest deeper than 32 levels"),
            "{problem:?}"
        );
    }
}

#[test]
fn nesting_up_to_the_limit_is_parsed() {
    // 31 sequences inside the document's mapping: the schema refuses it, the depth bound does not.
    let text = format!(
        "rules: {}{}\n",
        "[".repeat(MAX_DEPTH - 1),
        "]".repeat(MAX_DEPTH - 1)
    );
    let problem = only_problem(&text);
    assert!(problem.message.contains("invalid type"), "{problem:?}");
}

#[test]
fn alias_expansion_is_bounded() {
    // 400 outputs written once and reused by 400 rules: 160,000 outputs, 800,000 values.
    let outputs = (0..400)
        .map(|k| {
            format!(
                "      - {{destination: 10.0.1.{}, port: {}}}\n",
                k % 250 + 1,
                k + 1
            )
        })
        .collect::<Vec<_>>()
        .concat();
    let rules = (1..400)
        .map(|k| format!("  - {{name: r{k}, input: *input, outputs: *outputs}}\n"))
        .collect::<Vec<_>>()
        .concat();
    let text = format!(
        "rules:\n  - name: r0\n    input: &input {{interface: eth0, group: 239.1.1.1, port: 1}}\n    outputs: &outputs\n{outputs}{rules}"
    );
    let problem = only_problem(&text);
    assert!(
        problem
            .message
            .contains("more than 500000 values once its aliases are expanded"),
        "{problem:?}"
    );
    // A billion laughs: lists of nine lists of nine lists ... of nine strings.
    let levels = (1..10)
        .map(|level| {
            let aliases = vec![format!("*a{}", level - 1); 9].join(", ");
            format!("a{level}: &a{level} [{aliases}]\n")
        })
        .collect::<Vec<_>>()
        .concat();
    let text = format!("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n{levels}");
    let problem = only_problem(&text);
    // a5 would stand for 9^5 lists of lol: 600,000 values.
    assert_eq!(problem.line, Some(6), "{problem:?}");
    assert!(
        problem.message.contains("aliases are expanded"),
        "{problem:?}"
    );
}

#[test]
fn a_recursive_alias_is_refused() {
    let problem = only_problem("rules: &r [*r]\n");
    assert_eq!(problem.line, Some(1));
    assert!(
        problem
            .message
            .contains("alias *r refers to no complete node"),
        "{problem:?}"
    );
}

#[test]
fn a_long_line_ends_in_an_error_that_stays_short() {
    let long = "a".repeat(4 * 1024 * 1024);
    let problem = only_problem(&good_with("name: camera-2", &format!("name: {long}")));
    assert_eq!(problem.field, "rules[1].name");
    assert!(problem.message.len() < 300, "{}", problem.message.len());
    assert!(
        problem.message.contains("(4194304 bytes)"),
        "{}",
        problem.message
    );
    // Refused by serde_yaml, which quotes the value in full.
    let problem = only_problem(&format!("rules: {long}\n"));
    assert_eq!(problem.line, Some(1));
    assert_eq!(problem.field, "rules");
    assert!(problem.message.len() < 300, "{}", problem.message.len());
    assert!(
        problem.message.starts_with("invalid type: string \"aaa"),
        "{}",
        problem.message
    );
    assert!(
        problem.message.ends_with("expected a sequence"),
        "{}",
        problem.message
    );
}

/// A file of `count` rules on distinct inputs, each with `outputs` outputs, in flow style.
fn many_rules(count: usize, outputs: usize) -> String {
    let output = "{destination: 10.9.9.9, port: 7000}";
    let outputs = vec![output; outputs].join(", ");
    let rules = (0..count)
        .map(|k| {
            format!(
                "  - {{name: r{k}, input: {{interface: eth0, group: 239.1.{}.{}, port: 5000}}, outputs: [{outputs}]}}\n",
                k / 250,
                k % 250 + 1
            )
        })
        .collect::<Vec<_>>()
        .concat();
    format!("rules:\n{rules}")
}

#[test]
fn more_rules_than_the_classifier_holds() {
    assert_eq!(
        parse(&many_rules(MAX_RULES, 1)).expect("valid").rules.len(),
        4096
    );
    let problem = only_problem(&many_rules(MAX_RULES + 1, 1));
    assert_eq!(problem.field, "rules[4096]");
    // Line 1 is `rules:`, rule i is on line i + 2.
    assert_eq!(problem.line, Some(4098));
    assert_eq!(
        problem.message,
        "4097 rules: the classifier holds at most 4096, and this is the first one over"
    );
}

#[test]
fn more_outputs_than_the_workers_count() {
    // 256 rules of 64 outputs fill the counters exactly; one more output is one too many.
    let full = many_rules(256, 64);
    assert_eq!(
        parse(&full)
            .expect("valid")
            .rules
            .iter()
            .map(|r| r.outputs.len())
            .sum::<usize>(),
        MAX_OUTPUTS
    );
    let text = format!(
        "{full}  - {{name: extra, input: {{interface: eth1, group: 239.9.9.9, port: 1}}, outputs: [{{destination: 10.9.9.9, port: 7000}}]}}\n"
    );
    let problem = only_problem(&text);
    assert_eq!(problem.field, "rules[256].outputs");
    assert_eq!(problem.line, Some(258));
    assert!(
        problem
            .message
            .starts_with("16385 outputs over all rules: the workers count at most 16384"),
        "{problem:?}"
    );
}

#[test]
fn link_local_input_groups_are_refused() {
    // OSPF's all-routers group, and both ends of the block.
    for group in ["224.0.0.5", "224.0.0.0", "224.0.0.255"] {
        let problem = only_problem(&good_with("group: 239.1.1.1", &format!("group: {group}")));
        assert_eq!(problem.field, "rules[0].input.group");
        assert_eq!(problem.line, Some(7));
        assert!(
            problem
                .message
                .starts_with(&format!("{group} is a link-local group (224.0.0.0/24)")),
            "{problem:?}"
        );
    }
    // Just past the block: an ordinary group.
    assert!(parse(&good_with("group: 239.1.1.1", "group: 224.0.1.1")).is_ok());
}

#[test]
fn cpus_are_tried_as_a_worker_pins_itself() {
    let online: Vec<u64> = aya::util::online_cpus()
        .expect("online CPUs")
        .into_iter()
        .map(u64::from)
        .collect();
    assert_eq!(usable_cpus(&online), online);
    // Beyond what a CPU set can name, and far beyond any machine here.
    assert_eq!(usable_cpus(&[1 << 20, u64::MAX]), Vec::<u64>::new());
}

#[test]
fn interface_names_the_kernel_cannot_have() {
    for bad in [
        "''",
        "eth0/1",
        "eth0:1",
        "'eth 0'",
        "abcdefghijklmnop",
        "'.'",
        "'..'",
        "\"eth\\0\"",
        "\"eth\\t0\"",
    ] {
        let problem = only_problem(&good_with("interface: eth1", &format!("interface: {bad}")));
        assert_eq!(problem.field, "rules[0].outputs[0].interface", "{bad}");
        assert_eq!(problem.line, Some(11), "{bad}");
        assert!(
            problem.message.starts_with("invalid interface name"),
            "{bad}: {problem:?}"
        );
    }
    // Dots, dashes and 15 bytes are fine: VLAN and bridge names look like this.
    for good in ["br-lan.42", "abcdefghijklmno", "..."] {
        let text = good_with("interface: eth1", &format!("interface: {good}"));
        assert!(parse(&text).is_ok(), "{good}");
    }
}

#[test]
fn a_rule_takes_its_own_path_or_the_settings_default() {
    let config = parse(GOOD).expect("valid");
    assert_eq!(config.settings.path, PathChoice::Auto);
    assert!(
        config
            .rules
            .iter()
            .all(|rule| rule.path == PathChoice::Auto)
    );
    assert!(config.rules.iter().all(|rule| !rule.local_delivery));

    let text = good_with("workers: 2", "workers: 2\n  path: worker").replacen(
        "    outputs:\n",
        "    path: kernel\n    local_delivery: true\n    outputs:\n",
        1,
    );
    let config = parse(&text).expect("valid");
    assert_eq!(config.settings.path, PathChoice::Worker);
    assert_eq!(config.rules[0].path, PathChoice::Kernel);
    assert!(config.rules[0].local_delivery);
    assert_eq!(config.rules[1].path, PathChoice::Worker, "the default");
    assert!(!config.rules[1].local_delivery);

    let problem = only_problem(&good_with("workers: 2", "workers: 2\n  path: fast"));
    assert_eq!(problem.line, Some(3));
    assert_eq!(problem.field, "settings.path");
    assert!(
        problem.message.contains("unknown variant `fast`"),
        "{problem:?}"
    );
}

#[test]
fn an_output_may_set_its_dscp() {
    let config = parse(&good_with(
        "        ttl: 8\n",
        "        ttl: 8\n        dscp: 46\n",
    ))
    .expect("valid");
    assert_eq!(config.rules[0].outputs[0].dscp, Some(46));
    assert_eq!(config.rules[1].outputs[0].dscp, None, "default: carried");
    let problem = only_problem(&good_with(
        "        ttl: 8\n",
        "        ttl: 8\n        dscp: 64\n",
    ));
    assert_eq!(problem.field, "rules[0].outputs[0].dscp");
    assert!(
        problem.message.starts_with("DSCP 64: use 0 to 63"),
        "{problem:?}"
    );
    assert!(problem.line.is_some());
}

#[test]
fn metrics_listen_is_optional_and_takes_an_address_and_port() {
    assert_eq!(parse(GOOD).expect("valid").settings.metrics_listen, None);
    for (written, expected) in [
        ("127.0.0.1:9433", "127.0.0.1:9433"),
        ("'[::1]:9433'", "[::1]:9433"),
        ("0.0.0.0:9433", "0.0.0.0:9433"),
    ] {
        let text = good_with(
            "workers: 2",
            &format!("workers: 2\n  metrics:\n    listen: {written}"),
        );
        let config = parse(&text).expect("valid");
        assert_eq!(
            config.settings.metrics_listen,
            Some(expected.parse().expect("an address")),
            "{written}"
        );
    }
}

#[test]
fn metrics_listen_refuses_host_names_port_zero_and_unknown_keys() {
    for (bad, message) in [
        (
            "localhost:9433",
            "settings.metrics.listen: \"localhost:9433\": not an IP address and port, such as \
             127.0.0.1:9433 or [::1]:9433",
        ),
        (
            "127.0.0.1",
            "settings.metrics.listen: \"127.0.0.1\": not an IP address and port, such as \
             127.0.0.1:9433 or [::1]:9433",
        ),
        (
            "127.0.0.1:0",
            "settings.metrics.listen: 127.0.0.1:0: port 0; give the port scrapers connect to, \
             such as 127.0.0.1:9433",
        ),
    ] {
        let error = ConfigError::Invalid {
            path: "rules.yaml".into(),
            problems: vec![only_problem(&good_with(
                "workers: 2",
                &format!("workers: 2\n  metrics:\n    listen: {bad}"),
            ))],
        };
        assert_eq!(
            error.to_string(),
            format!("rules.yaml:4: {message}"),
            "{bad}"
        );
    }
    let problem = only_problem(&good_with(
        "workers: 2",
        "workers: 2\n  metrics:\n    address: 127.0.0.1:9433",
    ));
    assert!(
        problem.message.contains("unknown field `address`"),
        "{problem:?}"
    );
}

const IPV6: &str = "\
rules:
  - name: studio-v6
    input:
      interface: eth0
      group: ff3e::8000:1
      port: 5000
      source: fd00:1::5
      min_hop_limit: 2
    outputs:
      - interface: eth1
        destination: ff3e::8000:2
        port: 6000
        hop_limit: 8
      - interface: eth1
        destination: 239.2.2.2
        port: 6001
      - destination: fd00:9::9
        port: 7000
";

#[test]
fn ipv6_groups_sources_and_mixed_outputs_are_accepted() {
    let config = parse(IPV6).expect("valid");
    let rule = &config.rules[0];
    assert_eq!(
        rule.input.group,
        "ff3e::8000:1".parse::<IpAddr>().expect("address")
    );
    assert_eq!(
        rule.input.source,
        Some("fd00:1::5".parse().expect("address"))
    );
    assert_eq!(
        rule.min_ttl,
        Some(2),
        "min_hop_limit is min_ttl's IPv6 name"
    );
    assert_eq!(rule.outputs[0].ttl, 8, "hop_limit is ttl's IPv6 name");
    assert!(
        rule.outputs[1].destination.is_ipv4(),
        "an IPv4 output of an IPv6 input"
    );
    assert_eq!(rule.outputs[2].interface, None);
    assert_eq!(
        rule.input.to_string(),
        "eth0:[ff3e::8000:1]:5000 from fd00:1::5"
    );
    assert_eq!(rule.outputs[0].to_string(), "eth1:[ff3e::8000:2]:6000");
}

/// `IPV6` with the first occurrence of `from` replaced by `to`, which must be refused with one
/// problem in `field` whose message contains `expected`.
fn ipv6_refused(from: &str, to: &str, field: &str, expected: &str) {
    assert!(IPV6.contains(from), "{from:?} is not in the sample");
    let problem = only_problem(&IPV6.replacen(from, to, 1));
    assert_eq!(problem.field, field, "{problem:?}");
    assert!(problem.message.contains(expected), "{problem:?}");
    assert!(problem.line.is_some(), "{problem:?}");
}

#[test]
fn ipv6_groups_that_cannot_be_relayed_are_refused() {
    let group = "rules[0].input.group";
    ipv6_refused(
        "group: ff3e::8000:1",
        "group: fd00::1",
        group,
        "not a multicast group",
    );
    ipv6_refused(
        "group: ff3e::8000:1",
        "group: ff01::1234",
        group,
        "interface-local",
    );
    ipv6_refused(
        "group: ff3e::8000:1",
        "group: ff10::1234",
        group,
        "reserved scope 0",
    );
    for protocol in ["ff02::1", "ff02::2", "ff02::16", "ff02::1:ff00:1234"] {
        ipv6_refused(
            "group: ff3e::8000:1",
            &format!("group: {protocol}"),
            group,
            "the link's own protocols",
        );
    }
    // A link-scope group of an application is a stream like any other.
    let link_scope = IPV6.replacen("group: ff3e::8000:1", "group: ff02::1234", 1);
    parse(&link_scope).expect("ff02::1234 is an application's group");
}

#[test]
fn ipv6_sources_are_unicast_senders_of_the_group_family() {
    let source = "rules[0].input.source";
    ipv6_refused(
        "source: fd00:1::5",
        "source: 10.0.0.5",
        source,
        "of one family",
    );
    ipv6_refused(
        "source: fd00:1::5",
        "source: ff3e::9",
        source,
        "cannot be a sender",
    );
    ipv6_refused(
        "source: fd00:1::5",
        "source: '::'",
        source,
        "cannot be a sender",
    );
    ipv6_refused(
        "source: fd00:1::5",
        "source: ::1",
        source,
        "cannot be a sender",
    );
    ipv6_refused(
        "source: fd00:1::5",
        "source: fd00:1::zz",
        source,
        "is not an IP address",
    );
}

#[test]
fn ipv6_destinations_need_their_scope_and_an_interface() {
    let destination = "rules[0].outputs[0].destination";
    ipv6_refused(
        "destination: ff3e::8000:2",
        "destination: ff01::2",
        destination,
        "interface-local",
    );
    ipv6_refused(
        "destination: ff3e::8000:2",
        "destination: '::'",
        destination,
        "cannot be a destination",
    );
    ipv6_refused(
        "destination: fd00:9::9",
        "destination: ::ffff:10.9.9.9",
        "rules[0].outputs[2].destination",
        "write the IPv4 address 10.9.9.9 itself",
    );
    ipv6_refused(
        "destination: fd00:9::9",
        "destination: ff02::5",
        "rules[0].outputs[2].interface",
        "needs an interface",
    );
    ipv6_refused(
        "destination: fd00:9::9",
        "destination: fe80::9",
        "rules[0].outputs[2].interface",
        "link-local destination fe80::9 needs an interface",
    );
}

#[test]
fn ttl_and_hop_limit_are_one_setting() {
    ipv6_refused(
        "hop_limit: 8",
        "hop_limit: 8\n        ttl: 8",
        "rules[0].outputs[0].hop_limit",
        "the same setting",
    );
    ipv6_refused(
        "hop_limit: 8",
        "hop_limit: 0",
        "rules[0].outputs[0].hop_limit",
        "hop limit 0: use 1 to 255",
    );
    ipv6_refused(
        "min_hop_limit: 2",
        "min_hop_limit: 2\n      min_ttl: 2",
        "rules[0].input.min_hop_limit",
        "the same setting",
    );
}

#[test]
fn an_ipv6_output_on_its_own_input_loops() {
    let looped = IPV6.replacen(
        "      - interface: eth1\n        destination: ff3e::8000:2\n        port: 6000",
        "      - interface: eth0\n        destination: ff3e::8000:1\n        port: 5000",
        1,
    );
    let problem = only_problem(&looped);
    assert_eq!(problem.field, "rules[0].outputs[0]");
    assert!(
        problem
            .message
            .contains("output [ff3e::8000:1]:5000 on eth0 is the rule's own input"),
        "{problem:?}"
    );
}
