//! nodemesh kernel programs.
//!
//! * `capture_connect4` / `capture_connect6` (cgroup `connect4`/`connect6`):
//!   when a socket owned by an enrolled workload's cgroup connects over TCP,
//!   record where it wanted to go (keyed by socket cookie) and rewrite the
//!   destination to the agent's outbound listener on loopback in the pod.
//! * `track_captured_sockets` (cgroup `sock_ops`): once the kernel has picked
//!   the ephemeral port, re-key that record by (netns cookie, family, port),
//!   which is what the agent can see on `accept`; delete it when the socket
//!   closes, so the map never outlives the connection.
//! * `steer_inbound` (`sk_lookup`, attached to each meshed pod's network
//!   namespace): a TCP connection arriving from outside the pod for one of its
//!   addresses is handed to the agent's inbound listener in that pod, whatever
//!   the port. The tunnel port, the listener's own port and anything the pod
//!   sends to itself (including the agent delivering to the app from inside the
//!   pod) are left to the normal socket lookup.
//!
//! While no agent listens for a meshed pod (it crashed, or is being replaced
//! without a handoff), both directions fail closed: its connects are refused
//! with `EPERM` and connections to it are reset, unless the node's
//! `setting::ON_AGENT_DOWN` says open. The maps and links are pinned by the
//! agent, so these programs keep deciding when no agent process exists.
//!
//! Each verdict on a traced workload (`WORKLOAD_FLAG_TRACE`, `MESHED_ADDR_TRACE`,
//! set by `mesh-agent debug trace`) is also reported through aya-log; while
//! nothing is traced this costs a flag test in `connect` and one array read in
//! `sk_lookup`.
//!
//! Everything is decided from kernel state (cgroup id, socket cookie, netns
//! cookie); nothing the application sends is trusted.
#![no_std]
#![no_main]

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, bpf_sock_tuple,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 as Tuple4,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 as Tuple6,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
        bpf_get_socket_cookie, bpf_sk_lookup_tcp, bpf_sk_release,
    },
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops, stream_verdict},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash, lpm_trie::Key},
    programs::{SkBuffContext, SkLookupContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::info;
use mesh_common::{
    CIDR_KEY_WORKLOAD_BITS, CidrKey, ConnKey, FAMILY_V4, FAMILY_V6, HBONE_PORT, INBOUND_PORT,
    InboundKey, JoinedPeer, MAX_CGROUP_ANCESTORS, MAX_EXCLUSIONS, MAX_INBOUND_ADDRS,
    MAX_JOINED_SOCKETS, MAX_PENDING_CONNECTIONS, MAX_WORKLOADS, MESHED_ADDR_TRACE, OrigDst,
    PortKey, WORKLOAD_FLAG_TRACE, WORKLOAD_FLAG_V6_LISTENER, WorkloadEntry, setting, stat,
    v4_mapped, verdict,
};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const AF_INET: u32 = 2;
/// Allow the syscall to proceed (cgroup sock_addr programs return 1 to allow).
const ALLOW: i32 = 1;
/// Fail the syscall with `EPERM` (cgroup sock_addr programs return 0 to deny).
const DENY: i32 = 0;

/// Enrolled workloads by cgroup id (filled by the agent).
#[map]
static WORKLOADS: HashMap<u64, WorkloadEntry> = HashMap::with_max_entries(MAX_WORKLOADS, 0);

/// Destination ports each workload sends direct (filled by the agent).
#[map]
static EXCLUDED_PORTS: HashMap<PortKey, u8> = HashMap::with_max_entries(MAX_EXCLUSIONS, 0);

/// Destination CIDRs each workload sends direct (filled by the agent).
#[map]
static EXCLUDED_CIDRS: LpmTrie<CidrKey, u8> = LpmTrie::with_max_entries(MAX_EXCLUSIONS, 0);

/// Original destinations between connect() and the kernel choosing a source port.
#[map]
static PENDING: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(MAX_PENDING_CONNECTIONS, 0);

/// Original destinations of captured connections, waiting for the agent's accept.
#[map]
static ORIG_DST: LruHashMap<ConnKey, OrigDst> =
    LruHashMap::with_max_entries(MAX_PENDING_CONNECTIONS, 0);

/// Decision counters, indexed by `mesh_common::stat`.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// The agent's inbound listener in each meshed pod, by pod address (filled by the agent).
/// A listener's entry goes away with the socket, so a miss means no agent serves it.
#[map]
static INBOUND_LISTENERS: SockHash<InboundKey> = SockHash::with_max_entries(MAX_INBOUND_ADDRS, 0);

/// Every steered pod address, kept while the pod is meshed whether or not an agent
/// listens (filled by the agent): what makes a missing listener a refusal.
#[map]
static MESHED_ADDRS: HashMap<InboundKey, u8> = HashMap::with_max_entries(MAX_INBOUND_ADDRS, 0);

/// Node-wide settings, indexed by `mesh_common::setting` (written by the agent).
#[map]
static SETTINGS: Array<u32> = Array::with_max_entries(setting::COUNT, 0);

/// Agent sockets of joined connections, by socket cookie: valid redirect targets
/// (filled by the agent before it starts splicing either direction).
#[map]
static SPLICE_TARGETS: SockHash<u64> = SockHash::with_max_entries(MAX_JOINED_SOCKETS, 0);

/// Agent sockets whose received bytes `splice_joined` forwards, by socket cookie.
#[map]
static SPLICED: SockHash<u64> = SockHash::with_max_entries(MAX_JOINED_SOCKETS, 0);

/// Where each spliced socket's bytes go, and how many went (filled by the agent).
#[map]
static JOINED_PEERS: HashMap<u64, JoinedPeer> = HashMap::with_max_entries(MAX_JOINED_SOCKETS, 0);

/// `sk_lookup` verdict: continue (with or without a selected socket).
const SK_PASS: u32 = 1;
/// `sk_lookup` verdict: no socket; the client gets a reset.
const SK_DROP: u32 = 0;
/// Every network namespace numbers its loopback device 1.
const LOOPBACK_IFINDEX: u32 = 1;

#[sk_lookup]
pub fn steer_inbound(ctx: SkLookupContext) -> u32 {
    steer(&ctx)
}

/// Whether the node says to let traffic go direct while no agent serves a pod.
#[inline(always)]
fn agent_down_open() -> bool {
    SETTINGS
        .get(setting::ON_AGENT_DOWN)
        .is_some_and(|v| *v == setting::AGENT_DOWN_OPEN)
}

fn steer(ctx: &SkLookupContext) -> u32 {
    // SAFETY: the kernel passes a valid bpf_sk_lookup for the program's lifetime.
    let l = unsafe { &*ctx.lookup };
    // Every field is read up front, each with its own constant offset from the
    // context: if the compiler chose between field addresses by branch, the
    // verifier would reject the load through a moved context pointer.
    // SAFETY (all reads): fields of the live context.
    let (protocol, ifindex, port, family) = unsafe {
        (
            read_volatile(&l.protocol),
            read_volatile(&l.ingress_ifindex),
            read_volatile(&l.local_port),
            read_volatile(&l.family),
        )
    };
    let ip4 = unsafe { read_volatile(&l.local_ip4) };
    let remote4 = unsafe { read_volatile(&l.remote_ip4) };
    let remote6 = unsafe {
        [
            read_volatile(&l.remote_ip6[0]),
            read_volatile(&l.remote_ip6[1]),
            read_volatile(&l.remote_ip6[2]),
            read_volatile(&l.remote_ip6[3]),
        ]
    };
    let ip6 = unsafe {
        [
            read_volatile(&l.local_ip6[0]),
            read_volatile(&l.local_ip6[1]),
            read_volatile(&l.local_ip6[2]),
            read_volatile(&l.local_ip6[3]),
        ]
    };
    if protocol != IPPROTO_TCP || ifindex == LOOPBACK_IFINDEX {
        return SK_PASS;
    }
    // From the pod's own address to itself: the pod talking to itself, or the agent
    // delivering to the application from inside the pod. Loopback routing reports
    // the address's device here, not `lo`, so the addresses decide.
    let own = if family == AF_INET {
        remote4 == ip4
    } else {
        remote6 == ip6
    };
    if own {
        return SK_PASS;
    }
    if port == u32::from(HBONE_PORT) || port == u32::from(INBOUND_PORT) {
        return SK_PASS;
    }
    let addr = if family == AF_INET {
        v4_mapped(ip4.to_ne_bytes())
    } else {
        ip6_bytes(ip6)
    };
    let key = InboundKey { addr };
    let inbound = Inbound {
        local: addr,
        remote4,
        remote6,
        v4: family == AF_INET,
        port,
    };
    if INBOUND_LISTENERS.redirect_sk_lookup(ctx, key, 0).is_ok() {
        if inbound_traced() {
            let meshed = unsafe { MESHED_ADDRS.get(&key) }.copied().unwrap_or(0);
            trace_inbound(ctx, meshed, verdict::STEERED_INBOUND, &inbound);
        }
        return SK_PASS;
    }
    // No listener: either the address is not meshed (the normal lookup decides)
    // or its agent is gone.
    let Some(meshed) = unsafe { MESHED_ADDRS.get(&key) }.copied() else {
        return SK_PASS;
    };
    if agent_down_open() {
        count(stat::INBOUND_AGENT_DOWN_DIRECT);
        trace_inbound(ctx, meshed, verdict::INBOUND_AGENT_DOWN_DIRECT, &inbound);
        SK_PASS
    } else {
        count(stat::INBOUND_AGENT_DOWN_REFUSED);
        trace_inbound(ctx, meshed, verdict::INBOUND_AGENT_DOWN_REFUSED, &inbound);
        SK_DROP
    }
}

/// An IPv6 address as the kernel's four network-order words give it, as bytes.
#[inline(always)]
fn ip6_bytes(words: [u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (
        words[0].to_ne_bytes(),
        words[1].to_ne_bytes(),
        words[2].to_ne_bytes(),
        words[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// An inbound connection as `sk_lookup` saw it, for its trace record.
struct Inbound {
    /// The pod address it is for (IPv4-mapped for IPv4).
    local: [u8; 16],
    remote4: u32,
    remote6: [u32; 4],
    v4: bool,
    port: u32,
}

/// Whether any pod address is traced now (one array read).
#[inline(always)]
fn inbound_traced() -> bool {
    SETTINGS
        .get(setting::TRACE_INBOUND)
        .is_some_and(|v| *v != 0)
}

/// Reports an inbound verdict when the pod address is traced. The record is
/// "inbound verdict=<code> src=<ip> dst=<ip> port=<port>", which the agent parses.
#[inline(always)]
fn trace_inbound(ctx: &SkLookupContext, meshed: u8, code: u8, c: &Inbound) {
    if meshed & MESHED_ADDR_TRACE == 0 {
        return;
    }
    count(stat::TRACED);
    let remote = if c.v4 {
        v4_mapped(c.remote4.to_ne_bytes())
    } else {
        ip6_bytes(c.remote6)
    };
    info!(
        ctx,
        "inbound verdict={} src={:i} dst={:i} port={}", code, remote, c.local, c.port
    );
}

/// Reports a connect verdict when the workload is traced. The record is
/// "connect verdict=<code> workload=<id> dst=<ip> port=<port>", which the agent parses.
#[inline(always)]
fn trace_connect(
    ctx: &SockAddrContext,
    workload: &WorkloadEntry,
    code: u8,
    addr: &[u8; 16],
    port: u16,
) {
    if workload.flags & WORKLOAD_FLAG_TRACE == 0 {
        return;
    }
    count(stat::TRACED);
    info!(
        ctx,
        "connect verdict={} workload={} dst={:i} port={}", code, workload.workload_id, *addr, port
    );
}

#[cgroup_sock_addr(connect4)]
pub fn capture_connect4(ctx: SockAddrContext) -> i32 {
    capture(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn capture_connect6(ctx: SockAddrContext) -> i32 {
    capture(&ctx, true)
}

#[sock_ops]
pub fn track_captured_sockets(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_tcp_connect(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => on_tcp_close(&ctx),
        _ => {}
    }
    0
}

/// Named apart from its section: an eBPF fn named like its section fails to link.
#[stream_verdict]
pub fn splice_joined(ctx: SkBuffContext) -> u32 {
    splice(&ctx)
}

#[inline(always)]
fn splice(ctx: &SkBuffContext) -> u32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(peer) = JOINED_PEERS.get_ptr_mut(&cookie) else {
        // Not joined (yet): the agent reads these bytes itself.
        return SK_PASS;
    };
    let len = ctx.len() as u64;
    if len == 0 {
        // A bare FIN (TCP has already recorded the end of stream, which the
        // agent reads and passes on). Any path that queues an empty segment
        // (a redirect, or keeping it behind bytes still waiting to be sent)
        // makes the kernel's work queue try to move zero bytes, which it takes
        // for a broken pipe and resets the connection: drop it instead.
        return SK_DROP;
    }
    // SAFETY: a live map value.
    let mut target = unsafe { (*peer).peer_cookie };
    if SPLICE_TARGETS.redirect_skb(ctx, &mut target, 0) == SK_PASS as i64 {
        // SAFETY: a live map value. The verdict of one socket runs under that
        // socket's lock, and only this socket's verdict writes this entry, so
        // the add cannot race (the agent only reads it).
        unsafe {
            let bytes = &raw mut (*peer).bytes;
            write_volatile(bytes, read_volatile(bytes) + len);
        }
        SK_PASS
    } else {
        // The peer socket is gone: keep the bytes on this socket, where the
        // agent sees them, rather than drop data the sender was told arrived.
        count(stat::SPLICE_MISSED);
        SK_PASS
    }
}

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // Per-CPU slot: no other CPU writes it, and preemption cannot interleave here.
        unsafe { *counter += 1 };
    }
}

/// The enrolled cgroup owning the current task: its own cgroup or an ancestor
/// (a container cgroup nested in the pod cgroup is captured as the pod).
#[inline(always)]
fn enrolled_workload() -> Option<(u64, WorkloadEntry)> {
    let own = unsafe { bpf_get_current_cgroup_id() };
    if let Some(entry) = unsafe { WORKLOADS.get(&own) } {
        return Some((own, *entry));
    }
    let mut level = 1;
    while level <= MAX_CGROUP_ANCESTORS {
        let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if ancestor == 0 || ancestor == own {
            break;
        }
        if let Some(entry) = unsafe { WORKLOADS.get(&ancestor) } {
            return Some((ancestor, *entry));
        }
        level += 1;
    }
    None
}

#[inline(always)]
fn is_v4_mapped(addr: &[u8; 16]) -> bool {
    addr[..10].iter().all(|b| *b == 0) && addr[10] == 0xff && addr[11] == 0xff
}

/// Loopback and unspecified destinations are the pod talking to itself.
#[inline(always)]
fn is_local(addr: &[u8; 16], family: u16) -> bool {
    if family == FAMILY_V4 {
        addr[12] == 127 || (addr[12] == 0 && addr[13] == 0 && addr[14] == 0 && addr[15] == 0)
    } else {
        addr[..15].iter().all(|b| *b == 0) && (addr[15] == 1 || addr[15] == 0)
    }
}

#[inline(always)]
fn is_excluded_port(workload_id: u32, port: u16) -> bool {
    let port_key = PortKey {
        workload_id,
        port,
        _pad: 0,
    };
    unsafe { EXCLUDED_PORTS.get(&port_key) }.is_some()
}

#[inline(always)]
fn is_excluded_cidr(workload_id: u32, addr: &[u8; 16]) -> bool {
    let cidr_key = Key::new(
        CIDR_KEY_WORKLOAD_BITS + 128,
        CidrKey {
            workload_id: workload_id.to_be_bytes(),
            addr: *addr,
        },
    );
    EXCLUDED_CIDRS.get(&cidr_key).is_some()
}

/// Whether the agent's outbound listener for this pod exists: loopback `port`
/// in the connecting socket's network namespace, IPv6 (`::1`) or IPv4. The
/// listener is the agent's presence; it closes when the agent dies.
#[inline(always)]
fn agent_listening(ctx: &SockAddrContext, v6_listener: bool, port: u16) -> bool {
    // SAFETY: a plain-data union, zeroed, then one variant filled.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if v6_listener {
        tuple.__bindgen_anon_1.ipv6 = Tuple6 {
            saddr: [0; 4],
            daddr: [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])],
            sport: 0,
            dport: port.to_be(),
        };
        core::mem::size_of::<Tuple6>()
    } else {
        tuple.__bindgen_anon_1.ipv4 = Tuple4 {
            saddr: 0,
            daddr: u32::from_ne_bytes([127, 0, 0, 1]),
            sport: 0,
            dport: port.to_be(),
        };
        core::mem::size_of::<Tuple4>()
    };
    // SAFETY: the tuple lives on this stack frame; a found socket is released below.
    let sk = unsafe {
        bpf_sk_lookup_tcp(
            ctx.as_ptr(),
            &mut tuple,
            size as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sk.is_null() {
        return false;
    }
    unsafe { bpf_sk_release(sk.cast()) };
    true
}

#[inline(always)]
fn capture(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    let (sock_type, protocol) = unsafe { ((*sa).type_, (*sa).protocol) };
    if sock_type != SOCK_STREAM || protocol != IPPROTO_TCP {
        return ALLOW;
    }
    let Some((cgroup_id, workload)) = enrolled_workload() else {
        return ALLOW;
    };

    let (addr, family) = if v6 {
        let addr = ip6_bytes(unsafe { (*sa).user_ip6 });
        let family = if is_v4_mapped(&addr) {
            FAMILY_V4
        } else {
            FAMILY_V6
        };
        (addr, family)
    } else {
        let ip = unsafe { (*sa).user_ip4 };
        (v4_mapped(ip.to_ne_bytes()), FAMILY_V4)
    };
    let port = u16::from_be(unsafe { (*sa).user_port } as u16);

    let trace = |code| trace_connect(ctx, &workload, code, &addr, port);
    if is_local(&addr, family) {
        count(stat::LOOPBACK);
        trace(verdict::LOOPBACK);
        return ALLOW;
    }
    if is_excluded_port(workload.workload_id, port) {
        count(stat::EXCLUDED);
        trace(verdict::EXCLUDED_PORT);
        return ALLOW;
    }
    if is_excluded_cidr(workload.workload_id, &addr) {
        count(stat::EXCLUDED);
        trace(verdict::EXCLUDED_CIDR);
        return ALLOW;
    }
    if family == FAMILY_V6 && workload.flags & WORKLOAD_FLAG_V6_LISTENER == 0 {
        count(stat::NO_V6_LISTENER);
        trace(verdict::NO_V6_LISTENER);
        return ALLOW;
    }
    // IPv4 destinations (v4-mapped ones included) are redirected to 127.0.0.1.
    if !agent_listening(ctx, family == FAMILY_V6, workload.outbound_port) {
        if agent_down_open() {
            count(stat::AGENT_DOWN_DIRECT);
            trace(verdict::AGENT_DOWN_DIRECT);
            return ALLOW;
        }
        count(stat::AGENT_DOWN_REFUSED);
        trace(verdict::AGENT_DOWN_REFUSED);
        return DENY;
    }

    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        addr,
        port,
        family,
        workload_id: workload.workload_id,
        cgroup_id,
    };
    if PENDING.insert(&cookie, &orig, 0).is_err() {
        // Without a record the agent could not forward it: refuse it, unless the
        // node chose availability over enforcement.
        count(stat::RECORD_FAILED);
        trace(verdict::RECORD_FAILED);
        return if agent_down_open() { ALLOW } else { DENY };
    }

    let listener_port = u32::from(workload.outbound_port.to_be());
    unsafe {
        if !v6 {
            (*sa).user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
        } else if family == FAMILY_V4 {
            (*sa).user_ip6[0] = 0;
            (*sa).user_ip6[1] = 0;
            (*sa).user_ip6[2] = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
            (*sa).user_ip6[3] = u32::from_ne_bytes([127, 0, 0, 1]);
        } else {
            (*sa).user_ip6[0] = 0;
            (*sa).user_ip6[1] = 0;
            (*sa).user_ip6[2] = 0;
            (*sa).user_ip6[3] = u32::from_ne_bytes([0, 0, 0, 1]);
        }
        (*sa).user_port = listener_port;
    }
    count(stat::CAPTURED);
    trace(verdict::CAPTURED);
    ALLOW
}

/// The key the agent will compute from its accepted socket's peer address.
#[inline(always)]
fn conn_key(ctx: &SockOpsContext) -> ConnKey {
    let family = if ctx.family() == AF_INET {
        FAMILY_V4
    } else {
        let local = ctx.local_ip6();
        if local[0] == 0 && local[1] == 0 && local[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]) {
            FAMILY_V4
        } else {
            FAMILY_V6
        }
    };
    ConnKey {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        port: ctx.local_port() as u16,
        family,
        _pad: 0,
    }
}

/// The source port is now bound: move the record to where the agent looks.
#[inline(always)]
fn on_tcp_connect(ctx: &SockOpsContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = (unsafe { PENDING.get(&cookie) }).copied() else {
        return;
    };
    let _ = PENDING.remove(&cookie);
    if ORIG_DST.insert(&conn_key(ctx), &orig, 0).is_err() {
        count(stat::RECORD_FAILED);
        return;
    }
    // Ask for state callbacks on this socket only, to delete the record on close.
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
}

#[inline(always)]
fn on_tcp_close(ctx: &SockOpsContext) {
    let _ = ORIG_DST.remove(&conn_key(ctx));
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
