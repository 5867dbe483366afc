//! The control socket: how `mcr stats`, `mcr status` and `mcr reload` talk to a running
//! supervisor.
//!
//! One JSON object per line each way: a [`Request`], then a [`Response`].

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    stats::StatsReport,
    status::{ReloadRecord, StatusReport},
};

/// Directory of the default control sockets.
pub const RUN_DIR: &str = "/run/mcr";

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Stats,
    Status,
    /// Re-read the rules file now.
    Reload,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Stats(StatsReport),
    Status(Box<StatusReport>),
    Reload(ReloadRecord),
    Error(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "cannot reach mcr at {}: {source} (is `mcr run` running with the same --pin-dir or --control-socket?)",
        path.display()
    )]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {}: unreadable answer: {source}", path.display())]
    Decode {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("mcr answered: {0}")]
    Remote(String),
}

/// The control socket that belongs to an instance pinned at `pin_dir`:
/// `/run/mcr/<last component of pin_dir>.sock`, so instances with different pin directories
/// never share one.
pub fn default_socket(pin_dir: &Path) -> PathBuf {
    let name = pin_dir
        .file_name()
        .map_or_else(|| "mcr".into(), |name| name.to_string_lossy().into_owned());
    Path::new(RUN_DIR).join(format!("{name}.sock"))
}

/// Sends one request and waits for the answer.
pub fn call(path: &Path, request: &Request) -> Result<Response, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_owned(),
        source,
    })?;
    // A reload answers when the file is read, validated and applied, which takes longer for a
    // big file on a busy machine; the others answer at once.
    let timeout = match request {
        Request::Reload => Duration::from_mins(1),
        Request::Stats | Request::Status => Duration::from_secs(5),
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_string(request).map_err(|source| ControlError::Decode {
        path: path.to_owned(),
        source,
    })?;
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io)?;
    match serde_json::from_str(&answer) {
        Ok(Response::Error(message)) => Err(ControlError::Remote(message)),
        Ok(response) => Ok(response),
        Err(source) => Err(ControlError::Decode {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_follows_the_pin_directory() {
        assert_eq!(
            default_socket(Path::new("/sys/fs/bpf/mcr")),
            Path::new("/run/mcr/mcr.sock")
        );
        assert_eq!(
            default_socket(Path::new("/sys/fs/bpf/mcr-lab")),
            Path::new("/run/mcr/mcr-lab.sock")
        );
    }

    #[test]
    fn wire_format_is_one_tagged_object() {
        assert_eq!(
            serde_json::to_string(&Request::Stats).expect("serialisable"),
            r#"{"command":"stats"}"#
        );
    }
}
