//! The rules file: its YAML form, the validated model the rest of MCR uses, and every check
//! that stands between the two.
//!
//! A file is accepted whole or not at all: [`load`] either returns a [`Config`] in which every
//! rule can be applied, or a [`ConfigError`] listing each problem with file, line and field.

mod events;
mod lines;
mod read;
mod shape;

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use self::lines::LineIndex;
pub use self::shape::{MAX_DEPTH, MAX_NODES};

/// TTL of relayed packets when an output does not set one: enough to cross a campus or a
/// data-centre fabric, small enough that a misrouted stream dies out.
pub const DEFAULT_TTL: u8 = 16;
/// Highest DSCP: six bits.
pub const MAX_DSCP: u8 = 63;
/// Longest rule name.
pub const MAX_NAME_LEN: usize = 64;
/// Longest Linux interface name (`IFNAMSIZ` less the terminating NUL).
const MAX_IFNAME_LEN: usize = 15;
/// Largest rules file read: far beyond any valid one (4,096 rules with 16,384 outputs in all
/// take about 2 MiB in block style), small enough that a mistaken path costs little memory.
pub const MAX_FILE_SIZE: u64 = 16 * 1024 * 1024;

/// A validated rules file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub settings: Settings,
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Number of forwarding workers; `None` means one per CPU.
    pub workers: Option<usize>,
    /// CPUs the workers run on, worker `i` on `cpus[i % len]`; `None` means all CPUs.
    pub cpus: Option<Vec<usize>>,
    /// The unprivileged user the workers run as.
    pub user: String,
    /// How long a worker may make no progress while packets wait for it before it is killed
    /// and restarted.
    pub stall_timeout: Duration,
    /// The path of rules that do not choose one.
    pub path: PathChoice,
    /// Where the Prometheus/OpenMetrics endpoint listens (`settings.metrics.listen`); no
    /// endpoint without one.
    pub metrics_listen: Option<SocketAddr>,
    /// How the workers are scheduled (`settings.realtime`).
    pub scheduling: Scheduling,
    /// Packets a worker may be behind before the classifier sheds its packets
    /// (`settings.shed_window`); each input socket's receive buffer is sized to hold as many.
    pub shed_window: u64,
}

impl Settings {
    /// The settings `reloaded` changes that a reload cannot apply, by their name in the rules
    /// file: the running workers, their sockets and the metrics endpoint keep what they
    /// started with until mcr restarts. `path` and `realtime` apply on reload.
    pub fn waiting_for_restart(&self, reloaded: &Settings) -> Vec<&'static str> {
        // Every field named, so that a new setting needs a decision here.
        let Settings {
            workers,
            cpus,
            user,
            stall_timeout,
            path: _,
            metrics_listen,
            scheduling: _,
            shed_window,
        } = self;
        [
            ("settings.workers", *workers != reloaded.workers),
            ("settings.cpus", *cpus != reloaded.cpus),
            ("settings.user", *user != reloaded.user),
            (
                "settings.stall_timeout",
                *stall_timeout != reloaded.stall_timeout,
            ),
            (
                "settings.metrics.listen",
                *metrics_listen != reloaded.metrics_listen,
            ),
            ("settings.shed_window", *shed_window != reloaded.shed_window),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
    }
}

/// The scheduling policy the supervisor gives each worker process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "lowercase")]
pub enum Scheduling {
    /// The kernel's default time sharing (`SCHED_OTHER`): a worker waits its turn behind
    /// whatever else runs on its CPU.
    #[default]
    Normal,
    /// `SCHED_FIFO` at `priority`: a woken worker runs at once, ahead of every time-shared
    /// task on its CPU, and keeps the CPU until it blocks.
    Fifo { priority: u8 },
}

impl fmt::Display for Scheduling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Normal => f.pad("normal"),
            Self::Fifo { priority } => f.pad(&format!("fifo {priority}")),
        }
    }
}

/// `SCHED_FIFO` priority of `realtime: true`: above every time-shared task, below the
/// kernel's interrupt threads (50) and anything a deployment runs at a higher priority.
pub const DEFAULT_REALTIME_PRIORITY: u8 = 10;
/// Highest `settings.realtime.priority`: a worker must never get ahead of the kernel's
/// threaded interrupt handlers (priority 50), which bring it its packets.
pub const MAX_REALTIME_PRIORITY: u8 = 49;

/// Who writes a rule's outputs: the classifier in the kernel, or a worker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathChoice {
    /// The kernel path when every output can be written there, the workers otherwise.
    #[default]
    Auto,
    /// The kernel path; the workers (saying why) when an output cannot be written there.
    Kernel,
    /// Always the workers.
    Worker,
}

/// Most workers: the worker index has eight bits in a packet's steering mark.
pub const MAX_WORKERS: usize = mcr_common::MAX_WORKERS as usize;

/// The user workers run as unless the file says otherwise.
pub const DEFAULT_USER: &str = "nobody";
/// `settings.stall_timeout` unless the file says otherwise: a worker is noticed within a
/// second or two and restarted soon after, long enough that a busy moment is not a stall.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest `settings.stall_timeout`, in seconds.
pub const MAX_STALL_TIMEOUT: u64 = 3600;
/// `settings.shed_window` unless the file says otherwise: four times the worker's standard
/// receive ring, room for a burst or a brief hold of the worker (on the benchmark VM, holds by
/// other threads of up to 14 ms: 2,000 packets at 140 k pps), for a standing delay under
/// sustained overload of about 33 ms at 250 k packets per second (decision 0017, which
/// measured 32,768 against it).
pub const DEFAULT_SHED_WINDOW: u64 = 8192;
/// Smallest `settings.shed_window`: the worker's standard receive ring (2,048 buffers, see
/// `worker::buffers`). The classifier counts every packet the worker has not yet reported as
/// taken, and the worker reports once per turn of its loop, after a turn that may fill the
/// whole ring; a smaller window would shed packets the worker still had buffers for.
pub const MIN_SHED_WINDOW: u64 = 2048;
/// Largest `settings.shed_window`: the largest measured (decision 0017). An input socket of a
/// 1500-byte MTU interface needs 126 MiB to hold this many, within the 160 MiB a socket may
/// have (`sockets::ingress`), so that the classifier sheds before a socket overflows; beyond
/// it a sustained overload holds every relayed packet back by more than 130 ms at 250 k
/// packets per second.
pub const MAX_SHED_WINDOW: u64 = 32_768;
/// Most outputs of one rule.
pub const MAX_OUTPUTS_PER_RULE: usize = crate::command::MAX_FDS;
/// Most rules: the classifier's maps have this many entries.
pub const MAX_RULES: usize = mcr_common::MAX_RULES as usize;
/// Most outputs over all rules: each has a counter slot in the workers' counter blocks.
pub const MAX_OUTPUTS: usize = crate::counters::MAX_OUTPUTS;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub input: Input,
    /// Lowest TTL an input packet may have to be relayed (`input.min_ttl` in the file);
    /// `None` relays any TTL.
    pub min_ttl: Option<u8>,
    pub outputs: Vec<Output>,
    /// The rule's own `path`, else `settings.path`.
    pub path: PathChoice,
    /// Whether the host's own stack also gets the input packets (applications on the relay
    /// host that subscribe to the input group). Off by default: a relayed packet is consumed.
    pub local_delivery: bool,
}

/// Where a rule's stream arrives: an IPv4 or an IPv6 group.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Input {
    pub interface: String,
    pub group: IpAddr,
    pub port: u16,
    /// Only this sender, for source-specific rules; of the group's family.
    pub source: Option<IpAddr>,
}

/// Where a rule's stream is re-published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    /// Interface to send on; required for multicast destinations, optional for unicast.
    pub interface: Option<String>,
    /// Of either family, whatever the input's: the output is sent from the output interface's
    /// address of the destination's family.
    pub destination: IpAddr,
    pub port: u16,
    /// IPv4 TTL or IPv6 hop limit (`ttl` or `hop_limit` in the file).
    pub ttl: u8,
    /// DSCP (0-63) of the relayed packets; `None` carries the input packet's. The ECN bits
    /// are always the input's.
    pub dscp: Option<u8>,
}

impl fmt::Display for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stream = SocketAddr::new(self.group, self.port);
        match self.source {
            Some(source) => write!(f, "{}:{stream} from {source}", self.interface),
            None => write!(f, "{}:{stream}", self.interface),
        }
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let destination = SocketAddr::new(self.destination, self.port);
        match &self.interface {
            Some(interface) => write!(f, "{interface}:{destination}"),
            None => write!(f, "{destination}"),
        }
    }
}

/// One problem in a rules file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub line: Option<usize>,
    /// Path of the field, such as `rules[2].input.group`.
    pub field: String,
    pub message: String,
}

/// A rules file that cannot be used, with every problem found in it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read rules file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: is {kind}, not a regular file: give the path of the rules file itself", path.display())]
    NotRegularFile { path: PathBuf, kind: &'static str },
    #[error(
        "{}: {size} bytes or more: a rules file has at most {MAX_FILE_SIZE} bytes (16 MiB)",
        path.display()
    )]
    TooLarge { path: PathBuf, size: u64 },
    #[error("{}", render_problems(path, problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    let lines: Vec<String> = problems
        .iter()
        .map(|problem| {
            let location = match problem.line {
                Some(line) => format!("{}:{line}", path.display()),
                None => path.display().to_string(),
            };
            if problem.field.is_empty() {
                format!("{location}: {}", problem.message)
            } else {
                format!("{location}: {}: {}", problem.field, problem.message)
            }
        })
        .collect();
    lines.join("\n")
}

/// Reads and validates the rules file at `path`.
///
/// Whatever `path` names, this ends in bounded time and memory: anything but a regular file is
/// refused without waiting, the size is capped, and the document's nesting and size are
/// bounded before the full parse.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = read::read_text(path)?;
    parse(&text).map_err(|problems| ConfigError::Invalid {
        path: path.to_owned(),
        problems,
    })
}

/// What `mcr check` says of the file at `path`: the validated rules and the warnings about
/// this host (see [`host_warnings`]), or why the file cannot be used.
pub fn check_file(path: &Path) -> Result<(Config, String), ConfigError> {
    let text = read::read_text(path)?;
    let config = parse(&text).map_err(|problems| ConfigError::Invalid {
        path: path.to_owned(),
        problems,
    })?;
    let warnings = host_warnings(&text, &config);
    Ok((config, render_problems(path, &warnings)))
}

/// What would keep valid rules waiting on this host now: an output interface that exists but
/// has no address of its output's family to send from. Not an error, since addresses come and
/// go (an IPv6 address appears after duplicate address detection, or with router
/// advertisements) and the rule starts by itself when one does; `mcr run` shows the rule as
/// waiting, with this reason.
fn host_warnings(text: &str, config: &Config) -> Vec<Problem> {
    let index = LineIndex::new(text);
    let mut warnings = Vec::new();
    for (i, rule) in config.rules.iter().enumerate() {
        for (j, output) in rule.outputs.iter().enumerate() {
            let Some(interface) = &output.interface else {
                continue;
            };
            if crate::sockets::interfaces::index(interface).is_none()
                || crate::sockets::interfaces::source_address(interface, output.destination)
                    .is_some()
            {
                continue;
            }
            let field = format!("rules[{i}].outputs[{j}].interface");
            warnings.push(Problem {
                line: index.line_of(&field),
                field,
                message: format!(
                    "{interface} has no {} address here to send to {} from: the rule waits \
                     until it has one",
                    family_name(output.destination),
                    output.destination
                ),
            });
        }
    }
    warnings
}

/// Validates the text of a rules file.
pub fn parse(text: &str) -> Result<Config, Vec<Problem>> {
    // Before `serde_yaml` sees the text: its parse time grows with the square of the nesting.
    shape::check(text).map_err(|problem| vec![problem])?;
    let raw: RawConfig =
        serde_yaml::from_str(text).map_err(|error| vec![syntax_problem(&error)])?;
    let index = LineIndex::new(text);
    let mut checker = Checker {
        index: &index,
        problems: Vec::new(),
    };
    let config = checker.check(raw);
    if checker.problems.is_empty() {
        Ok(config)
    } else {
        Err(checker.problems)
    }
}

/// Turns a `serde_yaml` error into a problem: its message starts with the field path when it
/// has one (`rules[0].input: unknown field ...`) and ends with the position, which moves into
/// `line`.
fn syntax_problem(error: &serde_yaml::Error) -> Problem {
    let mut message = error.to_string();
    if let Some(at) = message.rfind(" at line ") {
        message.truncate(at);
    }
    let (field, message) = match message.split_once(": ") {
        Some((field, rest)) if !field.contains(' ') => (field.to_owned(), rest.to_owned()),
        _ => (String::new(), message),
    };
    Problem {
        line: error.location().map(|location| location.line()),
        field,
        message: shorten(message),
    }
}

/// A YAML value as the user wrote it, near enough, for an error message.
fn yaml_text(value: &serde_yaml::Value) -> String {
    let text = serde_yaml::to_string(value).unwrap_or_default();
    shorten(text.trim_end().to_owned())
}

/// `message` cut in the middle when long: `serde_yaml` quotes the offending value whole, and a
/// value can be megabytes long. The start says what is wrong, the end what was expected.
fn shorten(message: String) -> String {
    const HEAD: usize = 120;
    const TAIL: usize = 60;
    let chars = message.chars().count();
    if chars <= HEAD + TAIL + 20 {
        return message;
    }
    let head: String = message.chars().take(HEAD).collect();
    let tail: String = message.chars().skip(chars - TAIL).collect();
    format!(
        "{head}…({} bytes left out)…{tail}",
        message.len() - head.len() - tail.len()
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    settings: RawSettings,
    rules: Vec<RawRule>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    workers: Option<u64>,
    cpus: Option<Vec<u64>>,
    user: Option<String>,
    stall_timeout: Option<i64>,
    path: Option<PathChoice>,
    metrics: Option<RawMetrics>,
    /// `true`, `false` or `{priority: N}`: read as YAML and checked by hand, so that each
    /// wrong form gets a message naming what is allowed.
    realtime: Option<serde_yaml::Value>,
    shed_window: Option<i64>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    input: RawInput,
    outputs: Vec<RawOutput>,
    path: Option<PathChoice>,
    #[serde(default)]
    local_delivery: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInput {
    interface: String,
    /// Addresses are read as text and parsed in the checks, whose errors name the line of
    /// the field and the text that is not an address.
    group: String,
    port: u16,
    source: Option<String>,
    min_ttl: Option<i64>,
    /// `min_ttl` under its IPv6 name.
    min_hop_limit: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    interface: Option<String>,
    destination: String,
    port: u16,
    ttl: Option<i64>,
    /// `ttl` under its IPv6 name.
    hop_limit: Option<i64>,
    dscp: Option<i64>,
}

struct Checker<'a> {
    index: &'a LineIndex,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn problem(&mut self, field: String, message: impl Into<String>) {
        self.problems.push(Problem {
            line: self.index.line_of(&field),
            field,
            message: message.into(),
        });
    }

    fn check(&mut self, raw: RawConfig) -> Config {
        let settings = self.check_settings(raw.settings);
        if raw.rules.is_empty() {
            self.problem(
                "rules".into(),
                "no rules: a rules file needs at least one rule",
            );
        }
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut inputs: HashMap<Input, usize> = HashMap::new();
        let mut rules = Vec::with_capacity(raw.rules.len());
        for (i, raw_rule) in raw.rules.into_iter().enumerate() {
            let rule = self.check_rule(i, raw_rule, settings.path);
            if let Some(first) = names.insert(rule.name.clone(), i) {
                self.problem(
                    format!("rules[{i}].name"),
                    format!(
                        "duplicate rule name {}: rules[{first}] already has it",
                        Quoted(&rule.name)
                    ),
                );
            }
            if let Some(first) = inputs.insert(rule.input.clone(), i) {
                self.problem(
                    format!("rules[{i}].input"),
                    format!(
                        "same input {} as rules[{first}] ({}): a stream can belong to one rule only",
                        rule.input, rules_name(&rules, first)
                    ),
                );
            }
            rules.push(rule);
        }
        self.check_capacity(&rules);
        Config { settings, rules }
    }

    fn check_settings(&mut self, raw: RawSettings) -> Settings {
        let workers = raw.workers.and_then(|workers| {
            if let Ok(n @ 1..=MAX_WORKERS) = usize::try_from(workers) {
                Some(n)
            } else {
                self.problem(
                    "settings.workers".into(),
                    format!("{workers} workers: must be between 1 and {MAX_WORKERS}"),
                );
                None
            }
        });
        let cpus = raw.cpus.map(|cpus| {
            if cpus.is_empty() {
                self.problem(
                    "settings.cpus".into(),
                    "empty CPU list: leave it out to use all CPUs",
                );
            }
            // The machine's online CPUs, not the ones this process may use: `mcr check` may
            // run confined to fewer.
            let online = aya::util::online_cpus().unwrap_or_default();
            let usable = usable_cpus(&cpus);
            cpus.into_iter()
                .enumerate()
                .filter_map(|(i, cpu)| match u32::try_from(cpu) {
                    Ok(id) if online.contains(&id) && usable.contains(&cpu) => {
                        usize::try_from(id).ok()
                    }
                    Ok(id) if online.contains(&id) => {
                        self.problem(
                            format!("settings.cpus[{i}]"),
                            format!(
                                "CPU {cpu} is online but this process may not run on it (a \
                                 cgroup's cpuset, such as systemd's AllowedCPUs=, leaves it \
                                 out): a worker pinned to it could not start"
                            ),
                        );
                        None
                    }
                    _ => {
                        self.problem(
                            format!("settings.cpus[{i}]"),
                            format!("CPU {cpu} is not online (online: {online:?})"),
                        );
                        None
                    }
                })
                .collect()
        });
        let user = raw.user.unwrap_or_else(|| DEFAULT_USER.to_owned());
        self.check_user(&user);
        let stall_timeout = raw.stall_timeout.map_or(DEFAULT_STALL_TIMEOUT, |seconds| {
            if let Ok(whole @ 1..=MAX_STALL_TIMEOUT) = u64::try_from(seconds) {
                Duration::from_secs(whole)
            } else {
                self.problem(
                    "settings.stall_timeout".into(),
                    format!("{seconds} seconds: use 1 to {MAX_STALL_TIMEOUT}"),
                );
                DEFAULT_STALL_TIMEOUT
            }
        });
        let metrics_listen = raw
            .metrics
            .and_then(|metrics| metrics.listen)
            .and_then(|listen| self.check_metrics_listen(&listen));
        let scheduling = raw.realtime.map_or(Scheduling::Normal, |realtime| {
            self.check_realtime(&realtime)
        });
        let shed_window = raw.shed_window.map_or(DEFAULT_SHED_WINDOW, |packets| {
            if let Ok(window @ MIN_SHED_WINDOW..=MAX_SHED_WINDOW) = u64::try_from(packets) {
                window
            } else {
                self.problem(
                    "settings.shed_window".into(),
                    format!(
                        "{packets} packets: use {MIN_SHED_WINDOW} to {MAX_SHED_WINDOW} (below, \
                         the classifier would shed packets a worker has receive buffers for; \
                         above, an input socket could not hold a window)"
                    ),
                );
                DEFAULT_SHED_WINDOW
            }
        });
        Settings {
            workers,
            cpus,
            user,
            stall_timeout,
            path: raw.path.unwrap_or_default(),
            metrics_listen,
            scheduling,
            shed_window,
        }
    }

    /// `realtime: true`, `realtime: false`, or `realtime: {priority: N}`.
    fn check_realtime(&mut self, realtime: &serde_yaml::Value) -> Scheduling {
        use serde_yaml::Value;
        const FORMS: &str = "use true, false or {priority: N} with N from 1 to 49";
        let field = "settings.realtime";
        match realtime {
            Value::Bool(false) => Scheduling::Normal,
            Value::Bool(true) => Scheduling::Fifo {
                priority: DEFAULT_REALTIME_PRIORITY,
            },
            Value::Mapping(options) => {
                let mut priority = DEFAULT_REALTIME_PRIORITY;
                for (key, value) in options {
                    match key.as_str() {
                        Some("priority") => match value.as_i64().map(u8::try_from) {
                            Some(Ok(n @ 1..=MAX_REALTIME_PRIORITY)) => priority = n,
                            _ => self.problem(
                                format!("{field}.priority"),
                                format!(
                                    "priority {}: use 1 to {MAX_REALTIME_PRIORITY} (from 50 up \
                                     a worker would get ahead of the kernel's interrupt \
                                     threads, which bring it its packets)",
                                    yaml_text(value)
                                ),
                            ),
                        },
                        _ => self.problem(
                            field.into(),
                            format!("unknown field {}: {FORMS}", yaml_text(key)),
                        ),
                    }
                }
                Scheduling::Fifo { priority }
            }
            other => {
                self.problem(field.into(), format!("{}: {FORMS}", yaml_text(other)));
                Scheduling::Normal
            }
        }
    }

    /// An IP address and a port: the endpoint is scraped at a fixed address, so neither a
    /// host name (resolved once, to whatever it meant then) nor port 0 (a port chosen anew at
    /// each start) would do.
    fn check_metrics_listen(&mut self, listen: &str) -> Option<SocketAddr> {
        match listen.parse::<SocketAddr>() {
            Ok(address) if address.port() != 0 => Some(address),
            Ok(_) => {
                self.problem(
                    "settings.metrics.listen".into(),
                    format!("{listen}: port 0; give the port scrapers connect to, such as 127.0.0.1:9433"),
                );
                None
            }
            Err(_) => {
                self.problem(
                    "settings.metrics.listen".into(),
                    format!(
                        "{}: not an IP address and port, such as 127.0.0.1:9433 or [::1]:9433",
                        Quoted(listen)
                    ),
                );
                None
            }
        }
    }

    /// Looks `user` up as `mcr run` does before it starts a worker: a user that does not exist
    /// stops `mcr run` at start, and a worker that would be root refuses to run.
    fn check_user(&mut self, user: &str) {
        let field = "settings.user".to_owned();
        match nix::unistd::User::from_name(user) {
            Ok(Some(found)) if found.uid.is_root() => self.problem(
                field,
                format!(
                    "user {} is root (uid 0): workers run as an unprivileged user; name one",
                    Quoted(user)
                ),
            ),
            Ok(Some(_)) => {}
            Ok(None) => self.problem(
                field,
                format!(
                    "user {} does not exist on this system: create it or name another \
                     unprivileged user",
                    Quoted(user)
                ),
            ),
            Err(error) => self.problem(
                field,
                format!("cannot look up user {}: {error}", Quoted(user)),
            ),
        }
    }

    /// What `mcr run` can hold: a rule over the limits would fail to start there.
    fn check_capacity(&mut self, rules: &[Rule]) {
        if rules.len() > MAX_RULES {
            self.problem(
                format!("rules[{MAX_RULES}]"),
                format!(
                    "{} rules: the classifier holds at most {MAX_RULES}, and this is the first \
                     one over",
                    rules.len()
                ),
            );
        }
        let total: usize = rules.iter().map(|rule| rule.outputs.len()).sum();
        let mut running = 0;
        for (i, rule) in rules.iter().enumerate() {
            running += rule.outputs.len();
            if running > MAX_OUTPUTS {
                self.problem(
                    format!("rules[{i}].outputs"),
                    format!(
                        "{total} outputs over all rules: the workers count at most {MAX_OUTPUTS}, \
                         and this rule's outputs go over"
                    ),
                );
                break;
            }
        }
    }

    fn check_rule(&mut self, i: usize, raw: RawRule, default_path: PathChoice) -> Rule {
        let at = format!("rules[{i}]");
        if raw.name.is_empty()
            || raw.name.len() > MAX_NAME_LEN
            || !raw
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            self.problem(
                format!("{at}.name"),
                format!(
                    "invalid rule name {}: use 1 to {MAX_NAME_LEN} letters, digits, '-', '_' or '.'",
                    Quoted(&raw.name)
                ),
            );
        }
        self.check_interface(&format!("{at}.input.interface"), &raw.input.interface);
        let group = self.address(&format!("{at}.input.group"), &raw.input.group);
        if let Some(group) = group {
            self.check_input_group(&format!("{at}.input.group"), group);
        }
        if raw.input.port == 0 {
            self.problem(format!("{at}.input.port"), "port 0: use 1 to 65535");
        }
        let source = raw.input.source.as_deref().and_then(|source| {
            let field = format!("{at}.input.source");
            let source = self.address(&field, source)?;
            if let Some(group) = group {
                self.check_input_source(&field, group, source);
            }
            Some(source)
        });
        let min_ttl = match (raw.input.min_ttl, raw.input.min_hop_limit) {
            (Some(_), Some(_)) => {
                self.problem(
                    format!("{at}.input.min_hop_limit"),
                    "min_ttl and min_hop_limit are the same setting: give one",
                );
                None
            }
            (Some(value), None) => self.check_min_ttl(&format!("{at}.input.min_ttl"), value),
            (None, Some(value)) => self.check_min_ttl(&format!("{at}.input.min_hop_limit"), value),
            (None, None) => None,
        };
        let input = Input {
            interface: raw.input.interface,
            // A file with a problem is refused whole: the placeholder goes no further.
            group: group.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            port: raw.input.port,
            source,
        };
        if raw.outputs.is_empty() {
            self.problem(
                format!("{at}.outputs"),
                "no outputs: a rule needs at least one output",
            );
        }
        if raw.outputs.len() > MAX_OUTPUTS_PER_RULE {
            self.problem(
                format!("{at}.outputs"),
                format!(
                    "{} outputs: a rule has at most {MAX_OUTPUTS_PER_RULE}",
                    raw.outputs.len()
                ),
            );
        }
        let outputs = raw
            .outputs
            .into_iter()
            .enumerate()
            .map(|(j, output)| self.check_output(&format!("{at}.outputs[{j}]"), &input, output))
            .collect();
        Rule {
            name: raw.name,
            input,
            min_ttl,
            outputs,
            path: raw.path.unwrap_or(default_path),
            local_delivery: raw.local_delivery,
        }
    }

    fn check_output(&mut self, at: &str, input: &Input, raw: RawOutput) -> Output {
        if let Some(interface) = &raw.interface {
            self.check_interface(&format!("{at}.interface"), interface);
        }
        let destination = self
            .address(&format!("{at}.destination"), &raw.destination)
            .inspect(|&destination| {
                self.check_destination(at, destination, raw.interface.is_some());
            })
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        if raw.port == 0 {
            self.problem(format!("{at}.port"), "port 0: use 1 to 65535");
        }
        if raw.interface.as_deref() == Some(input.interface.as_str())
            && destination == input.group
            && raw.port == input.port
        {
            self.problem(
                at.to_owned(),
                format!(
                    "output {} on {} is the rule's own input: it would loop forever",
                    SocketAddr::new(destination, raw.port),
                    input.interface
                ),
            );
        }
        let ttl = match (raw.ttl, raw.hop_limit) {
            (Some(_), Some(_)) => {
                self.problem(
                    format!("{at}.hop_limit"),
                    "ttl and hop_limit are the same setting: give one",
                );
                DEFAULT_TTL
            }
            (Some(ttl), None) => self.check_ttl(&format!("{at}.ttl"), "TTL", ttl),
            (None, Some(limit)) => self.check_ttl(&format!("{at}.hop_limit"), "hop limit", limit),
            (None, None) => DEFAULT_TTL,
        };
        let dscp = raw.dscp.and_then(|dscp| {
            let valid = u8::try_from(dscp).ok().filter(|dscp| *dscp <= MAX_DSCP);
            if valid.is_none() {
                self.problem(
                    format!("{at}.dscp"),
                    format!("DSCP {dscp}: use 0 to {MAX_DSCP} (46 is EF, 34 AF41)"),
                );
            }
            valid
        });
        Output {
            interface: raw.interface,
            destination,
            port: raw.port,
            ttl,
            dscp,
        }
    }

    /// The IPv4 or IPv6 address written in `field`.
    fn address(&mut self, field: &str, text: &str) -> Option<IpAddr> {
        let parsed = text.parse().ok();
        if parsed.is_none() {
            self.problem(
                field.to_owned(),
                format!(
                    "{} is not an IP address: write one such as 239.1.1.1 or ff3e::1",
                    Quoted(text)
                ),
            );
        }
        parsed
    }

    /// An input group: multicast, and one whose packets a relay may take (not a group that
    /// belongs to the link's own protocols, nor one that never leaves a host).
    fn check_input_group(&mut self, field: &str, group: IpAddr) {
        match group {
            IpAddr::V4(group) if !group.is_multicast() => self.problem(
                field.to_owned(),
                format!("{group} is not a multicast group (224.0.0.0/4 or ff00::/8)"),
            ),
            IpAddr::V4(group) if is_link_local_group(group) => self.problem(
                field.to_owned(),
                format!(
                    "{group} is a link-local group (224.0.0.0/24): these belong to routing and \
                     discovery protocols such as OSPF, PIM and IGMP and never leave their link"
                ),
            ),
            IpAddr::V4(_) => {}
            IpAddr::V6(group) if !group.is_multicast() => self.problem(
                field.to_owned(),
                format!("{group} is not a multicast group (224.0.0.0/4 or ff00::/8)"),
            ),
            IpAddr::V6(group) => {
                if let Some(reason) = unusable_ipv6_scope(group) {
                    self.problem(field.to_owned(), format!("{group} {reason}"));
                } else if is_ipv6_protocol_group(group) {
                    self.problem(
                        field.to_owned(),
                        format!(
                            "{group} belongs to the link's own protocols (all nodes, all \
                             routers, MLDv2 reports, solicited-node neighbour discovery): \
                             such packets are not a stream to relay"
                        ),
                    );
                }
            }
        }
    }

    /// A source-specific input's sender: a unicast address of the group's family.
    fn check_input_source(&mut self, field: &str, group: IpAddr, source: IpAddr) {
        let usable = match source {
            IpAddr::V4(source) => {
                !(source.is_multicast() || source.is_unspecified() || source.is_broadcast())
            }
            IpAddr::V6(source) => {
                !(source.is_multicast() || source.is_unspecified() || source.is_loopback())
            }
        };
        if !usable {
            self.problem(
                field.to_owned(),
                format!("{source} cannot be a sender: give the sender's unicast address"),
            );
        } else if source.is_ipv4() != group.is_ipv4() {
            self.problem(
                field.to_owned(),
                format!(
                    "sender {source} is {} but group {group} is {}: a packet's source and \
                     destination are of one family",
                    family_name(source),
                    family_name(group)
                ),
            );
        }
    }

    /// An output's destination: a multicast group (with an interface to send on) or a unicast
    /// host, of either family.
    fn check_destination(&mut self, at: &str, destination: IpAddr, has_interface: bool) {
        let field = format!("{at}.destination");
        match destination {
            IpAddr::V4(address) if address.is_unspecified() || address.is_broadcast() => {
                self.problem(field, format!("{address} cannot be a destination"));
                return;
            }
            IpAddr::V6(address) if address.is_unspecified() => {
                self.problem(field, format!("{address} cannot be a destination"));
                return;
            }
            IpAddr::V6(address) if address.to_ipv4_mapped().is_some() => {
                self.problem(
                    field,
                    format!(
                        "{address} is an IPv4-mapped address: write the IPv4 address {} itself",
                        address
                            .to_ipv4_mapped()
                            .map_or_else(String::new, |v4| v4.to_string())
                    ),
                );
                return;
            }
            IpAddr::V6(address) if address.is_multicast() => {
                if let Some(reason) = unusable_ipv6_scope(address) {
                    self.problem(field, format!("{address} {reason}"));
                    return;
                }
            }
            IpAddr::V6(address) if address.is_unicast_link_local() && !has_interface => {
                self.problem(
                    format!("{at}.interface"),
                    format!(
                        "link-local destination {address} needs an interface: the same \
                         address can be on every link"
                    ),
                );
                return;
            }
            IpAddr::V4(_) | IpAddr::V6(_) => {}
        }
        if destination.is_multicast() && !has_interface {
            self.problem(
                format!("{at}.interface"),
                format!("multicast destination {destination} needs an interface to send on"),
            );
        }
    }

    fn check_ttl(&mut self, field: &str, what: &str, value: i64) -> u8 {
        u8::try_from(value)
            .ok()
            .filter(|ttl| *ttl >= 1)
            .unwrap_or_else(|| {
                self.problem(field.to_owned(), format!("{what} {value}: use 1 to 255"));
                DEFAULT_TTL
            })
    }

    fn check_min_ttl(&mut self, field: &str, value: i64) -> Option<u8> {
        let valid = u8::try_from(value).ok().filter(|ttl| *ttl >= 1);
        if valid.is_none() {
            self.problem(
                field.to_owned(),
                format!("minimum TTL {value}: use 1 to 255"),
            );
        }
        valid
    }

    /// The kernel's own rules for a device name (`dev_valid_name`): a rule that names an
    /// interface that cannot exist would wait for it forever.
    fn check_interface(&mut self, field: &str, name: &str) {
        if name.is_empty()
            || name.len() > MAX_IFNAME_LEN
            || name == "."
            || name == ".."
            || name.contains(['/', ':'])
            || name.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            self.problem(
                field.to_owned(),
                format!(
                    "invalid interface name {}: 1 to {MAX_IFNAME_LEN} bytes, not '.' or '..', \
                     no '/', ':', spaces or control characters",
                    Quoted(name)
                ),
            );
        }
    }
}

/// Those of `cpus` a thread of this process can be pinned to, found by pinning a scratch thread
/// to each as a worker pins itself. A CPU outside the cgroup's cpuset is online but refused;
/// the process's own affinity mask does not matter, since a thread may widen its own.
fn usable_cpus(requested: &[u64]) -> Vec<u64> {
    let cpus = requested.to_vec();
    let tried = std::thread::Builder::new()
        .name("mcr-cpu-check".into())
        .spawn(move || {
            cpus.into_iter()
                .filter(|&cpu| {
                    let mut set = nix::sched::CpuSet::new();
                    usize::try_from(cpu).is_ok_and(|cpu| set.set(cpu).is_ok())
                        && nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                            .is_ok()
                })
                .collect()
        })
        .and_then(|thread| {
            thread
                .join()
                .map_err(|_| std::io::Error::other("the CPU check panicked"))
        });
    // Without a thread to try them on, no CPU is refused here: `mcr run` reports the failure.
    tried.unwrap_or_else(|_| requested.to_vec())
}

/// 224.0.0.0/24, the Local Network Control Block (RFC 5771): routers never forward it.
fn is_link_local_group(group: Ipv4Addr) -> bool {
    matches!(group.octets(), [224, 0, 0, _])
}

/// Why an IPv6 group's scope (RFC 4291 §2.7) cannot be relayed, if it cannot: scope 0 is
/// reserved, and interface-local groups (`ff01::/16`, `ff11::/16`…) never leave the host.
fn unusable_ipv6_scope(group: Ipv6Addr) -> Option<&'static str> {
    match group.segments()[0] & 0x000f {
        0 => Some("has the reserved scope 0: no packet is sent to it"),
        1 => Some(
            "is interface-local (scope 1, like ff01::/16): its packets never leave the host \
             that sends them",
        ),
        _ => None,
    }
}

/// The link-local groups IPv6 itself uses (RFC 4291, RFC 3810): all nodes `ff02::1`, all
/// routers `ff02::2`, MLDv2-capable routers `ff02::16`, and the solicited-node groups
/// `ff02::1:ff00:0/104` of neighbour discovery.
fn is_ipv6_protocol_group(group: Ipv6Addr) -> bool {
    match group.segments() {
        [0xff02, 0, 0, 0, 0, 0, 0, 1 | 2 | 0x16] => true,
        [0xff02, 0, 0, 0, 0, 1, high, _] => high & 0xff00 == 0xff00,
        _ => false,
    }
}

fn family_name(address: IpAddr) -> &'static str {
    if address.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// A value from the file as an error message quotes it: whole when short, cut when long, so that
/// a mistaken multi-megabyte line does not make a multi-megabyte message.
struct Quoted<'a>(&'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 64;
        match self.0.char_indices().nth(SHOWN) {
            None => write!(f, "{:?}", self.0),
            Some((cut, _)) => write!(f, "{:?}… ({} bytes)", &self.0[..cut], self.0.len()),
        }
    }
}

fn rules_name(rules: &[Rule], i: usize) -> &str {
    rules.get(i).map_or("", |rule| rule.name.as_str())
}

#[cfg(test)]
mod tests;
