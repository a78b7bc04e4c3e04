//! End-to-end tests of workload identities: a real agent with a CA from
//! `mesh-agent ca init` mints, shows and rotates certificates for its pods.

use std::time::Duration;

use nodemesh_testkit::{Agent, MeshCa, Node, Tools, wait_until, yaml_docs};

fn certificates(agent: &Agent) -> Vec<serde_json::Value> {
    agent.config_dump().unwrap()["certificates"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Each enrolled workload gets a certificate for its SPIFFE ID, visible in
/// `/config_dump` and as an expiry metric. It is renewed at half its lifetime
/// with a new serial, and dropped when the workload leaves.
#[test]
fn workload_certificates_are_issued_rotated_and_dropped() {
    let tools = Tools::new(env!("CARGO_BIN_EXE_podtool")).unwrap();
    let ca = MeshCa::init(&tools).unwrap();
    let mut node = Node::new().unwrap();
    let a = node.add_pod("a", "shop").unwrap();
    let b = node.add_pod("b", "backend").unwrap();
    let mut args = ca.args().to_vec();
    args.extend(["--cert-lifetime", "4s"]);
    let agent = Agent::start_with(
        &tools,
        &node,
        &yaml_docs(&[a.workload_yaml(), b.workload_yaml()]),
        &args,
    )
    .unwrap();
    let a_id = "spiffe://cluster.local/ns/shop/sa/a-sa";
    let serial_of = |id: &str| -> Option<String> {
        certificates(&agent)
            .iter()
            .find(|c| c["identity"] == id && c["state"] == "available")
            .and_then(|c| c["serial"].as_str().map(str::to_owned))
    };
    wait_until("both certificates", Duration::from_secs(10), || {
        Ok(certificates(&agent).len() == 2 && serial_of(a_id).is_some())
    })
    .unwrap();
    let first = serial_of(a_id).unwrap();
    let expiry = agent
        .metric(
            "nodemesh_certificate_expiry_timestamp_seconds",
            &[("identity", a_id)],
        )
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        expiry > now && expiry < now + 5.0,
        "expiry {expiry} vs now {now}"
    );

    // Renewed at half of the 4 s lifetime.
    wait_until("a rotated certificate", Duration::from_secs(10), || {
        Ok(serial_of(a_id).is_some_and(|s| s != first))
    })
    .unwrap();

    agent.reconfigure(&yaml_docs(&[b.workload_yaml()])).unwrap();
    wait_until("a's certificate dropped", Duration::from_secs(10), || {
        Ok(certificates(&agent).len() == 1)
    })
    .unwrap();
    assert!(serial_of(a_id).is_none());
    assert_eq!(
        agent
            .metric("nodemesh_certificate_rotation_failures_total", &[])
            .unwrap(),
        0.0
    );
}

/// The trust bundle is reloaded when the root file's content changes, and only
/// then: an idle agent reloads nothing for a minute; reading the CA files is
/// not a change (taken for one, each reload triggered the next, several times a
/// second for as long as the agent ran), and neither is a write of the same bytes.
#[test]
fn the_trust_bundle_is_reloaded_on_a_change_only() {
    let tools = Tools::new(env!("CARGO_BIN_EXE_podtool")).unwrap();
    let ca = MeshCa::init(&tools).unwrap();
    let mut node = Node::new().unwrap();
    let a = node.add_pod("a", "shop").unwrap();
    let agent =
        Agent::start_with(&tools, &node, &yaml_docs(&[a.workload_yaml()]), &ca.args()).unwrap();
    wait_until("a certificate", Duration::from_secs(10), || {
        Ok(certificates(&agent).len() == 1)
    })
    .unwrap();
    let reloads = || {
        let log = agent.log();
        log.matches("trust bundle reloaded").count() + log.matches("signing CA reloaded").count()
    };
    // Acceptance: an idle agent reloads nothing for a minute.
    std::thread::sleep(Duration::from_secs(60));
    assert_eq!(reloads(), 0, "reloaded with no change:\n{}", agent.log());

    // The same bytes written again (a Secret sync that changed nothing): no reload.
    let root = ca.dir.join("root-cert.pem");
    let pem = std::fs::read_to_string(&root).unwrap();
    std::fs::write(&root, &pem).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(reloads(), 0, "reloaded unchanged files:\n{}", agent.log());

    // A second root added (a rotation's overlap): one reload, then quiet again.
    let next = MeshCa::init(&tools).unwrap();
    let next_root = std::fs::read_to_string(next.dir.join("root-cert.pem")).unwrap();
    std::fs::write(&root, format!("{pem}{next_root}")).unwrap();
    let line = agent.log_line("reloaded after the change", |l| {
        l.contains("trust bundle reloaded")
    });
    assert!(line.contains("roots=2"), "{line}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(reloads(), 1, "{}", agent.log());
}

/// A broken CA directory stops the agent at start with one line naming the file.
#[test]
fn a_missing_ca_file_is_a_clear_start_error() {
    let tools = Tools::new(env!("CARGO_BIN_EXE_podtool")).unwrap();
    let ca = MeshCa::init(&tools).unwrap();
    std::fs::remove_file(ca.dir.join("ca-key.pem")).unwrap();
    let node = Node::new().unwrap();
    let err = Agent::start_with(&tools, &node, "", &ca.args())
        .err()
        .expect("agent must refuse to start")
        .to_string();
    assert!(err.contains("ca-key.pem"), "{err}");
}
