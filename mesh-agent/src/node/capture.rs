//! Kernel capture: loads the eBPF programs, attaches them to a cgroup, and owns
//! the maps through which the agent enrolls workloads and learns original
//! destinations.
//!
//! Maps and links are pinned (see [`crate::node::pins`]), so capture stays in
//! force when the agent exits or crashes: a meshed pod's connections are then
//! refused instead of leaving the pod unencrypted. A new agent of the same build
//! adopts the pinned objects; one of another build loads its own and, once its
//! maps are filled, swaps each link's program atomically ([`Capture::take_over`]).

use std::collections::HashSet;
use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, SockHash};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SkSkb, SockOps};
use aya::{Ebpf, EbpfLoader};
use ipnet::IpNet;
use mesh_common::{
    CIDR_KEY_WORKLOAD_BITS, CidrKey, ConnKey, FAMILY_V4, InboundKey, MAX_EXCLUSIONS,
    MAX_INBOUND_ADDRS, MAX_JOINED_SOCKETS, MAX_PENDING_CONNECTIONS, MAX_WORKLOADS, MESHED_ADDR,
    MESHED_ADDR_TRACE, OrigDst, PortKey, V4_MAPPED_PREFIX_BITS, WORKLOAD_FLAG_TRACE, WorkloadEntry,
    setting, stat, v4_mapped,
};
use serde::Serialize;

use crate::node::pins::{self, Generation, PinError};
use crate::node::splice::{Splice, SpliceError};
use crate::node::trace::KernelTrace;

/// The kernel programs, built by `cargo xtask build` and embedded so the agent is one file.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MESH_EBPF_OBJECT"));

/// Why capture could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The kernel refused to load the embedded programs.
    #[error(
        "loading the eBPF programs into the kernel failed: {0} (needs CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF and BTF)"
    )]
    Load(#[source] aya::EbpfError),
    /// A program could not be verified, loaded or attached.
    #[error("program {name}: {source}")]
    Program {
        /// Program name in the object.
        name: &'static str,
        /// What aya reported.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// The attach cgroup could not be opened.
    #[error("opening cgroup {path} to attach programs: {source}")]
    Cgroup {
        /// The cgroup directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A map the agent needs is missing from the object or has the wrong type.
    #[error("map {name}: {source}")]
    Map {
        /// Map name in the object.
        name: &'static str,
        /// What aya reported.
        #[source]
        source: aya::maps::MapError,
    },
    /// The object is missing a map the agent needs (a build mismatch).
    #[error("the embedded eBPF object has no map named {0}")]
    MissingMap(&'static str),
    /// The object is missing a program the agent needs (a build mismatch).
    #[error("the embedded eBPF object has no program named {0}")]
    MissingProgram(&'static str),
    /// The fast path's maps are missing or of the wrong kind.
    #[error("same-node fast path: {0}")]
    Splice(#[source] SpliceError),
    /// The programs' aya-log ring buffer is missing (a build mismatch).
    #[error("kernel trace ring buffer: {0}")]
    Trace(#[source] aya_log::Error),
    /// The bpffs pin directory could not be used.
    #[error(transparent)]
    Pin(#[from] PinError),
    /// A link could not be pinned, adopted or taken over.
    #[error("link {path}: {message}")]
    Link {
        /// The link's pin path.
        path: PathBuf,
        /// What failed.
        message: String,
    },
}

/// What a meshed pod's connections do while no agent serves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentDown {
    /// Refused at once, both ways: the mesh never silently stops enforcing.
    #[default]
    Closed,
    /// Direct and unencrypted, without policy: availability over enforcement.
    Open,
}

/// Where the kernel state is pinned and how it behaves without an agent.
#[derive(Debug, Clone)]
pub struct CaptureOptions {
    /// bpffs directory holding the pinned maps and links of every generation.
    pub pin_root: PathBuf,
    /// What meshed pods' connections do while no agent serves them.
    pub on_agent_down: AgentDown,
}

/// How the agent found the kernel side at start, for the log and `/config_dump`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Startup {
    /// Nothing was pinned: programs attached afresh.
    Fresh,
    /// This build's pinned maps and links were adopted.
    Adopted,
    /// Another build's links were found; they are taken over once this agent's
    /// maps are filled.
    TakingOver,
}

/// Program names in the object, with the hook each attaches to.
const SOCK_ADDR_PROGRAMS: [(&str, &str); 2] = [
    ("capture_connect4", "cgroup/connect4"),
    ("capture_connect6", "cgroup/connect6"),
];
const SOCK_OPS_PROGRAM: &str = "track_captured_sockets";
const SK_LOOKUP_PROGRAM: &str = "steer_inbound";
const SPLICE_PROGRAM: &str = "splice_joined";
/// Cgroup programs with the name of their pinned link.
const CGROUP_LINKS: [(&str, &str); 3] = [
    ("capture_connect4", "connect4"),
    ("capture_connect6", "connect6"),
    (SOCK_OPS_PROGRAM, "sock_ops"),
];
/// Every map in the object; each is pinned by name in the generation directory.
const MAPS: [&str; 13] = [
    "WORKLOADS",
    "EXCLUDED_PORTS",
    "EXCLUDED_CIDRS",
    "PENDING",
    "ORIG_DST",
    "STATS",
    "INBOUND_LISTENERS",
    "MESHED_ADDRS",
    "SETTINGS",
    "SPLICE_TARGETS",
    "SPLICED",
    "JOINED_PEERS",
    // aya-log's ring buffer: pinned so programs adopted from a predecessor
    // report to the buffer this agent reads.
    "AYA_LOGS",
];

/// Cgroup bpf_links (5.7+, always used on our minimum kernel) coexist with other
/// programs by construction and reject attach flags, so the mode must be `Single`
/// (flags 0). Other agents' and tools' programs on the same cgroup keep working.
const LINK_MODE: CgroupAttachMode = CgroupAttachMode::Single;

/// A loaded, attached program, for `/config_dump`.
#[derive(Debug, Clone, Serialize)]
pub struct ProgramSummary {
    /// Name in the object.
    pub name: &'static str,
    /// Hook it is attached to.
    pub hook: &'static str,
    /// Kernel program id (`bpftool prog show id N`).
    pub id: u32,
    /// Cgroup it is attached to.
    pub cgroup: PathBuf,
}

/// How full one map is, for metrics and `/config_dump`.
#[derive(Debug, Clone, Serialize)]
pub struct MapOccupancy {
    /// Map name in the object.
    pub name: &'static str,
    /// Entries present now.
    pub entries: u64,
    /// `max_entries`.
    pub capacity: u64,
}

/// Destinations an enrolled workload reaches without the agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Exclusions {
    /// Destination ports.
    pub ports: Vec<u16>,
    /// Destination CIDRs (the pod's own IPs are added as host routes).
    pub cidrs: Vec<IpNet>,
}

struct ConfigMaps {
    workloads: HashMap<MapData, u64, WorkloadEntry>,
    excluded_ports: HashMap<MapData, PortKey, u8>,
    excluded_cidrs: LpmTrie<MapData, CidrKey, u8>,
}

/// The loaded kernel side. Dropping it leaves the pinned links attached and the
/// pinned maps in place: only [`uninstall`] removes them.
pub struct Capture {
    /// Programs; per-pod `sk_lookup` links are made from it.
    ebpf: Mutex<Ebpf>,
    inbound: Mutex<SockHash<MapData, InboundKey>>,
    meshed_addrs: Mutex<HashMap<MapData, InboundKey, u8>>,
    config: Mutex<ConfigMaps>,
    pending: Mutex<HashMap<MapData, u64, OrigDst>>,
    orig_dst: Mutex<HashMap<MapData, ConnKey, OrigDst>>,
    stats: PerCpuArray<MapData, u64>,
    settings: Mutex<Array<MapData, u32>>,
    /// Workloads traced now, so `sk_lookup` reads trace bits only while any is.
    traced_workloads: Mutex<u32>,
    /// The programs' verdicts on traced workloads (`mesh-agent debug trace`).
    pub trace: KernelTrace,
    /// The same-node fast path's maps.
    pub splice: Arc<Splice>,
    programs: Vec<ProgramSummary>,
    generation: Generation,
    /// The cgroup links, held so this process's fds keep them for as long as it runs.
    cgroup_links: Mutex<Vec<PinnedLink>>,
    /// Other builds' generations whose links this agent takes over.
    takeover: Mutex<Vec<Generation>>,
    startup: Startup,
    on_agent_down: AgentDown,
}

/// A pod network namespace's pinned `sk_lookup` link. Dropping it only closes
/// this process's fd; [`Capture::detach_inbound`] unpins it.
pub struct NetnsLink {
    link: PinnedLink,
    cookie: u64,
}

/// What the agent serves now; everything else pinned is stale and swept.
#[derive(Debug, Default)]
pub struct LiveSet {
    /// Cgroups whose `WORKLOADS` entry stays (enrolled, or desired but failed:
    /// those stay refused rather than go uncaptured).
    pub cgroups: HashSet<u64>,
    /// Pod addresses that stay in `MESHED_ADDRS`.
    pub addrs: HashSet<IpAddr>,
    /// Network namespaces whose `sk_lookup` link stays; `None` keeps them all
    /// (some desired pod's namespace is not known yet).
    pub netns_cookies: Option<HashSet<u64>>,
}

/// What a sweep removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    /// `WORKLOADS` entries.
    pub workloads: usize,
    /// Exclusion entries (ports and CIDRs).
    pub exclusions: usize,
    /// `MESHED_ADDRS` entries.
    pub addrs: usize,
    /// Pinned `sk_lookup` links.
    pub netns_links: usize,
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, CaptureError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(CaptureError::MissingMap(name))?;
    T::try_from(map).map_err(|source| CaptureError::Map { name, source })
}

impl Capture {
    /// Loads the programs with their maps pinned under `options.pin_root` and makes
    /// sure they are attached to `attach_cgroup` (normally the cgroup2 root, so
    /// every pod below it is covered; enrollment is then decided per cgroup by map):
    /// adopting this build's pinned links, attaching and pinning new ones, or
    /// leaving another build's in force until [`Capture::take_over`].
    pub fn load(attach_cgroup: &Path, options: &CaptureOptions) -> Result<Self, CaptureError> {
        pins::ensure_bpffs(&options.pin_root)?;
        let stamp = pins::stamp(EBPF_OBJECT);
        let generation = Generation::new(&options.pin_root, &stamp);
        let adopted = generation.map("WORKLOADS").exists();
        generation.create()?;
        let map_paths: Vec<(&str, PathBuf)> =
            MAPS.iter().map(|m| (*m, generation.map(m))).collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(CaptureError::Load)?;
        let trace = KernelTrace::new(&mut ebpf).map_err(CaptureError::Trace)?;
        let cgroup = File::open(attach_cgroup).map_err(|source| CaptureError::Cgroup {
            path: attach_cgroup.to_owned(),
            source,
        })?;
        let program_err = |name| move |source| CaptureError::Program { name, source };
        for (name, _) in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(CaptureError::MissingProgram(name))?
                .try_into()
                .map_err(program_err(name))?;
            prog.load().map_err(program_err(name))?;
        }
        let sock_ops: &mut SockOps = ebpf
            .program_mut(SOCK_OPS_PROGRAM)
            .ok_or(CaptureError::MissingProgram(SOCK_OPS_PROGRAM))?
            .try_into()
            .map_err(program_err(SOCK_OPS_PROGRAM))?;
        sock_ops.load().map_err(program_err(SOCK_OPS_PROGRAM))?;
        let sk_lookup: &mut SkLookup = ebpf
            .program_mut(SK_LOOKUP_PROGRAM)
            .ok_or(CaptureError::MissingProgram(SK_LOOKUP_PROGRAM))?
            .try_into()
            .map_err(program_err(SK_LOOKUP_PROGRAM))?;
        sk_lookup.load().map_err(program_err(SK_LOOKUP_PROGRAM))?;

        let splice = Arc::new(Splice::from_object(&mut ebpf).map_err(CaptureError::Splice)?);
        {
            let verdict: &mut SkSkb = ebpf
                .program_mut(SPLICE_PROGRAM)
                .ok_or(CaptureError::MissingProgram(SPLICE_PROGRAM))?
                .try_into()
                .map_err(program_err(SPLICE_PROGRAM))?;
            verdict.load().map_err(program_err(SPLICE_PROGRAM))?;
            // Attached to the (pinned) map, replacing a predecessor's program of
            // this build. The link is forgotten, never detached: a draining
            // predecessor exiting must not take the verdict off its successor's
            // joined sockets.
            let id = splice
                .with_spliced_map(|m| verdict.attach(m.fd()))
                .map_err(program_err(SPLICE_PROGRAM))?;
            let link = verdict.take_link(id).map_err(program_err(SPLICE_PROGRAM))?;
            std::mem::forget(link);
        }
        if adopted {
            let swept = splice.sweep();
            if swept > 0 {
                tracing::info!(
                    swept,
                    "removed fast-path entries of connections that died with a previous agent"
                );
            }
        }

        let mut settings: Array<MapData, u32> = take_map(&mut ebpf, "SETTINGS")?;
        let down = match options.on_agent_down {
            AgentDown::Closed => setting::AGENT_DOWN_CLOSED,
            AgentDown::Open => setting::AGENT_DOWN_OPEN,
        };
        // Nothing is traced until this agent is asked to: a predecessor's
        // trace ends with it (re-enrolling clears the per-workload bits).
        for (index, value) in [(setting::ON_AGENT_DOWN, down), (setting::TRACE_INBOUND, 0)] {
            settings
                .set(index, value, 0)
                .map_err(|source| CaptureError::Map {
                    name: "SETTINGS",
                    source,
                })?;
        }

        let others = pins::other_generations(&options.pin_root, &stamp);
        let others_have_links = others
            .iter()
            .any(|g| CGROUP_LINKS.iter().any(|(_, l)| g.link(l).exists()));
        let mut cgroup_links = Vec::new();
        let startup = if others_have_links && !adopted {
            // Another build captures now; its links get this build's programs
            // only once this agent's maps hold every workload.
            Startup::TakingOver
        } else {
            for (program, link) in CGROUP_LINKS {
                let path = generation.link(link);
                let pinned = if path.exists() {
                    PinnedLink::from_pin(&path).map_err(|e| CaptureError::Link {
                        path: path.clone(),
                        message: format!("adopting: {e}"),
                    })?
                } else {
                    attach_cgroup_program(&mut ebpf, program, &cgroup, &path)?
                };
                cgroup_links.push(pinned);
            }
            if adopted {
                Startup::Adopted
            } else {
                Startup::Fresh
            }
        };
        let takeover = if startup == Startup::TakingOver {
            others
        } else {
            // Generations without links hold nothing in force: remove them.
            for g in others {
                pins::remove_tree(&g.dir)?;
            }
            Vec::new()
        };

        let mut programs = Vec::new();
        for (name, hook) in SOCK_ADDR_PROGRAMS
            .into_iter()
            .chain([(SOCK_OPS_PROGRAM, "cgroup/sock_ops")])
        {
            let program = ebpf
                .program(name)
                .ok_or(CaptureError::MissingProgram(name))?;
            programs.push(ProgramSummary {
                name,
                hook,
                id: program.info().map_err(program_err(name))?.id(),
                cgroup: attach_cgroup.to_owned(),
            });
        }
        let sk_lookup = ebpf
            .program(SK_LOOKUP_PROGRAM)
            .ok_or(CaptureError::MissingProgram(SK_LOOKUP_PROGRAM))?;
        programs.push(ProgramSummary {
            name: SK_LOOKUP_PROGRAM,
            hook: "sk_lookup (per meshed pod netns)",
            id: sk_lookup
                .info()
                .map_err(program_err(SK_LOOKUP_PROGRAM))?
                .id(),
            cgroup: PathBuf::new(),
        });
        let verdict = ebpf
            .program(SPLICE_PROGRAM)
            .ok_or(CaptureError::MissingProgram(SPLICE_PROGRAM))?;
        programs.push(ProgramSummary {
            name: SPLICE_PROGRAM,
            hook: "sk_skb/stream_verdict (map SPLICED)",
            id: verdict.info().map_err(program_err(SPLICE_PROGRAM))?.id(),
            cgroup: PathBuf::new(),
        });

        let config = ConfigMaps {
            workloads: take_map(&mut ebpf, "WORKLOADS")?,
            excluded_ports: take_map(&mut ebpf, "EXCLUDED_PORTS")?,
            excluded_cidrs: take_map(&mut ebpf, "EXCLUDED_CIDRS")?,
        };
        Ok(Capture {
            config: Mutex::new(config),
            pending: Mutex::new(take_map(&mut ebpf, "PENDING")?),
            orig_dst: Mutex::new(take_map(&mut ebpf, "ORIG_DST")?),
            stats: take_map(&mut ebpf, "STATS")?,
            splice,
            inbound: Mutex::new(take_map(&mut ebpf, "INBOUND_LISTENERS")?),
            meshed_addrs: Mutex::new(take_map(&mut ebpf, "MESHED_ADDRS")?),
            settings: Mutex::new(settings),
            traced_workloads: Mutex::new(0),
            trace,
            programs,
            ebpf: Mutex::new(ebpf),
            generation,
            cgroup_links: Mutex::new(cgroup_links),
            takeover: Mutex::new(takeover),
            startup,
            on_agent_down: options.on_agent_down,
        })
    }

    /// How the kernel side was found at start.
    pub fn startup(&self) -> Startup {
        self.startup
    }

    /// What meshed pods' connections do while no agent serves them.
    pub fn on_agent_down(&self) -> AgentDown {
        self.on_agent_down
    }

    /// The generation directory this agent's objects are pinned in.
    pub fn pin_dir(&self) -> &Path {
        &self.generation.dir
    }

    /// The highest workload id in the adopted `WORKLOADS` map, so ids this agent
    /// assigns never collide with entries (and their exclusions) still in force.
    pub fn highest_workload_id(&self) -> u32 {
        let maps = self.config.lock().expect("capture map lock");
        maps.workloads
            .iter()
            .filter_map(Result::ok)
            .map(|(_, e)| e.workload_id)
            .max()
            .unwrap_or(0)
    }

    /// Drops every recorded original destination: after a crash they belong to
    /// connections that died with the old process (their clients saw a reset).
    /// Call before any listener is bound.
    pub fn clear_connection_records(&self) -> usize {
        let mut cleared = 0;
        let mut pending = self.pending.lock().expect("pending lock");
        let keys: Vec<u64> = pending.keys().filter_map(Result::ok).collect();
        for k in keys {
            cleared += usize::from(pending.remove(&k).is_ok());
        }
        let mut orig = self.orig_dst.lock().expect("orig dst lock");
        let keys: Vec<ConnKey> = orig.keys().filter_map(Result::ok).collect();
        for k in keys {
            cleared += usize::from(orig.remove(&k).is_ok());
        }
        cleared
    }

    /// Gives another build's pinned links this build's programs, one atomic
    /// `BPF_LINK_UPDATE` per hook, re-pins them here and removes that build's
    /// directory. Call once this agent's maps hold every workload; a no-op
    /// otherwise. Returns how many links were taken over.
    pub fn take_over(&self) -> Result<usize, CaptureError> {
        let others = std::mem::take(&mut *self.takeover.lock().expect("takeover lock"));
        if others.is_empty() {
            return Ok(0);
        }
        let ebpf = self.ebpf.lock().expect("ebpf lock");
        let mut links = self.cgroup_links.lock().expect("cgroup links lock");
        let mut taken = 0;
        for (program, link) in CGROUP_LINKS {
            let mine = self.generation.link(link);
            let Some(old) = others.iter().map(|g| g.link(link)).find(|p| p.exists()) else {
                continue;
            };
            let link_fd = pins::open_pinned(&old).map_err(|e| CaptureError::Link {
                path: old.clone(),
                message: format!("opening: {e}"),
            })?;
            let fd = ebpf
                .program(program)
                .ok_or(CaptureError::MissingProgram(program))?
                .fd()
                .map_err(|source| CaptureError::Program {
                    name: program,
                    source,
                })?;
            pins::update_link_program(&link_fd, fd).map_err(|e| CaptureError::Link {
                path: old.clone(),
                message: format!("replacing its program (BPF_LINK_UPDATE): {e}"),
            })?;
            // The same link, now running this build's program, moves to this
            // build's directory (bpffs renames within one mount).
            std::fs::rename(&old, &mine).map_err(|e| CaptureError::Link {
                path: mine.clone(),
                message: format!("moving the pin from {}: {e}", old.display()),
            })?;
            links.push(PinnedLink::from_pin(&mine).map_err(|e| CaptureError::Link {
                path: mine.clone(),
                message: format!("opening: {e}"),
            })?);
            taken += 1;
        }
        drop(links);
        drop(ebpf);
        // The old build's per-pod links and maps go with its directory; this
        // agent attached its own sk_lookup links when it enrolled each pod.
        for g in &others {
            pins::remove_tree(&g.dir)?;
        }
        Ok(taken)
    }

    /// Starts capturing connects from `cgroup_id` (call only once its listener is bound,
    /// so no connection is ever redirected to a port nobody listens on).
    pub fn enroll(
        &self,
        cgroup_id: u64,
        entry: WorkloadEntry,
        exclusions: &Exclusions,
    ) -> Result<(), CaptureError> {
        let mut maps = self.config.lock().expect("capture map lock");
        // Exclusions first: the workload must never be captured without them.
        maps.insert_exclusions(entry.workload_id, exclusions)?;
        maps.workloads
            .insert(cgroup_id, entry, 0)
            .map_err(|source| CaptureError::Map {
                name: "WORKLOADS",
                source,
            })
    }

    /// Replaces a workload's exclusions while it stays enrolled.
    pub fn update_exclusions(
        &self,
        workload_id: u32,
        old: &Exclusions,
        new: &Exclusions,
    ) -> Result<(), CaptureError> {
        let mut maps = self.config.lock().expect("capture map lock");
        maps.insert_exclusions(workload_id, new)?;
        let stale = Exclusions {
            ports: old
                .ports
                .iter()
                .filter(|p| !new.ports.contains(p))
                .copied()
                .collect(),
            cidrs: old
                .cidrs
                .iter()
                .filter(|c| !new.cidrs.contains(c))
                .copied()
                .collect(),
        };
        maps.remove_exclusions(workload_id, &stale);
        Ok(())
    }

    /// Stops capturing `cgroup_id`: its next connect goes direct.
    pub fn unenroll(&self, cgroup_id: u64, workload_id: u32, exclusions: &Exclusions) {
        let mut maps = self.config.lock().expect("capture map lock");
        // Removing a missing key is harmless; a real failure here would leave capture on,
        // which the occupancy metric and /config_dump make visible.
        if let Err(e) = maps.workloads.remove(&cgroup_id) {
            tracing::debug!(cgroup_id, error = %e, "workload entry already absent");
        }
        maps.remove_exclusions(workload_id, exclusions);
    }

    /// Attaches inbound steering to a pod's network namespace (whose cookie is
    /// `cookie`), pinned so it outlives the agent; adopts the pinned link when
    /// this build already steers that namespace.
    pub fn attach_inbound(&self, netns: &File, cookie: u64) -> Result<NetnsLink, CaptureError> {
        let path = self.generation.netns_link(cookie);
        if path.exists() {
            let link = PinnedLink::from_pin(&path).map_err(|e| CaptureError::Link {
                path: path.clone(),
                message: format!("adopting: {e}"),
            })?;
            return Ok(NetnsLink { link, cookie });
        }
        let err = |source| CaptureError::Program {
            name: SK_LOOKUP_PROGRAM,
            source,
        };
        let mut ebpf = self.ebpf.lock().expect("ebpf lock");
        let program: &mut SkLookup = ebpf
            .program_mut(SK_LOOKUP_PROGRAM)
            .ok_or(CaptureError::MissingProgram(SK_LOOKUP_PROGRAM))?
            .try_into()
            .map_err(err)?;
        let id = program.attach(netns).map_err(err)?;
        let link: FdLink = program.take_link(id).map_err(err)?.into();
        let link = link.pin(&path).map_err(|e| CaptureError::Link {
            path: path.clone(),
            message: format!("pinning: {e}"),
        })?;
        Ok(NetnsLink { link, cookie })
    }

    /// Stops steering a pod's namespace: unpins its link, which detaches once
    /// this process's fd closes too.
    pub fn detach_inbound(&self, link: NetnsLink) {
        if let Err(e) = link.link.unpin() {
            tracing::warn!(netns_cookie = link.cookie, error = %e, "unpinning a pod's sk_lookup link failed");
        }
    }

    /// Steers inbound TCP for pod address `ip` to `listener` (the agent's inbound
    /// listener in that pod), and marks the address meshed, so it is refused
    /// rather than reached directly whenever that listener is gone. `traced`
    /// reports its steering verdicts ([`Capture::set_traced`]).
    pub fn steer_inbound(
        &self,
        ip: IpAddr,
        listener: &impl std::os::fd::AsRawFd,
        traced: bool,
    ) -> Result<(), CaptureError> {
        self.meshed_addrs
            .lock()
            .expect("meshed addrs lock")
            .insert(inbound_key(ip), meshed_value(traced), 0)
            .map_err(|source| CaptureError::Map {
                name: "MESHED_ADDRS",
                source,
            })?;
        self.inbound
            .lock()
            .expect("inbound map lock")
            .insert(inbound_key(ip), listener.as_raw_fd(), 0)
            .map_err(|source| CaptureError::Map {
                name: "INBOUND_LISTENERS",
                source,
            })
    }

    /// Switches the kernel's verdict reports for one enrolled workload on or
    /// off: the trace bit of its `WORKLOADS` entry (connects) and of each of
    /// its addresses in `MESHED_ADDRS` (inbound). The caller counts watchers
    /// and calls this on the first and after the last; entries written later
    /// by enrollment carry the bit through `WorkloadEntry::flags` and
    /// [`Capture::steer_inbound`].
    pub fn set_traced(&self, cgroup_id: u64, ips: &[IpAddr], on: bool) -> Result<(), CaptureError> {
        let map_err = |name| move |source| CaptureError::Map { name, source };
        {
            let mut maps = self.config.lock().expect("capture map lock");
            if let Ok(mut entry) = maps.workloads.get(&cgroup_id, 0) {
                entry.flags = if on {
                    entry.flags | WORKLOAD_FLAG_TRACE
                } else {
                    entry.flags & !WORKLOAD_FLAG_TRACE
                };
                maps.workloads
                    .insert(cgroup_id, entry, 0)
                    .map_err(map_err("WORKLOADS"))?;
            }
        }
        {
            let mut meshed = self.meshed_addrs.lock().expect("meshed addrs lock");
            for ip in ips {
                let key = inbound_key(*ip);
                // Only addresses still meshed: a trace never re-creates an entry.
                if meshed.get(&key, 0).is_ok() {
                    meshed
                        .insert(key, meshed_value(on), 0)
                        .map_err(map_err("MESHED_ADDRS"))?;
                }
            }
        }
        let mut traced = self.traced_workloads.lock().expect("traced lock");
        *traced = if on {
            *traced + 1
        } else {
            traced.saturating_sub(1)
        };
        self.settings
            .lock()
            .expect("settings lock")
            .set(setting::TRACE_INBOUND, *traced, 0)
            .map_err(map_err("SETTINGS"))
    }

    /// Whether `cgroup_id`'s kernel entry has the trace bit; `None` without an entry.
    pub fn is_traced(&self, cgroup_id: u64) -> Option<bool> {
        let maps = self.config.lock().expect("capture map lock");
        let entry = maps.workloads.get(&cgroup_id, 0).ok()?;
        Some(entry.flags & WORKLOAD_FLAG_TRACE != 0)
    }

    /// Stops steering `ip`: it is no longer meshed.
    pub fn unsteer_inbound(&self, ip: IpAddr) {
        let _ = self
            .inbound
            .lock()
            .expect("inbound map lock")
            .remove(&inbound_key(ip));
        let _ = self
            .meshed_addrs
            .lock()
            .expect("meshed addrs lock")
            .remove(&inbound_key(ip));
    }

    /// Removes pinned kernel state that nothing in `live` accounts for: entries
    /// and links a dead or previous agent left for pods that are gone or no
    /// longer meshed.
    pub fn sweep(&self, live: &LiveSet) -> Swept {
        let mut swept = Swept::default();
        {
            let mut maps = self.config.lock().expect("capture map lock");
            let entries: Vec<(u64, WorkloadEntry)> =
                maps.workloads.iter().filter_map(Result::ok).collect();
            let mut kept_ids = HashSet::new();
            for (cgroup, entry) in entries {
                if live.cgroups.contains(&cgroup) {
                    kept_ids.insert(entry.workload_id);
                } else if maps.workloads.remove(&cgroup).is_ok() {
                    swept.workloads += 1;
                }
            }
            let ports: Vec<PortKey> = maps.excluded_ports.keys().filter_map(Result::ok).collect();
            for k in ports {
                if !kept_ids.contains(&k.workload_id) && maps.excluded_ports.remove(&k).is_ok() {
                    swept.exclusions += 1;
                }
            }
            let cidrs: Vec<Key<CidrKey>> =
                maps.excluded_cidrs.keys().filter_map(Result::ok).collect();
            for k in cidrs {
                let id = u32::from_be_bytes(k.data().workload_id);
                if !kept_ids.contains(&id) && maps.excluded_cidrs.remove(&k).is_ok() {
                    swept.exclusions += 1;
                }
            }
        }
        {
            let keep: HashSet<InboundKey> = live.addrs.iter().map(|ip| inbound_key(*ip)).collect();
            let mut meshed = self.meshed_addrs.lock().expect("meshed addrs lock");
            let keys: Vec<InboundKey> = meshed.keys().filter_map(Result::ok).collect();
            for k in keys {
                if !keep.contains(&k) && meshed.remove(&k).is_ok() {
                    swept.addrs += 1;
                }
            }
        }
        if let Some(cookies) = &live.netns_cookies {
            for cookie in self.generation.netns_links() {
                if !cookies.contains(&cookie)
                    && std::fs::remove_file(self.generation.netns_link(cookie)).is_ok()
                {
                    swept.netns_links += 1;
                }
            }
        }
        swept
    }

    /// Takes the original destination of a captured connection, as recorded by the kernel.
    pub fn take_orig_dst(&self, key: &ConnKey) -> Option<OrigDst> {
        let mut map = self.orig_dst.lock().expect("orig dst lock");
        let orig = map.get(key, 0).ok()?;
        // The kernel also deletes it on close; deleting now keeps the map as small as the
        // accept backlog rather than the number of live connections.
        let _ = map.remove(key);
        Some(orig)
    }

    /// Decision counters summed over CPUs, indexed by `mesh_common::stat`.
    pub fn stats(&self) -> [u64; stat::COUNT as usize] {
        let mut out = [0u64; stat::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = self.stats.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        out
    }

    /// Entries and capacity of every capture map.
    pub fn occupancy(&self) -> Vec<MapOccupancy> {
        let config = self.config.lock().expect("capture map lock");
        let pending = self.pending.lock().expect("pending lock").keys().count() as u64;
        let orig_dst = self.orig_dst.lock().expect("orig dst lock").keys().count() as u64;
        let splice = self.splice.occupancy();
        vec![
            MapOccupancy {
                name: "WORKLOADS",
                entries: config.workloads.keys().count() as u64,
                capacity: MAX_WORKLOADS.into(),
            },
            MapOccupancy {
                name: "EXCLUDED_PORTS",
                entries: config.excluded_ports.keys().count() as u64,
                capacity: MAX_EXCLUSIONS.into(),
            },
            MapOccupancy {
                name: "EXCLUDED_CIDRS",
                entries: config.excluded_cidrs.keys().count() as u64,
                capacity: MAX_EXCLUSIONS.into(),
            },
            MapOccupancy {
                name: "PENDING",
                entries: pending,
                capacity: MAX_PENDING_CONNECTIONS.into(),
            },
            MapOccupancy {
                name: "INBOUND_LISTENERS",
                entries: self.inbound_entries(),
                capacity: MAX_INBOUND_ADDRS.into(),
            },
            MapOccupancy {
                name: "MESHED_ADDRS",
                entries: self
                    .meshed_addrs
                    .lock()
                    .expect("meshed addrs lock")
                    .keys()
                    .count() as u64,
                capacity: MAX_INBOUND_ADDRS.into(),
            },
            MapOccupancy {
                name: "ORIG_DST",
                entries: orig_dst,
                capacity: MAX_PENDING_CONNECTIONS.into(),
            },
            MapOccupancy {
                name: "SPLICE_TARGETS",
                entries: splice.targets,
                capacity: MAX_JOINED_SOCKETS.into(),
            },
            MapOccupancy {
                name: "SPLICED",
                entries: splice.spliced,
                capacity: MAX_JOINED_SOCKETS.into(),
            },
            MapOccupancy {
                name: "JOINED_PEERS",
                entries: splice.peers,
                capacity: MAX_JOINED_SOCKETS.into(),
            },
        ]
    }

    /// Steered pod addresses now.
    pub fn inbound_entries(&self) -> u64 {
        self.inbound
            .lock()
            .expect("inbound map lock")
            .keys()
            .count() as u64
    }

    /// The attached programs.
    pub fn programs(&self) -> &[ProgramSummary] {
        &self.programs
    }
}

/// A meshed address's `MESHED_ADDRS` value, with the trace bit when `traced`.
fn meshed_value(traced: bool) -> u8 {
    if traced {
        MESHED_ADDR | MESHED_ADDR_TRACE
    } else {
        MESHED_ADDR
    }
}

/// Attaches a cgroup program through a bpf_link and pins the link at `path`.
fn attach_cgroup_program(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &File,
    path: &Path,
) -> Result<PinnedLink, CaptureError> {
    let err = |source| CaptureError::Program { name, source };
    let program = ebpf
        .program_mut(name)
        .ok_or(CaptureError::MissingProgram(name))?;
    let link: FdLink = if name == SOCK_OPS_PROGRAM {
        let prog: &mut SockOps = program.try_into().map_err(err)?;
        let id = prog.attach(cgroup, LINK_MODE).map_err(err)?;
        prog.take_link(id).map_err(err)?.try_into()
    } else {
        let prog: &mut CgroupSockAddr = program.try_into().map_err(err)?;
        let id = prog.attach(cgroup, LINK_MODE).map_err(err)?;
        prog.take_link(id).map_err(err)?.try_into()
    }
    .map_err(|e| CaptureError::Link {
        path: path.to_owned(),
        message: format!("not a bpf_link: {e}"),
    })?;
    link.pin(path).map_err(|e| CaptureError::Link {
        path: path.to_owned(),
        message: format!("pinning: {e}"),
    })
}

/// Removes every pinned map and link under `pin_root`: capture stops once no
/// agent holds them either. The deliberate way to take nodemesh off a node.
pub fn uninstall(pin_root: &Path) -> Result<usize, CaptureError> {
    let pinned = pins::count_pins(pin_root);
    pins::remove_tree(pin_root)?;
    Ok(pinned)
}

impl ConfigMaps {
    fn insert_exclusions(&mut self, workload_id: u32, ex: &Exclusions) -> Result<(), CaptureError> {
        for port in &ex.ports {
            self.excluded_ports
                .insert(port_key(workload_id, *port), 1, 0)
                .map_err(|source| CaptureError::Map {
                    name: "EXCLUDED_PORTS",
                    source,
                })?;
        }
        for cidr in &ex.cidrs {
            self.excluded_cidrs
                .insert(&cidr_key(workload_id, cidr), 1, 0)
                .map_err(|source| CaptureError::Map {
                    name: "EXCLUDED_CIDRS",
                    source,
                })?;
        }
        Ok(())
    }

    fn remove_exclusions(&mut self, workload_id: u32, ex: &Exclusions) {
        for port in &ex.ports {
            let _ = self.excluded_ports.remove(&port_key(workload_id, *port));
        }
        for cidr in &ex.cidrs {
            let _ = self.excluded_cidrs.remove(&cidr_key(workload_id, cidr));
        }
    }
}

fn port_key(workload_id: u32, port: u16) -> PortKey {
    PortKey {
        workload_id,
        port,
        _pad: 0,
    }
}

/// LPM key: the workload id's 32 bits, then the address (IPv4 as IPv4-mapped).
fn cidr_key(workload_id: u32, cidr: &IpNet) -> Key<CidrKey> {
    let (addr, bits) = match cidr {
        IpNet::V4(n) => (
            v4_mapped(n.network().octets()),
            V4_MAPPED_PREFIX_BITS + u32::from(n.prefix_len()),
        ),
        IpNet::V6(n) => (n.network().octets(), u32::from(n.prefix_len())),
    };
    Key::new(
        CIDR_KEY_WORKLOAD_BITS + bits,
        CidrKey {
            workload_id: workload_id.to_be_bytes(),
            addr,
        },
    )
}

fn inbound_key(ip: IpAddr) -> InboundKey {
    InboundKey {
        addr: match ip {
            IpAddr::V4(v4) => v4_mapped(v4.octets()),
            IpAddr::V6(v6) => v6.octets(),
        },
    }
}

/// The socket address the application originally connected to.
pub fn orig_dst_addr(orig: &OrigDst) -> SocketAddr {
    let v6 = std::net::Ipv6Addr::from(orig.addr);
    let ip = if orig.family == FAMILY_V4 {
        v6.to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6))
    } else {
        IpAddr::V6(v6)
    };
    SocketAddr::new(ip, orig.port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_keys_cover_workload_id_then_address() {
        let k = cidr_key(7, &"10.1.0.0/16".parse().unwrap());
        assert_eq!(k.prefix_len(), 32 + 96 + 16);
        assert_eq!(k.data().workload_id, [0, 0, 0, 7]);
        assert_eq!(&k.data().addr[10..14], &[0xff, 0xff, 10, 1]);
        let k6 = cidr_key(1, &"fd00::/8".parse().unwrap());
        assert_eq!(k6.prefix_len(), 32 + 8);
    }

    #[test]
    fn orig_dst_round_trips_both_families() {
        let mut o = OrigDst {
            addr: v4_mapped([198, 18, 0, 2]),
            port: 8080,
            family: FAMILY_V4,
            workload_id: 1,
            cgroup_id: 1,
        };
        assert_eq!(orig_dst_addr(&o).to_string(), "198.18.0.2:8080");
        o.addr = "fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets();
        o.family = mesh_common::FAMILY_V6;
        assert_eq!(orig_dst_addr(&o).to_string(), "[fd00::2]:8080");
    }
}
