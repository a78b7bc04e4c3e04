//! Request-level (L7) traffic management for connections to Service VIPs:
//! protocol detection, Gateway API routing, load balancing, retries, timeouts,
//! outlier detection, fault injection, rate limits and request telemetry.
//!
//! Pure decisions (`detect`, `route`, `balance`, `budget`) are kept apart from the
//! I/O in `proxy` and `upstream`, and tested table-driven.

pub mod balance;
pub mod budget;
pub mod catalog;
pub mod detect;
pub mod proxy;
pub mod route;
pub mod traffic;
pub mod upstream;

use std::time::Duration;

/// L7 settings that come from agent flags.
#[derive(Debug, Clone)]
pub struct L7Settings {
    /// How long to wait for a client's first bytes before treating it as opaque.
    pub detect_timeout: Duration,
    /// Ports never inspected on any Service (server-speaks-first protocols).
    pub opaque_ports: Vec<u16>,
    /// Largest request header block accepted (HTTP/1: 431 above it; HTTP/2: a reset).
    pub max_header_bytes: usize,
    /// Time allowed for an HTTP/1 client to send its headers (slowloris defence).
    pub header_timeout: Duration,
}

impl Default for L7Settings {
    fn default() -> Self {
        L7Settings {
            detect_timeout: Duration::from_millis(100),
            // Linkerd's defaults: SMTP, MySQL, Galera, PostgreSQL, Redis, Elasticsearch, memcached.
            opaque_ports: vec![25, 587, 3306, 4444, 5432, 6379, 9300, 11211],
            max_header_bytes: 64 * 1024,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// Node-wide L7 state shared by every workload's listeners.
pub struct L7 {
    /// Services, routes and endpoint state in force.
    pub catalog: catalog::CatalogStore,
    /// Flags.
    pub settings: L7Settings,
    /// Where JSON request-log lines go, when enabled.
    pub request_log: Option<tracing_appender::non_blocking::NonBlocking>,
}
