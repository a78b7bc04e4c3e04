//! Bounded resources: how many connections the agent holds, in all and for one
//! pod, and what happens when file descriptors run out. Over a bound, a new
//! connection is reset at once (never left waiting), counted and logged (at most
//! once a second per reason), while established connections carry on.

use std::fs::File;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};

use crate::metrics::Metrics;

/// Istio `response_flags` of a connection refused by a limit (upstream
/// overflow, as Envoy reports a tripped circuit breaker).
pub const OVERFLOW_FLAGS: &str = "UO";

/// Why a new connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The agent holds `--max-connections` already.
    AgentLimit,
    /// The pod holds its own limit already.
    WorkloadLimit,
    /// The process is out of file descriptors.
    FdExhausted,
}

impl Refusal {
    /// Metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::AgentLimit => "agent_limit",
            Refusal::WorkloadLimit => "workload_limit",
            Refusal::FdExhausted => "fd_exhausted",
        }
    }
}

/// The agent-wide bound and the spare descriptor kept for shedding load.
pub struct Limits {
    max: usize,
    open: AtomicUsize,
    metrics: Arc<Metrics>,
    /// Closed to make room to accept (and reset) one connection when the process
    /// is out of descriptors, so the client hears a refusal instead of waiting.
    spare_fd: Mutex<Option<File>>,
    last_logged: Mutex<[Option<Instant>; 3]>,
}

/// One pod's bound (0: none) and the connections it holds.
#[derive(Debug, Default)]
pub struct PodLimit {
    max: AtomicU32,
    open: AtomicUsize,
}

impl PodLimit {
    /// Sets the bound (`None`: unbounded); live connections are not affected.
    pub fn set(&self, max: Option<std::num::NonZeroU32>) {
        self.max
            .store(max.map_or(0, |m| m.get()), Ordering::Relaxed);
    }

    /// Connections held for the pod now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// A connection's claim on the bounds; released when the connection ends.
pub struct Permit {
    limits: Arc<Limits>,
    pod: Arc<PodLimit>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limits.open.fetch_sub(1, Ordering::Relaxed);
        self.pod.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard one (each connection costs two
/// or more descriptors); returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

/// Descriptors kept back from connections for maps, listeners, files and the
/// tunnel pool when `--max-connections` is derived from the fd limit.
const RESERVED_FDS: u64 = 1024;

/// The agent-wide connection bound for an fd limit: each relayed connection
/// holds two descriptors (client and upstream).
pub fn default_max_connections(fd_limit: u64) -> usize {
    (fd_limit.saturating_sub(RESERVED_FDS) / 2).max(64) as usize
}

impl Limits {
    /// Bounds of `max` connections for the whole agent.
    pub fn new(max: usize, metrics: Arc<Metrics>) -> Self {
        Limits {
            max,
            open: AtomicUsize::new(0),
            metrics,
            spare_fd: Mutex::new(File::open("/dev/null").ok()),
            last_logged: Mutex::new([None; 3]),
        }
    }

    /// The agent-wide bound.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections held now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Claims room for one more connection of `pod`, or says why there is none.
    pub fn admit(self: &Arc<Self>, pod: &Arc<PodLimit>) -> Result<Permit, Refusal> {
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::AgentLimit);
        }
        let pod_max = pod.max.load(Ordering::Relaxed) as usize;
        if pod.open.fetch_add(1, Ordering::Relaxed) >= pod_max && pod_max != 0 {
            pod.open.fetch_sub(1, Ordering::Relaxed);
            self.open.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::WorkloadLimit);
        }
        Ok(Permit {
            limits: self.clone(),
            pod: pod.clone(),
        })
    }

    /// Resets `stream` at once and records why.
    pub fn refuse(&self, stream: TcpStream, why: Refusal, workload: &str, listener: &str) {
        let _ = stream.set_zero_linger();
        drop(stream);
        self.record(why, workload, listener);
    }

    fn record(&self, why: Refusal, workload: &str, listener: &str) {
        self.metrics.connection_refused(why.reason(), workload);
        let mut last = self.last_logged.lock().expect("limits log lock");
        let slot = &mut last[why as usize];
        if slot.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            *slot = Some(Instant::now());
            tracing::warn!(
                workload,
                listener,
                reason = why.reason(),
                response_flags = OVERFLOW_FLAGS,
                open = self.open(),
                max = self.max,
                "new connection reset: over a limit (established connections carry on; logged at most once a second)"
            );
        }
    }

    /// Out of descriptors while `listener` has connections waiting: gives up the
    /// spare descriptor to accept one and reset it, then takes the spare back.
    /// Returns whether one was shed.
    pub fn shed_one(&self, listener: &TcpListener, workload: &str, kind: &str) -> bool {
        let mut spare = self.spare_fd.lock().expect("spare fd lock");
        drop(spare.take());
        let shed = match listener.accept_std() {
            Ok(stream) => {
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                drop(stream);
                self.record(Refusal::FdExhausted, workload, kind);
                true
            }
            Err(_) => false,
        };
        *spare = File::open("/dev/null").ok();
        shed
    }
}

/// Accepting without registering the stream with tokio (which would need
/// another descriptor for nothing): the shed connection is closed at once.
trait AcceptStd {
    fn accept_std(&self) -> std::io::Result<std::net::TcpStream>;
}

impl AcceptStd for TcpListener {
    fn accept_std(&self) -> std::io::Result<std::net::TcpStream> {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: accept4 on our listening socket; a returned fd is ours to own.
        let fd = unsafe {
            libc::accept4(
                self.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd from accept4.
        Ok(unsafe { std::net::TcpStream::from_raw_fd(fd) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_and_pod_bounds_are_claimed_and_released() {
        let limits = Arc::new(Limits::new(3, Arc::new(Metrics::new())));
        let a = Arc::new(PodLimit::default());
        a.set(std::num::NonZeroU32::new(2));
        let b = Arc::new(PodLimit::default());
        let a1 = limits.admit(&a).unwrap();
        let _a2 = limits.admit(&a).unwrap();
        assert_eq!(limits.admit(&a).err(), Some(Refusal::WorkloadLimit));
        let _b1 = limits.admit(&b).unwrap();
        assert_eq!(limits.admit(&b).err(), Some(Refusal::AgentLimit));
        assert_eq!((limits.open(), a.open(), b.open()), (3, 2, 1));
        drop(a1);
        assert_eq!((limits.open(), a.open()), (2, 1));
        let _b2 = limits.admit(&b).unwrap();
        a.set(None);
        assert_eq!(limits.admit(&a).err(), Some(Refusal::AgentLimit));
    }

    #[test]
    fn the_default_bound_leaves_descriptors_for_the_agent() {
        assert_eq!(default_max_connections(1_048_576), 523_776);
        assert_eq!(default_max_connections(1024), 64);
    }
}
