//! The reconciler: one owner of enrollment state, turning each accepted config
//! into kernel map entries and in-pod listeners, live and without touching
//! connections that are already flowing.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, anyhow};
use ipnet::IpNet;
use mesh_common::{
    FAMILY_V4, FAMILY_V6, WORKLOAD_FLAG_TRACE, WORKLOAD_FLAG_V6_LISTENER, WorkloadEntry,
};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::connections::ConnectionTable;
use crate::handoff::{HandedOverJoined, Handover, Inherited, ListenerKey};
use crate::identity::manager::CertView;
use crate::identity::node::{IdentitySettings, IdentityState};
use crate::metrics::Metrics;
use crate::node::capture::{Capture, Exclusions, LiveSet, MapOccupancy, NetnsLink, ProgramSummary};
use crate::node::cgroup::{Cgroup2, cgroup_id};
use crate::node::netns::NetnsHandle;
use crate::proxy::inbound::{self, InboundContext};
use crate::proxy::l7::catalog::{ServiceEndpointsView, ServiceRoutesView};
use crate::proxy::l7::pod::PodL7;
use crate::proxy::l7::upstream::Upstreams;
use crate::proxy::l7::{L7, L7Settings};
use crate::proxy::limits::{Limits, PodLimit};
use crate::proxy::outbound;
use crate::proxy::pod::PodContext;
use crate::proxy::same_node::{LocalDestinations, LocalRegistration};
use crate::proxy::tunnel::pool::{PoolSettings, PoolView, TunnelPool};
use crate::proxy::tunnel::{self, HBONE_PORT};
use crate::state::policy::{Policies, PolicyStore};
use crate::state::route::HttpRoute;
use crate::state::service::Selectable;
use crate::state::workload::{Directory, NetnsRef, Workload, WorkloadMeta};
use crate::state::{ConfigError, MeshConfig};
use mesh_common::INBOUND_PORT;

/// Agent settings that come from flags, not from the desired state.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where the desired state comes from, for `/config_dump` (a file path or the
    /// Kubernetes API).
    pub source: String,
    /// Port of the outbound listener on loopback inside each pod.
    pub outbound_port: u16,
    /// Upper bound on an upstream connect.
    pub connect_timeout: Duration,
    /// How long an unenrolled workload's listener keeps accepting already-captured connections.
    pub drain: Duration,
    /// Cgroup the programs are attached to.
    pub attach_cgroup: PathBuf,
    /// Mesh CA and certificate settings; `None` runs without mTLS.
    pub identity: Option<IdentitySettings>,
    /// This node's name: workloads with another `spec.nodeName` are only looked up, never enrolled.
    pub node_name: Option<String>,
    /// Protocol detection and HTTP limits.
    pub l7: L7Settings,
    /// Where JSON request-log lines go, when enabled.
    pub request_log: Option<tracing_appender::non_blocking::NonBlocking>,
    /// Records request spans for the OTLP collector, when one is configured.
    pub tracer: crate::traces::Tracer,
    /// Most connections the agent holds at once; more are reset at once.
    pub max_connections: usize,
    /// Join same-node connections in the kernel instead of tunnelling them.
    pub same_node_fast_path: bool,
}

/// Outcome of the last desired-state loads, for `/config_dump`.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigStatus {
    /// Where the desired state comes from: the config file, or the Kubernetes API.
    pub source: String,
    /// Number of desired states applied so far.
    pub generation: u64,
    /// When the last good state was applied (Unix seconds).
    pub last_applied_unix: f64,
    /// Why the most recent load was rejected, if it was (file source).
    pub last_error: Option<String>,
    /// Objects the source rejected while applying the rest (Kubernetes source):
    /// `Kind namespace/name: field: message`.
    pub rejected_objects: Vec<String>,
}

struct Enrollment {
    /// Inbound steering of the pod; undone when the enrollment is dropped.
    inbound: Option<InboundSteering>,
    /// The pod's entry for the same-node fast path; removed on drop.
    local: Option<LocalRegistration>,
    workload: Workload,
    workload_id: u32,
    cgroup_id: u64,
    exclusions: Exclusions,
    ctx: Arc<PodContext>,
    listeners: Vec<SocketAddr>,
    /// This process's copy of each listening socket, handed to a successor.
    sockets: Vec<(ListenerKey, OwnedFd)>,
    tasks: Vec<JoinHandle<()>>,
    cancel: CancellationToken,
}

/// A pod's inbound steering: its addresses in the kernel's steering map and the
/// pinned `sk_lookup` link on its namespace. Both outlive the agent process
/// (that is what keeps a pod fail-closed while no agent runs); they are removed
/// by [`InboundSteering::remove`] when the pod leaves the mesh, or on drop while
/// `armed` (an enrollment that failed half way).
struct InboundSteering {
    capture: Arc<Capture>,
    ips: Vec<IpAddr>,
    link: Option<NetnsLink>,
    armed: bool,
}

impl InboundSteering {
    fn remove(mut self) {
        self.armed = true;
    }
}

impl Drop for InboundSteering {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for ip in &self.ips {
            self.capture.unsteer_inbound(*ip);
        }
        if let Some(link) = self.link.take() {
            self.capture.detach_inbound(link);
        }
    }
}

#[derive(Default)]
struct State {
    enrolled: BTreeMap<String, Enrollment>,
    failed: BTreeMap<String, (Workload, String)>,
    /// Listener tasks of unenrolled workloads, still draining, by netns inode.
    draining: HashMap<u64, Vec<JoinHandle<()>>>,
    next_workload_id: u32,
    /// Pinned kernel state from an earlier agent may still hold entries for pods
    /// that are gone; swept once every desired pod is enrolled.
    sweep_pending: bool,
    /// A successor is taking over: config is not applied (its kernel writes would
    /// race the successor's); the latest one waits here in case it goes away.
    frozen: bool,
    deferred: Option<(MeshConfig, Vec<String>)>,
    /// Handed over (or stopping): never applies config again.
    retired: bool,
    status: ConfigStatus,
    /// Workloads whose kernel verdicts are traced, with how many watch each:
    /// enrollment writes their kernel entries with the trace bit.
    traced: HashMap<String, usize>,
}

/// Where one workload stands with the reconciler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrollmentState {
    /// Captured: its cgroup is in the kernel map and its listeners are bound.
    Enrolled,
    /// Its last enrollment failed, with this error; it is retried.
    Failed(String),
    /// Not enrolled (not desired, or not yet reconciled).
    Absent,
}

/// The running agent.
pub struct Agent {
    /// Kernel side.
    pub capture: Arc<Capture>,
    /// Exported metrics.
    pub metrics: Arc<Metrics>,
    /// Live connections.
    pub connections: Arc<ConnectionTable>,
    directory: Arc<Directory>,
    cgroup2: Cgroup2,
    own_cgroup: Option<PathBuf>,
    settings: Settings,
    state: tokio::sync::Mutex<State>,
    ready: AtomicBool,
    /// Listening sockets received from a predecessor, used instead of binding.
    inherited: Inherited,
    /// Another build's links are taken over only after the predecessor stopped
    /// accepting, not at the first apply.
    hold_takeover: AtomicBool,
    /// Whether an exchange with a successor is under way ([`Handover`]).
    exchanging: tokio::sync::watch::Sender<bool>,
    /// The admin endpoint's listener, handed to a successor.
    admin_listener: std::sync::Mutex<Option<(ListenerKey, OwnedFd)>>,
    /// Fires when this agent hands over or stops: listeners stop accepting and
    /// server connections finish gracefully.
    pub drain: CancellationToken,
    runtime: tokio::runtime::Handle,
    /// Certificates and trust; `None` when the agent runs without a CA.
    pub identity: Option<Arc<IdentityState>>,
    /// Client tunnel connections, shared by all workloads.
    pub pool: Arc<TunnelPool>,
    /// Peer authentication and authorization in force.
    pub policies: Arc<PolicyStore>,
    /// Services, routes and endpoint health.
    pub l7: Arc<L7>,
    /// Connection bounds, agent-wide and per pod.
    pub limits: Arc<Limits>,
    /// Pods served here, for the same-node fast path.
    local: Arc<LocalDestinations>,
}

impl Agent {
    /// Wraps loaded capture programs; a source then calls [`Agent::apply`].
    pub fn new(
        capture: Capture,
        cgroup2: Cgroup2,
        settings: Settings,
        metrics: Arc<Metrics>,
        identity: Option<Arc<IdentityState>>,
    ) -> Self {
        let own_cgroup = cgroup2.own_cgroup().ok();
        let state = State {
            // Above every id still in the adopted maps, so a new id never inherits
            // a previous agent's exclusions.
            next_workload_id: capture.highest_workload_id() + 1,
            sweep_pending: true,
            status: ConfigStatus {
                source: settings.source.clone(),
                ..ConfigStatus::default()
            },
            ..State::default()
        };
        let pool = Arc::new(TunnelPool::new(PoolSettings {
            connect_timeout: settings.connect_timeout,
            ..PoolSettings::default()
        }));
        // Closes idle tunnel connections; stops when the agent is gone.
        let weak = Arc::downgrade(&pool);
        let pool_metrics = metrics.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            while let Some(pool) = {
                tick.tick().await;
                weak.upgrade()
            } {
                let open = pool.reap_idle();
                pool_metrics.tunnel_pool_connections.set(open as i64);
            }
        });
        Agent {
            local: Arc::new(LocalDestinations::new(settings.same_node_fast_path)),
            limits: Arc::new(Limits::new(settings.max_connections, metrics.clone())),
            l7: Arc::new(L7::new(
                settings.l7.clone(),
                settings.request_log.clone(),
                settings.tracer.clone(),
            )),
            policies: Arc::new(PolicyStore::default()),
            pool,
            identity,
            capture: Arc::new(capture),
            metrics,
            connections: Arc::new(ConnectionTable::default()),
            directory: Arc::new(Directory::default()),
            cgroup2,
            own_cgroup,
            settings,
            state: tokio::sync::Mutex::new(state),
            ready: AtomicBool::new(false),
            inherited: Inherited::default(),
            hold_takeover: AtomicBool::new(false),
            admin_listener: std::sync::Mutex::new(None),
            exchanging: tokio::sync::watch::Sender::new(false),
            drain: CancellationToken::new(),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Uses `inherited` (a predecessor's listeners) instead of binding anew, and
    /// leaves taking over another build's links to [`Capture::take_over`] after
    /// the predecessor stopped accepting.
    pub fn with_predecessor(mut self, inherited: Inherited) -> Self {
        self.inherited = inherited;
        self.hold_takeover.store(true, Ordering::Release);
        self
    }

    /// Closes this process's copy of inherited listeners no pod took (pods that
    /// left the mesh during the handoff); returns how many.
    pub fn release_inherited(&self) -> usize {
        self.inherited.release()
    }

    /// The admin endpoint's listening socket, so a successor can take it over.
    pub fn set_admin_listener(
        &self,
        addr: SocketAddr,
        listener: &impl AsFd,
    ) -> std::io::Result<()> {
        let fd = listener.as_fd().try_clone_to_owned()?;
        *self.admin_listener.lock().expect("admin listener lock") = Some((
            ListenerKey {
                netns_cookie: 0,
                addr,
            },
            fd,
        ));
        Ok(())
    }

    /// Stops accepting on every listener (connections already accepted carry on)
    /// and signals server connections to finish: for a successor, or a stop.
    pub async fn retire(&self) {
        let mut state = self.state.lock().await;
        state.retired = true;
        state.frozen = true;
        state.deferred = None;
        for e in state.enrolled.values() {
            e.cancel.cancel();
        }
        self.drain.cancel();
    }

    /// Watches joined same-node connections a predecessor handed over (each
    /// is checked and authorized again first; see [`crate::proxy::same_node::adopt`]).
    pub fn adopt_joined_connections(&self, joined: Vec<HandedOverJoined>) {
        for handed in joined {
            self.runtime
                .spawn(crate::proxy::same_node::adopt(self.local.clone(), handed));
        }
    }

    /// Waits (up to `timeout`) until no exchange with a successor is under
    /// way: a retired agent exits only after its last message, so nothing in
    /// transit (joined connections) closes with it.
    pub async fn exchange_ended(&self, timeout: Duration) {
        let mut exchanging = self.exchanging.subscribe();
        let ended = exchanging.wait_for(|busy| !busy);
        if tokio::time::timeout(timeout, ended).await.is_err() {
            tracing::warn!(
                ?timeout,
                "the exchange with a successor did not end; exiting anyway"
            );
        }
    }

    /// Whether the agent has retired.
    pub fn is_retired(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// Whether the first config has been applied.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Applies a desired state from any source: the one reconciler. Connections
    /// that still fit it keep flowing. `rejected` lists objects the source left
    /// out (shown in `/config_dump`). Returns how many local workloads failed to
    /// enroll, so the source can retry them.
    pub async fn apply(&self, config: MeshConfig, rejected: Vec<String>) -> usize {
        let mut state = self.state.lock().await;
        if state.frozen {
            if !state.retired {
                state.deferred = Some((config, rejected));
            }
            return state.failed.len();
        }
        state.status.last_error = None;
        state.status.rejected_objects = rejected;
        self.reconcile(&mut state, config).await;
        if state.sweep_pending {
            self.sweep_kernel_state(&mut state);
        }
        crate::allocator::release_freed_memory();
        // Counted once in force, so a scrape never shows a state as applied early.
        self.metrics.config_reload(true);
        state.status.generation += 1;
        state.status.last_applied_unix = unix_now();
        self.ready.store(true, Ordering::Release);
        state.failed.len()
    }

    /// Records a desired state the source could not read at all; the last good
    /// state stays in force.
    pub async fn reject(&self, error: &ConfigError) {
        tracing::error!(source = %self.settings.source, error = %error, "config rejected; the last good config stays in force");
        self.state.lock().await.status.last_error = Some(error.to_string());
        // Counted last, so a scrape that shows the failure finds its reason too.
        self.metrics.config_reload(false);
    }

    /// Where the desired state comes from (a file, or the Kubernetes API).
    pub fn source(&self) -> &str {
        &self.settings.source
    }

    /// How the workload `namespace/name` stands: enrolled (with its network
    /// namespace at `netns`, when given), failed and why, or neither. The CNI
    /// plugin's ADD waits on this.
    pub async fn enrollment(&self, key: &str, netns: Option<&Path>) -> EnrollmentState {
        let state = self.state.lock().await;
        if let Some(e) = state.enrolled.get(key) {
            let same_netns = netns.is_none_or(|want| {
                e.workload
                    .placement
                    .as_ref()
                    .is_some_and(|p| p.netns == NetnsRef::Path(want.to_owned()))
            });
            if same_netns {
                return EnrollmentState::Enrolled;
            }
        }
        match state.failed.get(key) {
            Some((_, error)) => EnrollmentState::Failed(error.clone()),
            None => EnrollmentState::Absent,
        }
    }

    /// How many local workloads are waiting for a retry of their enrollment.
    pub async fn failed_workloads(&self) -> usize {
        self.state.lock().await.failed.len()
    }

    async fn reconcile(&self, state: &mut State, mut config: MeshConfig) {
        let node = self.settings.node_name.as_deref();
        let changed = self.policies.replace(Policies {
            peer_authentications: std::mem::take(&mut config.peer_authentications),
            authorization_policies: std::mem::take(&mut config.authorization_policies),
        });
        if changed {
            let closed = self.connections.revoke_disallowed(&self.policies.get());
            tracing::info!(closed, "policies applied");
        }
        // Only meshed pods of this node are enrolled; the rest are known for
        // attribution and as Service endpoints.
        let desired: BTreeMap<String, Workload> = config
            .workloads
            .iter()
            .filter(|w| w.meshed && w.is_local_to(node))
            .map(|w| (w.key(), w.clone()))
            .collect();

        let leaving: Vec<String> = state
            .enrolled
            .iter()
            .filter(|(key, e)| {
                desired
                    .get(*key)
                    .is_none_or(|w| !w.same_placement(&e.workload))
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in leaving {
            if let Some(e) = state.enrolled.remove(&key) {
                self.unenroll(state, e);
            }
        }
        state.failed.retain(|key, _| desired.contains_key(key));
        state.draining.retain(|_, tasks| {
            tasks.retain(|t| !t.is_finished());
            !tasks.is_empty()
        });

        for (key, workload) in &desired {
            if let Some(e) = state.enrolled.get_mut(key) {
                if e.workload != *workload
                    && let Err(err) = self.update_in_place(e, workload)
                {
                    tracing::error!(workload = %key, error = %err, "updating workload failed; keeping its previous settings");
                }
                continue;
            }
            match self.enroll(state, workload).await {
                Ok(e) => {
                    tracing::info!(workload = %key, cgroup_id = e.cgroup_id, netns_cookie = e.ctx.netns.cookie, listeners = ?e.listeners, "workload enrolled");
                    state.failed.remove(key);
                    state.enrolled.insert(key.clone(), e);
                }
                Err(err) => {
                    tracing::error!(workload = %key, error = %format!("{err:#}"), "workload not enrolled; its traffic is not captured");
                    state
                        .failed
                        .insert(key.clone(), (workload.clone(), format!("{err:#}")));
                }
            }
        }

        // One identity per pod, shared by the directory and every Service endpoint.
        let metas = config
            .workloads
            .iter()
            .map(|w| self.directory.identity_for(w))
            .collect();
        let selectable = Selectable::new(&config.workloads, metas);
        let mut by_ip = HashMap::with_capacity(config.workloads.len());
        for (w, meta) in config.workloads.iter().zip(selectable.metas()) {
            for ip in &w.ips {
                by_ip.insert(*ip, meta.clone());
            }
        }
        self.directory.replace(by_ip);
        self.l7.catalog.apply(&config, &selectable);
        if let Some(identity) = &self.identity {
            identity.certs.set_identities(
                state
                    .enrolled
                    .values()
                    .map(|e| WorkloadMeta::from_config(&e.workload).identity())
                    .collect(),
            );
        }
        self.metrics
            .enrolled_workloads
            .set(state.enrolled.len() as i64);
        self.metrics.failed_workloads.set(state.failed.len() as i64);
    }

    /// Gives another build's pinned links this agent's programs (see
    /// [`Capture::take_over`]); call once its maps hold every enrolled pod.
    pub fn take_over_capture(&self) {
        match self.capture.take_over() {
            Ok(0) => {}
            Ok(links) => {
                tracing::info!(links, "took over capture from another build's programs")
            }
            Err(e) => {
                tracing::error!(error = %e, "taking over another build's links failed; they stay in force")
            }
        }
    }

    /// Takes over another build's links once this agent's maps hold the enrolled
    /// pods, and removes pinned entries no desired pod accounts for.
    fn sweep_kernel_state(&self, state: &mut State) {
        if !self.hold_takeover.load(Ordering::Acquire) {
            self.take_over_capture();
        }
        let mut live = LiveSet::default();
        let mut cookies = std::collections::HashSet::new();
        for e in state.enrolled.values() {
            live.cgroups.insert(e.cgroup_id);
            live.addrs.extend(e.workload.ips.iter().copied());
            cookies.insert(e.ctx.netns.cookie);
        }
        // A desired pod that failed to enroll keeps its pinned entries: refused,
        // not uncaptured, until it is enrolled again.
        for (w, _) in state.failed.values() {
            live.addrs.extend(w.ips.iter().copied());
            if let Some(p) = &w.placement
                && let Ok(id) = cgroup_id(&self.cgroup2.resolve(&p.cgroup_path))
            {
                live.cgroups.insert(id);
            }
        }
        let complete = state.failed.is_empty();
        live.netns_cookies = complete.then_some(cookies);
        let swept = self.capture.sweep(&live);
        if swept != Default::default() {
            tracing::info!(
                workloads = swept.workloads,
                exclusions = swept.exclusions,
                addresses = swept.addrs,
                netns_links = swept.netns_links,
                "removed kernel state left for pods no longer served"
            );
        }
        state.sweep_pending = !complete;
    }

    async fn enroll(&self, state: &mut State, w: &Workload) -> anyhow::Result<Enrollment> {
        let placement = w.placement.as_ref().ok_or_else(|| {
            anyhow!("its cgroup and network namespace are not known (yet): a file must set spec.cgroupPath and spec.netns; in Kubernetes mode the pod cgroup has not been found on this node")
        })?;
        let cgroup_path = self.cgroup2.resolve(&placement.cgroup_path);
        if let Some(own) = &self.own_cgroup
            && own.starts_with(&cgroup_path)
        {
            return Err(anyhow!(
                "spec.cgroupPath {} contains the agent itself; enrolling it would capture the agent's own connections",
                cgroup_path.display()
            ));
        }
        let cgroup_id = cgroup_id(&cgroup_path)
            .with_context(|| format!("spec.cgroupPath {}", cgroup_path.display()))?;
        let ns_file = placement.netns.file();
        let netns = NetnsHandle::open(&ns_file, &w.name)
            .await
            .with_context(|| format!("spec.netns {}", placement.netns))?;
        // A listener of this pod may still be draining after a recent unenroll.
        if let Some(tasks) = state.draining.remove(&netns.inode) {
            for task in tasks {
                let _ = task.await;
            }
        }
        let netns = Arc::new(netns);
        let mut sockets = Vec::new();
        let port = self.settings.outbound_port;
        let v4_addr = SocketAddr::from(([127, 0, 0, 1], port));
        let v4 = self
            .listener_in(&netns, v4_addr, &mut sockets)
            .await?
            .with_context(|| format!("binding outbound listener {v4_addr} in the pod"))?;
        let v6_addr = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
        let v6 = match self.listener_in(&netns, v6_addr, &mut sockets).await? {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::info!(workload = %w.key(), error = %e, "no IPv6 loopback listener; IPv6 connects from this pod go direct");
                None
            }
        };

        let workload_id = state.next_workload_id;
        state.next_workload_id += 1;
        let ctx = Arc::new(PodContext {
            meta: RwLock::new(Arc::new(WorkloadMeta::from_config(w))),
            cgroup_id,
            ips: w.ips.clone(),
            netns,
            capture: self.capture.clone(),
            metrics: self.metrics.clone(),
            connections: self.connections.clone(),
            directory: self.directory.clone(),
            connect_timeout: self.settings.connect_timeout,
            identity: self.identity.clone(),
            pool: self.pool.clone(),
            drain: self.drain.clone(),
            limits: self.limits.clone(),
            limit: {
                let limit = Arc::new(PodLimit::default());
                limit.set(w.max_connections);
                limit
            },
        });
        let outbound_ctx = Arc::new(PodL7 {
            pod: ctx.clone(),
            l7: self.l7.clone(),
            upstreams: Upstreams::new(
                ctx.clone(),
                {
                    let local = self.local.clone();
                    Arc::new(move |ip| local.lookup(ip).is_some())
                },
                self.l7.parsed_by.clone(),
            ),
            local: self.local.clone(),
        });
        let cancel = CancellationToken::new();
        // Any early return below stops the listeners already spawned.
        let stop_on_error = cancel.clone().drop_guard();
        let mut listeners = vec![v4_addr];
        let mut tasks = vec![self.spawn_listener(v4, FAMILY_V4, &outbound_ctx, &cancel)?];
        let traced = state.traced.contains_key(&w.key());
        let mut flags = if traced { WORKLOAD_FLAG_TRACE } else { 0 };
        if let Some(v6) = v6 {
            listeners.push(v6_addr);
            tasks.push(self.spawn_listener(v6, FAMILY_V6, &outbound_ctx, &cancel)?);
            flags |= WORKLOAD_FLAG_V6_LISTENER;
        }
        let mut steering = None;
        let mut local = None;
        if let Some(identity) = &self.identity {
            let inbound = Arc::new(InboundContext::new(
                ctx.clone(),
                identity.clone(),
                WorkloadMeta::from_config(w).identity(),
                w.ips.clone(),
                self.policies.clone(),
                self.l7.clone(),
            ));
            for ip in &w.ips {
                let addr = SocketAddr::new(*ip, HBONE_PORT);
                let listener = self
                    .listener_in(&ctx.netns, addr, &mut sockets)
                    .await?
                    .with_context(|| format!("binding tunnel listener {addr} in the pod"))?;
                let listener = TcpListener::from_std(listener)?;
                listeners.push(addr);
                tasks.push(tokio::spawn(tunnel::server::serve(
                    listener,
                    inbound.clone(),
                    cancel.clone(),
                )));
            }
            // Inbound plaintext: listeners on the pod's loopback, reached only through
            // kernel steering from the pod's addresses.
            let mut by_family: Vec<(bool, TcpListener)> = Vec::new();
            for addr in [
                SocketAddr::from(([127, 0, 0, 1], INBOUND_PORT)),
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, INBOUND_PORT)),
            ] {
                match self.listener_in(&ctx.netns, addr, &mut sockets).await? {
                    Ok(l) => {
                        listeners.push(addr);
                        by_family.push((addr.is_ipv6(), TcpListener::from_std(l)?));
                    }
                    Err(e) if addr.is_ipv6() => {
                        tracing::info!(workload = %w.key(), error = %e, "no IPv6 inbound listener; inbound IPv6 is not steered");
                    }
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("binding inbound listener {addr} in the pod")
                        });
                    }
                }
            }
            // Undone on drop, so an early return below leaves nothing steered.
            let mut steered = InboundSteering {
                capture: self.capture.clone(),
                ips: Vec::new(),
                link: None,
                armed: true,
            };
            for ip in &w.ips {
                if let Some((_, l)) = by_family.iter().find(|(v6, _)| *v6 == ip.is_ipv6()) {
                    self.capture
                        .steer_inbound(*ip, l, traced)
                        .context("writing the inbound steering map")?;
                    steered.ips.push(*ip);
                }
            }
            for (_, l) in by_family {
                tasks.push(tokio::spawn(inbound::serve(
                    l,
                    inbound.clone(),
                    cancel.clone(),
                )));
            }
            let ns = std::fs::File::open(&ns_file)?;
            steered.link = Some(
                self.capture
                    .attach_inbound(&ns, ctx.netns.cookie)
                    .context("attaching inbound steering (sk_lookup) to the pod")?,
            );
            steering = Some(steered);
            local = Some(self.local.register(&w.ips, &inbound));
        }
        let exclusions = exclusions_for(w);
        let entry = WorkloadEntry {
            workload_id,
            outbound_port: port,
            flags,
        };
        // Capture starts only now, with the listeners already accepting.
        if let Err(e) = self.capture.enroll(cgroup_id, entry, &exclusions) {
            self.capture.unenroll(cgroup_id, workload_id, &exclusions);
            return Err(e).context("writing capture maps");
        }
        stop_on_error.disarm();
        if let Some(s) = &mut steering {
            s.armed = false;
        }
        Ok(Enrollment {
            inbound: steering,
            local,
            workload: w.clone(),
            workload_id,
            cgroup_id,
            exclusions,
            ctx,
            listeners,
            sockets,
            tasks,
            cancel,
        })
    }

    /// A listening socket on `addr` in the pod: the predecessor's, when it
    /// handed one over, else a new one. This process's copy is kept in `sockets`
    /// for a successor. The outer error is the namespace thread's, the inner
    /// one the bind's.
    async fn listener_in(
        &self,
        netns: &NetnsHandle,
        addr: SocketAddr,
        sockets: &mut Vec<(ListenerKey, OwnedFd)>,
    ) -> anyhow::Result<std::io::Result<std::net::TcpListener>> {
        let listener = match self.inherited.take(netns.cookie, addr) {
            Some(l) => Ok(l),
            None => netns.run(move || bind_listener(addr)).await?,
        };
        if let Ok(l) = &listener {
            sockets.push((
                ListenerKey {
                    netns_cookie: netns.cookie,
                    addr,
                },
                l.as_fd().try_clone_to_owned()?,
            ));
        }
        Ok(listener)
    }

    fn spawn_listener(
        &self,
        listener: std::net::TcpListener,
        family: u16,
        ctx: &Arc<PodL7>,
        cancel: &CancellationToken,
    ) -> anyhow::Result<JoinHandle<()>> {
        let listener = TcpListener::from_std(listener)?;
        Ok(tokio::spawn(outbound::serve(
            listener,
            family,
            ctx.clone(),
            cancel.clone(),
            self.settings.drain,
        )))
    }

    fn unenroll(&self, state: &mut State, e: Enrollment) {
        self.capture
            .unenroll(e.cgroup_id, e.workload_id, &e.exclusions);
        // New same-node connections to it go the normal way (and find it gone).
        drop(e.local);
        // Stop steering inbound connections before their listeners close.
        if let Some(steering) = e.inbound {
            steering.remove();
        }
        e.cancel.cancel();
        state
            .draining
            .entry(e.ctx.netns.inode)
            .or_default()
            .extend(e.tasks);
        tracing::info!(workload = %e.workload.key(), "workload unenrolled; its new connections go direct, live ones continue");
    }

    fn update_in_place(&self, e: &mut Enrollment, w: &Workload) -> anyhow::Result<()> {
        let exclusions = exclusions_for(w);
        if exclusions != e.exclusions {
            self.capture
                .update_exclusions(e.workload_id, &e.exclusions, &exclusions)?;
            e.exclusions = exclusions;
        }
        e.ctx.limit.set(w.max_connections);
        *e.ctx.meta.write().expect("workload meta lock") = Arc::new(WorkloadMeta::from_config(w));
        e.workload = w.clone();
        tracing::info!(workload = %w.key(), "workload updated in place");
        Ok(())
    }

    /// Every decision the mesh would take for `query`, from this agent's state
    /// (`/debug/explain`); an error names what cannot be resolved.
    pub async fn explain(
        &self,
        query: &crate::explain::Query,
    ) -> Result<crate::explain::Explanation, String> {
        let enrolled: Vec<Workload> = {
            let state = self.state.lock().await;
            state
                .enrolled
                .values()
                .map(|e| e.workload.clone())
                .collect()
        };
        let catalog = self.l7.catalog.get();
        let policies = self.policies.get();
        let view = crate::explain::MeshView {
            enrolled: &enrolled,
            directory: &self.directory,
            catalog: &catalog,
            policies: &policies,
            opaque_ports: &self.settings.l7.opaque_ports,
            outbound_port: self.settings.outbound_port,
        };
        crate::explain::explain(query, &view)
    }

    /// Starts tracing the kernel's verdicts for one enrolled workload
    /// (`namespace/name` or one of its IPs) for a new watcher, who must call
    /// [`Agent::stop_trace`] when done.
    pub async fn start_trace(&self, target: &str) -> Result<TraceSession, String> {
        let mut state = self.state.lock().await;
        if state.frozen || state.retired {
            return Err("this agent is handing over to a successor: trace on the successor".into());
        }
        let ip = target.parse::<IpAddr>().ok();
        let e = state
            .enrolled
            .values()
            .find(|e| {
                e.workload.key() == target || ip.is_some_and(|ip| e.workload.ips.contains(&ip))
            })
            .ok_or_else(|| {
                format!("no workload {target:?} is enrolled on this node (give namespace/name or a pod IP)")
            })?;
        let session = TraceSession {
            workload: e.workload.key(),
            workload_id: e.workload_id,
            ips: e.workload.ips.clone(),
            cgroup_id: e.cgroup_id,
            // Subscribed before the bits are set: no verdict is missed.
            verdicts: self.capture.trace.subscribe(),
        };
        self.capture
            .trace
            .start_reader(self.drain.clone())
            .map_err(|e| format!("reading the kernel trace: {e}"))?;
        let watchers = state.traced.entry(session.workload.clone()).or_default();
        *watchers += 1;
        if *watchers == 1
            && let Err(e) = self
                .capture
                .set_traced(session.cgroup_id, &session.ips, true)
        {
            state.traced.remove(&session.workload);
            return Err(format!("switching the kernel trace on: {e}"));
        }
        tracing::info!(workload = %session.workload, "kernel verdict trace started");
        Ok(session)
    }

    /// Ends one watcher's trace; the kernel stops reporting after the last.
    pub async fn stop_trace(&self, session: &TraceSession) {
        let mut state = self.state.lock().await;
        let Some(watchers) = state.traced.get_mut(&session.workload) else {
            return;
        };
        *watchers -= 1;
        if *watchers > 0 {
            return;
        }
        state.traced.remove(&session.workload);
        if state.frozen || state.retired {
            // The kernel maps are the successor's now, and it enrolled every
            // workload without the trace bit: writing them would race it.
            return;
        }
        // The workload may have been re-enrolled (new cgroup or addresses) or
        // left meanwhile: clear what is in the kernel now.
        let (cgroup_id, ips) = match state.enrolled.get(&session.workload) {
            Some(e) => (e.cgroup_id, e.workload.ips.clone()),
            None => (session.cgroup_id, session.ips.clone()),
        };
        match self.capture.set_traced(cgroup_id, &ips, false) {
            Ok(()) => tracing::info!(workload = %session.workload, "kernel verdict trace stopped"),
            Err(e) => {
                tracing::warn!(workload = %session.workload, error = %e, "switching the kernel trace off failed")
            }
        }
    }

    /// Everything `/config_dump` shows.
    pub async fn config_dump(&self) -> ConfigDump {
        let maps = self.metrics.refresh_from_kernel(&self.capture);
        let state = self.state.lock().await;
        let mut workloads = Vec::new();
        let mut listeners = Vec::new();
        for e in state.enrolled.values() {
            let mut dump = WorkloadDump::new(&e.workload, "enrolled", None, Some(e));
            dump.kernel_traced = self.capture.is_traced(e.cgroup_id);
            workloads.push(dump);
            for addr in &e.listeners {
                listeners.push(ListenerDump {
                    workload: e.workload.key(),
                    address: addr.to_string(),
                    netns_cookie: e.ctx.netns.cookie,
                });
            }
        }
        for (w, err) in state.failed.values() {
            workloads.push(WorkloadDump::new(w, "failed", Some(err.clone()), None));
        }
        let stats = self.capture.stats();
        let catalog = self.l7.catalog.get();
        ConfigDump {
            config: state.status.clone(),
            workloads,
            listeners,
            programs: self.capture.programs().to_vec(),
            maps,
            tunnel_pool: self.pool.views(),
            certificates: self
                .identity
                .as_ref()
                .map(|i| i.certs.views())
                .unwrap_or_default(),
            capture_decisions: mesh_common::stat::NAMES
                .iter()
                .zip(stats)
                .map(|(n, v)| (n.to_string(), v))
                .collect(),
            services: catalog.route_views(),
            routes: catalog.routes().iter().map(|r| (**r).clone()).collect(),
            endpoints: catalog.endpoint_views(),
        }
    }
}

impl Handover for Agent {
    fn offer(&self) -> Vec<(ListenerKey, OwnedFd)> {
        self.exchanging.send_replace(true);
        // Under the state lock: an apply in progress finishes first, and none starts.
        let mut state = self.runtime.block_on(self.state.lock());
        state.frozen = true;
        let mut offered = Vec::new();
        let admin = self.admin_listener.lock().expect("admin listener lock");
        let all = state
            .enrolled
            .values()
            .flat_map(|e| e.sockets.iter())
            .chain(admin.iter());
        for (key, fd) in all {
            match fd.try_clone() {
                Ok(fd) => offered.push((*key, fd)),
                Err(e) => {
                    tracing::error!(addr = %key.addr, error = %e, "duplicating a listener for the successor failed; it binds anew")
                }
            }
        }
        offered
    }

    fn resume(&self) {
        let deferred = {
            let mut state = self.runtime.block_on(self.state.lock());
            if state.retired {
                return;
            }
            state.frozen = false;
            state.deferred.take()
        };
        if let Some((config, rejected)) = deferred {
            self.runtime.block_on(self.apply(config, rejected));
        }
    }

    fn retire(&self) {
        self.runtime.block_on(Agent::retire(self));
    }

    fn hand_over_joined(&self) -> Vec<HandedOverJoined> {
        // Each joined connection's task answers at once unless it is passing on
        // a half-close; those finish here.
        self.runtime
            .block_on(self.local.hand_over_joined(Duration::from_secs(1)))
    }

    fn adopt_joined(&self, joined: Vec<HandedOverJoined>) {
        self.adopt_joined_connections(joined);
    }

    fn exchange_ended(&self) {
        self.exchanging.send_replace(false);
    }
}

fn bind_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    // A pod address may still be in IPv6 duplicate-address detection.
    if !addr.ip().is_loopback() {
        if addr.is_ipv6() {
            socket.set_freebind_v6(true)?;
        } else {
            socket.set_freebind_v4(true)?;
        }
    }
    socket.bind(&addr.into())?;
    // A deep backlog so a burst of connects waits for accept instead of SYN retries.
    socket.listen(4096)?;
    Ok(socket.into())
}

/// A workload's exclusions plus its own IPs: a pod talking to itself is never captured.
fn exclusions_for(w: &Workload) -> Exclusions {
    let mut cidrs: Vec<IpNet> = w.excluded_cidrs.clone();
    cidrs.extend(w.ips.iter().map(|ip: &IpAddr| IpNet::from(*ip)));
    cidrs.sort();
    cidrs.dedup();
    let mut ports = w.excluded_ports.clone();
    ports.sort_unstable();
    ports.dedup();
    Exclusions { ports, cidrs }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One watcher of the kernel's verdicts on one workload (`debug trace`).
pub struct TraceSession {
    /// The traced workload's `namespace/name`.
    pub workload: String,
    /// Its id in the kernel maps, which `connect` records carry.
    pub workload_id: u32,
    /// Its addresses, which `inbound` records are for.
    pub ips: Vec<IpAddr>,
    cgroup_id: u64,
    /// Every verdict the kernel reports, for [`TraceSession::concerns`] to filter.
    pub verdicts: tokio::sync::broadcast::Receiver<crate::node::trace::KernelVerdict>,
}

impl TraceSession {
    /// Whether a verdict is about this session's workload: other workloads may
    /// be traced by other watchers at the same time.
    pub fn concerns(&self, v: &crate::node::trace::KernelVerdict) -> bool {
        match v.hook {
            crate::node::trace::Hook::Connect => v.workload_id == Some(self.workload_id),
            crate::node::trace::Hook::Inbound => self.ips.contains(&v.destination.ip()),
        }
    }
}

/// `/config_dump` body.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigDump {
    /// Config file status.
    pub config: ConfigStatus,
    /// Configured workloads and whether they are enrolled.
    pub workloads: Vec<WorkloadDump>,
    /// In-pod listeners.
    pub listeners: Vec<ListenerDump>,
    /// Attached programs.
    pub programs: Vec<ProgramSummary>,
    /// Capture maps and their occupancy.
    pub maps: Vec<MapOccupancy>,
    /// Client tunnel connections by key.
    pub tunnel_pool: Vec<PoolView>,
    /// Workload certificates: identity, serial, expiry, state.
    pub certificates: Vec<CertView>,
    /// Kernel decision counters.
    pub capture_decisions: BTreeMap<String, u64>,
    /// Service ports: VIPs, protocol, traffic policy and attached routes.
    pub services: Vec<ServiceRoutesView>,
    /// HTTPRoutes in force, in precedence order.
    pub routes: Vec<HttpRoute>,
    /// Endpoints of each Service port and their health.
    pub endpoints: Vec<ServiceEndpointsView>,
}

/// One workload in `/config_dump`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadDump {
    /// `namespace/name`.
    pub workload: String,
    /// SPIFFE identity.
    pub principal: String,
    /// `enrolled` or `failed`.
    pub state: &'static str,
    /// Why enrollment failed.
    pub error: Option<String>,
    /// Kernel cgroup id, when enrolled.
    pub cgroup_id: Option<u64>,
    /// Netns cookie, when enrolled.
    pub netns_cookie: Option<u64>,
    /// Agent-assigned id used in the kernel maps.
    pub workload_id: Option<u32>,
    /// Exclusions in force (own IPs included).
    pub exclusions: Option<Exclusions>,
    /// Whether the kernel reports this workload's connect verdicts now (the
    /// trace bit of its kernel entry, set while `debug trace` watches it).
    pub kernel_traced: Option<bool>,
    /// The workload as configured.
    pub spec: Workload,
}

impl WorkloadDump {
    fn new(
        w: &Workload,
        state: &'static str,
        error: Option<String>,
        e: Option<&Enrollment>,
    ) -> Self {
        WorkloadDump {
            workload: w.key(),
            principal: WorkloadMeta::from_config(w).principal(),
            state,
            error,
            cgroup_id: e.map(|e| e.cgroup_id),
            netns_cookie: e.map(|e| e.ctx.netns.cookie),
            workload_id: e.map(|e| e.workload_id),
            exclusions: e.map(|e| e.exclusions.clone()),
            kernel_traced: None,
            spec: w.clone(),
        }
    }
}

/// One in-pod listener in `/config_dump`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerDump {
    /// `namespace/name`.
    pub workload: String,
    /// Address inside the pod.
    pub address: String,
    /// The pod's netns cookie.
    pub netns_cookie: u64,
}
