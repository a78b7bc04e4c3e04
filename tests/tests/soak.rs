//! The short soak (the full one is `cargo xtask soak`): 1,000 long-lived
//! connections and 100 new ones a second for 40 s across two nodes, through pod
//! churn, config reloads, an agent upgrade and a `kill -9`; nothing may leak and
//! nothing may be lost where nothing was cut.

use std::time::Duration;

use nodemesh_testkit::Tools;
use nodemesh_testkit::soak::{SoakSettings, run};

#[test]
fn a_short_soak_leaks_nothing_and_loses_nothing() {
    let settings = SoakSettings {
        duration: Duration::from_secs(40),
        connections: 1_000,
        rate: 100,
    };
    let report = run(
        Tools::new(env!("CARGO_BIN_EXE_podtool")).unwrap(),
        &settings,
    )
    .unwrap();
    let table = report.markdown(&settings, 5.0);
    println!("{table}");
    assert!(report.passed(), "{table}");
    // The run did what it says: every event happened, and the connections were held.
    let events: Vec<&str> = report.events.iter().map(|(_, e)| e.as_str()).collect();
    assert!(
        events.contains(&"node 0 agent upgraded (handoff)"),
        "{events:?}"
    );
    assert!(
        events.contains(&"node 1 agent killed (-9) and restarted"),
        "{events:?}"
    );
    assert!(events.iter().filter(|e| e.starts_with("pod churn")).count() >= 6);
    let peak = report
        .samples
        .iter()
        .filter(|s| s.node == "node0")
        .map(|s| s.connections)
        .fold(0.0, f64::max);
    assert!(peak >= 1_000.0, "node 0 carried at most {peak} connections");
    assert!(report.bytes_per_connection > 0.0);
}
