//! The `mcr` command line.

use std::{
    io::{IsTerminal as _, Write as _},
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
};

use anyhow::bail;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    config,
    control::{self, Request, Response},
    stats,
    status::{self, ReloadResult},
    supervisor::{self, RunOptions},
    systemd,
};

/// Default pin directory of the classifier's maps.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/mcr";
/// The rules file `mcr run` and `mcr check` read unless told otherwise.
pub const DEFAULT_CONFIG: &str = "/etc/mcr/rules.yaml";

#[derive(Parser)]
#[command(
    name = "mcr",
    version,
    about = "MCR: a multicast relay for Linux",
    long_about = "MCR receives UDP multicast streams on an input interface and re-publishes each \
packet to one or more outputs (a group and port on another interface, or a unicast address), \
sent from the relay's own address, so that downstream routers accept the stream despite their \
reverse-path check. An eBPF classifier on the input interfaces matches packets against the \
rules of the rules file (mcr-rules(5)) and either writes the outputs itself (the kernel path) \
or hands the packets to unprivileged worker processes (the worker path).\n\n`mcr run` is the \
relay; the other commands validate a rules file or talk to a running relay over its control \
socket.",
    after_long_help = "FILES:\n  /etc/mcr/rules.yaml      the rules file, see mcr-rules(5)\n  \
/run/mcr/mcr.sock        the control socket of the instance pinned at /sys/fs/bpf/mcr\n  \
/sys/fs/bpf/mcr          the classifier's pinned maps (bpftool map dump pinned ...)\n\n\
The Debian package runs `mcr run` as the systemd service mcr.service (Type=notify): \
`systemctl reload mcr` runs `mcr reload`, and the log is in `journalctl -u mcr`.\n\n\
SEE ALSO: mcr-rules(5), mcr-run(8), mcr-check(8), mcr-stats(8), mcr-status(8), \
mcr-reload(8), systemd.service(5)"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay (needs root, or `CAP_BPF`, `CAP_PERFMON`, `CAP_NET_ADMIN`, `CAP_NET_RAW`,
    /// and `CAP_SETUID`, `CAP_SETGID`, `CAP_SETPCAP` to start the workers unprivileged).
    ///
    /// Runs until SIGINT or SIGTERM, re-reads the rules file when it changes, on SIGHUP and on
    /// `mcr reload`. Under systemd it reports readiness, reloads and shutdown (`Type=notify`),
    /// pings the watchdog when `WatchdogSec=` is set, and puts each log line's journal priority
    /// before it.
    Run {
        /// The rules file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[command(flatten)]
        instance: Instance,
        /// Serve Prometheus metrics at `http://ADDRESS/metrics` (for example 127.0.0.1:9433);
        /// overrides `settings.metrics.listen` of the rules file.
        #[arg(long, value_name = "ADDRESS")]
        metrics_listen: Option<SocketAddr>,
        /// Log level when `RUST_LOG` is not set: error, warn, info, debug or trace.
        #[arg(long, default_value = "info")]
        log_level: String,
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Validate a rules file without running it: prints `OK: N rules`, or every problem with
    /// its file, line and field and exits with status 1.
    Check {
        /// The rules file.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Show what a running instance is doing: rules file, last reload, workers, interfaces.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        instance: Instance,
    },
    /// Ask a running instance to re-read its rules file now; prints the outcome, and exits
    /// with status 1 when the file is rejected (the running rules stay).
    Reload {
        #[command(flatten)]
        instance: Instance,
    },
    /// A forwarding worker; started by `mcr run`, not by hand.
    #[command(hide = true)]
    Worker,
    /// Show per-rule counters and rates of a running instance.
    Stats {
        /// Print a JSON array of rules instead of the table.
        #[arg(long)]
        json: bool,
        /// With --json: print the array of workers instead of rules.
        #[arg(long, requires = "json")]
        workers: bool,
        /// With --json: print the classifier's counts of packets it did not relay, by reason.
        #[arg(long, requires = "json", conflicts_with = "workers")]
        skipped: bool,
        /// Redraw the table every second until interrupted.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
        #[command(flatten)]
        instance: Instance,
    },
}

/// Which instance: its pin directory, and its control socket (derived from the pin directory
/// unless given).
#[derive(Args)]
struct Instance {
    /// Directory on bpffs where the maps are pinned.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Control socket; default /run/mcr/<pin directory name>.sock.
    #[arg(long)]
    control_socket: Option<PathBuf>,
}

impl Instance {
    fn control_socket(&self) -> PathBuf {
        self.control_socket
            .clone()
            .unwrap_or_else(|| control::default_socket(&self.pin_dir))
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

impl Cli {
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Command::Run {
                config,
                instance,
                metrics_listen,
                log_level,
                log_format,
            } => {
                init_logging(&log_level, log_format);
                supervisor::run(&RunOptions {
                    config,
                    control_socket: instance.control_socket(),
                    pin_dir: instance.pin_dir,
                    metrics_listen,
                })?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Worker => {
                crate::worker::run()?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Check { config } => match config::check_file(&config) {
                Ok((config, warnings)) => {
                    for warning in warnings.lines() {
                        eprintln!("warning: {warning}");
                    }
                    println!("OK: {} rules", config.rules.len());
                    Ok(ExitCode::SUCCESS)
                }
                Err(error) => {
                    eprintln!("{error}");
                    Ok(ExitCode::FAILURE)
                }
            },
            Command::Stats {
                json,
                workers,
                skipped,
                watch,
                instance,
            } => {
                let socket = instance.control_socket();
                loop {
                    let Response::Stats(report) = control::call(&socket, &Request::Stats)? else {
                        bail!("mcr answered something other than statistics");
                    };
                    if json && skipped {
                        println!("{}", serde_json::to_string_pretty(&report.skipped)?);
                    } else if json && workers {
                        println!("{}", serde_json::to_string_pretty(&report.workers)?);
                    } else if json {
                        println!("{}", serde_json::to_string_pretty(&report.rules)?);
                    } else if watch {
                        // Home the cursor and clear the screen, then draw.
                        print!("\x1b[H\x1b[2J{}", stats::render_table(&report));
                        std::io::stdout().flush()?;
                    } else {
                        print!("{}", stats::render_table(&report));
                    }
                    if !watch {
                        return Ok(ExitCode::SUCCESS);
                    }
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
            Command::Status { json, instance } => {
                let Response::Status(report) =
                    control::call(&instance.control_socket(), &Request::Status)?
                else {
                    bail!("mcr answered something other than its status");
                };
                if json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print!("{}", status::render(&report));
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Reload { instance } => {
                let Response::Reload(record) =
                    control::call(&instance.control_socket(), &Request::Reload)?
                else {
                    bail!("mcr answered something other than a reload result");
                };
                match record.result {
                    ReloadResult::Applied => {
                        println!("reload {}: rules file applied", record.time);
                        Ok(ExitCode::SUCCESS)
                    }
                    ReloadResult::Rejected => {
                        eprintln!(
                            "reload {}: rules file rejected, the running rules stay as they were:\n{}",
                            record.time,
                            record.error.unwrap_or_default()
                        );
                        Ok(ExitCode::FAILURE)
                    }
                }
            }
        }
    }
}

fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // The netlink message parser warns about attributes newer than itself; MCR only needs
        // to know that something changed.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(format!("{level},netlink_packet_route=error"))
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // Under systemd each line starts with its journal priority (`journalctl -p warning` then
    // shows warnings and errors only); the journal adds its own timestamps.
    let journal = systemd::stderr_is_journal();
    match (format, journal) {
        (LogFormat::Text, false) => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        (LogFormat::Json, false) => builder.json().init(),
        (LogFormat::Text, true) => builder
            .with_ansi(false)
            .event_format(systemd::JournalPriority(
                tracing_subscriber::fmt::format().without_time(),
            ))
            .init(),
        (LogFormat::Json, true) => builder
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(systemd::JournalPriority(
                tracing_subscriber::fmt::format().json().without_time(),
            ))
            .init(),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn run_and_check_read_the_system_rules_file_without_flags() {
        let Ok(Cli {
            command:
                Command::Run {
                    config,
                    metrics_listen,
                    ..
                },
        }) = Cli::try_parse_from(["mcr", "run"])
        else {
            panic!("`mcr run` without flags is refused");
        };
        assert_eq!(config, PathBuf::from("/etc/mcr/rules.yaml"));
        assert_eq!(metrics_listen, None);
        let Ok(Cli {
            command: Command::Check { config },
        }) = Cli::try_parse_from(["mcr", "check"])
        else {
            panic!("`mcr check` without flags is refused");
        };
        assert_eq!(config, PathBuf::from("/etc/mcr/rules.yaml"));
    }

    #[test]
    fn metrics_listen_takes_an_address_and_port() {
        let Ok(Cli {
            command: Command::Run { metrics_listen, .. },
        }) = Cli::try_parse_from(["mcr", "run", "--metrics-listen", "[::1]:9433"])
        else {
            panic!("an IPv6 address is refused");
        };
        assert_eq!(
            metrics_listen,
            Some("[::1]:9433".parse().expect("an address"))
        );
        assert!(Cli::try_parse_from(["mcr", "run", "--metrics-listen", "localhost:9433"]).is_err());
    }
}
