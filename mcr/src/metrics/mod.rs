//! The Prometheus/`OpenMetrics` endpoint of `mcr run` (`settings.metrics.listen`,
//! `--metrics-listen`).
//!
//! The supervisor's event loop only takes snapshots: the same [`StatsReport`] `mcr stats`
//! reads, and how the last reload went. Everything else happens off the loop: accepting,
//! reading requests and writing responses in tasks of this module (they share the runtime's
//! thread with the loop, but only between non-blocking reads and writes), and rendering, which
//! takes about 100 ms for the largest rules file, on a blocking thread of its own. A
//! client cannot hold up the loop or forwarding: connections are limited in number, a request
//! must arrive whole within [`REQUEST_TIMEOUT`] and fit in [`http::MAX_REQUEST_HEAD`] bytes, a
//! response must be taken within [`RESPONSE_TIMEOUT`], and scrapes within
//! [`SNAPSHOT_MAX_AGE`] of each other share one snapshot, so however fast clients ask, the
//! loop takes at most a few snapshots a second.

mod http;
mod render;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Mutex, Semaphore, mpsc, oneshot},
    time::Instant,
};

use self::http::{Request, RequestError, Response};
pub use self::render::{Format, render};
use crate::stats::StatsReport;

/// Connections served at once; more are closed as they arrive, until one ends.
pub const MAX_CONNECTIONS: usize = 8;
/// Time a client has to send its whole request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to take its whole response.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time the event loop has to hand over a snapshot before the scrape is answered with 503.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes within this time of a snapshot are served from it.
pub const SNAPSHOT_MAX_AGE: Duration = Duration::from_millis(250);

/// What the endpoint renders: the statistics `mcr stats` shows, and how the last reload went.
#[derive(Debug)]
pub struct Snapshot {
    pub stats: StatsReport,
    pub config: ConfigHealth,
}

#[derive(Debug)]
pub struct ConfigHealth {
    /// Whether the last reading of the rules file (at start or on a reload) was applied.
    pub last_reload_successful: bool,
    /// When the rules file was last applied.
    pub last_success: SystemTime,
}

/// A request for a snapshot, answered by the event loop.
pub type SnapshotRequest = oneshot::Sender<Arc<Snapshot>>;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics scrapes on {address}: {source}")]
pub struct BindError {
    address: SocketAddr,
    source: std::io::Error,
}

/// Binds the endpoint's address; done before the relay starts, so a taken port stops it with
/// an error that names the address.
pub async fn bind(address: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| BindError { address, source })
}

/// The last snapshot and what was rendered from it: scrapes in quick succession share both.
struct Cache {
    snapshot: Option<(Instant, Arc<Snapshot>)>,
    rendered: Vec<(Format, Arc<String>)>,
}

struct Endpoint {
    snapshots: mpsc::Sender<SnapshotRequest>,
    /// Held while a snapshot is fetched or rendered: concurrent scrapes wait for that one
    /// rather than each asking the loop.
    cache: Mutex<Cache>,
}

/// Why a scrape could not be answered with metrics.
#[derive(Debug, thiserror::Error)]
enum Unavailable {
    #[error("the relay did not hand over its counters in time")]
    NoSnapshot,
    #[error("the metrics could not be encoded")]
    Render,
}

/// The endpoint's task, and the snapshot requests the event loop answers. Dropping it stops
/// the endpoint.
pub struct Server {
    /// Requests for snapshots; without an endpoint, none ever arrive.
    pub requests: mpsc::Receiver<SnapshotRequest>,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Keeps `requests` open when there is no endpoint.
    _idle: Option<mpsc::Sender<SnapshotRequest>>,
}

impl Server {
    /// Serves scrapes on `listener`, if there is one, from a task of its own.
    pub fn spawn(listener: Option<TcpListener>) -> Self {
        let (snapshots, requests) = mpsc::channel(1);
        match listener {
            Some(listener) => {
                if let Ok(address) = listener.local_addr() {
                    tracing::info!(%address, "serving metrics at /metrics");
                }
                Self {
                    requests,
                    task: Some(tokio::spawn(serve(listener, snapshots))),
                    _idle: None,
                }
            }
            None => Self {
                requests,
                task: None,
                _idle: Some(snapshots),
            },
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Serves scrapes on `listener` until the task is dropped, asking the event loop for
/// snapshots on `snapshots`.
async fn serve(listener: TcpListener, snapshots: mpsc::Sender<SnapshotRequest>) {
    let endpoint = Arc::new(Endpoint {
        snapshots,
        cache: Mutex::new(Cache {
            snapshot: None,
            rendered: Vec::new(),
        }),
    });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of descriptors, most likely: wait rather than spin.
                tracing::warn!(%error, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            // Every slot is taken: the connection is closed unanswered rather than queued, so
            // that many idle connections cost nothing but their refusal.
            drop(stream);
            continue;
        };
        let endpoint = Arc::clone(&endpoint);
        tokio::spawn(async move {
            endpoint.serve_connection(stream).await;
            drop(slot);
        });
    }
}

impl Endpoint {
    async fn serve_connection(&self, mut stream: TcpStream) {
        let request =
            match tokio::time::timeout(REQUEST_TIMEOUT, http::read_request(&mut stream)).await {
                Ok(Ok(request)) => request,
                Ok(Err(RequestError::Closed)) => return,
                Ok(Err(error)) => {
                    let text = format!("{error}\n");
                    Response::text(error.status(), &text)
                        .send(&mut stream, RESPONSE_TIMEOUT)
                        .await;
                    return;
                }
                Err(_) => {
                    let text = format!(
                        "request not complete within {} s\n",
                        REQUEST_TIMEOUT.as_secs()
                    );
                    Response::text("408 Request Timeout", &text)
                        .send(&mut stream, RESPONSE_TIMEOUT)
                        .await;
                    return;
                }
            };
        match request {
            Request::Index { head_only } => {
                let mut response = Response::text("200 OK", "MCR: metrics at /metrics\n");
                response.head_only = head_only;
                response.send(&mut stream, RESPONSE_TIMEOUT).await;
            }
            Request::Metrics { format, head_only } => match self.rendered(format).await {
                Ok(body) => {
                    Response {
                        status: "200 OK",
                        content_type: format.content_type(),
                        body: body.as_bytes(),
                        head_only,
                    }
                    .send(&mut stream, RESPONSE_TIMEOUT)
                    .await;
                }
                Err(error) => {
                    let text = format!("{error}\n");
                    Response::text("503 Service Unavailable", &text)
                        .send(&mut stream, RESPONSE_TIMEOUT)
                        .await;
                }
            },
        }
    }

    /// The metrics in `format`, from a snapshot at most [`SNAPSHOT_MAX_AGE`] old.
    async fn rendered(&self, format: Format) -> Result<Arc<String>, Unavailable> {
        let mut cache = self.cache.lock().await;
        let fresh = cache
            .snapshot
            .as_ref()
            .filter(|(taken, _)| taken.elapsed() < SNAPSHOT_MAX_AGE)
            .map(|(_, snapshot)| Arc::clone(snapshot));
        let snapshot = if let Some(snapshot) = fresh {
            snapshot
        } else {
            let snapshot = self.snapshot().await?;
            cache.snapshot = Some((Instant::now(), Arc::clone(&snapshot)));
            cache.rendered.clear();
            snapshot
        };
        if let Some((_, text)) = cache.rendered.iter().find(|(f, _)| *f == format) {
            return Ok(Arc::clone(text));
        }
        // Thousands of rules take a while to encode: not on the runtime's only thread.
        let text = tokio::task::spawn_blocking(move || render(snapshot, format))
            .await
            .map_err(|_| Unavailable::Render)?
            .map_err(|_| Unavailable::Render)?;
        let text = Arc::new(text);
        cache.rendered.push((format, Arc::clone(&text)));
        Ok(text)
    }

    async fn snapshot(&self) -> Result<Arc<Snapshot>, Unavailable> {
        let (reply, answer) = oneshot::channel();
        tokio::time::timeout(SNAPSHOT_TIMEOUT, async {
            self.snapshots
                .send(reply)
                .await
                .map_err(|_| Unavailable::NoSnapshot)?;
            answer.await.map_err(|_| Unavailable::NoSnapshot)
        })
        .await
        .map_err(|_| Unavailable::NoSnapshot)?
    }
}
