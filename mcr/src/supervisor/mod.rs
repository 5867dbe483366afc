//! `mcr run`: the privileged supervisor. It loads the classifier, starts the workers, keeps
//! maps, sockets and workers in sync with the rules file and the interfaces that exist,
//! restarts workers that die, and answers the control socket until SIGINT or SIGTERM.

mod dataplane;
mod rules;
mod watch;
mod workers;

use std::{
    fs,
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
    time::Instant as TokioInstant,
};

use self::{
    dataplane::Dataplane,
    rules::RuleTable,
    watch::{Change, Changes},
    workers::WorkerEvent,
};
use crate::{
    bpf::Classifier,
    config::{self, Config, Settings},
    control::{Request, Response},
    metrics::{self, ConfigHealth, Snapshot},
    status::{
        InterfaceStatus, ReloadRecord, ReloadResult, RuleCounts, StatusReport, Trigger, WorkerState,
    },
    systemd,
};

/// How often counters are read for the rates `mcr stats` shows.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Changes that arrive within this time are handled together (an editor's save is several
/// file events; a new veth pair is several link events).
const SETTLE: Duration = Duration::from_millis(200);

pub struct RunOptions {
    pub config: PathBuf,
    pub pin_dir: PathBuf,
    pub control_socket: PathBuf,
    /// Where to serve metrics; overrides `settings.metrics.listen`.
    pub metrics_listen: Option<SocketAddr>,
}

type Call = (Request, oneshot::Sender<Response>);

/// A reload under way: the rules file is read and validated on a blocking thread, so a slow
/// or hostile file never holds up signals, the control socket or worker restarts.
struct Reloading {
    trigger: Trigger,
    parse: tokio::task::JoinHandle<Result<Config, config::ConfigError>>,
    /// `mcr reload` callers waiting for the outcome.
    waiters: Vec<oneshot::Sender<Response>>,
}

/// Changes wait until they have settled: an editor's save is several file events, a new veth
/// pair several link events, a resolving neighbour several neighbour events.
#[derive(Default)]
struct Settling {
    rules_file: Option<TokioInstant>,
    interfaces: Option<TokioInstant>,
    routes: Option<TokioInstant>,
}

impl Settling {
    fn slot(&mut self, change: Change) -> &mut Option<TokioInstant> {
        match change {
            Change::RulesFile => &mut self.rules_file,
            Change::Interfaces => &mut self.interfaces,
            Change::Routes => &mut self.routes,
        }
    }

    /// Notes `change`: it is handled [`SETTLE`] after its first event, together with
    /// whatever else of its kind arrived meanwhile.
    fn note(&mut self, change: Change, now: TokioInstant) {
        self.slot(change).get_or_insert(now + SETTLE);
    }

    /// The change to handle next, and when.
    fn next(&self) -> Option<(TokioInstant, Change)> {
        [
            (self.rules_file, Change::RulesFile),
            (self.interfaces, Change::Interfaces),
            (self.routes, Change::Routes),
        ]
        .into_iter()
        .filter_map(|(at, change)| Some((at?, change)))
        .min_by_key(|(at, _)| *at)
    }

    fn clear(&mut self, change: Change) {
        *self.slot(change) = None;
    }
}

/// Reloads asked for while one was under way: they run once it ends (the file may have
/// changed since its parse began), and answer their own callers.
#[derive(Default)]
struct NextReload {
    trigger: Option<Trigger>,
    waiters: Vec<oneshot::Sender<Response>>,
}

/// Runs the supervisor until SIGINT or SIGTERM, then detaches everything and removes the pins.
pub fn run(options: &RunOptions) -> anyhow::Result<()> {
    let config = config::load(&options.config)?;
    raise_descriptor_limit();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the supervisor's runtime")?;
    runtime.block_on(serve(options, config))
}

/// Everything the event loop changes.
struct Supervisor<'a> {
    options: &'a RunOptions,
    classifier: Classifier,
    dataplane: Dataplane,
    table: RuleTable,
    /// The rules file as last applied.
    config: Config,
    /// The settings mcr started with: what runs, bar those a reload applies (`realtime`,
    /// `path`), whatever the rules file says now.
    started_with: Settings,
    events: mpsc::Sender<WorkerEvent>,
    started: Instant,
    reloads: u64,
    last_reload: Option<ReloadRecord>,
    /// When the rules file was last applied (at start or on a reload), for the metrics.
    last_applied: SystemTime,
    /// Whether systemd has been told that the relay runs (`READY=1`).
    ready_sent: bool,
}

async fn serve(options: &RunOptions, config: Config) -> anyhow::Result<()> {
    refuse_if_running(&options.control_socket)?;
    let metrics_listener = match options.metrics_listen.or(config.settings.metrics_listen) {
        Some(address) => Some(metrics::bind(address).await?),
        None => None,
    };
    let classifier = Classifier::load(&options.pin_dir)?;
    tracing::info!(pin_dir = %options.pin_dir.display(), "classifier loaded, maps pinned");

    let (events, mut worker_events) = mpsc::channel(64);
    let dataplane = match classifier
        .worker_load_map()
        .context("sharing the worker load map")
        .and_then(|load_map| Dataplane::start(&config.settings, load_map, events.clone()))
    {
        Ok(dataplane) => dataplane,
        Err(error) => {
            let _ = classifier.shutdown();
            return Err(error);
        }
    };
    tracing::info!(workers = dataplane.worker_count(), "workers started");

    let mut supervisor = Supervisor {
        options,
        classifier,
        dataplane,
        table: RuleTable::default(),
        started_with: config.settings.clone(),
        config,
        events,
        started: Instant::now(),
        reloads: 0,
        last_reload: None,
        last_applied: SystemTime::now(),
        ready_sent: false,
    };
    // Watching starts before the rules are applied: a neighbour that resolves, or an
    // interface that appears, while thousands of rules start is handled right after.
    let changes = Arc::new(Changes::default());
    let _file_watch = match watch::watch_rules_file(&options.config, Arc::clone(&changes)) {
        Ok(watcher) => Some(watcher),
        Err(error) => {
            tracing::warn!("{error:#}; the rules file is reloaded on SIGHUP and `mcr reload` only");
            None
        }
    };
    if let Err(error) = watch::watch_interfaces(Arc::clone(&changes)) {
        tracing::warn!("{error:#}; interfaces that appear later are picked up on reload only");
    }
    supervisor.apply(Trigger::Start);

    // The socket appears only once the rules are in place: a client that can connect sees
    // the relay as configured.
    let result = match bind_control_socket(&options.control_socket) {
        Ok(listener) => {
            supervisor
                .event_loop(&listener, &mut worker_events, &changes, metrics_listener)
                .await
        }
        Err(error) => Err(error),
    };

    let _ = fs::remove_file(&options.control_socket);
    // Steering stops first, then the workers, then the sockets (and with them the IGMP
    // memberships).
    let Supervisor {
        classifier,
        mut dataplane,
        ..
    } = supervisor;
    let shutdown = classifier.shutdown();
    tracing::info!("classifier detached, pins removed");
    dataplane.stop_workers();
    wait_for_workers(&mut dataplane, &mut worker_events).await;
    tracing::info!("workers stopped");
    dataplane.close();
    tracing::info!("sockets closed, groups left");
    result.and(shutdown.map_err(Into::into))
}

impl Supervisor<'_> {
    async fn event_loop(
        &mut self,
        listener: &UnixListener,
        worker_events: &mut mpsc::Receiver<WorkerEvent>,
        changes: &Changes,
        metrics_listener: Option<TcpListener>,
    ) -> anyhow::Result<()> {
        let mut interrupt = signal(SignalKind::interrupt()).context("handling SIGINT")?;
        let mut terminate = signal(SignalKind::terminate()).context("handling SIGTERM")?;
        let mut hangup = signal(SignalKind::hangup()).context("handling SIGHUP")?;
        let mut sampler = tokio::time::interval(SAMPLE_INTERVAL);
        let (calls, mut pending) = mpsc::channel::<Call>(64);
        let mut reloading: Option<Reloading> = None;
        let mut next_reload = NextReload::default();
        let mut settling = Settling::default();
        let mut metrics_server = metrics::Server::spawn(metrics_listener);
        let mut watchdog = systemd::watchdog_interval().map(tokio::time::interval);

        tracing::info!(control_socket = %self.options.control_socket.display(), "running");
        self.notify_ready_once_workers_run();
        loop {
            let settled = settling.next();
            let at = settled.map_or_else(|| TokioInstant::now() + Duration::from_hours(1), |s| s.0);
            tokio::select! {
                _ = interrupt.recv() => break,
                _ = terminate.recv() => break,
                _ = hangup.recv() => {
                    next_reload.trigger.get_or_insert(Trigger::Sighup);
                }
                change = changes.next() => settling.note(change, TokioInstant::now()),
                () = tokio::time::sleep_until(at), if settled.is_some() => {
                    let change = settled.map(|s| s.1).expect("the branch runs only when settled");
                    settling.clear(change);
                    match change {
                        Change::RulesFile => {
                            next_reload.trigger.get_or_insert(Trigger::FileChange);
                        }
                        Change::Interfaces => self.reconcile(),
                        Change::Routes => {
                            self.table.replan(&mut self.classifier, &mut self.dataplane);
                        }
                    }
                }
                parsed = async {
                    match reloading.as_mut() {
                        Some(reload) => (&mut reload.parse).await,
                        None => std::future::pending().await,
                    }
                }, if reloading.is_some() => {
                    let reload = reloading.take().expect("the branch runs only while reloading");
                    self.reload_finished(reload, parsed);
                }
                _ = sampler.tick() => {
                    self.dataplane.sample();
                    self.table.sample(&self.classifier, &self.dataplane);
                }
                Some(event) = worker_events.recv() => {
                    self.worker_event(event);
                    self.notify_ready_once_workers_run();
                }
                Some(reply) = metrics_server.requests.recv() => {
                    let _ = reply.send(Arc::new(self.metrics_snapshot()));
                }
                _ = async { watchdog.as_mut().expect("polled only with a watchdog").tick().await },
                    if watchdog.is_some() => systemd::watchdog_ping(),
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        tokio::spawn(serve_client(stream, calls.clone()));
                    }
                    Err(error) => tracing::warn!(%error, "control socket accept failed"),
                },
                Some((request, reply)) = pending.recv() => match request {
                    Request::Stats => {
                        let report = self.table.report(&self.classifier, &self.dataplane);
                        let _ = reply.send(Response::Stats(report));
                    }
                    Request::Status => {
                        let _ = reply.send(Response::Status(Box::new(self.status())));
                    }
                    // Answered when the reload ends.
                    Request::Reload => {
                        next_reload.trigger.get_or_insert(Trigger::Command);
                        next_reload.waiters.push(reply);
                    }
                },
            }
            if reloading.is_none()
                && let Some(trigger) = next_reload.trigger.take()
            {
                let path = self.options.config.clone();
                self.notify_reloading();
                reloading = Some(Reloading {
                    trigger,
                    parse: tokio::task::spawn_blocking(move || config::load(&path)),
                    waiters: std::mem::take(&mut next_reload.waiters),
                });
            }
        }
        tracing::info!("shutting down");
        systemd::stopping();
        Ok(())
    }

    /// Tells systemd that the relay runs, once: the rules are applied, and no worker is still
    /// starting (each runs, or has failed and is being retried, which the status line says).
    fn notify_ready_once_workers_run(&mut self) {
        if self.ready_sent
            || self
                .dataplane
                .worker_summaries()
                .iter()
                .any(|worker| worker.state == WorkerState::Starting)
        {
            return;
        }
        self.ready_sent = true;
        let status = systemd::status_line(&self.status());
        tracing::info!(%status, "ready");
        systemd::ready(&status);
    }

    /// Tells systemd that a reload begins, once it has been told that the relay runs.
    fn notify_reloading(&self) {
        if self.ready_sent {
            systemd::reloading();
        }
    }

    /// What the metrics endpoint renders: the report `mcr stats` reads, and the last reload.
    fn metrics_snapshot(&self) -> Snapshot {
        Snapshot {
            stats: self.table.report(&self.classifier, &self.dataplane),
            config: ConfigHealth {
                last_reload_successful: self
                    .last_reload
                    .as_ref()
                    .is_none_or(|reload| reload.result == ReloadResult::Applied),
                last_success: self.last_applied,
            },
        }
    }

    /// Applies `self.config` to the interfaces as they are now.
    fn apply(&mut self, trigger: Trigger) {
        let summary = self
            .table
            .apply(&mut self.classifier, &mut self.dataplane, &self.config);
        tracing::info!(
            config = %self.options.config.display(),
            ?trigger,
            active = summary.active,
            waiting = summary.waiting,
            failed = summary.failed,
            "rules applied"
        );
    }

    /// A reload's parse ended: applies the file and answers those who asked for the reload.
    fn reload_finished(
        &mut self,
        reload: Reloading,
        parsed: Result<Result<Config, config::ConfigError>, tokio::task::JoinError>,
    ) {
        let parsed = parsed.unwrap_or_else(|error| {
            Err(config::ConfigError::Read {
                path: self.options.config.clone(),
                source: std::io::Error::other(error),
            })
        });
        let record = self.finish_reload(reload.trigger, parsed);
        if self.ready_sent {
            systemd::ready(&systemd::status_line(&self.status()));
        }
        for waiter in reload.waiters {
            let _ = waiter.send(Response::Reload(record.clone()));
        }
    }

    /// Applies a re-read rules file; a file that failed validation changes nothing.
    fn finish_reload(
        &mut self,
        trigger: Trigger,
        parsed: Result<Config, config::ConfigError>,
    ) -> ReloadRecord {
        self.reloads += 1;
        let (result, error) = match parsed {
            Ok(config) => {
                let scheduling = config.settings.scheduling;
                if scheduling != self.config.settings.scheduling {
                    tracing::info!(%scheduling, "worker scheduling changed (settings.realtime)");
                    self.dataplane.schedule_workers(scheduling);
                }
                // Against what runs, not the last file: a value reloaded twice still waits, and
                // one put back as it was no longer does.
                let waiting = self.started_with.waiting_for_restart(&config.settings);
                if !waiting.is_empty() {
                    tracing::warn!(
                        "{} changed: the running value stays until mcr restarts",
                        waiting.join(", ")
                    );
                }
                self.config = config;
                self.apply(trigger);
                self.last_applied = SystemTime::now();
                (ReloadResult::Applied, None)
            }
            Err(error) => {
                tracing::error!(
                    ?trigger,
                    "rules file rejected, the running rules stay as they were:\n{error}"
                );
                (ReloadResult::Rejected, Some(error.to_string()))
            }
        };
        let record = ReloadRecord {
            time: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            trigger,
            result,
            error,
        };
        self.last_reload = Some(record.clone());
        record
    }

    /// Interfaces changed: rules waiting for them start, rules that lost them wait again.
    fn reconcile(&mut self) {
        let before = self.table.summary();
        let after = self
            .table
            .apply(&mut self.classifier, &mut self.dataplane, &self.config);
        if before != after {
            tracing::info!(
                active = after.active,
                waiting = after.waiting,
                failed = after.failed,
                "interfaces changed; rules re-applied"
            );
            if self.ready_sent {
                systemd::status(&systemd::status_line(&self.status()));
            }
        }
    }

    fn worker_event(&mut self, event: WorkerEvent) {
        if let Some((index, delay)) = self.dataplane.worker_event(event) {
            let events = self.events.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = events.send(WorkerEvent::RestartDue { index }).await;
            });
        }
    }

    fn status(&self) -> StatusReport {
        let summary = self.table.summary();
        let per_interface = self.table.rules_per_interface();
        let mut interfaces: Vec<InterfaceStatus> = self
            .classifier
            .attachments()
            .map(|(name, attachment)| InterfaceStatus {
                name: name.clone(),
                ifindex: attachment.ifindex,
                attach: attachment.mode.name().to_owned(),
                rules: per_interface.get(name.as_str()).copied().unwrap_or(0),
            })
            .collect();
        interfaces.sort_by(|a, b| a.name.cmp(&b.name));
        StatusReport {
            config: self.options.config.display().to_string(),
            pid: std::process::id(),
            uptime_seconds: self.started.elapsed().as_secs(),
            pin_dir: self.classifier.pin_dir().display().to_string(),
            shed_window: Some(self.started_with.shed_window),
            rules: RuleCounts {
                total: summary.active + summary.waiting + summary.failed,
                active: summary.active,
                waiting: summary.waiting,
                failed: summary.failed,
                kernel: summary.kernel,
            },
            reloads: self.reloads,
            last_reload: self.last_reload.clone(),
            workers: self.dataplane.worker_summaries(),
            interfaces,
            rule_states: self.table.rule_states(),
        }
    }
}

/// Gives stopping workers a moment to exit on their own.
async fn wait_for_workers(dataplane: &mut Dataplane, events: &mut mpsc::Receiver<WorkerEvent>) {
    let deadline = TokioInstant::now() + Duration::from_secs(2);
    while !dataplane.pids().is_empty() {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(event)) => {
                dataplane.worker_event(event);
            }
            Ok(None) | Err(_) => break,
        }
    }
}

/// Reads one request from a CLI client, has the event loop answer it, writes the answer.
async fn serve_client(stream: UnixStream, calls: mpsc::Sender<Call>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(read).read_line(&mut line),
    )
    .await;
    if !matches!(read, Ok(Ok(n)) if n > 0) {
        return;
    }
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(request) => {
            let (reply, answer) = oneshot::channel();
            if calls.send((request, reply)).await.is_err() {
                return;
            }
            match answer.await {
                Ok(response) => response,
                Err(_) => return,
            }
        }
        Err(error) => Response::Error(format!("bad request: {error}")),
    };
    if let Ok(mut text) = serde_json::to_string(&response) {
        text.push('\n');
        let _ = write.write_all(text.as_bytes()).await;
    }
}

/// Unicast outputs, memberships and packet sockets are file descriptors, in the supervisor and
/// again in the workers (which inherit the limit): thousands of rules need more than the usual
/// soft limit of 1024, so it is raised to the hard limit.
fn raise_descriptor_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(%error, soft, hard, "cannot raise the open file limit");
            }
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot read the open file limit"),
    }
}

/// Refuses to start when another instance answers on the control socket.
fn refuse_if_running(path: &Path) -> anyhow::Result<()> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!(
            "another mcr instance is running on control socket {}; give this one its own --pin-dir",
            path.display()
        );
    }
    Ok(())
}

/// Binds the control socket, replacing a socket file a dead instance left behind.
fn bind_control_socket(path: &Path) -> anyhow::Result<UnixListener> {
    let _ = fs::remove_file(path);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)
            .with_context(|| format!("creating control socket directory {}", dir.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding control socket {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting permissions of {}", path.display()))?;
    Ok(listener)
}
