//! Which pods run where, as the CA service needs it: a kube-rs watcher over
//! every pod, trimmed at once to UID, node and service account, indexed by
//! name and by node. A relist is gathered aside and swapped in whole.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};

use super::authorize::{PodFacts, Pods, ServiceAccount};

/// Every running pod of the cluster, indexed.
#[derive(Default)]
pub struct PodIndex {
    index: RwLock<Index>,
    synced: AtomicBool,
}

#[derive(Default)]
struct Index {
    /// By `(namespace, name)`.
    pods: HashMap<(String, String), PodFacts>,
    /// Per node, how many pods each service account has there.
    by_node: HashMap<String, HashMap<ServiceAccount, u32>>,
}

impl Index {
    fn insert(&mut self, namespace: String, name: String, facts: PodFacts) {
        self.remove(&namespace, &name);
        if let Some(node) = &facts.node {
            let sa = ServiceAccount::new(&namespace, &facts.service_account);
            *self
                .by_node
                .entry(node.clone())
                .or_default()
                .entry(sa)
                .or_default() += 1;
        }
        self.pods.insert((namespace, name), facts);
    }

    fn remove(&mut self, namespace: &str, name: &str) {
        let Some(old) = self.pods.remove(&(namespace.to_owned(), name.to_owned())) else {
            return;
        };
        let Some(node) = old.node else { return };
        let Some(accounts) = self.by_node.get_mut(&node) else {
            return;
        };
        let sa = ServiceAccount::new(namespace, &old.service_account);
        if let Some(count) = accounts.get_mut(&sa) {
            *count -= 1;
            if *count == 0 {
                accounts.remove(&sa);
            }
        }
        if accounts.is_empty() {
            self.by_node.remove(&node);
        }
    }
}

/// A pod's namespace, name and facts; `None` for a pod that has finished
/// (phase Succeeded or Failed), which needs no certificate.
fn trim(pod: &Pod) -> Option<(String, String, PodFacts)> {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    let spec = pod.spec.as_ref();
    Some((
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default(),
        PodFacts {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            node: spec.and_then(|s| s.node_name.clone()),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
        },
    ))
}

impl PodIndex {
    /// Whether a complete list has arrived: before it, every answer would be a guess.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// How many running pods are known.
    pub fn len(&self) -> usize {
        self.index.read().expect("pod index lock").pods.len()
    }

    /// Whether no pod is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn apply(&self, pod: &Pod) {
        let mut index = self.index.write().expect("pod index lock");
        match trim(pod) {
            Some((ns, name, facts)) => index.insert(ns, name, facts),
            None => index.remove(
                pod.metadata.namespace.as_deref().unwrap_or_default(),
                pod.metadata.name.as_deref().unwrap_or_default(),
            ),
        }
    }

    /// Reads an agent's pod, and the pods of `namespace` on its node, straight
    /// from the API into the index: a pod that started a moment ago may not
    /// have reached the watch yet, and must not be refused for it.
    pub async fn refresh(
        &self,
        client: &kube::Client,
        agent_namespace: &str,
        agent_pod: &str,
        namespace: &str,
    ) -> Result<(), kube::Error> {
        let agents: Api<Pod> = Api::namespaced(client.clone(), agent_namespace);
        let listed = agents
            .list(&ListParams::default().fields(&format!("metadata.name={agent_pod}")))
            .await?;
        let mut node = None;
        for pod in &listed.items {
            self.apply(pod);
            node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        }
        let Some(node) = node else { return Ok(()) };
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let listed = pods
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await?;
        for pod in &listed.items {
            self.apply(pod);
        }
        Ok(())
    }

    /// Feeds the index from a watcher over every pod, forever; errors are
    /// retried with kube-rs's backoff and the index keeps its state meanwhile.
    pub async fn run(&self, client: kube::Client) {
        let api: Api<Pod> = Api::all(client);
        let mut events = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
        let mut relist: Option<Index> = None;
        while let Some(event) = events.next().await {
            match event {
                Err(e) => {
                    tracing::warn!(error = %e, "pod watch failed; retrying, the last pod list stays in force");
                }
                Ok(Event::Init) => relist = Some(Index::default()),
                Ok(Event::InitApply(pod)) => {
                    if let (Some(index), Some((ns, name, facts))) = (relist.as_mut(), trim(&pod)) {
                        index.insert(ns, name, facts);
                    }
                }
                Ok(Event::InitDone) => {
                    if let Some(index) = relist.take() {
                        let pods = index.pods.len();
                        *self.index.write().expect("pod index lock") = index;
                        if !self.synced.swap(true, Ordering::AcqRel) {
                            tracing::info!(pods, "pods listed; answering certificate requests");
                        }
                    }
                }
                Ok(Event::Apply(pod)) => self.apply(&pod),
                Ok(Event::Delete(pod)) => {
                    let mut index = self.index.write().expect("pod index lock");
                    index.remove(
                        pod.metadata.namespace.as_deref().unwrap_or_default(),
                        pod.metadata.name.as_deref().unwrap_or_default(),
                    );
                }
            }
        }
    }
}

impl Pods for PodIndex {
    fn get(&self, namespace: &str, name: &str) -> Option<PodFacts> {
        let index = self.index.read().expect("pod index lock");
        index
            .pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    fn runs_on(&self, node: &str, sa: &ServiceAccount) -> bool {
        let index = self.index.read().expect("pod index lock");
        index
            .by_node
            .get(node)
            .is_some_and(|accounts| accounts.contains_key(sa))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};

    fn pod(ns: &str, name: &str, node: &str, sa: &str, phase: &str) -> Pod {
        Pod {
            metadata: kube::api::ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                uid: Some(format!("uid-{name}")),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                service_account_name: Some(sa.into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn the_index_follows_moves_and_finished_pods() {
        let index = PodIndex::default();
        let cart = ServiceAccount::new("shop", "cart");
        index.apply(&pod("shop", "cart-1", "a", "cart", "Running"));
        index.apply(&pod("shop", "cart-2", "a", "cart", "Running"));
        assert!(index.runs_on("a", &cart));
        index.apply(&pod("shop", "cart-1", "a", "cart", "Succeeded"));
        assert!(index.runs_on("a", &cart), "cart-2 still runs there");
        index.apply(&pod("shop", "cart-2", "b", "cart", "Running"));
        assert!(!index.runs_on("a", &cart));
        assert!(index.runs_on("b", &cart));
        assert_eq!(
            index.get("shop", "cart-2").unwrap().node.as_deref(),
            Some("b")
        );
        assert_eq!(index.get("shop", "cart-1"), None);
        assert_eq!(index.len(), 1);
    }
}
