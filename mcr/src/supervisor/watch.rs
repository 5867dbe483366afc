//! What makes the supervisor look again: the rules file changing on disk (inotify, through
//! `notify`), interfaces or addresses coming and going, and routes or neighbours changing
//! (rtnetlink).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use notify::{EventKind, RecursiveMode, Watcher as _};
use rtnetlink::{
    packet_core::NetlinkPayload,
    packet_route::RouteNetlinkMessage,
    sys::{AsyncSocket as _, SocketAddr},
};
use tokio::sync::Notify;

/// Something changed that may change what runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// The rules file was written, replaced or renamed over.
    RulesFile,
    /// A link or an address appeared, changed or went away.
    Interfaces,
    /// A route or a neighbour entry changed: next hops may have moved.
    Routes,
}

/// Changes reported by the watchers and not yet handled, one flag per kind: a burst of events
/// of one kind is one change, and no kind can crowd out another.
#[derive(Default)]
pub struct Changes {
    rules_file: Notify,
    interfaces: Notify,
    routes: Notify,
}

impl Changes {
    /// Notes `change`; callable from any thread.
    pub fn report(&self, change: Change) {
        match change {
            Change::RulesFile => &self.rules_file,
            Change::Interfaces => &self.interfaces,
            Change::Routes => &self.routes,
        }
        .notify_one();
    }

    /// The next change reported since the last one was taken.
    pub async fn next(&self) -> Change {
        tokio::select! {
            () = self.rules_file.notified() => Change::RulesFile,
            () = self.interfaces.notified() => Change::Interfaces,
            () = self.routes.notified() => Change::Routes,
        }
    }
}

/// Watches the directory of `path`, so that editors that write a new file and rename it over
/// the old one are seen too, and reports changes to that one file.
pub fn watch_rules_file(
    path: &Path,
    changes: Arc<Changes>,
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
            changes.report(Change::RulesFile);
        }
    })
    .context("starting the rules file watcher")?;
    watcher
        .watch(&directory, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", directory.display()))?;
    Ok(watcher)
}

const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_NEIGH: u32 = 3;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV6_IFADDR: u32 = 9;
const RTNLGRP_IPV6_ROUTE: u32 = 11;

const fn group_bit(group: u32) -> u32 {
    1 << (group - 1)
}

/// Subscribes to link, address, route (IPv4 and IPv6) and neighbour events and reports each as
/// [`Change::Interfaces`] or [`Change::Routes`].
pub fn watch_interfaces(changes: Arc<Changes>) -> anyhow::Result<()> {
    let (mut connection, _handle, mut messages) =
        rtnetlink::new_connection().context("opening a netlink socket")?;
    connection
        .socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(
            0,
            group_bit(RTNLGRP_LINK)
                | group_bit(RTNLGRP_IPV4_IFADDR)
                | group_bit(RTNLGRP_NEIGH)
                | group_bit(RTNLGRP_IPV4_ROUTE)
                | group_bit(RTNLGRP_IPV6_IFADDR)
                | group_bit(RTNLGRP_IPV6_ROUTE),
        ))
        .context("subscribing to link, address, route and neighbour events")?;
    tokio::spawn(connection);
    tokio::spawn(async move {
        while let Some((message, _)) = messages.next().await {
            let change = match message.payload {
                NetlinkPayload::InnerMessage(
                    RouteNetlinkMessage::NewNeighbour(_)
                    | RouteNetlinkMessage::DelNeighbour(_)
                    | RouteNetlinkMessage::NewRoute(_)
                    | RouteNetlinkMessage::DelRoute(_),
                ) => Change::Routes,
                _ => Change::Interfaces,
            };
            changes.report(change);
        }
    });
    Ok(())
}
