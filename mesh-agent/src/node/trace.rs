//! The kernel's own verdicts, for `mesh-agent debug trace`: the eBPF programs
//! report each capture and steering decision on a traced workload through
//! aya-log into the pinned `AYA_LOGS` ring buffer; this module reads it,
//! parses each record into a [`KernelVerdict`] and fans it out to watchers.
//!
//! Which workloads are traced is decided by flag bits in the capture maps
//! ([`crate::node::capture::Capture::set_traced`]), so nothing is written to
//! the ring buffer while nobody watches. The reader starts at the first trace
//! and stops when the agent drains: an agent handing over stops reading before
//! its successor (which shares the pinned ring buffer) is asked to trace.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aya::Ebpf;
use aya_log::EbpfLogger;
use mesh_common::verdict;
use serde::Serialize;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// What became of a record read from the ring buffer: passed to the
/// watchers, not understood, or discarded as written before this agent read.
pub const RECORD_OUTCOMES: [&str; 3] = ["read", "malformed", "stale"];

/// Verdicts buffered per watcher before the slowest one is told it missed some.
const WATCHER_BUFFER: usize = 4096;

/// One decision of a kernel program on a traced workload's connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KernelVerdict {
    /// Which hook decided: `connect` (outbound, cgroup) or `inbound` (`sk_lookup`).
    pub hook: Hook,
    /// What it decided, as `mesh_common::verdict::NAMES` spells it.
    pub verdict: &'static str,
    /// The connecting workload's agent-assigned id (`connect` only).
    pub workload_id: Option<u32>,
    /// Who connected (`inbound` only; a `connect` comes from the workload).
    pub source: Option<IpAddr>,
    /// Where the connection was going, as the application asked.
    pub destination: SocketAddr,
}

/// The kernel hook a verdict comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    /// `cgroup/connect4` and `connect6`: a meshed pod's outbound connect.
    Connect,
    /// `sk_lookup`: a connection arriving for a meshed pod's address.
    Inbound,
}

/// Why a record from the ring buffer is not a verdict (a program of another
/// build, or a bug): logged and counted, never trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The record does not start with a known hook.
    #[error("unknown record kind in {0:?}")]
    Kind(String),
    /// A field is missing or malformed.
    #[error("field {field} missing or malformed in {record:?}")]
    Field {
        /// Which field.
        field: &'static str,
        /// The whole record.
        record: String,
    },
}

/// Parses one record as `mesh-ebpf` writes it:
/// `connect verdict=<code> workload=<id> dst=<ipv6> port=<port>` or
/// `inbound verdict=<code> src=<ipv6> dst=<ipv6> port=<port>`; IPv4 travels
/// IPv4-mapped and comes back as IPv4.
pub fn parse(record: &str) -> Result<KernelVerdict, ParseError> {
    let mut words = record.split_ascii_whitespace();
    let hook = match words.next() {
        Some("connect") => Hook::Connect,
        Some("inbound") => Hook::Inbound,
        _ => return Err(ParseError::Kind(record.to_owned())),
    };
    let fields: Vec<(&str, &str)> = words.filter_map(|w| w.split_once('=')).collect();
    let field = |name: &'static str| {
        fields
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| *v)
            .ok_or_else(|| ParseError::Field {
                field: name,
                record: record.to_owned(),
            })
    };
    let bad = |name: &'static str| ParseError::Field {
        field: name,
        record: record.to_owned(),
    };
    let ip = |name: &'static str| -> Result<IpAddr, ParseError> {
        let v6: Ipv6Addr = field(name)?.parse().map_err(|_| bad(name))?;
        Ok(v6.to_canonical())
    };
    let code: u8 = field("verdict")?.parse().map_err(|_| bad("verdict"))?;
    let name = verdict::NAMES
        .get(usize::from(code))
        .copied()
        .ok_or_else(|| bad("verdict"))?;
    let port: u16 = field("port")?.parse().map_err(|_| bad("port"))?;
    let destination = SocketAddr::new(ip("dst")?, port);
    Ok(match hook {
        Hook::Connect => KernelVerdict {
            hook,
            verdict: name,
            workload_id: Some(field("workload")?.parse().map_err(|_| bad("workload"))?),
            source: None,
            destination,
        },
        Hook::Inbound => KernelVerdict {
            hook,
            verdict: name,
            workload_id: None,
            source: Some(ip("src")?),
            destination,
        },
    })
}

/// Receives aya-log's records and passes each parsed verdict to the watchers.
struct VerdictSink(Arc<SinkState>);

/// What the sink shares with [`KernelTrace`].
struct SinkState {
    watchers: broadcast::Sender<KernelVerdict>,
    /// Set while the reader empties what was written before it started.
    discarding: AtomicBool,
    discarded: AtomicU64,
    read: AtomicU64,
    malformed: AtomicU64,
}

impl log::Log for VerdictSink {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let sink = &self.0;
        if sink.discarding.load(Ordering::Relaxed) {
            sink.discarded.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match parse(&record.args().to_string()) {
            Ok(v) => {
                sink.read.fetch_add(1, Ordering::Relaxed);
                // No watcher left is not an error: the bits are being cleared.
                drop(sink.watchers.send(v));
            }
            Err(e) => {
                sink.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "a kernel trace record was not understood");
            }
        }
    }

    fn flush(&self) {}
}

/// The kernel trace: the ring buffer's reader and the watchers' channel.
pub struct KernelTrace {
    sink: Arc<SinkState>,
    /// Taken by the reader task when the first trace starts.
    reader: Mutex<Option<EbpfLogger<VerdictSink>>>,
}

impl KernelTrace {
    /// Takes the programs' `AYA_LOGS` ring buffer (pinned with the other maps,
    /// so programs adopted from a predecessor write to the same one).
    pub fn new(ebpf: &mut Ebpf) -> Result<Self, aya_log::Error> {
        let (watchers, _) = broadcast::channel(WATCHER_BUFFER);
        let sink = Arc::new(SinkState {
            watchers,
            discarding: AtomicBool::new(false),
            discarded: AtomicU64::new(0),
            read: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
        });
        let logger = EbpfLogger::init_with_logger(ebpf, VerdictSink(sink.clone()))?;
        Ok(Self {
            sink,
            reader: Mutex::new(Some(logger)),
        })
    }

    /// Records taken from the ring buffer so far, by what became of them, in
    /// the order of [`RECORD_OUTCOMES`]: compared with the kernel's `traced`
    /// count, what the ring buffer could not hold.
    pub fn records(&self) -> [u64; 3] {
        let s = &self.sink;
        [
            s.read.load(Ordering::Relaxed),
            s.malformed.load(Ordering::Relaxed),
            s.discarded.load(Ordering::Relaxed),
        ]
    }

    /// A new watcher's receiver: every verdict from now on, or how many it missed.
    pub fn subscribe(&self) -> broadcast::Receiver<KernelVerdict> {
        self.sink.watchers.subscribe()
    }

    /// Starts reading the ring buffer, once (later calls do nothing), until
    /// `stop` fires. Must run inside the tokio runtime.
    pub fn start_reader(&self, stop: CancellationToken) -> std::io::Result<()> {
        let Some(mut logger) = self.reader.lock().expect("kernel trace lock").take() else {
            return Ok(());
        };
        // Records already in the pinned buffer were written for watchers of an
        // agent that is gone (a trace cut short by a crash, or decisions made
        // while no agent ran): shown now they would pass for new ones.
        let sink = &self.sink;
        sink.discarding.store(true, Ordering::Relaxed);
        let flushed = std::panic::catch_unwind(AssertUnwindSafe(|| logger.flush()));
        sink.discarding.store(false, Ordering::Relaxed);
        let stale = sink.discarded.load(Ordering::Relaxed);
        if stale > 0 || flushed.is_err() {
            tracing::info!(
                stale,
                "discarded kernel trace records written before this agent read them"
            );
        }
        // SAFETY: the logger owns its ring buffer's map fd, which stays open
        // and the same until the logger (moved into the AsyncFd) is dropped.
        let mut fd = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        tokio::spawn(async move {
            loop {
                let mut ready = tokio::select! {
                    ready = fd.readable_mut() => match ready {
                        Ok(ready) => ready,
                        Err(e) => {
                            tracing::warn!(error = %e, "reading the kernel trace failed; debug trace stops");
                            return;
                        }
                    },
                    _ = stop.cancelled() => return,
                };
                // aya-log panics on a record it cannot decode; one bad record
                // must not end tracing for good.
                let flushed = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    ready.get_inner_mut().flush();
                }));
                if flushed.is_err() {
                    tracing::warn!("a malformed kernel trace record was skipped");
                }
                ready.clear_ready();
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn records_parse_as_the_kernel_writes_them() {
        let cases: &[(&str, Result<KernelVerdict, &str>)] = &[
            (
                "connect verdict=0 workload=7 dst=::ffff:10.1.2.3 port=8080",
                Ok(KernelVerdict {
                    hook: Hook::Connect,
                    verdict: "captured",
                    workload_id: Some(7),
                    source: None,
                    destination: "10.1.2.3:8080".parse().unwrap(),
                }),
            ),
            (
                "connect verdict=3 workload=1 dst=fd00::5 port=443",
                Ok(KernelVerdict {
                    hook: Hook::Connect,
                    verdict: "excluded_cidr",
                    workload_id: Some(1),
                    source: None,
                    destination: "[fd00::5]:443".parse().unwrap(),
                }),
            ),
            (
                "inbound verdict=8 src=::ffff:10.0.0.9 dst=::ffff:10.0.0.2 port=80",
                Ok(KernelVerdict {
                    hook: Hook::Inbound,
                    verdict: "steered_inbound",
                    workload_id: None,
                    source: Some("10.0.0.9".parse().unwrap()),
                    destination: "10.0.0.2:80".parse().unwrap(),
                }),
            ),
            ("hello world", Err("unknown record kind")),
            (
                "connect verdict=99 workload=1 dst=::1 port=1",
                Err("field verdict"),
            ),
            ("connect verdict=0 dst=::1 port=1", Err("field workload")),
            (
                "inbound verdict=8 src=nope dst=::1 port=1",
                Err("field src"),
            ),
            (
                "connect verdict=0 workload=1 dst=::1 port=70000",
                Err("field port"),
            ),
        ];
        for (record, want) in cases {
            match (parse(record), want) {
                (Ok(got), Ok(want)) => assert_eq!(&got, want, "{record}"),
                (Err(got), Err(want)) => {
                    assert!(got.to_string().contains(want), "{record}: {got}")
                }
                (got, want) => panic!("{record}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn every_verdict_code_has_a_name() {
        for code in 0..verdict::COUNT {
            let record = format!("connect verdict={code} workload=1 dst=::ffff:1.2.3.4 port=1");
            assert_eq!(
                parse(&record).unwrap().verdict,
                verdict::NAMES[usize::from(code)]
            );
        }
    }

    proptest! {
        #[test]
        fn arbitrary_records_never_panic(record in ".{0,200}") {
            let _ = parse(&record);
        }

        #[test]
        fn any_destination_round_trips(ip in any::<std::net::Ipv4Addr>(), port in any::<u16>(), id in any::<u32>()) {
            let mapped = ip.to_ipv6_mapped();
            let v = parse(&format!("connect verdict=0 workload={id} dst={mapped} port={port}")).unwrap();
            prop_assert_eq!(v.destination, SocketAddr::new(IpAddr::V4(ip), port));
            prop_assert_eq!(v.workload_id, Some(id));
        }
    }
}
