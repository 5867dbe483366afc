//! The forwarding side of the supervisor: which worker owns which rule, the sockets that feed
//! and serve them, the IGMP memberships, and the counters the workers keep.
//!
//! Sockets are created lazily: an interface gets its fanout group with its first rule and
//! loses it with its last; an output's socket lives as long as its rule.

use std::{
    collections::HashMap,
    net::IpAddr,
    os::fd::{AsFd, OwnedFd},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use mcr_common::WorkerLoad;
use tokio::sync::mpsc;

use super::workers::{Executable, Progress, Worker, WorkerEvent};
use crate::{
    bpf::Classifier,
    command::{Command, EthernetOrigin, OutputSpec},
    config::{Rule, Scheduling, Settings},
    counters::{MAX_OUTPUTS, OutputTotals},
    flow::{Family, FlowKey},
    sockets::{
        egress::{self, EgressSockets, Origin},
        ingress::{self, FanoutGroup},
        interfaces,
        memberships::{Membership, Memberships},
    },
    state::{StartError, Waiting},
    stats::WorkerStats,
    status::WorkerStatus,
};

/// The CPUs this process may run on: the default for the workers.
fn allowed_cpus() -> Vec<usize> {
    let Ok(set) = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) else {
        return vec![0];
    };
    let cpus: Vec<usize> = (0..nix::sched::CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect();
    if cpus.is_empty() { vec![0] } else { cpus }
}

/// Where each output of `rule` sends from, or why it cannot send yet.
pub fn resolve_origins(rule: &Rule) -> Result<Vec<Option<Origin>>, Waiting> {
    rule.outputs
        .iter()
        .map(|output| {
            let Some(interface) = &output.interface else {
                return Ok(None);
            };
            let ifindex = interfaces::index(interface)
                .ok_or_else(|| Waiting::OutputInterface(interface.clone()))?;
            let address =
                interfaces::source_address(interface, output.destination).ok_or_else(|| {
                    Waiting::OutputAddress {
                        interface: interface.clone(),
                        family: Family::of(output.destination),
                        routable: match output.destination {
                            IpAddr::V4(_) => false,
                            IpAddr::V6(destination) => !interfaces::is_link_scoped(destination),
                        },
                    }
                })?;
            // Best effort: an interface that cannot be read now gets its frames one by one.
            let ethernet = interfaces::link_by_name(interface)
                .ok()
                .filter(interfaces::Link::is_ethernet)
                .and_then(|link| {
                    Some(EthernetOrigin {
                        mac: link.mac?,
                        mtu: link.mtu,
                    })
                });
            Ok(Some(Origin {
                interface: interface.clone(),
                ifindex,
                address,
                ethernet,
            }))
        })
        .collect()
}

struct InputState {
    id: u32,
    ifindex: u32,
    interface: String,
    /// The interface's MTU when its sockets opened: which receive buffers the workers use.
    mtu: u32,
    group: FanoutGroup,
    rules: usize,
    /// Kernel drops per worker socket, accumulated (the kernel resets them on each read).
    drops: Vec<u64>,
}

struct EgressState {
    spec: OutputSpec,
    /// The output's UDP socket; `None` for outputs framed on the worker's link-layer socket.
    socket: Option<OwnedFd>,
}

struct RouteState {
    key: FlowKey,
    worker: usize,
    membership: Membership,
    outputs: Vec<EgressState>,
}

pub struct Dataplane {
    workers: Vec<Worker>,
    /// Each worker's link-layer sockets for multicast outputs, kept across its restarts.
    frame_sockets: Vec<EgressSockets>,
    /// The binary every worker is started from.
    executable: Executable,
    /// The classifier's map of worker loads, handed to each worker at start.
    load_map: OwnedFd,
    /// How long a worker may stall before it is killed.
    stall_timeout: Duration,
    /// `settings.shed_window` as it was at start: every worker, restarts included, sheds at
    /// this backlog, and every input socket is sized for it, whatever a reload says.
    shed_window: u64,
    user: (u32, u32),
    events: mpsc::Sender<WorkerEvent>,
    /// By interface index (an interface deleted and created again is a new input) and family
    /// (each family's packets have their own sockets).
    inputs: HashMap<(u32, Family), InputState>,
    routes: HashMap<u32, RouteState>,
    memberships: Memberships,
    next_input: u32,
}

impl Dataplane {
    /// Starts the workers `settings` asks for; each gets `load_map` (see [`Worker::spawn`]).
    pub fn start(
        settings: &Settings,
        load_map: OwnedFd,
        events: mpsc::Sender<WorkerEvent>,
    ) -> anyhow::Result<Self> {
        let cpus: Vec<usize> = settings.cpus.clone().unwrap_or_else(allowed_cpus);
        let count = settings
            .workers
            .unwrap_or(cpus.len())
            .clamp(1, crate::config::MAX_WORKERS);
        let user = nix::unistd::User::from_name(&settings.user)
            .with_context(|| format!("looking up user {}", settings.user))?
            .with_context(|| format!("user {} does not exist (settings.user)", settings.user))?;
        let user = (user.uid.as_raw(), user.gid.as_raw());
        let executable = Executable::current().context("opening /proc/self/exe")?;
        let mut workers = Vec::with_capacity(count);
        let mut frame_sockets = Vec::with_capacity(count);
        for index in 0..count {
            let mut worker = Worker::new(
                index,
                cpus.get(index % cpus.len().max(1)).copied(),
                settings.scheduling,
            )?;
            let sockets =
                egress::open_egress_sockets().context("opening link-layer output sockets")?;
            worker.spawn(
                &executable,
                user,
                load_map.as_fd(),
                settings.shed_window,
                &events,
            )?;
            send_egress(&worker, &sockets)?;
            workers.push(worker);
            frame_sockets.push(sockets);
        }
        Ok(Self {
            workers,
            frame_sockets,
            executable,
            load_map,
            stall_timeout: settings.stall_timeout,
            shed_window: settings.shed_window,
            user,
            events,
            inputs: HashMap::new(),
            routes: HashMap::new(),
            memberships: Memberships::new(),
            next_input: 0,
        })
    }

    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// The worker that forwards rule `slot`: fixed for the life of the slot, so a rule's
    /// output counters stay in one worker's block.
    pub fn worker_for(&self, slot: u32) -> usize {
        slot as usize % self.workers.len()
    }

    /// Makes rule `slot` forward `key`: sockets, worker, IGMP. Called again for a running
    /// rule, it switches the rule to the new outputs. `origins` are the resolved output
    /// interfaces (see [`resolve_origins`]), `counters` the output counters, one per output.
    /// Returns the worker that owns the rule.
    pub fn start_rule(
        &mut self,
        classifier: &Classifier,
        slot: u32,
        rule: &Rule,
        key: FlowKey,
        origins: &[Option<Origin>],
        counters: &[u32],
    ) -> Result<usize, StartError> {
        let mut outputs = Vec::with_capacity(rule.outputs.len());
        for ((output, origin), &counter) in rule.outputs.iter().zip(origins).zip(counters) {
            if counter as usize >= MAX_OUTPUTS {
                return Err(StartError::NoOutputCounter(MAX_OUTPUTS));
            }
            let ipv6 = output.destination.is_ipv6();
            let frame = origin
                .as_ref()
                .filter(|_| output.destination.is_multicast())
                .and_then(|origin| egress::frame_header(output, origin));
            let egress = match frame {
                Some(frame) => EgressState {
                    spec: OutputSpec {
                        counter,
                        frame: Some(frame),
                        dscp: output.dscp,
                        ipv6,
                    },
                    socket: None,
                },
                None => EgressState {
                    spec: OutputSpec {
                        counter,
                        frame: None,
                        dscp: output.dscp,
                        ipv6,
                    },
                    socket: Some(egress::open(output, origin.as_ref()).map_err(|source| {
                        StartError::OutputSocket {
                            output: output.to_string(),
                            source,
                        }
                    })?),
                },
            };
            outputs.push(egress);
        }
        let worker = self.worker_for(slot);
        self.open_input(
            classifier,
            &rule.input.interface,
            key.ifindex(),
            key.family(),
        )?;
        let membership = Membership {
            ifindex: key.ifindex(),
            group: rule.input.group,
            source: rule.input.source,
        };
        let route = RouteState {
            key,
            worker,
            membership,
            outputs,
        };
        if let Err(error) = self.send_route(slot, &route) {
            tracing::warn!(rule = %rule.name, "{error:#}");
        }
        if let Err(error) = self.memberships.join(membership) {
            tracing::warn!(rule = %rule.name, %error, "cannot join {}", rule.input.group);
        }
        // A rule that switched outputs: the old sockets close now that the worker has the
        // new ones, and its old hold on the input and the group is let go.
        if let Some(old) = self.routes.insert(slot, route) {
            self.release(old);
        }
        Ok(worker)
    }

    fn send_route(&self, slot: u32, route: &RouteState) -> anyhow::Result<()> {
        let fds: Vec<_> = route
            .outputs
            .iter()
            .filter_map(|o| o.socket.as_ref().map(AsFd::as_fd))
            .collect();
        self.workers[route.worker].send(
            &Command::AddRule {
                slot,
                key: route.key,
                outputs: route.outputs.iter().map(|o| o.spec).collect(),
            },
            &fds,
        )
    }

    /// Stops rule `slot` (after the classifier stopped steering it).
    pub fn stop_rule(&mut self, slot: u32) {
        let Some(route) = self.routes.remove(&slot) else {
            return;
        };
        if let Err(error) = self.workers[route.worker].send(&Command::RemoveRule { slot }, &[]) {
            tracing::warn!("{error:#}");
        }
        self.release(route);
    }

    /// Lets go of what a route held: its group membership and its input's packet sockets
    /// (each shared with other rules, so only the last holder's release ends them), and its
    /// output sockets.
    fn release(&mut self, route: RouteState) {
        if let Err(error) = self.memberships.leave(route.membership) {
            tracing::warn!(%error, "cannot leave {}", route.membership.group);
        }
        self.close_input_ref((route.key.ifindex(), route.key.family()));
        drop(route.outputs);
    }

    fn open_input(
        &mut self,
        classifier: &Classifier,
        interface: &str,
        ifindex: u32,
        family: Family,
    ) -> Result<(), StartError> {
        if let Some(input) = self.inputs.get_mut(&(ifindex, family)) {
            input.rules += 1;
            return Ok(());
        }
        // Packets longer than the standard receive buffers (jumbo frames) need the workers'
        // big ones, and bigger socket buffers; when the MTU cannot be read, the usual one is
        // assumed.
        let mtu = interfaces::link_by_index(ifindex).map_or(1500, |link| link.mtu);
        let group = FanoutGroup::open(
            ifindex,
            family,
            mtu,
            self.shed_window,
            self.workers.len(),
            classifier,
        )
        .map_err(|source| StartError::InputSockets {
            interface: interface.to_owned(),
            family,
            source,
        })?;
        let needed = ingress::window_bytes(self.shed_window, mtu);
        if needed > ingress::MAX_RECEIVE_BUFFER {
            tracing::warn!(
                "{interface} (MTU {mtu}): a shedding window of {} packets (settings.shed_window) \
                 needs {} MiB of receive buffer, more than the {} MiB a socket gets: under \
                 overload its sockets may overflow (kernel_drops) before the classifier sheds; \
                 a smaller window avoids it",
                self.shed_window,
                needed / (1024 * 1024),
                ingress::MAX_RECEIVE_BUFFER / (1024 * 1024),
            );
        }
        let id = self.next_input;
        self.next_input += 1;
        for (worker, socket) in self.workers.iter().zip(&group.sockets) {
            let command = Command::AddInput {
                input: id,
                ifindex,
                mtu,
            };
            if let Err(error) = worker.send(&command, &[socket.as_fd()]) {
                tracing::warn!("{error:#}");
            }
        }
        tracing::info!(
            interface,
            %family,
            workers = self.workers.len(),
            "packet sockets opened"
        );
        self.inputs.insert(
            (ifindex, family),
            InputState {
                id,
                ifindex,
                interface: interface.to_owned(),
                mtu,
                drops: vec![0; group.sockets.len()],
                group,
                rules: 1,
            },
        );
        Ok(())
    }

    fn close_input_ref(&mut self, input: (u32, Family)) {
        let key = input;
        let Some(input) = self.inputs.get_mut(&key) else {
            return;
        };
        input.rules -= 1;
        if input.rules > 0 {
            return;
        }
        let Some(input) = self.inputs.remove(&key) else {
            return;
        };
        for worker in &self.workers {
            let _ = worker.send(&Command::RemoveInput { input: input.id }, &[]);
        }
        tracing::info!(interface = %input.interface, family = %key.1, "packet sockets closed");
    }

    /// Handles a worker event; returns a restart to schedule.
    pub fn worker_event(&mut self, event: WorkerEvent) -> Option<(usize, Duration)> {
        match event {
            WorkerEvent::Exited {
                index,
                generation,
                status,
            } => {
                let worker = self.workers.get_mut(index)?;
                let delay = worker.exited(generation, &status)?;
                let state = worker.lifecycle.state();
                let reason = state.reason().unwrap_or_default();
                tracing::error!(
                    worker = index,
                    "worker {state}, {reason}; next start in {delay:?}"
                );
                Some((index, delay))
            }
            WorkerEvent::Ready { index, generation } => {
                if let Some(worker) = self.workers.get_mut(index) {
                    worker.ready(generation);
                }
                None
            }
            WorkerEvent::RestartDue { index } => self.restart(index),
        }
    }

    /// Starts worker `index` again and hands it its sockets and rules; returns the next try
    /// when no process could be started.
    fn restart(&mut self, index: usize) -> Option<(usize, Duration)> {
        let worker = self.workers.get_mut(index)?;
        if !worker.lifecycle.wants_restart() {
            return None;
        }
        if let Err(error) = worker.spawn(
            &self.executable,
            self.user,
            self.load_map.as_fd(),
            self.shed_window,
            &self.events,
        ) {
            let delay = worker.lifecycle.start_failed(format!("{error:#}"));
            let state = worker.lifecycle.state();
            tracing::error!(
                worker = index,
                "worker {state}: {error:#}; next try in {delay:?}"
            );
            return Some((index, delay));
        }
        if let Err(error) = self.hand_over(index) {
            // Without its sockets or rules the process is no use: its exit restarts it.
            tracing::error!(worker = index, "{error:#}");
            self.workers[index].kill(format!("handing over its sockets and rules: {error:#}"));
            return None;
        }
        tracing::info!(worker = index, pid = ?self.workers[index].pid, "worker restarted with its rules");
        None
    }

    /// Sends a newly started worker `index` its inputs and rules.
    fn hand_over(&self, index: usize) -> anyhow::Result<()> {
        let worker = &self.workers[index];
        send_egress(worker, &self.frame_sockets[index])?;
        for input in self.inputs.values() {
            let socket = &input.group.sockets[index];
            worker.send(
                &Command::AddInput {
                    input: input.id,
                    ifindex: input.ifindex,
                    mtu: input.mtu,
                },
                &[socket.as_fd()],
            )?;
        }
        for (slot, route) in &self.routes {
            if route.worker == index {
                self.send_route(*slot, route)?;
            }
        }
        Ok(())
    }

    /// Reads the kernel's per-socket drop counters (they reset on every read) and checks that
    /// every worker with packets waiting is making progress.
    pub fn sample(&mut self) {
        for input in self.inputs.values_mut() {
            for (worker, (_, drops)) in input.group.take_statistics().into_iter().enumerate() {
                if let Some(total) = input.drops.get_mut(worker) {
                    *total += drops;
                }
            }
        }
        self.watch_progress(Instant::now());
    }

    /// Marks workers that make no progress while packets wait for them as stalled, and kills
    /// those stalled for longer than the stall timeout; their exit restarts them.
    fn watch_progress(&mut self, now: Instant) {
        for worker in &mut self.workers {
            let progress = worker
                .counters
                .block()
                .totals
                .progress
                .load(Ordering::Relaxed);
            let waiting = self
                .inputs
                .values()
                .any(|input| input.group.has_waiting(worker.index));
            let index = worker.index;
            match worker
                .lifecycle
                .observe(now, progress, waiting, self.stall_timeout)
            {
                Progress::Fine | Progress::Stalled { newly: false } => {}
                Progress::Stalled { newly: true } => {
                    tracing::warn!(
                        worker = index,
                        pid = ?worker.pid,
                        "worker stalled: no progress while packets wait; killed if it stays so for {:?}",
                        self.stall_timeout
                    );
                }
                Progress::Recovered => {
                    tracing::info!(worker = index, "stalled worker is making progress again");
                }
                Progress::Kill(reason) => {
                    tracing::error!(worker = index, pid = ?worker.pid, "{reason}");
                    worker.kill(reason);
                }
            }
        }
    }

    /// What counter `counter` of rule `slot`'s worker holds now.
    pub fn output_totals(&self, slot: u32, counter: u32) -> OutputTotals {
        self.workers[self.worker_for(slot)]
            .counters
            .block()
            .outputs
            .get(counter as usize)
            .map(crate::counters::OutputCounters::read)
            .unwrap_or_default()
    }

    /// The workers' figures; `load` reads worker `index`'s page of the classifier's load map
    /// (what it shed, how far behind the worker is).
    pub fn worker_stats(&self, load: impl Fn(usize) -> WorkerLoad) -> Vec<WorkerStats> {
        self.workers
            .iter()
            .map(|worker| {
                let totals = &worker.counters.block().totals;
                let kernel_drops = self
                    .inputs
                    .values()
                    .filter_map(|input| input.drops.get(worker.index))
                    .sum();
                let load = load(worker.index);
                WorkerStats {
                    process: worker_status(worker),
                    received: totals.received.load(Ordering::Relaxed),
                    backlog: load.backlog(),
                    shed: load.shed,
                    kernel_drops,
                    malformed: totals.malformed.load(Ordering::Relaxed),
                    too_big: totals.too_big.load(Ordering::Relaxed),
                    no_rule: totals.no_rule.load(Ordering::Relaxed),
                    no_buffer: totals.no_buffer.load(Ordering::Relaxed),
                    sends: totals.sends.load(Ordering::Relaxed),
                    sent: totals.sent.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Asks every worker to stop; they exit on their own (see `Dataplane::pids`).
    pub fn stop_workers(&mut self) {
        for worker in &mut self.workers {
            worker.stop();
        }
    }

    /// Closes every socket; memberships end with their sockets. Packet sockets cost the
    /// kernel an RCU grace period each to close, so thousands of them take a moment: this
    /// runs after the workers are gone.
    pub fn close(self) {
        drop(self.routes);
        drop(self.inputs);
        drop(self.memberships);
    }

    /// Puts every worker, running or started later, under `scheduling` (`settings.realtime`,
    /// which a reload applies at once).
    pub fn schedule_workers(&mut self, scheduling: Scheduling) {
        for worker in &mut self.workers {
            worker.schedule(scheduling);
        }
    }

    /// Workers as `mcr status` shows them.
    pub fn worker_summaries(&self) -> Vec<WorkerStatus> {
        self.workers.iter().map(worker_status).collect()
    }

    /// Pids of the workers still running (for the shutdown grace period).
    pub fn pids(&self) -> Vec<u32> {
        self.workers.iter().filter_map(|w| w.pid).collect()
    }
}

/// Hands `worker` its link-layer output sockets.
fn send_egress(worker: &Worker, sockets: &EgressSockets) -> anyhow::Result<()> {
    match &sockets.ethernet {
        Some(ethernet) => worker.send(
            &Command::SetEgress { ethernet: true },
            &[sockets.packets.as_fd(), ethernet.as_fd()],
        ),
        None => worker.send(
            &Command::SetEgress { ethernet: false },
            &[sockets.packets.as_fd()],
        ),
    }
}

fn worker_status(worker: &Worker) -> WorkerStatus {
    WorkerStatus {
        worker: worker.index,
        pid: worker.pid,
        cpu: worker.cpu,
        state: worker.lifecycle.state().clone(),
        restarts: worker.lifecycle.restarts(),
        scheduling: worker.scheduled,
    }
}
