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
    assert_eq!(rule.input.source, Some(Ipv4Addr::new(10, 0, 0, 5)));
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
        problem.message.contains("invalid IPv4 address"),
        "{problem:?}"
    );
}

#[test]
fn input_group_must_be_multicast() {
    let problem = only_problem(&good_with("group: 239.1.1.1", "group: 10.1.1.1"));
    assert_eq!(problem.line, Some(7));
    assert_eq!(problem.field, "rules[0].input.group");
    assert!(problem.message.contains("not an IPv4 multicast group"));
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
