//! The file source: a YAML file of Kubernetes-shaped documents, re-read when it
//! changes (editors and ConfigMaps replace it by rename) and on SIGHUP. A bad file
//! is rejected whole, with the document and field named, and the last good state
//! stays in force.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use notify::Watcher;
use tokio::signal::unix::{SignalKind, signal};

use crate::reconciler::Agent;
use crate::state::{self, ConfigError};

/// A config file and what was last applied from it.
pub struct FileSource {
    path: PathBuf,
    trust_domain: Arc<str>,
    last_text: Option<String>,
}

impl FileSource {
    /// A source for `path`, whose workloads belong to `trust_domain`.
    pub fn new(path: PathBuf, trust_domain: Arc<str>) -> Self {
        FileSource {
            path,
            trust_domain,
            last_text: None,
        }
    }

    /// Reads the file and applies it. `force` re-applies an unchanged file (SIGHUP);
    /// an unchanged file is also re-applied while workloads wait for an enrollment retry.
    pub async fn reload(&mut self, agent: &Agent, force: bool) -> Result<(), ConfigError> {
        let read = std::fs::read_to_string(&self.path).map_err(|source| ConfigError::Read {
            path: self.path.clone(),
            source,
        });
        let parsed = read.and_then(|text| state::parse(&text).map(|c| (text, c)));
        let (text, config) = match parsed {
            Ok(ok) => ok,
            Err(e) => {
                agent.reject(&e).await;
                return Err(e);
            }
        };
        if !force && self.last_text.as_deref() == Some(&text) && agent.failed_workloads().await == 0
        {
            return Ok(());
        }
        agent
            .apply(config.with_trust_domain(&self.trust_domain), Vec::new())
            .await;
        self.last_text = Some(text);
        Ok(())
    }

    /// Starts watching the file's directory (editors and Kubernetes ConfigMaps
    /// replace files by rename). Called before the first read, so that a change
    /// made between that read and [`FileSource::watch`] is not missed.
    pub fn changes(&self) -> anyhow::Result<DirChanges> {
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_owned();
        let name = self.path.file_name().map(|n| n.to_owned());
        watch_dir_for(&dir, "config", move |file| {
            // Only the config file, or a mounted ConfigMap's `..data` swap: other
            // files beside it (a log, say) change without changing the config.
            Some(file) == name.as_deref() || file.to_string_lossy().starts_with("..")
        })
    }

    /// Re-applies the file whenever `changes` reports a change or SIGHUP
    /// arrives; runs until dropped.
    pub async fn watch(mut self, agent: Arc<Agent>, changes: DirChanges) -> anyhow::Result<()> {
        let (_watcher, mut changes) = changes;
        let mut hangup = signal(SignalKind::hangup())?;
        loop {
            let force = tokio::select! {
                Some(()) = changes.recv() => {
                    settle(&mut changes).await;
                    false
                }
                _ = hangup.recv() => true,
            };
            // A rejected file is logged and counted inside reload; keep serving.
            let _ = self.reload(&agent, force).await;
        }
    }
}

/// A directory watcher (kept alive by its holder) and the channel it signals changes on.
pub type DirChanges = (notify::RecommendedWatcher, tokio::sync::mpsc::Receiver<()>);

/// Watches `dir`, signalling changes of its content.
pub fn watch_dir(dir: &Path, what: &str) -> anyhow::Result<DirChanges> {
    watch_dir_for(dir, what, |_| true)
}

/// Watches `dir`, signalling changes of the files whose name `relevant` accepts.
pub fn watch_dir_for(
    dir: &Path,
    what: &str,
    relevant: impl Fn(&std::ffi::OsStr) -> bool + Send + 'static,
) -> anyhow::Result<DirChanges> {
    let (tx, rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let touches = event.paths.is_empty()
            || event
                .paths
                .iter()
                .any(|p| p.file_name().is_some_and(&relevant));
        if is_change(&event.kind) && touches {
            let _ = tx.try_send(());
        }
    })
    .with_context(|| format!("creating the {what} directory watcher"))?;
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    Ok((watcher, rx))
}

/// Whether an event changes what is in the directory. Opening and reading a
/// file is an event too (inotify's `IN_OPEN`, `IN_CLOSE_NOWRITE`): taken for a
/// change, the reload that reads the files would trigger the next reload, for
/// ever.
fn is_change(kind: &notify::EventKind) -> bool {
    use notify::EventKind;
    use notify::event::AccessKind;
    match kind {
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
        // A file written and closed: some writers are seen only by this.
        EventKind::Access(AccessKind::Close(notify::event::AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Other => false,
        EventKind::Any => true,
    }
}

/// Lets a burst of writes settle before reading, and swallows its other events.
pub async fn settle(changes: &mut tokio::sync::mpsc::Receiver<()>) {
    tokio::time::sleep(Duration::from_millis(100)).await;
    while changes.try_recv().is_ok() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reading_the_files_is_not_a_change_and_writing_or_swapping_them_is() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("root-cert.pem");
        std::fs::write(&file, "a").unwrap();
        let (_watcher, mut changes) = watch_dir(dir.path(), "test").unwrap();
        for _ in 0..5 {
            std::fs::read_to_string(&file).unwrap();
        }
        let quiet = tokio::time::timeout(Duration::from_millis(300), changes.recv()).await;
        assert!(quiet.is_err(), "reading the files was taken for a change");

        std::fs::write(&file, "b").unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(5), changes.recv()).await;
        assert!(seen.is_ok(), "a write was missed");
        settle(&mut changes).await;

        // Kubernetes updates a mounted Secret by swapping the `..data` symlink.
        std::fs::write(dir.path().join("next"), "c").unwrap();
        settle(&mut changes).await;
        std::fs::rename(dir.path().join("next"), &file).unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(5), changes.recv()).await;
        assert!(seen.is_ok(), "a rename over the file was missed");
    }

    /// The config's directory may hold other files (a log, say): their changes
    /// are not the config's, or each error logged there would reload the config.
    #[tokio::test]
    async fn other_files_beside_the_config_do_not_trigger_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("mesh.yaml");
        std::fs::write(&config, "").unwrap();
        let source = FileSource::new(config.clone(), Arc::from("cluster.local"));
        let (_watcher, mut changes) = source.changes().unwrap();
        std::fs::write(dir.path().join("agent.log"), "a line").unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(300), changes.recv()).await;
        assert!(quiet.is_err(), "a neighbour's write was taken for a change");
        std::fs::write(&config, "---").unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(5), changes.recv()).await;
        assert!(seen.is_ok(), "a write of the config was missed");
        std::fs::create_dir(dir.path().join("..2026_12_02")).unwrap();
        settle(&mut changes).await;
        std::os::unix::fs::symlink("..2026_12_02", dir.path().join("..data_tmp")).unwrap();
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(5), changes.recv()).await;
        assert!(seen.is_ok(), "a ConfigMap's ..data swap was missed");
    }
}
