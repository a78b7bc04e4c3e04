//! Kernel capture: loads the eBPF programs, attaches them to a cgroup, and owns
//! the maps through which the agent enrolls workloads and learns original
//! destinations.

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, MapData, PerCpuArray, SockHash};
use aya::programs::sk_lookup::SkLookupLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps};
use aya::{Ebpf, EbpfLoader};
use ipnet::IpNet;
use mesh_common::{
    CIDR_KEY_WORKLOAD_BITS, CidrKey, ConnKey, FAMILY_V4, InboundKey, MAX_EXCLUSIONS,
    MAX_INBOUND_ADDRS, MAX_PENDING_CONNECTIONS, MAX_WORKLOADS, OrigDst, PortKey,
    V4_MAPPED_PREFIX_BITS, WorkloadEntry, stat, v4_mapped,
};
use serde::Serialize;

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
}

/// Program names in the object, with the hook each attaches to.
const SOCK_ADDR_PROGRAMS: [(&str, &str); 2] = [
    ("capture_connect4", "cgroup/connect4"),
    ("capture_connect6", "cgroup/connect6"),
];
const SOCK_OPS_PROGRAM: &str = "track_captured_sockets";
const SK_LOOKUP_PROGRAM: &str = "steer_inbound";

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

/// The loaded kernel side. Dropping it detaches every program (bpf_link).
pub struct Capture {
    /// Keeps programs and their links alive; per-pod `sk_lookup` links are made from it.
    ebpf: Mutex<Ebpf>,
    inbound: Mutex<SockHash<MapData, InboundKey>>,
    config: Mutex<ConfigMaps>,
    pending: Mutex<HashMap<MapData, u64, OrigDst>>,
    orig_dst: Mutex<HashMap<MapData, ConnKey, OrigDst>>,
    stats: PerCpuArray<MapData, u64>,
    programs: Vec<ProgramSummary>,
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, CaptureError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(CaptureError::MissingMap(name))?;
    T::try_from(map).map_err(|source| CaptureError::Map { name, source })
}

impl Capture {
    /// Loads the programs and attaches them to `attach_cgroup` (normally the cgroup2 root,
    /// so every pod below it is covered; enrollment is then decided per cgroup by map).
    pub fn load(attach_cgroup: &Path) -> Result<Self, CaptureError> {
        let mut ebpf = EbpfLoader::new()
            .load(EBPF_OBJECT)
            .map_err(CaptureError::Load)?;
        let cgroup = File::open(attach_cgroup).map_err(|source| CaptureError::Cgroup {
            path: attach_cgroup.to_owned(),
            source,
        })?;
        let mut programs = Vec::new();
        let program_err = |name| move |source| CaptureError::Program { name, source };
        for (name, hook) in SOCK_ADDR_PROGRAMS {
            let program = ebpf
                .program_mut(name)
                .ok_or(CaptureError::MissingProgram(name))?;
            let id = {
                let prog: &mut CgroupSockAddr = program.try_into().map_err(program_err(name))?;
                prog.load().map_err(program_err(name))?;
                prog.attach(&cgroup, LINK_MODE).map_err(program_err(name))?;
                prog.info().map_err(program_err(name))?.id()
            };
            programs.push(ProgramSummary {
                name,
                hook,
                id,
                cgroup: attach_cgroup.to_owned(),
            });
        }
        let program = ebpf
            .program_mut(SOCK_OPS_PROGRAM)
            .ok_or(CaptureError::MissingProgram(SOCK_OPS_PROGRAM))?;
        let sock_ops: &mut SockOps = program.try_into().map_err(program_err(SOCK_OPS_PROGRAM))?;
        sock_ops.load().map_err(program_err(SOCK_OPS_PROGRAM))?;
        sock_ops
            .attach(&cgroup, LINK_MODE)
            .map_err(program_err(SOCK_OPS_PROGRAM))?;
        programs.push(ProgramSummary {
            name: SOCK_OPS_PROGRAM,
            hook: "cgroup/sock_ops",
            id: sock_ops.info().map_err(program_err(SOCK_OPS_PROGRAM))?.id(),
            cgroup: attach_cgroup.to_owned(),
        });

        let program = ebpf
            .program_mut(SK_LOOKUP_PROGRAM)
            .ok_or(CaptureError::MissingProgram(SK_LOOKUP_PROGRAM))?;
        let sk_lookup: &mut SkLookup =
            program.try_into().map_err(program_err(SK_LOOKUP_PROGRAM))?;
        sk_lookup.load().map_err(program_err(SK_LOOKUP_PROGRAM))?;
        programs.push(ProgramSummary {
            name: SK_LOOKUP_PROGRAM,
            hook: "sk_lookup (per meshed pod netns)",
            id: sk_lookup
                .info()
                .map_err(program_err(SK_LOOKUP_PROGRAM))?
                .id(),
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
            inbound: Mutex::new(take_map(&mut ebpf, "INBOUND_LISTENERS")?),
            programs,
            ebpf: Mutex::new(ebpf),
        })
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

    /// Attaches inbound steering to a pod's network namespace. It stays attached
    /// while the returned link lives.
    pub fn attach_inbound(&self, netns: &File) -> Result<SkLookupLink, CaptureError> {
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
        program.take_link(id).map_err(err)
    }

    /// Steers inbound TCP for pod address `ip` to `listener` (the agent's inbound
    /// listener in that pod).
    pub fn steer_inbound(
        &self,
        ip: IpAddr,
        listener: &impl std::os::fd::AsRawFd,
    ) -> Result<(), CaptureError> {
        self.inbound
            .lock()
            .expect("inbound map lock")
            .insert(inbound_key(ip), listener.as_raw_fd(), 0)
            .map_err(|source| CaptureError::Map {
                name: "INBOUND_LISTENERS",
                source,
            })
    }

    /// Stops steering `ip`.
    pub fn unsteer_inbound(&self, ip: IpAddr) {
        let _ = self
            .inbound
            .lock()
            .expect("inbound map lock")
            .remove(&inbound_key(ip));
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
                name: "ORIG_DST",
                entries: orig_dst,
                capacity: MAX_PENDING_CONNECTIONS.into(),
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
