//! Just enough HTTP/1.x for a scraper: one request per connection, its head read within a
//! deadline and a size bound and parsed by `httparse`, and a complete response with a length,
//! after which the connection closes.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::render::Format;

/// Largest request head read: a scraper's is a few hundred bytes.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Most header lines in a request.
const MAX_HEADERS: usize = 32;
/// How long, and how much, a client's unread data is drained after its response.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

/// What a client asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// `GET /metrics` (or `HEAD`), in the format the `Accept` header prefers.
    Metrics { format: Format, head_only: bool },
    /// `GET /`: a pointer to `/metrics`.
    Index { head_only: bool },
}

/// Why a request was not served; each maps to a status code.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the client closed the connection before its request was complete")]
    Closed,
    #[error("malformed request")]
    Malformed,
    #[error("request head over {MAX_REQUEST_HEAD} bytes or {MAX_HEADERS} headers")]
    TooLarge,
    #[error("method {0} not allowed: use GET or HEAD")]
    Method(String),
    #[error("no such page: {0} (the metrics are at /metrics)")]
    NotFound(String),
}

/// Reads one request head from `stream`. The caller bounds the time it may take.
pub async fn read_request(stream: &mut TcpStream) -> Result<Request, RequestError> {
    let mut head = vec![0_u8; MAX_REQUEST_HEAD];
    let mut filled = 0;
    loop {
        let read = stream
            .read(&mut head[filled..])
            .await
            .map_err(|_| RequestError::Closed)?;
        if read == 0 {
            return Err(RequestError::Closed);
        }
        filled += read;
        if let Some(request) = parse(&head[..filled])? {
            return Ok(request);
        }
        if filled == head.len() {
            return Err(RequestError::TooLarge);
        }
    }
}

/// Parses a request head: `None` while it is incomplete.
pub fn parse(bytes: &[u8]) -> Result<Option<Request>, RequestError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => return Err(RequestError::TooLarge),
        Err(_) => return Err(RequestError::Malformed),
    }
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Err(RequestError::Malformed);
    };
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        other => return Err(RequestError::Method(other.chars().take(16).collect())),
    };
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    match path {
        "/metrics" => {
            let accepts_openmetrics = request.headers.iter().any(|header| {
                header.name.eq_ignore_ascii_case("accept")
                    && std::str::from_utf8(header.value)
                        .is_ok_and(|value| value.contains("application/openmetrics-text"))
            });
            let format = if accepts_openmetrics {
                Format::OpenMetrics
            } else {
                Format::Prometheus
            };
            Ok(Some(Request::Metrics { format, head_only }))
        }
        "/" => Ok(Some(Request::Index { head_only })),
        other => Err(RequestError::NotFound(other.chars().take(64).collect())),
    }
}

/// A complete response.
pub struct Response<'a> {
    pub status: &'static str,
    pub content_type: &'static str,
    pub body: &'a [u8],
    pub head_only: bool,
}

impl<'a> Response<'a> {
    pub fn text(status: &'static str, body: &'a str) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes(),
            head_only: false,
        }
    }

    /// Writes the response and closes the connection; `timeout` bounds the whole write, so a
    /// client that does not read gives up its connection slot.
    ///
    /// Before closing, what the client still sends is read and dropped for a moment: closing a
    /// socket with unread data resets the connection, and the reset can destroy the response
    /// before the client has read it (an error answered before its request ended).
    pub async fn send(&self, stream: &mut TcpStream, timeout: Duration) {
        let head = format!(
            "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        let sent = tokio::time::timeout(timeout, async {
            stream.write_all(head.as_bytes()).await?;
            if !self.head_only {
                stream.write_all(self.body).await?;
            }
            stream.shutdown().await
        })
        .await;
        if matches!(sent, Ok(Ok(()))) {
            let _ = tokio::time::timeout(LINGER, async {
                let mut discard = [0_u8; 4096];
                let mut left = LINGER_BYTES;
                while left > 0 {
                    match stream.read(&mut discard).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => left = left.saturating_sub(n),
                    }
                }
            })
            .await;
        }
    }
}

impl RequestError {
    pub fn status(&self) -> &'static str {
        match self {
            Self::Closed | Self::Malformed => "400 Bad Request",
            Self::TooLarge => "431 Request Header Fields Too Large",
            Self::Method(_) => "405 Method Not Allowed",
            Self::NotFound(_) => "404 Not Found",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_is_parsed_with_its_format() {
        let prometheus = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: \
            application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.4\r\n\r\n";
        assert_eq!(
            parse(prometheus),
            Ok(Some(Request::Metrics {
                format: Format::OpenMetrics,
                head_only: false
            }))
        );
        assert_eq!(
            parse(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Ok(Some(Request::Metrics {
                format: Format::Prometheus,
                head_only: true
            }))
        );
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n\r\n"),
            Ok(Some(Request::Index { head_only: false }))
        );
    }

    #[test]
    fn incomplete_bad_and_unknown_requests() {
        assert_eq!(parse(b"GET /metrics HTTP/1.1\r\nHost: x"), Ok(None));
        assert_eq!(
            parse(b"\x16\x03\x01\x02\x00\r\n\r\n"),
            Err(RequestError::Malformed)
        );
        assert_eq!(
            parse(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Err(RequestError::Method("POST".into()))
        );
        assert_eq!(
            parse(b"GET /admin HTTP/1.1\r\n\r\n"),
            Err(RequestError::NotFound("/admin".into()))
        );
        let many = "X-Many: y\r\n".repeat(40);
        assert_eq!(
            parse(format!("GET /metrics HTTP/1.1\r\n{many}\r\n").as_bytes()),
            Err(RequestError::TooLarge)
        );
    }
}
