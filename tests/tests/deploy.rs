//! The install manifests: `kubectl kustomize deploy/` renders objects that pass
//! the Kubernetes schemas (`kubernetes-validate --strict`), and the agent's
//! ClusterRole grants exactly what an agent in Kubernetes mode uses: list and
//! watch on each kind it watches, found by running one against the API double.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nodemesh_testkit::apiserver::{self, ApiServer};
use nodemesh_testkit::{Agent, Node, Tools, wait_until};
use serde::Deserialize;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_owned()
}

/// `kubectl kustomize deploy/`, as the documented install renders it.
fn rendered() -> String {
    kustomize("deploy")
}

/// `kubectl kustomize <dir>` of a kustomization in the workspace.
fn kustomize(dir: &str) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(workspace().join(dir))
        .output()
        .expect("running kubectl (installed by `cargo xtask setup`)");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 manifests")
}

fn documents(yaml: &str) -> Vec<serde_yaml_ng::Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|d| serde_yaml_ng::Value::deserialize(d).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn rendered_manifests_pass_the_kubernetes_schemas() {
    let validate = std::env::var_os("NODEMESH_KUBERNETES_VALIDATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/tools/venv/bin/kubernetes-validate"));
    assert!(
        validate.exists(),
        "{} is missing: `cargo xtask setup` installs it",
        validate.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let yaml = rendered();
    // The install, and the step that removes the CNI entry before uninstalling.
    for (name, text) in [
        ("install", yaml.clone()),
        ("uninstall", kustomize("deploy/uninstall")),
    ] {
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, &text).unwrap();
        let out = Command::new(&validate)
            .args(["--strict", "--quiet"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubernetes-validate refused the {name} manifests:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The agent answers the CNI plugin on the socket its init container chains in.
    let daemonset = documents(&yaml)
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap();
    let text = serde_yaml_ng::to_string(&daemonset).unwrap();
    assert!(
        text.contains("--socket=/var/run/nodemesh/cni.sock"),
        "{text}"
    );
    assert!(
        text.contains("--cni-socket=/var/run/nodemesh/cni.sock"),
        "{text}"
    );
    // No signing key on the nodes: the agent asks the CA service, and only the
    // CA Deployment mounts the cacerts Secret.
    assert!(
        !text.contains("cacerts") && !text.contains("--ca-dir"),
        "{text}"
    );
    assert!(
        text.contains("--ca-address=https://nodemesh-ca.nodemesh-system.svc:15012")
            && text.contains("audience: istio-ca"),
        "{text}"
    );
    let mounting_cacerts: Vec<String> = documents(&yaml)
        .iter()
        .filter(|d| {
            serde_yaml_ng::to_string(d)
                .unwrap()
                .contains("secretName: cacerts")
        })
        .map(|d| {
            format!(
                "{} {}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(mounting_cacerts, ["Deployment nodemesh-ca"]);
    let kinds: BTreeSet<String> = documents(&yaml)
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or("").to_owned())
        .collect();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "DaemonSet",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    ] {
        assert!(kinds.contains(kind), "no {kind} in {kinds:?}");
    }
}

#[test]
fn the_cluster_role_grants_list_and_watch_on_what_the_agent_watches_and_nothing_else() {
    let granted = granted(&rendered(), "nodemesh-agent");
    for (_, _, verbs) in &granted {
        assert_eq!(
            verbs,
            &BTreeSet::from(["list".to_owned(), "watch".to_owned()]),
            "{granted:?}"
        );
    }
    let granted: BTreeSet<(String, String)> = granted.into_iter().map(|(g, r, _)| (g, r)).collect();

    // What an agent actually lists and watches.
    let tools = Tools::new(env!("CARGO_BIN_EXE_podtool")).unwrap();
    let api = ApiServer::start().unwrap();
    let node = Node::new().unwrap();
    let agent = Agent::start_kube(&tools, &node, &api, &[]).unwrap();
    wait_until("agent ready", Duration::from_secs(20), || {
        Ok(agent.get("/healthz/ready").is_ok())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    let used: BTreeSet<(String, String)> = api
        .served_all()
        .into_iter()
        .filter(|(_, served)| served.list_starts > 0 || served.watches > 0)
        .map(|(plural, _)| {
            let group = apiserver::api_group(&plural).expect("a kind the double serves");
            (group.to_owned(), plural)
        })
        .collect();
    assert_eq!(
        granted, used,
        "the ClusterRole (left) must grant exactly what the agent lists and watches (right)"
    );
}

/// `(group, resource, verbs)` the ClusterRole `name` grants; no wildcards, no
/// resource names.
fn granted(yaml: &str, name: &str) -> BTreeSet<(String, String, BTreeSet<String>)> {
    let docs = documents(yaml);
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("a ClusterRole {name}"));
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_sequence().expect("rules") {
        let strings = |field: &str| -> Vec<String> {
            rule[field]
                .as_sequence()
                .into_iter()
                .flatten()
                .map(|v| v.as_str().expect("a string").to_owned())
                .collect()
        };
        let verbs: BTreeSet<String> = strings("verbs").into_iter().collect();
        assert!(rule["resourceNames"].is_null() && rule["nonResourceURLs"].is_null());
        for group in strings("apiGroups") {
            for resource in strings("resources") {
                assert!(!group.contains('*') && !resource.contains('*'), "{rule:?}");
                granted.insert((group.clone(), resource, verbs.clone()));
            }
        }
    }
    granted
}

/// The CA service's ClusterRole: TokenReview create, and pods list and watch,
/// which a CA service run against the API double is seen to use; nothing else
/// (no Secrets: its key is mounted).
#[test]
fn the_ca_role_grants_token_reviews_and_pod_reads_only() {
    let set = |verbs: &[&str]| verbs.iter().map(|v| v.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        granted(&rendered(), "nodemesh-ca"),
        BTreeSet::from([
            (
                "authentication.k8s.io".to_owned(),
                "tokenreviews".to_owned(),
                set(&["create"])
            ),
            ("".to_owned(), "pods".to_owned(), set(&["list", "watch"])),
        ])
    );
    let tools = Tools::new(env!("CARGO_BIN_EXE_podtool")).unwrap();
    let ca_files = nodemesh_testkit::MeshCa::init(&tools).unwrap();
    let api = ApiServer::start().unwrap();
    let _ca = nodemesh_testkit::ca::CaServer::start(&tools, &api, &ca_files.dir, &[]).unwrap();
    let used: BTreeSet<String> = api
        .served_all()
        .into_iter()
        .filter(|(_, served)| served.list_starts > 0 || served.watches > 0)
        .map(|(plural, _)| plural)
        .collect();
    assert_eq!(used, BTreeSet::from(["pods".to_owned()]));
}
