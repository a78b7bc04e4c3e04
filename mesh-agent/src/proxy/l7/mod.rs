//! Request-level (L7) traffic management for connections to Service VIPs:
//! protocol detection, Gateway API routing, load balancing, retries, timeouts,
//! outlier detection, fault injection, rate limits and request telemetry.
//!
//! Pure decisions (`detect`, `route`, `balance`, `budget`) are kept apart from the
//! I/O in `proxy` and `upstream`, and tested table-driven.

pub mod balance;
pub mod budget;
pub mod catalog;
pub mod destination;
pub mod detect;
pub mod forward;
pub mod pod;
pub mod proxy;
pub mod record;
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
    /// This agent's secret marker for streams whose requests its client side
    /// already served ([`crate::proxy::tunnel::PARSED_BY_HEADER`]).
    pub parsed_by: http::HeaderValue,
    /// Records request spans, when a collector is configured.
    pub tracer: crate::traces::Tracer,
}

impl L7 {
    /// Node-wide L7 state with a fresh marker (random, never logged).
    pub fn new(
        settings: L7Settings,
        request_log: Option<tracing_appender::non_blocking::NonBlocking>,
        tracer: crate::traces::Tracer,
    ) -> Self {
        let secret: u128 = rand::random();
        L7 {
            catalog: catalog::CatalogStore::default(),
            settings,
            request_log,
            tracer,
            parsed_by: http::HeaderValue::from_str(&format!("{secret:032x}"))
                .expect("hex is a valid header value"),
        }
    }
}

#[cfg(test)]
mod docs_examples {
    /// Every `yaml` block of the L7 docs must load as config, so the examples stay true.
    #[test]
    fn every_example_in_the_l7_docs_loads() {
        let pages = [
            (
                "services.md",
                include_str!("../../../../docs/l7/services.md"),
            ),
            ("routing.md", include_str!("../../../../docs/l7/routing.md")),
            (
                "retries-and-timeouts.md",
                include_str!("../../../../docs/l7/retries-and-timeouts.md"),
            ),
            (
                "load-balancing.md",
                include_str!("../../../../docs/l7/load-balancing.md"),
            ),
            (
                "fault-injection-and-rate-limits.md",
                include_str!("../../../../docs/l7/fault-injection-and-rate-limits.md"),
            ),
            (
                "telemetry.md",
                include_str!("../../../../docs/l7/telemetry.md"),
            ),
        ];
        for (name, text) in pages {
            let blocks: Vec<&str> = text
                .split("```yaml\n")
                .skip(1)
                .map(|b| b.split("```").next().unwrap_or(""))
                .collect();
            assert!(!blocks.is_empty(), "{name} has no example");
            for block in blocks {
                let config = crate::state::parse(block)
                    .unwrap_or_else(|e| panic!("{name}: example rejected: {e}"));
                assert!(
                    !config.services.is_empty(),
                    "{name}: example declares no Service"
                );
            }
        }
    }
}
