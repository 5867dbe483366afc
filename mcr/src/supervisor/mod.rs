//! `mcr run`: the privileged supervisor. It loads the classifier, starts the workers, keeps
//! maps, sockets and workers in sync with the rules file, restarts workers that die, and
//! answers the control socket until SIGINT or SIGTERM.

mod dataplane;
mod rules;
mod workers;

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
};

use self::{dataplane::Dataplane, rules::RuleTable, workers::WorkerEvent};
use crate::{
    bpf::Classifier,
    config::{self, Config},
    control::{Request, Response},
};

/// How often counters are read for the rates `mcr stats` shows.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

pub struct RunOptions {
    pub config: PathBuf,
    pub pin_dir: PathBuf,
    pub control_socket: PathBuf,
}

type Call = (Request, oneshot::Sender<Response>);

/// Runs the supervisor until SIGINT or SIGTERM, then detaches everything and removes the pins.
pub fn run(options: &RunOptions) -> anyhow::Result<()> {
    let config = config::load(&options.config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the supervisor's runtime")?;
    runtime.block_on(serve(options, &config))
}

async fn serve(options: &RunOptions, config: &Config) -> anyhow::Result<()> {
    refuse_if_running(&options.control_socket)?;
    let mut classifier = Classifier::load(&options.pin_dir)?;
    tracing::info!(pin_dir = %options.pin_dir.display(), "classifier loaded, maps pinned");

    let (events, mut worker_events) = mpsc::channel(64);
    let mut dataplane = match Dataplane::start(&config.settings, events.clone()) {
        Ok(dataplane) => dataplane,
        Err(error) => {
            let _ = classifier.shutdown();
            return Err(error);
        }
    };
    tracing::info!(workers = dataplane.worker_count(), "workers started");

    let mut table = RuleTable::default();
    let summary = table.apply(&mut classifier, &mut dataplane, config);
    tracing::info!(
        config = %options.config.display(),
        active = summary.active,
        waiting = summary.waiting,
        failed = summary.failed,
        "rules applied"
    );

    // The socket appears only once the rules are in place: a client that can connect sees
    // the relay as configured.
    let mut plane = Plane {
        classifier: &mut classifier,
        dataplane: &mut dataplane,
        table: &mut table,
        events: &events,
    };
    let result = match bind_control_socket(&options.control_socket) {
        Ok(listener) => event_loop(options, &listener, &mut plane, &mut worker_events).await,
        Err(error) => Err(error),
    };

    let _ = fs::remove_file(&options.control_socket);
    // Steering stops first, then the workers, then the sockets (and with them the IGMP
    // memberships).
    let shutdown = classifier.shutdown();
    tracing::info!("classifier detached, pins removed");
    dataplane.shutdown();
    wait_for_workers(&mut dataplane, &mut worker_events).await;
    tracing::info!("workers stopped");
    result.and(shutdown.map_err(Into::into))
}

/// Everything the event loop changes.
struct Plane<'a> {
    classifier: &'a mut Classifier,
    dataplane: &'a mut Dataplane,
    table: &'a mut RuleTable,
    events: &'a mpsc::Sender<WorkerEvent>,
}

/// Gives stopping workers a moment to exit on their own.
async fn wait_for_workers(dataplane: &mut Dataplane, events: &mut mpsc::Receiver<WorkerEvent>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while !dataplane.pids().is_empty() {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(event)) => {
                dataplane.worker_event(event);
            }
            Ok(None) | Err(_) => break,
        }
    }
}

async fn event_loop(
    options: &RunOptions,
    listener: &UnixListener,
    plane: &mut Plane<'_>,
    worker_events: &mut mpsc::Receiver<WorkerEvent>,
) -> anyhow::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut hangup = signal(SignalKind::hangup()).context("handling SIGHUP")?;
    let mut sampler = tokio::time::interval(SAMPLE_INTERVAL);
    let (calls, mut pending) = mpsc::channel::<Call>(64);

    tracing::info!(control_socket = %options.control_socket.display(), "running");
    loop {
        tokio::select! {
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = hangup.recv() => reload(&options.config, plane),
            _ = sampler.tick() => {
                plane.dataplane.sample();
                plane.table.sample(plane.classifier, plane.dataplane);
            }
            Some(event) = worker_events.recv() => {
                if let Some((index, delay)) = plane.dataplane.worker_event(event) {
                    let events = plane.events.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        let _ = events.send(WorkerEvent::RestartDue { index }).await;
                    });
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve_client(stream, calls.clone()));
                }
                Err(error) => tracing::warn!(%error, "control socket accept failed"),
            },
            Some((request, reply)) = pending.recv() => {
                let _ = reply.send(answer(&request, plane));
            }
        }
    }
    tracing::info!("shutting down");
    Ok(())
}

fn reload(path: &Path, plane: &mut Plane<'_>) {
    match config::load(path) {
        Ok(config) => {
            let summary = plane
                .table
                .apply(plane.classifier, plane.dataplane, &config);
            tracing::info!(
                config = %path.display(),
                active = summary.active,
                waiting = summary.waiting,
                failed = summary.failed,
                "rules reloaded"
            );
        }
        Err(error) => {
            tracing::error!("rules file rejected, the running rules stay as they were:\n{error}");
        }
    }
}

fn answer(request: &Request, plane: &Plane<'_>) -> Response {
    match request {
        Request::Stats => Response::Stats(plane.table.report(plane.classifier, plane.dataplane)),
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
