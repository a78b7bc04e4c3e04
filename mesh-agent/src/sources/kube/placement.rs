//! Finding a pod on this node from its UID: the pod cgroup kubelet made (either
//! cgroup driver, any QoS class) and the network namespace of a process in it.
//! This is how pods that started before the agent, or whose creation it missed,
//! are enrolled.

use std::path::{Path, PathBuf};

use crate::state::workload::{NetnsRef, Placement};

/// What the node shows of a pod so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// Its cgroup, and a process in it whose network namespace is the pod's.
    Found(Placement),
    /// The pod cgroup exists, but no process runs in it yet (the sandbox is starting).
    Starting(PathBuf),
    /// No pod cgroup for this UID under the root.
    Missing,
}

/// Where kubelet puts the cgroup of pod `uid`, relative to its cgroup root: the
/// systemd driver (UID dashes become underscores) and the cgroupfs driver, for
/// the Guaranteed, Burstable and BestEffort classes.
pub fn pod_cgroup_candidates(uid: &str) -> [PathBuf; 6] {
    let escaped = uid.replace('-', "_");
    [
        format!("kubepods.slice/kubepods-pod{escaped}.slice"),
        format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{escaped}.slice"),
        format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{escaped}.slice"),
        format!("kubepods/pod{uid}"),
        format!("kubepods/burstable/pod{uid}"),
        format!("kubepods/besteffort/pod{uid}"),
    ]
    .map(PathBuf::from)
}

/// Looks for pod `uid` under `root` (the cgroup holding `kubepods`).
pub fn discover(root: &Path, uid: &str) -> Discovery {
    if uid.is_empty() || uid.contains('/') {
        return Discovery::Missing;
    }
    let Some(dir) = pod_cgroup_candidates(uid)
        .into_iter()
        .map(|c| root.join(c))
        .find(|d| d.join("cgroup.procs").is_file())
    else {
        return Discovery::Missing;
    };
    match first_process(&dir, 4) {
        Some(pid) => Discovery::Found(Placement {
            cgroup_path: dir,
            netns: NetnsRef::Pid(pid),
        }),
        None => Discovery::Starting(dir),
    }
}

/// A process in `dir` or its descendants (containers are child cgroups), looking
/// at most `depth` levels down. The sandbox's pause process holds the pod netns,
/// and so does every other process of a pod that is not on the host network.
fn first_process(dir: &Path, depth: usize) -> Option<u32> {
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    if let Some(pid) = procs.lines().find_map(|l| l.trim().parse::<u32>().ok()) {
        return Some(pid);
    }
    if depth == 0 {
        return None;
    }
    let mut children: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    children.sort();
    children
        .iter()
        .find_map(|child| first_process(child, depth - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make(root: &Path, rel: &str, procs: &str) -> PathBuf {
        let dir = root.join(rel);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.procs"), procs).unwrap();
        dir
    }

    #[test]
    fn finds_pods_for_both_drivers_and_every_qos_class() {
        let root = tempfile::tempdir().unwrap();
        let uid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
        let escaped = "1b4e28ba_2fa1_11d2_883f_0016d3cca427";
        let layouts = [
            format!("kubepods.slice/kubepods-pod{escaped}.slice"),
            format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{escaped}.slice"
            ),
            format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{escaped}.slice"
            ),
            format!("kubepods/pod{uid}"),
            format!("kubepods/burstable/pod{uid}"),
            format!("kubepods/besteffort/pod{uid}"),
        ];
        for layout in &layouts {
            let pod = make(root.path(), layout, "");
            // The process lives in a container cgroup below the pod's.
            make(&pod, "cri-containerd-abc.scope", "4242\n");
            assert_eq!(
                discover(root.path(), uid),
                Discovery::Found(Placement {
                    cgroup_path: pod.clone(),
                    netns: NetnsRef::Pid(4242),
                }),
                "{layout}"
            );
            std::fs::remove_dir_all(root.path().join(layout.split('/').next().unwrap())).unwrap();
        }
    }

    #[test]
    fn a_pod_without_processes_is_starting() {
        let root = tempfile::tempdir().unwrap();
        let dir = make(root.path(), "kubepods/besteffort/podabc", "");
        assert_eq!(discover(root.path(), "abc"), Discovery::Starting(dir));
        assert_eq!(discover(root.path(), "other"), Discovery::Missing);
        assert_eq!(discover(root.path(), "../x"), Discovery::Missing);
        assert_eq!(discover(root.path(), ""), Discovery::Missing);
    }
}
