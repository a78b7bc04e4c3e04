//! Request-level (L7) traffic management for connections to Service VIPs:
//! protocol detection, Gateway API routing, load balancing, retries, timeouts,
//! outlier detection, fault injection, rate limits and request telemetry.
//!
//! Pure decisions (`detect`, `route`, `balance`, `budget`) are kept apart from the
//! I/O in `proxy` and `upstream`, and tested table-driven.

pub mod balance;
pub mod budget;
pub mod detect;
pub mod route;
pub mod traffic;
