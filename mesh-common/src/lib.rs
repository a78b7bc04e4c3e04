//! Types shared by the kernel programs (`mesh-ebpf`) and the node agent.
//!
//! Every type here is `#[repr(C)]` with explicit padding so the kernel and user
//! space agree on the byte layout of map keys and values.
#![no_std]

/// Upper bound on enrolled workloads; sizes the `WORKLOADS` map.
pub const MAX_WORKLOADS: u32 = 4096;
/// Upper bound on captured connections waiting to be accepted by the agent.
pub const MAX_PENDING_CONNECTIONS: u32 = 65536;
/// Upper bound on excluded ports and CIDRs across all workloads.
pub const MAX_EXCLUSIONS: u32 = 16384;
/// How many cgroup levels above the socket owner are checked for enrollment,
/// so a container cgroup nested under its pod cgroup is captured too.
pub const MAX_CGROUP_ANCESTORS: i32 = 8;

/// Address family tag for IPv4 (also used for IPv4-mapped IPv6 traffic).
pub const FAMILY_V4: u16 = 4;
/// Address family tag for IPv6.
pub const FAMILY_V6: u16 = 6;

/// The workload has an IPv6 loopback listener, so IPv6 connects may be redirected.
pub const WORKLOAD_FLAG_V6_LISTENER: u16 = 1;
/// The workload's capture verdicts are reported through aya-log while
/// `mesh-agent debug trace` watches it; off by default, so the hot path only
/// tests this bit.
pub const WORKLOAD_FLAG_TRACE: u16 = 2;

/// `MESHED_ADDRS` value bit: the address is meshed (every entry has it).
pub const MESHED_ADDR: u8 = 1;
/// `MESHED_ADDRS` value bit: inbound steering verdicts for this address are
/// reported through aya-log (`mesh-agent debug trace`).
pub const MESHED_ADDR_TRACE: u8 = 2;

/// The agent's mTLS tunnel port on every meshed pod (HBONE); never steered.
pub const HBONE_PORT: u16 = 15008;
/// The agent's in-pod listener for inbound plaintext; never steered itself.
pub const INBOUND_PORT: u16 = 15006;
/// Upper bound on steered pod addresses (a few per workload).
pub const MAX_INBOUND_ADDRS: u32 = MAX_WORKLOADS * 4;

/// Upper bound on sockets joined by the same-node fast path (two per connection).
pub const MAX_JOINED_SOCKETS: u32 = 65536;

/// One direction of a same-node connection the kernel carries: bytes arriving
/// on the agent socket keyed by this entry go out of `peer_cookie`'s socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct JoinedPeer {
    /// Socket cookie of the agent socket the bytes are sent from.
    pub peer_cookie: u64,
    /// Bytes the kernel has moved in this direction (written only by that socket's verdict).
    pub bytes: u64,
}

/// Node-wide settings the kernel programs read, by index into the `SETTINGS` array.
/// They live in a pinned map, so they still apply while no agent runs.
pub mod setting {
    /// What a meshed pod's connections do while no agent serves it
    /// (`AGENT_DOWN_CLOSED` or `AGENT_DOWN_OPEN`).
    pub const ON_AGENT_DOWN: u32 = 0;
    /// Non-zero while some pod address is traced, so `sk_lookup` looks up its
    /// trace bit only then: steering costs one array read while nobody traces.
    pub const TRACE_INBOUND: u32 = 1;
    /// Number of settings.
    pub const COUNT: u32 = 2;
    /// Refuse at once: nothing leaves or enters a meshed pod outside the mesh (the default).
    pub const AGENT_DOWN_CLOSED: u32 = 0;
    /// Let connections go direct, unencrypted and unenforced (availability over enforcement).
    pub const AGENT_DOWN_OPEN: u32 = 1;
}

/// A pod address whose inbound TCP the `sk_lookup` program steers to the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InboundKey {
    /// IPv6 bytes; IPv4 stored IPv4-mapped.
    pub addr: [u8; 16],
}

/// Why an enrolled workload's cgroup maps to capture settings in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkloadEntry {
    /// Agent-assigned id; keys the exclusion maps and is echoed in `OrigDst`.
    pub workload_id: u32,
    /// Port of the agent's outbound listener on loopback inside the pod's netns.
    pub outbound_port: u16,
    /// `WORKLOAD_FLAG_*` bits.
    pub flags: u16,
}

/// The destination the application asked for, recorded before it was rewritten.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// IPv6 bytes; IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`).
    pub addr: [u8; 16],
    /// Destination port in host byte order.
    pub port: u16,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u16,
    /// Workload that owns the connecting socket, from `WorkloadEntry`.
    pub workload_id: u32,
    /// The cgroup id that matched enrollment (the pod's cgroup).
    pub cgroup_id: u64,
}

/// Identifies a captured connection from the agent's side of the loopback hop:
/// the client's ephemeral port is unique per network namespace and family.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Network namespace cookie of the pod (and of the agent's listener in it).
    pub netns_cookie: u64,
    /// The client's local (ephemeral) port in host byte order.
    pub port: u16,
    /// `FAMILY_V4` or `FAMILY_V6`, as seen by the agent's listener.
    pub family: u16,
    /// Explicit padding so the key has no uninitialised bytes.
    pub _pad: u32,
}

/// An excluded destination port of one workload.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortKey {
    /// Workload the exclusion belongs to.
    pub workload_id: u32,
    /// Destination port in host byte order.
    pub port: u16,
    /// Explicit padding so the key has no uninitialised bytes.
    pub _pad: u16,
}

/// LPM-trie data for an excluded CIDR of one workload. The workload id leads in
/// big-endian so a prefix of `32 + n` bits matches "this workload, first n bits".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CidrKey {
    /// `workload_id.to_be_bytes()`.
    pub workload_id: [u8; 4],
    /// IPv6 bytes; IPv4 CIDRs are stored IPv4-mapped.
    pub addr: [u8; 16],
}

/// Prefix bits that the workload id occupies in a `CidrKey`.
pub const CIDR_KEY_WORKLOAD_BITS: u32 = 32;
/// Prefix bits of the `::ffff:0:0/96` IPv4-mapped range.
pub const V4_MAPPED_PREFIX_BITS: u32 = 96;

/// Indices of the per-CPU counters the kernel programs keep, exported as metrics.
pub mod stat {
    /// Connects redirected to the agent.
    pub const CAPTURED: u32 = 0;
    /// Connects from enrolled workloads left alone because of an exclusion.
    pub const EXCLUDED: u32 = 1;
    /// Connects left alone because they target loopback or the unspecified address.
    pub const LOOPBACK: u32 = 2;
    /// IPv6 connects left alone because the workload has no IPv6 listener.
    pub const NO_V6_LISTENER: u32 = 3;
    /// Captured connects whose original destination could not be recorded: refused
    /// (or sent direct under `AGENT_DOWN_OPEN`).
    pub const RECORD_FAILED: u32 = 4;
    /// Outbound connects refused because no agent listened for the pod (fail-closed).
    pub const AGENT_DOWN_REFUSED: u32 = 5;
    /// Outbound connects sent direct because no agent listened (`--on-agent-down open`).
    pub const AGENT_DOWN_DIRECT: u32 = 6;
    /// Inbound connections to a meshed pod reset because no agent listened (fail-closed).
    pub const INBOUND_AGENT_DOWN_REFUSED: u32 = 7;
    /// Inbound connections let straight to the application because no agent listened (open).
    pub const INBOUND_AGENT_DOWN_DIRECT: u32 = 8;
    /// Received segments a joined socket could not hand to its peer, left to the agent to relay.
    pub const SPLICE_MISSED: u32 = 9;
    /// Verdicts on traced workloads handed to aya-log (`mesh-agent debug
    /// trace`); more than the agent read means the ring buffer was full.
    pub const TRACED: u32 = 10;
    /// Number of counters.
    pub const COUNT: u32 = 11;
    /// Metric label for each counter, by index.
    pub const NAMES: [&str; COUNT as usize] = [
        "captured",
        "excluded",
        "loopback",
        "no_v6_listener",
        "record_failed",
        "agent_down_refused",
        "agent_down_direct",
        "inbound_agent_down_refused",
        "inbound_agent_down_direct",
        "splice_missed",
        "traced",
    ];
}

/// The kernel programs' verdicts as `mesh-agent debug trace` reports them: the
/// code travels in the aya-log record, the name is what users read.
pub mod verdict {
    /// Connect redirected to the agent's outbound listener.
    pub const CAPTURED: u8 = 0;
    /// Connect to loopback or the unspecified address: the pod talking to itself.
    pub const LOOPBACK: u8 = 1;
    /// Connect to a port the workload excludes (`excludedPorts`).
    pub const EXCLUDED_PORT: u8 = 2;
    /// Connect to a CIDR the workload excludes (`excludedCidrs`, its own IPs).
    pub const EXCLUDED_CIDR: u8 = 3;
    /// IPv6 connect left alone: the workload has no IPv6 listener.
    pub const NO_V6_LISTENER: u8 = 4;
    /// Captured connect refused: its original destination could not be recorded.
    pub const RECORD_FAILED: u8 = 5;
    /// Connect refused: no agent listens for the pod (fail-closed).
    pub const AGENT_DOWN_REFUSED: u8 = 6;
    /// Connect sent direct: no agent listens for the pod (`--on-agent-down open`).
    pub const AGENT_DOWN_DIRECT: u8 = 7;
    /// Inbound connection handed to the agent's inbound listener in the pod.
    pub const STEERED_INBOUND: u8 = 8;
    /// Inbound connection reset: no agent listens for the pod (fail-closed).
    pub const INBOUND_AGENT_DOWN_REFUSED: u8 = 9;
    /// Inbound connection let through to the application: no agent listens (open).
    pub const INBOUND_AGENT_DOWN_DIRECT: u8 = 10;
    /// Number of verdicts.
    pub const COUNT: u8 = 11;
    /// What users read for each verdict, by code.
    pub const NAMES: [&str; COUNT as usize] = [
        "captured",
        "loopback",
        "excluded_port",
        "excluded_cidr",
        "no_v6_listener",
        "record_failed",
        "agent_down_refused",
        "agent_down_direct",
        "steered_inbound",
        "inbound_agent_down_refused",
        "inbound_agent_down_direct",
    ];
}

/// Maps an IPv4 address (network-order octets) to its IPv4-mapped IPv6 form.
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C), Copy, with explicit padding and no pointers.
    unsafe impl aya::Pod for super::WorkloadEntry {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::CidrKey {}
    unsafe impl aya::Pod for super::InboundKey {}
    unsafe impl aya::Pod for super::JoinedPeer {}
}
