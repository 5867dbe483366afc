//! The eBPF side of the supervisor: loads the classifier, pins its maps, attaches it to input
//! interfaces and turns rules into map entries. Which rule becomes which entries is decided in
//! `supervisor/rules.rs`; the kernel path's output sets and counters are in [`outputs`].

pub mod outputs;

use std::{
    collections::HashMap,
    fs, io,
    path::{Path, PathBuf},
};

use std::os::fd::{AsFd, BorrowedFd};

use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray, PerCpuValues},
    programs::{
        LinkOrder, ProgramError, SchedClassifier, SocketFilter, TcAttachType,
        tc::{self, TcAttachOptions},
    },
};
use mcr_common::{
    MAP_KERNEL_OUTPUTS, MAP_OUTPUT_STATS, MAP_RULE_STATS, MAP_RULES, MAP_RULES6, MAP_SKIPS,
    MAP_WORKER_LOAD, MAX_RULES, PROG_ADMIT, PROG_CLASSIFIER, PROG_STEER, RuleCounters, RuleKey,
    RuleKey6, RuleSlot, SkipCounters, WorkerLoad,
};

use self::outputs::KernelPathMaps;
use crate::flow::FlowKey;
use nix::{
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};

/// The classifier object, built by `build.rs` from `mcr-ebpf`.
static CLASSIFIER_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mcr-ebpf"));

/// Every map the classifier pins, in the order the README lists them.
pub const PINNED_MAPS: [&str; 7] = [
    MAP_RULES,
    MAP_RULES6,
    MAP_RULE_STATS,
    MAP_SKIPS,
    MAP_KERNEL_OUTPUTS,
    MAP_OUTPUT_STATS,
    MAP_WORKER_LOAD,
];

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("cannot mount bpffs on {}: {source} (run as root or mount it yourself)", path.display())]
    MountBpffs { path: PathBuf, source: nix::Error },
    #[error("{} is not on a bpffs mount; choose a pin directory under /sys/fs/bpf", path.display())]
    NotBpffs { path: PathBuf },
    #[error("cannot prepare pin directory {}: {source}", path.display())]
    PinDir { path: PathBuf, source: io::Error },
    #[error("cannot load the eBPF classifier (needs root or CAP_BPF and CAP_NET_ADMIN): {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("cannot prepare the classifier program: {0}")]
    Program(#[source] ProgramError),
    #[error("cannot pin map {name} at {}: {source}", path.display())]
    Pin {
        name: &'static str,
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("cannot attach the classifier to interface {interface}: {source}")]
    Attach {
        interface: String,
        source: ProgramError,
    },
    #[error("cannot detach the classifier from interface {interface}: {source}")]
    Detach {
        interface: String,
        source: ProgramError,
    },
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: MapError },
}

pub(crate) fn map_error(map: &'static str) -> impl FnOnce(MapError) -> BpfError {
    move |source| BpfError::Map { map, source }
}

/// How the classifier hangs on an interface's ingress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// A TCX link (kernel 6.6 and later).
    Tcx,
    /// A direct-action filter on a clsact qdisc (older kernels).
    Clsact,
}

impl AttachMode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcx => "tc ingress (tcx link)",
            Self::Clsact => "tc ingress (clsact filter)",
        }
    }
}

pub struct Attachment {
    pub ifindex: u32,
    pub mode: AttachMode,
    link: tc::SchedClassifierLinkId,
}

/// The loaded classifier with its maps pinned under one directory.
pub struct Classifier {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    rules: BpfHashMap<MapData, RuleKey, RuleSlot>,
    rules6: BpfHashMap<MapData, RuleKey6, RuleSlot>,
    rule_stats: PerCpuArray<MapData, RuleCounters>,
    skips: PerCpuArray<MapData, SkipCounters>,
    /// The kernel path's output sets and per-output counters.
    pub kernel: KernelPathMaps,
    worker_load: Array<MapData, WorkerLoad>,
    attached: HashMap<String, Attachment>,
    cpus: usize,
}

impl Classifier {
    /// Loads the classifier and pins its maps in `pin_dir`, replacing pins a previous instance
    /// left behind. The caller makes sure no live instance uses `pin_dir`.
    pub fn load(pin_dir: &Path) -> Result<Self, BpfError> {
        ensure_bpffs(pin_dir)?;
        remove_pins(pin_dir).map_err(|source| BpfError::PinDir {
            path: pin_dir.to_owned(),
            source,
        })?;
        fs::create_dir_all(pin_dir).map_err(|source| BpfError::PinDir {
            path: pin_dir.to_owned(),
            source,
        })?;

        let mut ebpf = Ebpf::load(CLASSIFIER_OBJECT)?;
        for name in PINNED_MAPS {
            let path = pin_dir.join(name);
            ebpf.map(name)
                .ok_or(BpfError::Missing(name))?
                .pin(&path)
                .map_err(|source| BpfError::Pin { name, path, source })?;
        }
        let program: &mut SchedClassifier = ebpf
            .program_mut(PROG_CLASSIFIER)
            .ok_or(BpfError::Missing(PROG_CLASSIFIER))?
            .try_into()
            .map_err(BpfError::Program)?;
        program.load().map_err(BpfError::Program)?;
        for name in [PROG_ADMIT, PROG_STEER] {
            let program: &mut SocketFilter = ebpf
                .program_mut(name)
                .ok_or(BpfError::Missing(name))?
                .try_into()
                .map_err(BpfError::Program)?;
            program.load().map_err(BpfError::Program)?;
        }

        let rules = take_map(&mut ebpf, MAP_RULES)?;
        let rules6 = take_map(&mut ebpf, MAP_RULES6)?;
        let rule_stats = take_map(&mut ebpf, MAP_RULE_STATS)?;
        let skips = take_map(&mut ebpf, MAP_SKIPS)?;
        let worker_load = take_map(&mut ebpf, MAP_WORKER_LOAD)?;
        let kernel = KernelPathMaps {
            outputs: take_map(&mut ebpf, MAP_KERNEL_OUTPUTS)?,
            stats: take_map(&mut ebpf, MAP_OUTPUT_STATS)?,
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, error)| BpfError::PinDir {
            path: "/sys/devices/system/cpu/possible".into(),
            source: error,
        })?;
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            rules,
            rules6,
            rule_stats,
            skips,
            kernel,
            worker_load,
            attached: HashMap::new(),
            cpus,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Interfaces the classifier is attached to, with how.
    pub fn attachments(&self) -> impl Iterator<Item = (&String, &Attachment)> {
        self.attached.iter()
    }

    /// Attaches the classifier to the TC ingress of `interface` (index `ifindex`): a TCX link
    /// where the kernel has TCX (6.6 and later), else a filter on a clsact qdisc. A TCX link
    /// lives as long as this process, so a crash detaches it. An attachment to an earlier
    /// interface of the same name is replaced.
    pub fn attach(&mut self, interface: &str, ifindex: u32) -> Result<(), BpfError> {
        match self.attached.get(interface) {
            Some(existing) if existing.ifindex == ifindex => return Ok(()),
            Some(_) => {
                // The interface was deleted and created again; its old link died with it.
                let _ = self.detach(interface);
            }
            None => {}
        }
        let attach_error = |source| BpfError::Attach {
            interface: interface.to_owned(),
            source,
        };
        let program = self.program()?;
        let tcx = program.attach_with_options(
            interface,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        );
        let (link, mode) = if let Ok(link) = tcx {
            (link, AttachMode::Tcx)
        } else {
            // Kernels before 6.6 have no TCX: a filter on a clsact qdisc instead.
            let _ = tc::qdisc_add_clsact(interface);
            let link = program
                .attach_with_options(
                    interface,
                    TcAttachType::Ingress,
                    TcAttachOptions::Netlink(tc::NlOptions::default()),
                )
                .map_err(attach_error)?;
            (link, AttachMode::Clsact)
        };
        self.attached.insert(
            interface.to_owned(),
            Attachment {
                ifindex,
                mode,
                link,
            },
        );
        Ok(())
    }

    pub fn detach(&mut self, interface: &str) -> Result<(), BpfError> {
        let Some(attachment) = self.attached.remove(interface) else {
            return Ok(());
        };
        self.program()?
            .detach(attachment.link)
            .map_err(|source| BpfError::Detach {
                interface: interface.to_owned(),
                source,
            })
    }

    fn program(&mut self) -> Result<&mut SchedClassifier, BpfError> {
        self.ebpf
            .program_mut(PROG_CLASSIFIER)
            .ok_or(BpfError::Missing(PROG_CLASSIFIER))?
            .try_into()
            .map_err(BpfError::Program)
    }

    fn socket_program(&self, name: &'static str) -> Result<&SocketFilter, BpfError> {
        self.ebpf
            .program(name)
            .ok_or(BpfError::Missing(name))?
            .try_into()
            .map_err(BpfError::Program)
    }

    /// Puts the admission filter on a worker's `AF_PACKET` socket.
    pub fn attach_admit_filter(&self, socket: BorrowedFd<'_>) -> Result<(), BpfError> {
        self.socket_program(PROG_ADMIT)?
            .attach(socket)
            .map_err(BpfError::Program)
    }

    /// The fanout program, for `PACKET_FANOUT_DATA`.
    pub fn steer_program(&self) -> Result<BorrowedFd<'_>, BpfError> {
        Ok(self
            .socket_program(PROG_STEER)?
            .fd()
            .map_err(BpfError::Program)?
            .as_fd())
    }

    /// Sets the counters of `slot` to zero, for a rule that takes the slot over.
    pub fn clear_rule_counters(&mut self, slot: u32) -> Result<(), BpfError> {
        let zeros = PerCpuValues::try_from(vec![RuleCounters::default(); self.cpus])
            .map_err(|error| map_error(MAP_RULE_STATS)(MapError::from(error)))?;
        self.rule_stats
            .set(slot, zeros, 0)
            .map_err(map_error(MAP_RULE_STATS))
    }

    /// Starts matching `key` as `value` says (its counter slot keeps counting from where it
    /// is), or replaces the entry of `key` in one step.
    pub fn insert_rule(&mut self, key: &FlowKey, value: RuleSlot) -> Result<(), BpfError> {
        match key {
            FlowKey::V4(key) => self
                .rules
                .insert(key, value, 0)
                .map_err(map_error(MAP_RULES)),
            FlowKey::V6(key) => self
                .rules6
                .insert(key, value, 0)
                .map_err(map_error(MAP_RULES6)),
        }
    }

    /// The map entry of `key`, if the classifier has one.
    pub fn rule(&self, key: &FlowKey) -> Option<RuleSlot> {
        match key {
            FlowKey::V4(key) => self.rules.get(key, 0).ok(),
            FlowKey::V6(key) => self.rules6.get(key, 0).ok(),
        }
    }

    pub fn remove_rule(&mut self, key: &FlowKey) -> Result<(), BpfError> {
        let (result, map) = match key {
            FlowKey::V4(key) => (self.rules.remove(key), MAP_RULES),
            FlowKey::V6(key) => (self.rules6.remove(key), MAP_RULES6),
        };
        match result {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(error) => Err(map_error(map)(error)),
        }
    }

    /// The counters of `slot`, summed over all CPUs.
    pub fn rule_counters(&self, slot: u32) -> Result<RuleCounters, BpfError> {
        let per_cpu = self
            .rule_stats
            .get(&slot, 0)
            .map_err(map_error(MAP_RULE_STATS))?;
        Ok(per_cpu
            .iter()
            .fold(RuleCounters::default(), |sum, c| sum + *c))
    }

    /// Multicast UDP the classifier did not relay, by reason, summed over all CPUs.
    /// A descriptor of the map of worker loads, for a worker to map its own page of.
    pub fn worker_load_map(&self) -> io::Result<std::os::fd::OwnedFd> {
        aya::maps::IterableMap::map(&self.worker_load)
            .fd()
            .as_fd()
            .try_clone_to_owned()
    }

    /// How far behind worker `index` is, and what was shed because of it.
    pub fn worker_load(&self, index: u32) -> Option<WorkerLoad> {
        self.worker_load.get(&index, 0).ok()
    }

    pub fn skip_counters(&self) -> Result<SkipCounters, BpfError> {
        let per_cpu = self.skips.get(&0, 0).map_err(map_error(MAP_SKIPS))?;
        Ok(per_cpu
            .iter()
            .fold(SkipCounters::default(), |sum, c| sum + *c))
    }

    /// Detaches from every interface and removes the pins.
    pub fn shutdown(mut self) -> Result<(), BpfError> {
        let interfaces: Vec<String> = self.attached.keys().cloned().collect();
        let mut first_error = None;
        for interface in interfaces {
            if let Err(error) = self.detach(&interface) {
                first_error.get_or_insert(error);
            }
        }
        if let Err(source) = remove_pins(&self.pin_dir) {
            first_error.get_or_insert(BpfError::PinDir {
                path: self.pin_dir.clone(),
                source,
            });
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Highest slot number the counter array can hold.
pub const MAX_SLOT: u32 = MAX_RULES - 1;

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(BpfError::Missing(name))?;
    T::try_from(map).map_err(map_error(name))
}

/// Makes sure the parent of `pin_dir` is on bpffs, mounting it at `/sys/fs/bpf` if nothing is.
fn ensure_bpffs(pin_dir: &Path) -> Result<(), BpfError> {
    let parent = pin_dir.parent().unwrap_or(Path::new("/"));
    if statfs(parent).is_ok_and(|fs| fs.filesystem_type() == BPF_FS_MAGIC) {
        return Ok(());
    }
    if parent == Path::new("/sys/fs/bpf") {
        mount(
            Some("bpf"),
            parent,
            Some("bpf"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(|source| BpfError::MountBpffs {
            path: parent.to_owned(),
            source,
        })?;
        return Ok(());
    }
    Err(BpfError::NotBpffs {
        path: pin_dir.to_owned(),
    })
}

/// Removes the pins MCR creates in `pin_dir` and the directory itself if it is then empty.
/// Files MCR does not know are left alone.
fn remove_pins(pin_dir: &Path) -> io::Result<()> {
    for name in PINNED_MAPS {
        match fs::remove_file(pin_dir.join(name)) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
    }
    match fs::remove_dir(pin_dir) {
        Ok(()) => Ok(()),
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty
            ) =>
        {
            Ok(())
        }
        Err(error) => Err(error),
    }
}
