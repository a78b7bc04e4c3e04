//! Installing the plugin on a node, as Istio's and Cilium's CNI installers do:
//! the binary goes into the runtime's CNI binary directory, and a `nodemesh-cni`
//! entry is appended to the node's pod network config (the first config file
//! in the CNI config directory, which is the one the runtime uses). Both are
//! written to a temporary file and renamed, so the runtime never reads half a
//! file. Uninstalling removes the entry and the binary; until then a pod of a
//! meshed namespace cannot start on a node whose agent is gone.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// The plugin's binary name, and its `type` in the config.
pub const PLUGIN: &str = "nodemesh-cni";

/// What install or uninstall changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The config file holding (or no longer holding) the entry.
    pub config: Option<PathBuf>,
    /// The installed (or removed) binary.
    pub binary: PathBuf,
}

/// The config file the runtime uses: the first `.conflist`, `.conf` or `.json`
/// in `conf_dir`, in lexical order (libcni's rule).
pub fn primary_config(conf_dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .with_context(|| format!("reading {}", conf_dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
        })
        .collect();
    files.sort();
    Ok(files.into_iter().next())
}

/// `config` (a `.conflist`, or a single-plugin `.conf`) with the plugin entry
/// `entry` last in its chain, replacing an earlier nodemesh entry.
pub fn with_entry(config: &Value, entry: &Value) -> anyhow::Result<Value> {
    let mut list = if config.get("plugins").is_some() {
        config.clone()
    } else if config.get("type").is_some() {
        // A single plugin: the same network as a one-plugin list.
        json!({
            "cniVersion": config["cniVersion"],
            "name": config["name"],
            "plugins": [config],
        })
    } else {
        bail!("neither a plugin list (plugins) nor a plugin (type)");
    };
    let plugins = list["plugins"]
        .as_array_mut()
        .context("plugins is not a list")?;
    plugins.retain(|p| p["type"] != PLUGIN);
    plugins.push(entry.clone());
    Ok(list)
}

/// `config` without the nodemesh entry; `None` if it had none.
pub fn without_entry(config: &Value) -> Option<Value> {
    let plugins = config.get("plugins")?.as_array()?;
    if !plugins.iter().any(|p| p["type"] == PLUGIN) {
        return None;
    }
    let mut out = config.clone();
    out["plugins"] = Value::Array(
        plugins
            .iter()
            .filter(|p| p["type"] != PLUGIN)
            .cloned()
            .collect(),
    );
    Some(out)
}

/// The chain entry that points the plugin at the agent's socket.
pub fn entry(socket: &Path, timeout_seconds: u64) -> Value {
    json!({"type": PLUGIN, "agentSocket": socket, "timeoutSeconds": timeout_seconds})
}

/// Copies `binary` into `bin_dir` and chains `entry` into the pod network's
/// config in `conf_dir`. `Ok(None)` when there is no pod network config yet.
pub fn install(
    binary: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    entry: &Value,
) -> anyhow::Result<Option<Report>> {
    let Some(config_path) = primary_config(conf_dir)? else {
        return Ok(None);
    };
    let installed = bin_dir.join(PLUGIN);
    let staged = bin_dir.join(format!(".{PLUGIN}.new"));
    std::fs::copy(binary, &staged)
        .with_context(|| format!("copying {} to {}", binary.display(), staged.display()))?;
    std::fs::rename(&staged, &installed)?;
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let config: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not JSON", config_path.display()))?;
    let chained =
        with_entry(&config, entry).with_context(|| format!("{}", config_path.display()))?;
    // A single-plugin `.conf` becomes a `.conflist` of the same name.
    let target = if config.get("plugins").is_none() {
        config_path.with_extension("conflist")
    } else {
        config_path.clone()
    };
    write_atomically(&target, &chained)?;
    if target != config_path {
        std::fs::remove_file(&config_path)?;
    }
    Ok(Some(Report {
        config: Some(target),
        binary: installed,
    }))
}

/// Removes the entry from every config in `conf_dir` that has it, and the binary.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> anyhow::Result<Report> {
    let mut changed = None;
    for entry in std::fs::read_dir(conf_dir)
        .with_context(|| format!("reading {}", conf_dir.display()))?
        .flatten()
    {
        let path = entry.path();
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Ok(config) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if let Some(cleaned) = without_entry(&config) {
            write_atomically(&path, &cleaned)?;
            changed = Some(path);
        }
    }
    let binary = bin_dir.join(PLUGIN);
    match std::fs::remove_file(&binary) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", binary.display())),
    }
    Ok(Report {
        config: changed,
        binary,
    })
}

fn write_atomically(path: &Path, value: &Value) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .context("config path has no file name")?
        .to_string_lossy();
    // Not matched by the runtime's `.conflist`/`.conf`/`.json` scan.
    let staged = path.with_file_name(format!(".{name}.nodemesh-new"));
    std::fs::write(&staged, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("writing {}", staged.display()))?;
    std::fs::rename(&staged, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("bin");
        let conf = root.path().join("net.d");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&conf).unwrap();
        let plugin = root.path().join("nodemesh-cni-build");
        std::fs::write(&plugin, b"#!/bin/true\n").unwrap();
        (root, bin, conf, plugin)
    }

    fn read(path: &Path) -> Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn install_chains_into_the_first_config_and_uninstall_restores_it() {
        let (_root, bin, conf, plugin) = dirs();
        let flannel = json!({"cniVersion": "1.0.0", "name": "cbr0", "plugins": [
            {"type": "flannel", "delegate": {"isDefaultGateway": true}},
            {"type": "portmap", "capabilities": {"portMappings": true}}]});
        std::fs::write(conf.join("10-flannel.conflist"), flannel.to_string()).unwrap();
        std::fs::write(
            conf.join("99-loopback.conf"),
            r#"{"cniVersion":"1.0.0","name":"lo","type":"loopback"}"#,
        )
        .unwrap();
        let e = entry(Path::new("/var/run/nodemesh/cni.sock"), 30);

        let report = install(&plugin, &bin, &conf, &e).unwrap().unwrap();
        assert_eq!(report.config, Some(conf.join("10-flannel.conflist")));
        assert!(bin.join(PLUGIN).exists());
        let chained = read(&conf.join("10-flannel.conflist"));
        let types: Vec<&str> = chained["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["flannel", "portmap", PLUGIN]);
        assert_eq!(
            chained["plugins"][2]["agentSocket"],
            "/var/run/nodemesh/cni.sock"
        );

        // Installing again (an agent restart) keeps one entry.
        install(&plugin, &bin, &conf, &e).unwrap();
        assert_eq!(
            read(&conf.join("10-flannel.conflist"))["plugins"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
        // No staging file is left where the runtime looks.
        let names: Vec<String> = std::fs::read_dir(&conf)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");

        let report = uninstall(&bin, &conf).unwrap();
        assert_eq!(report.config, Some(conf.join("10-flannel.conflist")));
        assert_eq!(read(&conf.join("10-flannel.conflist")), flannel);
        assert!(!bin.join(PLUGIN).exists());
        // Twice is fine.
        assert_eq!(uninstall(&bin, &conf).unwrap().config, None);
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_list_and_a_missing_network_waits() {
        let (_root, bin, conf, plugin) = dirs();
        let e = entry(Path::new("/run/n.sock"), 30);
        assert_eq!(install(&plugin, &bin, &conf, &e).unwrap(), None);
        std::fs::write(
            conf.join("10-bridge.conf"),
            r#"{"cniVersion":"0.4.0","name":"k8s","type":"bridge","bridge":"cni0"}"#,
        )
        .unwrap();
        let report = install(&plugin, &bin, &conf, &e).unwrap().unwrap();
        assert_eq!(report.config, Some(conf.join("10-bridge.conflist")));
        assert!(!conf.join("10-bridge.conf").exists());
        let list = read(&conf.join("10-bridge.conflist"));
        assert_eq!(list["cniVersion"], "0.4.0");
        assert_eq!(list["plugins"][0]["bridge"], "cni0");
        assert_eq!(list["plugins"][1]["type"], PLUGIN);
        assert!(with_entry(&json!({"name": "x"}), &e).is_err());
    }
}
