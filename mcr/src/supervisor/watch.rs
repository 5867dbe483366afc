//! What makes the supervisor look again: the rules file changing on disk (inotify, through
//! `notify`) and interfaces or addresses coming and going (rtnetlink).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use notify::{EventKind, RecursiveMode, Watcher as _};
use rtnetlink::sys::{AsyncSocket as _, SocketAddr};
use tokio::sync::mpsc;

/// Something changed that may change what runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// The rules file was written, replaced or renamed over.
    RulesFile,
    /// A link or an IPv4 address appeared, changed or went away.
    Interfaces,
}

/// Watches the directory of `path`, so that editors that write a new file and rename it over
/// the old one are seen too, and reports changes to that one file.
pub fn watch_rules_file(
    path: &Path,
    changes: mpsc::Sender<Change>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    let path = path
        .canonicalize()
        .with_context(|| format!("resolving {}", path.display()))?;
    let directory = path
        .parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
    let name = path.file_name().map(ToOwned::to_owned);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let relevant = matches!(
            event.kind,
            EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
        ) && event
            .paths
            .iter()
            .any(|changed| changed.file_name() == name.as_deref());
        if relevant {
            // A full channel already holds a pending change; dropping this one loses nothing.
            let _ = changes.try_send(Change::RulesFile);
        }
    })
    .context("starting the rules file watcher")?;
    watcher
        .watch(&directory, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", directory.display()))?;
    Ok(watcher)
}

const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_IPV4_IFADDR: u32 = 5;

const fn group_bit(group: u32) -> u32 {
    1 << (group - 1)
}

/// Subscribes to link and IPv4 address events and reports each as [`Change::Interfaces`].
pub fn watch_interfaces(changes: mpsc::Sender<Change>) -> anyhow::Result<()> {
    let (mut connection, _handle, mut messages) =
        rtnetlink::new_connection().context("opening a netlink socket")?;
    connection
        .socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(
            0,
            group_bit(RTNLGRP_LINK) | group_bit(RTNLGRP_IPV4_IFADDR),
        ))
        .context("subscribing to link and address events")?;
    tokio::spawn(connection);
    tokio::spawn(async move {
        while messages.next().await.is_some() {
            let _ = changes.try_send(Change::Interfaces);
        }
    });
    Ok(())
}
