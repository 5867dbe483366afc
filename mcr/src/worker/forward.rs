//! The worker's `io_uring` loop: receive, look up, send — and the supervisor's commands, all in
//! one thread.
//!
//! Per packet: one completion from a multishot receive (into a provided buffer), a parse, at
//! most two hash lookups, and sends straight from the receive buffer. Packets of a rule whose
//! outputs are all Ethernet-framed wait until the end of the loop turn in a run of their flow
//! (same length and DSCP/ECN byte), so that each output sends the run at once, split into
//! packets by the kernel (decision 0014); other packets are sent one by one as they come.
//! IPv6 framed outputs need a UDP checksum: the payload's part of it is found once per packet,
//! without reading the payload when the input carries a checksum, and each output adds its own
//! header fields. No allocation, no logging, no system call of its own: submissions go to the
//! kernel in one `io_uring_enter` per loop turn.

use std::{
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::atomic::Ordering,
    time::Duration,
};

use io_uring::{
    IoUring, Submitter, cqueue, opcode, squeue,
    types::{self, Fd},
};
use rustc_hash::FxHashMap;

use super::{
    buffers::{Buffer, Buffers, Ring},
    frames::{Frame, FrameSlab},
    load::LoadPage,
    segments::{EthernetFrame, MAX_RUN, RunSlab, run_limit},
};
use crate::{
    command::{self, Command, MAX_MESSAGE},
    counters::{MAX_OUTPUTS, SharedCounters, bump},
    flow::FlowKey,
    packet::{self, Addresses, Datagram, OnesComplementSum, ParseError},
};

/// A worker that has had nothing to do for this long has nothing queued: it tells the
/// classifier so (`LoadPage::forgive_backlog`).
const IDLE: Duration = Duration::from_millis(100);

/// The two ECN bits of the DSCP/ECN byte (IPv4 TOS, IPv6 traffic class): always the input
/// packet's.
const ECN_BITS: u8 = 0b11;

/// Most sends in flight at once: keeps completions within the completion queue, so the kernel
/// never has to buffer overflowing completions in memory.
pub const MAX_IN_FLIGHT: usize = 8192;
/// Submission queue size; the completion queue is twice this plus the in-flight bound.
pub const SQ_ENTRIES: u32 = 4096;

const KIND_SHIFT: u64 = 56;
const KIND_RECV: u64 = 1;
const KIND_SEND: u64 = 2;
const KIND_CONTROL: u64 = 3;
const KIND_CANCEL: u64 = 4;
const KIND_RUN: u64 = 5;

/// Flows with a run waiting at once; a packet of one more flow sends the oldest run.
const MAX_PENDING_RUNS: usize = 64;

fn recv_data(input: u32) -> u64 {
    (KIND_RECV << KIND_SHIFT) | u64::from(input)
}

/// A send's user data: its buffer, its frame slot (or [`NO_SLOT`]) and its output counter.
fn send_data(buffer: Buffer, slot: u32, counter: u32) -> u64 {
    (KIND_SEND << KIND_SHIFT)
        | (u64::from(buffer.raw()) << 40)
        | (u64::from(slot & FIELD_MASK) << 20)
        | u64::from(counter & FIELD_MASK)
}

/// An Ethernet send's user data: its slot (which names its buffers) and its output counter.
fn run_data(slot: u32, counter: u32) -> u64 {
    (KIND_RUN << KIND_SHIFT)
        | (u64::from(slot & FIELD_MASK) << 20)
        | u64::from(counter & FIELD_MASK)
}

/// Twenty bits each for the frame slot and the counter index.
const FIELD_MASK: u32 = 0xf_ffff;
/// The slot field of a send that needs no frame slot.
const NO_SLOT: u32 = FIELD_MASK;

struct Input {
    id: u32,
    ifindex: u32,
    socket: OwnedFd,
    /// The buffers its packets arrive in, by its interface's MTU.
    ring: Ring,
    /// A multishot receive is outstanding.
    armed: bool,
    /// Removed by the supervisor; closed once its receive has ended.
    closing: bool,
    /// Receive errors since the last packet.
    failures: u32,
}

/// Receive errors in a row after which an input is no longer re-armed.
const MAX_RECEIVE_FAILURES: u32 = 100;

/// How an output's packets leave.
enum Egress {
    /// A connected UDP socket of its own, IPv6 (`AF_INET6`) or IPv4.
    Socket { socket: OwnedFd, ipv6: bool },
    /// Framed by the worker and sent on its link-layer socket.
    Framed(Frame),
}

struct Output {
    egress: Egress,
    counter: u32,
    /// DSCP to set; `None` carries the input packet's.
    dscp: Option<u8>,
}

struct Route {
    slot: u32,
    outputs: Vec<Output>,
    /// The largest payload whose packets wait in runs: every output is Ethernet-framed and
    /// the payload fits each one's MTU. 0 when some output is not Ethernet-framed.
    run_payload: usize,
    /// Some output frames IPv6 itself and needs the payload's part of the UDP checksum.
    needs_payload_sum: bool,
}

impl Route {
    fn new(slot: u32, outputs: Vec<Output>) -> Self {
        let run_payload = outputs
            .iter()
            .map(|output| match &output.egress {
                Egress::Framed(frame) => frame
                    .ethernet
                    .as_ref()
                    .map_or(0, EthernetFrame::max_payload),
                Egress::Socket { .. } => 0,
            })
            .min()
            .unwrap_or(0);
        let needs_payload_sum = outputs
            .iter()
            .any(|output| matches!(&output.egress, Egress::Framed(frame) if frame.is_ipv6()));
        Self {
            slot,
            outputs,
            run_payload,
            needs_payload_sum,
        }
    }
}

/// Packets of one flow waiting to be sent together: same rule, payload length and DSCP/ECN
/// byte, in arrival order.
struct Run {
    /// The key of the rule they matched.
    key: FlowKey,
    payload_len: usize,
    dscp_ecn: u8,
    buffers: [Buffer; MAX_RUN],
    /// Where each payload starts in its buffer.
    starts: [usize; MAX_RUN],
    count: usize,
    /// The first packet's payload sum, for a run that ends up one packet long (see
    /// [`Forwarder::send_each`]).
    payload_sum: Option<OnesComplementSum>,
}

/// Everything the loop owns except the ring itself.
pub struct Forwarder {
    control: OwnedFd,
    control_buffer: Vec<u8>,
    counters: SharedCounters,
    buffers: Buffers,
    frames: FrameSlab,
    /// The link-layer socket framed outputs send on, once the supervisor has sent it.
    frame_socket: Option<OwnedFd>,
    /// The socket Ethernet-framed outputs send on, whole frames behind a `virtio_net_hdr`.
    ethernet_socket: Option<OwnedFd>,
    runs_slab: RunSlab,
    /// Runs waiting for the end of the loop turn, oldest first.
    runs: Vec<Run>,
    /// The kernel splits runs (it refused one with `EINVAL` otherwise: a kernel before 6.2).
    segmenting: bool,
    /// This worker's page of the classifier's load map.
    load: LoadPage,
    inputs: Vec<Input>,
    /// By flow key, looked up for every packet: a fast hash rather than the default one that
    /// resists chosen keys, because only the supervisor (from the rules file) inserts keys;
    /// a packet's key is only looked up.
    routes: FxHashMap<FlowKey, Route>,
    in_flight: usize,
    running: bool,
}

/// Builds the ring with the flags that suit one thread that both submits and reaps, falling
/// back to plain settings on kernels without them. The ring starts disabled: it takes no
/// submission until the sandbox has restricted it (see `sandbox::restrict_ring`).
pub fn new_ring() -> std::io::Result<IoUring> {
    let cq = SQ_ENTRIES * 2 + u32::try_from(MAX_IN_FLIGHT).unwrap_or(u32::MAX);
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_r_disabled()
        .setup_cqsize(cq)
        .build(SQ_ENTRIES)
        .or_else(|_| {
            IoUring::builder()
                .setup_r_disabled()
                .setup_cqsize(cq)
                .build(SQ_ENTRIES)
        })
}

impl Forwarder {
    pub fn new(
        control: OwnedFd,
        counters: SharedCounters,
        buffers: Buffers,
        load: LoadPage,
    ) -> Self {
        Self {
            control,
            control_buffer: vec![0; MAX_MESSAGE],
            counters,
            buffers,
            frames: FrameSlab::new(MAX_IN_FLIGHT),
            frame_socket: None,
            ethernet_socket: None,
            runs_slab: RunSlab::new(MAX_IN_FLIGHT),
            runs: Vec::with_capacity(MAX_PENDING_RUNS),
            segmenting: true,
            load,
            inputs: Vec::new(),
            routes: FxHashMap::default(),
            in_flight: 0,
            running: true,
        }
    }

    /// Runs until the supervisor says shutdown or goes away.
    pub fn run(&mut self, ring: &mut IoUring) -> anyhow::Result<()> {
        let (submitter, mut sq, mut cq) = ring.split();
        self.arm_control(&submitter, &mut sq)?;
        let idle = types::Timespec::from(IDLE);
        let wait = types::SubmitArgs::new().timespec(&idle);
        while self.running {
            sq.sync();
            // One system call both submits this turn's sends and waits for what comes next:
            // sends on packet sockets complete as they are submitted, so waiting for one
            // completion more than there are sends in flight waits for the next packet (or
            // command) instead of returning at once for the sends' own completions. The
            // longer turn also gathers more packets into runs.
            let timed_out = match submitter.submit_with_args(self.in_flight + 1, &wait) {
                Ok(_) => false,
                Err(error) if error.raw_os_error() == Some(nix::libc::ETIME) => true,
                Err(error) if error.raw_os_error() == Some(nix::libc::EINTR) => false,
                // EBUSY: completions must be reaped before more can be submitted.
                Err(error) if error.raw_os_error() == Some(nix::libc::EBUSY) => false,
                Err(error) => return Err(error.into()),
            };
            bump(&self.counters.block().totals.progress, 1);
            cq.sync();
            // Nothing at all happened for a while (not even a send completing): nothing is
            // queued for this worker.
            if timed_out && cq.is_empty() {
                self.load.forgive_backlog();
            }
            for cqe in cq.by_ref() {
                self.complete(&cqe, &submitter, &mut sq)?;
            }
            self.send_runs(&submitter, &mut sq)?;
            self.load.taken(
                self.counters
                    .block()
                    .totals
                    .received
                    .load(Ordering::Relaxed),
            );
            self.rearm_inputs(&submitter, &mut sq)?;
            self.buffers.publish();
        }
        Ok(())
    }

    fn complete(
        &mut self,
        cqe: &cqueue::Entry,
        submitter: &Submitter<'_>,
        sq: &mut squeue::SubmissionQueue<'_>,
    ) -> anyhow::Result<()> {
        let data = cqe.user_data();
        match data >> KIND_SHIFT {
            KIND_RECV => self.received(cqe, submitter, sq),
            KIND_SEND => {
                self.sent(cqe);
                Ok(())
            }
            KIND_RUN => {
                self.run_sent(cqe);
                Ok(())
            }
            KIND_CONTROL => {
                // Sends queued so far refer to sockets a command may close, and waiting runs
                // to rules it may remove: send and submit them first.
                self.send_runs(submitter, sq)?;
                sq.sync();
                submitter.submit()?;
                self.control_ready(submitter, sq)?;
                if !cqueue::more(cqe.flags()) && self.running {
                    self.arm_control(submitter, sq)?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn received(
        &mut self,
        cqe: &cqueue::Entry,
        submitter: &Submitter<'_>,
        sq: &mut squeue::SubmissionQueue<'_>,
    ) -> anyhow::Result<()> {
        let input_id = (cqe.user_data() & 0xffff_ffff) as u32;
        let Some(index) = self.inputs.iter().position(|input| input.id == input_id) else {
            return Ok(());
        };
        let ring = self.inputs[index].ring;
        if let Some(id) = cqueue::buffer_select(cqe.flags()) {
            let buffer = Buffer::new(ring, id);
            self.buffers.taken(ring);
            self.inputs[index].failures = 0;
            match usize::try_from(cqe.result()) {
                Ok(len) => self.forward(index, buffer, len, submitter, sq)?,
                Err(_) => self.buffers.recycle(buffer),
            }
        } else if cqe.result() == -nix::libc::ENOBUFS {
            bump(&self.counters.block().totals.no_buffer, 1);
        } else if cqe.result() < 0 && cqe.result() != -nix::libc::ECANCELED {
            // One error (the interface went down, say) is normal; an endless series would
            // turn re-arming into a busy loop, so the input is given up on instead.
            let input = &mut self.inputs[index];
            input.failures += 1;
            if input.failures == MAX_RECEIVE_FAILURES {
                tracing::error!(
                    input = input.id,
                    error = %std::io::Error::from_raw_os_error(-cqe.result()),
                    "receiving keeps failing; this input stops until the supervisor replaces it"
                );
            }
        }
        if !cqueue::more(cqe.flags()) {
            let input = &mut self.inputs[index];
            input.armed = false;
            if input.closing {
                self.inputs.swap_remove(index);
            }
        }
        Ok(())
    }

    /// Sends one received packet to every output of its rule.
    fn forward(
        &mut self,
        input: usize,
        buffer: Buffer,
        len: usize,
        submitter: &Submitter<'_>,
        sq: &mut squeue::SubmissionQueue<'_>,
    ) -> anyhow::Result<()> {
        let totals = &self.counters.block().totals;
        bump(&totals.received, 1);
        let bytes = self.buffers.buffer(buffer, len);
        let datagram = match packet::parse(bytes, buffer.ring().buffer_size()) {
            Ok(datagram) => datagram,
            Err(reason) => {
                bump(
                    match reason {
                        ParseError::Malformed => &totals.malformed,
                        ParseError::TooBig => &totals.too_big,
                    },
                    1,
                );
                self.buffers.recycle(buffer);
                return Ok(());
            }
        };
        let key = flow_key(self.inputs[input].ifindex, &datagram);
        // Source-specific rules first, then the rule for any sender.
        let Some((&key, route)) = self
            .routes
            .get_key_value(&key)
            .or_else(|| self.routes.get_key_value(&key.any_source()))
        else {
            bump(&totals.no_rule, 1);
            self.buffers.recycle(buffer);
            return Ok(());
        };
        let payload_len = datagram.payload.len();
        let needs_payload_sum = route.needs_payload_sum;
        if self.ethernet_socket.is_some() && (1..=route.run_payload).contains(&payload_len) {
            return self.join_run(
                key,
                buffer,
                len,
                &datagram,
                needs_payload_sum,
                submitter,
                sq,
            );
        }
        // IPv6 framed outputs need the payload's part of their UDP checksum when sent one by
        // one: taken from the input's checksum where it has one (so a payload corrupted on
        // the way still fails the output's), else summed.
        let payload_sum = needs_payload_sum.then(|| datagram.payload_sum(bytes));
        // Sent now: a run of its flow that is waiting goes first.
        if let Some(index) = self.runs.iter().position(|run| run.key == key) {
            let run = self.runs.swap_remove(index);
            self.send_run(&run, submitter, sq)?;
        }
        let start = datagram.payload.start;
        self.send_each(
            key,
            buffer,
            start..start + payload_len,
            datagram.dscp_ecn,
            payload_sum,
            submitter,
            sq,
        )
    }

    /// Queues one send of the payload at `payload` in `buffer` to every output of rule `key`.
    #[allow(
        clippy::too_many_arguments,
        reason = "one packet's facts, passed on as they are"
    )]
    fn send_each(
        &mut self,
        key: FlowKey,
        buffer: Buffer,
        payload: std::ops::Range<usize>,
        dscp_ecn: u8,
        payload_sum: Option<OnesComplementSum>,
        submitter: &Submitter<'_>,
        sq: &mut squeue::SubmissionQueue<'_>,
    ) -> anyhow::Result<()> {
        let Some(route) = self.routes.get(&key) else {
            self.buffers.recycle(buffer);
            return Ok(());
        };
        if !room_for(self.in_flight, route.outputs.len(), submitter, sq)? {
            for output in &route.outputs {
                queue_full(&self.counters, output.counter, 1);
            }
            self.buffers.recycle(buffer);
            return Ok(());
        }
        let payload = &self.buffers.buffer(buffer, payload.end)[payload];
        let mut queued = 0;
        for output in &route.outputs {
            let prepared = send_entry(
                &mut self.frames,
                self.frame_socket.as_ref(),
                output,
                buffer,
                payload,
                output_dscp_ecn(output, dscp_ecn),
                || payload_sum.unwrap_or_default(),
            );
            let Some(send) = prepared else {
                queue_full(&self.counters, output.counter, 1);
                continue;
            };
            // SAFETY: the payload lies in buffer `buffer`, which is not recycled before the
            // last of these sends completes (`Buffers::hold`); a frame's header and message live in
            // their slab slot until the send completes; the socket stays open because sends
            // are submitted before any command can close it.
            unsafe { sq.push(&send) }.expect("room was checked above");
            queued += 1;
        }
        if queued == 0 {
            self.buffers.recycle(buffer);
            return Ok(());
        }
        self.buffers
            .hold(buffer, u16::try_from(queued).unwrap_or(u16::MAX));
        self.in_flight += queued;
        Ok(())
    }

    /// Adds `datagram` (in the first `len` bytes of `buffer`) to the run of its flow, which
    /// is sent once it is full, once a packet of the flow does not fit it, or at the end of
    /// the loop turn. Only a packet that starts a run has its payload's sum taken (when
    /// `needs_payload_sum`): the kernel completes the checksums of a run, and a run that stays
    /// one packet long goes out alone with the sum.
    #[allow(
        clippy::too_many_arguments,
        reason = "one packet's facts, passed on as they are"
    )]
    fn join_run(
        &mut self,
        key: FlowKey,
        buffer: Buffer,
        len: usize,
        datagram: &Datagram,
        needs_payload_sum: bool,
        submitter: &Submitter<'_>,
        sq: &mut squeue::SubmissionQueue<'_>,
    ) -> anyhow::Result<()> {
        let start = datagram.payload.start;
        let payload_len = datagram.payload.len();
        let dscp_ecn = datagram.dscp_ecn;
        let limit = if self.segmenting {
            run_limit(payload_len)
        } else {
            1
        };
        if let Some(index) = self.runs.iter().position(|run| run.key == key) {
            let run = &mut self.runs[index];
            if run.payload_len == payload_len && run.dscp_ecn == dscp_ecn && run.count < limit {
                run.buffers[run.count] = buffer;
                run.starts[run.count] = start;
                run.count += 1;
                if run.count == limit {
                    let run = self.runs.swap_remove(index);
                    self.send_run(&run, submitter, sq)?;
                }
                return Ok(());
            }
            let run = self.runs.swap_remove(index);
            self.send_run(&run, submitter, sq)?;
        }
        if self.runs.len() == MAX_PENDING_RUNS {
            let oldest = self.runs.swap_remove(0);
            self.send_run(&oldest, submitter, sq)?;
        }
        let payload_sum =
            needs_payload_sum.then(|| datagram.payload_sum(self.buffers.buffer(buffer, len)));
        let run = Run {
            key,
            payload_len,
            dscp_ecn,
            payload_sum,
            buffers: [buffer; MAX_RUN],
            starts: [start; MAX_RUN],
            count: 1,
        };
        if limit == 1 {
            return self.send_run(&run, submitter, sq);
        }
        self.runs.push(run);
        Ok(())
    }

    /// Sends every waiting run, oldest first.
    fn send_runs(
        &mut self,
        submitter: &Submitter<'_>,
        sq: &mut squeue::SubmissionQueue<'_>,
    ) -> anyhow::Result<()> {
        let runs = std::mem::take(&mut self.runs);
        for run in &runs {
            self.send_run(run, submitter, sq)?;
        }
        self.runs = runs;
        self.runs.clear();
        Ok(())
    }

    /// Queues one Ethernet send of `run` per output of its rule, split by the kernel. A run of
    /// one packet is sent as any single packet: measured, an IP packet on the other link-layer
    /// socket costs less than a frame behind a `virtio_net_hdr` (decision 0014).
    fn send_run(
        &mut self,
        run: &Run,
        submitter: &Submitter<'_>,
        sq: &mut squeue::SubmissionQueue<'_>,
    ) -> anyhow::Result<()> {
        if run.count == 1 {
            let start = run.starts[0];
            return self.send_each(
                run.key,
                run.buffers[0],
                start..start + run.payload_len,
                run.dscp_ecn,
                run.payload_sum,
                submitter,
                sq,
            );
        }
        let buffers = &run.buffers[..run.count];
        let (Some(route), Some(socket)) = (self.routes.get(&run.key), &self.ethernet_socket) else {
            // The rule went away while its packets waited (not possible between commands).
            for &buffer in buffers {
                self.buffers.recycle(buffer);
            }
            return Ok(());
        };
        let count = run.count as u64;
        if !room_for(self.in_flight, route.outputs.len(), submitter, sq)? {
            for output in &route.outputs {
                queue_full(&self.counters, output.counter, count);
            }
            for &buffer in buffers {
                self.buffers.recycle(buffer);
            }
            return Ok(());
        }
        let mut payloads: [&[u8]; MAX_RUN] = [&[]; MAX_RUN];
        for ((payload, &buffer), &start) in payloads.iter_mut().zip(buffers).zip(&run.starts) {
            let bytes = self.buffers.buffer(buffer, start + run.payload_len);
            *payload = &bytes[start..];
        }
        let mut queued = 0;
        for output in &route.outputs {
            let Egress::Framed(frame) = &output.egress else {
                continue;
            };
            let dscp_ecn = output_dscp_ecn(output, run.dscp_ecn);
            let Some((slot, message)) =
                self.runs_slab
                    .prepare(frame, buffers, &payloads[..run.count], dscp_ecn)
            else {
                queue_full(&self.counters, output.counter, count);
                continue;
            };
            let send = opcode::SendMsg::new(Fd(socket.as_raw_fd()), message)
                .flags(nix::libc::MSG_DONTWAIT as u32)
                .build()
                .user_data(run_data(slot, output.counter));
            // SAFETY: the payloads lie in the run's buffers, which are not recycled before the
            // last of these sends completes (`Buffers::hold`); the headers, I/O vector and
            // message live in their slab slot until the send completes; the socket stays open
            // because sends are submitted before any command can close it.
            unsafe { sq.push(&send) }.expect("room was checked above");
            queued += 1;
        }
        for &buffer in buffers {
            if queued == 0 {
                self.buffers.recycle(buffer);
            } else {
                self.buffers
                    .hold(buffer, u16::try_from(queued).unwrap_or(u16::MAX));
            }
        }
        self.in_flight += queued;
        Ok(())
    }

    fn run_sent(&mut self, cqe: &cqueue::Entry) {
        let data = cqe.user_data();
        let slot = u32::try_from((data >> 20) & u64::from(FIELD_MASK)).unwrap_or(NO_SLOT);
        let counter = usize::try_from(data & u64::from(FIELD_MASK)).unwrap_or(usize::MAX);
        let Some(sent) = self.runs_slab.release(slot) else {
            return;
        };
        let count = sent.count as u64;
        if cqe.result() == -nix::libc::EINVAL && sent.count > 1 && self.segmenting {
            tracing::warn!(
                "the kernel does not split UDP runs (VIRTIO_NET_HDR_GSO_UDP_L4 needs Linux 6.2); \
                 sending packets one by one"
            );
            self.segmenting = false;
        }
        let block = self.counters.block();
        if let Some(output) = block.outputs.get(counter) {
            match cqe.result() {
                result if result >= 0 => {
                    bump(&output.packets, count);
                    bump(&output.bytes, sent.payload_bytes as u64);
                    bump(&block.totals.sends, 1);
                    bump(&block.totals.sent, count);
                }
                result if result == -nix::libc::EAGAIN => bump(&output.queue_full, count),
                _ => bump(&output.errors, count),
            }
        }
        self.in_flight = self.in_flight.saturating_sub(1);
        for &buffer in sent.buffers() {
            self.buffers.sent(buffer);
        }
    }

    fn sent(&mut self, cqe: &cqueue::Entry) {
        let data = cqe.user_data();
        let buffer = Buffer::from_raw(((data >> 40) & 0xffff) as u16);
        let slot = u32::try_from((data >> 20) & u64::from(FIELD_MASK)).unwrap_or(NO_SLOT);
        let counter = usize::try_from(data & u64::from(FIELD_MASK)).unwrap_or(usize::MAX);
        // A framed send reports the headers it wrote too; counters count payload bytes.
        let headers = if slot == NO_SLOT {
            0
        } else {
            self.frames.release(slot) as u64
        };
        let block = self.counters.block();
        if let Some(output) = block.outputs.get(counter) {
            match u64::try_from(cqe.result()) {
                Ok(bytes) => {
                    bump(&output.packets, 1);
                    bump(&output.bytes, bytes.saturating_sub(headers));
                    bump(&block.totals.sends, 1);
                    bump(&block.totals.sent, 1);
                }
                Err(_) if cqe.result() == -nix::libc::EAGAIN => bump(&output.queue_full, 1),
                Err(_) => bump(&output.errors, 1),
            }
        }
        self.in_flight = self.in_flight.saturating_sub(1);
        self.buffers.sent(buffer);
    }

    /// Starts (again) the multishot receive of every input whose receive ended, once there
    /// are buffers to receive into.
    fn rearm_inputs(
        &mut self,
        submitter: &Submitter<'_>,
        sq: &mut squeue::SubmissionQueue<'_>,
    ) -> anyhow::Result<()> {
        for input in &mut self.inputs {
            if self.buffers.available(input.ring) == 0 {
                continue;
            }
            if input.armed || input.closing || input.failures >= MAX_RECEIVE_FAILURES {
                continue;
            }
            let recv = opcode::RecvMulti::new(Fd(input.socket.as_raw_fd()), input.ring.group())
                .build()
                .user_data(recv_data(input.id));
            push(submitter, sq, &recv)?;
            input.armed = true;
        }
        Ok(())
    }

    fn arm_control(
        &self,
        submitter: &Submitter<'_>,
        sq: &mut squeue::SubmissionQueue<'_>,
    ) -> anyhow::Result<()> {
        let poll = opcode::PollAdd::new(Fd(self.control.as_raw_fd()), nix::libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(KIND_CONTROL << KIND_SHIFT);
        push(submitter, sq, &poll)
    }

    fn control_ready(
        &mut self,
        submitter: &Submitter<'_>,
        sq: &mut squeue::SubmissionQueue<'_>,
    ) -> anyhow::Result<()> {
        loop {
            let received = command::receive(self.control.as_fd(), &mut self.control_buffer);
            let (command, fds) = match received {
                Ok(Some(message)) => message,
                Ok(None) => return Ok(()),
                Err(command::CommandError::Closed) => {
                    tracing::info!("supervisor closed the control socket; exiting");
                    self.running = false;
                    return Ok(());
                }
                Err(error) => return Err(error.into()),
            };
            if fds.len() != command.expected_fds() {
                tracing::error!(
                    "{}",
                    command::CommandError::FdCount(
                        command.name(),
                        fds.len(),
                        command.expected_fds()
                    )
                );
                continue;
            }
            self.apply(command, fds, submitter, sq)?;
        }
    }

    fn apply(
        &mut self,
        command: Command,
        fds: Vec<OwnedFd>,
        submitter: &Submitter<'_>,
        sq: &mut squeue::SubmissionQueue<'_>,
    ) -> anyhow::Result<()> {
        match command {
            Command::Init { .. } => tracing::warn!("ignoring a second init"),
            Command::AddInput {
                input,
                ifindex,
                mtu,
            } => {
                let socket = fds.into_iter().next().expect("fd count checked");
                tracing::debug!(input, ifindex, mtu, "input added");
                self.inputs.push(Input {
                    id: input,
                    ifindex,
                    socket,
                    ring: Ring::for_mtu(mtu),
                    armed: false,
                    closing: false,
                    failures: 0,
                });
            }
            Command::RemoveInput { input } => {
                if let Some(index) = self.inputs.iter().position(|i| i.id == input) {
                    if self.inputs[index].armed {
                        self.inputs[index].closing = true;
                        let cancel = opcode::AsyncCancel::new(recv_data(input))
                            .build()
                            .user_data(KIND_CANCEL << KIND_SHIFT);
                        push(submitter, sq, &cancel)?;
                    } else {
                        self.inputs.swap_remove(index);
                    }
                    tracing::debug!(input, "input removed");
                }
            }
            Command::SetEgress { .. } => {
                let mut fds = fds.into_iter();
                self.frame_socket = fds.next();
                self.ethernet_socket = fds.next();
            }
            Command::AddRule { slot, key, outputs } => {
                if outputs.iter().any(|o| o.counter as usize >= MAX_OUTPUTS) {
                    tracing::error!(slot, "rule names a counter out of range; ignored");
                    return Ok(());
                }
                self.routes
                    .retain(|old_key, route| route.slot != slot || *old_key == key);
                let mut sockets = fds.into_iter();
                let outputs = outputs
                    .iter()
                    .filter_map(|spec| {
                        let egress = match &spec.frame {
                            Some(header) => Egress::Framed(Frame::new(header)),
                            None => Egress::Socket {
                                socket: sockets.next()?,
                                ipv6: spec.ipv6,
                            },
                        };
                        Some(Output {
                            egress,
                            counter: spec.counter,
                            dscp: spec.dscp,
                        })
                    })
                    .collect();
                self.routes.insert(key, Route::new(slot, outputs));
                tracing::debug!(slot, "rule added");
            }
            Command::RemoveRule { slot } => {
                self.routes.retain(|_, route| route.slot != slot);
                tracing::debug!(slot, "rule removed");
            }
            Command::Shutdown => {
                tracing::info!("shutting down");
                self.running = false;
            }
        }
        Ok(())
    }
}

/// The input's DSCP/ECN byte, or `output`'s DSCP with the input's ECN bits.
fn output_dscp_ecn(output: &Output, input: u8) -> u8 {
    output
        .dscp
        .map_or(input, |dscp| (dscp << 2) | (input & ECN_BITS))
}

/// The route key of `datagram`, received on interface `ifindex`: the key of its source-specific
/// rule, whose `any_source` is the fallback.
fn flow_key(ifindex: u32, datagram: &Datagram) -> FlowKey {
    match datagram.addresses {
        Addresses::V4 {
            source,
            destination,
        } => FlowKey::V4(mcr_common::RuleKey::new(
            ifindex,
            destination.octets(),
            source.octets(),
            datagram.destination_port,
        )),
        Addresses::V6 {
            source,
            destination,
        } => FlowKey::V6(mcr_common::RuleKey6::new(
            ifindex,
            destination.octets(),
            source.octets(),
            datagram.destination_port,
        )),
    }
}

/// The send of `payload` (in receive buffer `buffer`) to `output` with DSCP/ECN byte
/// `dscp_ecn`, or `None` when no send slot is free. `payload_sum` gives the payload's part of
/// a UDP checksum, which only IPv6 framed outputs ask for. A full socket buffer fails a send at
/// once (`MSG_DONTWAIT`) instead of parking it, which would let later packets of the flow
/// overtake it.
fn send_entry(
    frames: &mut FrameSlab,
    frame_socket: Option<&OwnedFd>,
    output: &Output,
    buffer: Buffer,
    payload: &[u8],
    dscp_ecn: u8,
    payload_sum: impl FnOnce() -> OnesComplementSum,
) -> Option<squeue::Entry> {
    let entry = match &output.egress {
        // The socket's own DSCP/ECN byte is 0: a plain send needs no control message.
        Egress::Socket { socket, .. } if dscp_ecn == 0 => {
            let len = u32::try_from(payload.len()).expect("a payload fits a receive buffer");
            opcode::Send::new(Fd(socket.as_raw_fd()), payload.as_ptr(), len)
                .flags(nix::libc::MSG_DONTWAIT)
                .build()
                .user_data(send_data(buffer, NO_SLOT, output.counter))
        }
        Egress::Socket { socket, ipv6 } => {
            let (slot, message) = frames.prepare_datagram(payload, dscp_ecn, *ipv6)?;
            opcode::SendMsg::new(Fd(socket.as_raw_fd()), message)
                .flags(nix::libc::MSG_DONTWAIT as u32)
                .build()
                .user_data(send_data(buffer, slot, output.counter))
        }
        Egress::Framed(frame) => {
            let socket = frame_socket?;
            let (slot, message) = frames.prepare(frame, payload, dscp_ecn, payload_sum)?;
            opcode::SendMsg::new(Fd(socket.as_raw_fd()), message)
                .flags(nix::libc::MSG_DONTWAIT as u32)
                .build()
                .user_data(send_data(buffer, slot, output.counter))
        }
    };
    Some(entry)
}

/// Counts `packets` not sent to the output with counter `counter` for want of room.
fn queue_full(counters: &SharedCounters, counter: u32, packets: u64) {
    if let Some(output) = counters.block().outputs.get(counter as usize) {
        bump(&output.queue_full, packets);
    }
}

/// Whether `entries` more sends fit, beside `in_flight` sends, the in-flight bound and the
/// submission queue; submits what is queued first when the queue lacks the room.
fn room_for(
    in_flight: usize,
    entries: usize,
    submitter: &Submitter<'_>,
    sq: &mut squeue::SubmissionQueue<'_>,
) -> anyhow::Result<bool> {
    if sq.capacity() - sq.len() < entries {
        sq.sync();
        submitter.submit()?;
        sq.sync();
    }
    Ok(in_flight + entries <= MAX_IN_FLIGHT && sq.capacity() - sq.len() >= entries)
}

/// Pushes one entry, submitting first if the queue is full.
fn push(
    submitter: &Submitter<'_>,
    sq: &mut squeue::SubmissionQueue<'_>,
    entry: &squeue::Entry,
) -> anyhow::Result<()> {
    if sq.is_full() {
        sq.sync();
        submitter.submit()?;
        sq.sync();
    }
    // SAFETY: the entries pushed here (receive, poll, cancel) reference only descriptors the
    // forwarder owns for as long as the operation can run, and no memory.
    unsafe { sq.push(entry) }.map_err(|_| anyhow::anyhow!("submission queue full"))
}

#[cfg(test)]
mod tests {
    use mcr_common::{RuleKey, RuleKey6};

    use super::*;

    fn datagram(addresses: Addresses) -> Datagram {
        Datagram {
            addresses,
            source_port: 4000,
            destination_port: 5000,
            dscp_ecn: 0,
            udp_checksum: 0,
            payload: 28..30,
        }
    }

    #[test]
    fn packets_find_the_rule_of_their_family() {
        let v4 = datagram(Addresses::V4 {
            source: [10, 1, 0, 1].into(),
            destination: [239, 1, 1, 1].into(),
        });
        assert_eq!(
            flow_key(3, &v4),
            FlowKey::V4(RuleKey::new(3, [239, 1, 1, 1], [10, 1, 0, 1], 5000))
        );
        let source: std::net::Ipv6Addr = "fd00::1".parse().expect("address");
        let group: std::net::Ipv6Addr = "ff3e::1:2".parse().expect("address");
        let v6 = datagram(Addresses::V6 {
            source,
            destination: group,
        });
        let key = flow_key(4, &v6);
        assert_eq!(
            key,
            FlowKey::V6(RuleKey6::new(4, group.octets(), source.octets(), 5000))
        );
        // The rule for any sender is the fallback, as written by the rules side.
        let any = FlowKey::new(4, group.into(), None, 5000).expect("same family");
        assert_eq!(key.any_source(), any);
        let specific =
            FlowKey::new(4, group.into(), Some(source.into()), 5000).expect("same family");
        assert_eq!(key, specific);
    }
}
