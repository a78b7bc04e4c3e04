//! The `nodemesh-cni` plugin, chained after the pod network's plugins (CNI spec
//! 1.0: ADD, DEL, CHECK and VERSION). What it decides is a pure function of its
//! environment, its config and the agent's reply ([`run`]); asking the agent is
//! the one piece of I/O ([`ask_agent`]).
//!
//! - ADD passes the previous plugin's result through once the agent has enrolled
//!   the pod, or has said that the pod is not meshed. If the agent cannot be
//!   reached or refuses, ADD fails with error 11 ("try again later"), so the
//!   runtime retries and the pod never starts outside the mesh.
//! - DEL asks the agent to unenroll the pod and succeeds when there is nothing
//!   left to do, the agent being gone included.
//! - A sandbox that is not a Kubernetes pod (no `K8S_POD_NAME`) is passed through.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::cni::{Command, DEFAULT_SOCKET, Reply, Request};

/// The CNI spec versions whose config and results the plugin understands.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// How long ADD waits for the agent unless the config says otherwise. The
/// kubelet's own timeout for a sandbox is minutes; enrolling takes milliseconds
/// unless the agent is still starting.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// CNI error codes (spec 1.0, "Error").
mod code {
    /// The config's `cniVersion` is not supported.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Environment variables are missing or malformed.
    pub const INVALID_ENVIRONMENT: u32 = 4;
    /// The config on stdin could not be decoded.
    pub const DECODE_FAILURE: u32 = 6;
    /// The config is well-formed but wrong.
    pub const INVALID_CONFIG: u32 = 7;
    /// A transient condition: the runtime should retry.
    pub const TRY_AGAIN_LATER: u32 = 11;
}

/// The plugin's config: the network's, with the previous plugin's result.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: String,
    /// The agent's socket (default [`DEFAULT_SOCKET`]).
    #[serde(default)]
    agent_socket: Option<String>,
    /// How long ADD waits for enrollment.
    #[serde(default)]
    timeout_seconds: Option<u64>,
    #[serde(default)]
    prev_result: Option<Value>,
}

/// What the plugin prints and how it exits.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The result or error JSON (empty for DEL and CHECK successes).
    pub stdout: String,
    /// 0 on success.
    pub exit_code: i32,
    /// A line for the runtime's log.
    pub log: Option<String>,
}

impl Outcome {
    fn ok(stdout: String) -> Self {
        Outcome {
            stdout,
            exit_code: 0,
            log: None,
        }
    }

    fn error(version: &str, code: u32, msg: &str, details: String) -> Self {
        Outcome {
            stdout: json!({"cniVersion": version, "code": code, "msg": msg, "details": details})
                .to_string(),
            exit_code: 1,
            log: Some(format!("nodemesh-cni: {msg}: {details}")),
        }
    }

    fn logged(mut self, line: String) -> Self {
        self.log = Some(line);
        self
    }
}

/// Runs one CNI command. `env` is the process environment (`CNI_*`), `stdin`
/// the network config, and `ask` carries a request to the agent.
pub fn run(
    env: &HashMap<String, String>,
    stdin: &str,
    ask: impl FnOnce(&Path, &Request, Duration) -> std::io::Result<Reply>,
) -> Outcome {
    let var = |name: &str| env.get(name).map(String::as_str).unwrap_or("");
    let command = var("CNI_COMMAND");
    if command == "VERSION" {
        return Outcome::ok(
            json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS}).to_string(),
        );
    }
    let conf: NetConf = match serde_json::from_str(stdin) {
        Ok(c) => c,
        Err(e) => {
            return Outcome::error(
                "1.0.0",
                code::DECODE_FAILURE,
                "cannot decode the network config",
                e.to_string(),
            );
        }
    };
    let version = conf.cni_version.as_str();
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Outcome::error(
            version,
            code::INCOMPATIBLE_VERSION,
            "unsupported cniVersion",
            format!("{version:?}; supported: {}", SUPPORTED_VERSIONS.join(", ")),
        );
    }
    let command = match command {
        "ADD" => Command::Add,
        "DEL" => Command::Del,
        "CHECK" => Command::Check,
        other => {
            return Outcome::error(
                version,
                code::INVALID_ENVIRONMENT,
                "unsupported CNI_COMMAND",
                format!("{other:?}"),
            );
        }
    };
    let args = parse_args(var("CNI_ARGS"));
    let pass_through = || match command {
        Command::Add => Outcome::ok(result(version, conf.prev_result.as_ref())),
        Command::Del | Command::Check => Outcome::ok(String::new()),
    };
    let (Some(namespace), Some(name)) = (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME"))
    else {
        // Not a Kubernetes pod: nothing for the mesh to do.
        return pass_through();
    };
    let netns = var("CNI_NETNS");
    if netns.is_empty() && command != Command::Del {
        return Outcome::error(
            version,
            code::INVALID_ENVIRONMENT,
            "CNI_NETNS is not set",
            format!("pod {namespace}/{name}"),
        );
    }
    let ips = match conf.prev_result.as_ref().map(result_ips).transpose() {
        Ok(ips) => ips.unwrap_or_default(),
        Err(e) => {
            return Outcome::error(version, code::INVALID_CONFIG, "cannot read prevResult", e);
        }
    };
    let timeout = conf
        .timeout_seconds
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TIMEOUT);
    let request = Request {
        command,
        container_id: var("CNI_CONTAINERID").to_owned(),
        netns: netns.to_owned(),
        pod_namespace: namespace.clone(),
        pod_name: name.clone(),
        pod_uid: args.get("K8S_POD_UID").cloned().unwrap_or_default(),
        ips,
        timeout_ms: timeout.as_millis() as u64,
    };
    let socket = conf.agent_socket.as_deref().unwrap_or(DEFAULT_SOCKET);
    let pod = format!("{namespace}/{name}");
    match (command, ask(Path::new(socket), &request, timeout)) {
        (_, Ok(Reply::Enrolled)) | (Command::Del, Ok(Reply::Removed)) => {
            pass_through().logged(format!("nodemesh-cni: {command:?} pod {pod}: done"))
        }
        (_, Ok(Reply::NotMeshed { reason })) => {
            pass_through().logged(format!("nodemesh-cni: pod {pod} is not meshed: {reason}"))
        }
        (_, Ok(Reply::Failed { message })) => Outcome::error(
            version,
            code::TRY_AGAIN_LATER,
            "the nodemesh agent did not enroll the pod",
            format!("pod {pod}: {message}"),
        ),
        (_, Ok(Reply::Removed)) => Outcome::error(
            version,
            code::TRY_AGAIN_LATER,
            "the nodemesh agent answered out of turn",
            format!("pod {pod}: {command:?} got \"removed\""),
        ),
        // The agent is gone: so is anything it had enrolled; it unenrolls pods it
        // finds deleted when it starts again.
        (Command::Del, Err(e)) => pass_through().logged(format!(
            "nodemesh-cni: DEL pod {pod}: agent at {socket} unreachable ({e}); nothing to undo"
        )),
        (_, Err(e)) => Outcome::error(
            version,
            code::TRY_AGAIN_LATER,
            "the nodemesh agent is unreachable; the pod cannot start outside the mesh",
            format!("pod {pod}: {socket}: {e}"),
        ),
    }
}

/// `CNI_ARGS`: `K=V` pairs separated by `;`.
fn parse_args(args: &str) -> HashMap<String, String> {
    args.split(';')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The result ADD prints: the previous plugin's, in the config's version.
fn result(version: &str, prev: Option<&Value>) -> String {
    let mut out = prev.cloned().unwrap_or_else(|| json!({}));
    if let Some(map) = out.as_object_mut() {
        map.insert("cniVersion".into(), json!(version));
    }
    out.to_string()
}

/// The pod's addresses in a result (`ips[].address`, in CIDR notation).
fn result_ips(prev: &Value) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    for (i, entry) in prev["ips"].as_array().into_iter().flatten().enumerate() {
        let cidr = entry["address"]
            .as_str()
            .ok_or_else(|| format!("ips[{i}].address is missing"))?;
        let ip = cidr.split('/').next().unwrap_or_default();
        out.push(
            ip.parse()
                .map_err(|_| format!("ips[{i}].address {cidr:?} is not an address"))?,
        );
    }
    Ok(out)
}

/// Sends `request` to the agent at `socket` and waits up to `timeout` for its reply.
pub fn ask_agent(socket: &Path, request: &Request, timeout: Duration) -> std::io::Result<Reply> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    if reply.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the agent closed the connection without a reply",
        ));
    }
    serde_json::from_str(&reply).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(command: &str, args: &str) -> HashMap<String, String> {
        [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "c0ffee"),
            ("CNI_NETNS", "/var/run/netns/cni-1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
            ("CNI_ARGS", args),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    const POD_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=1b4e28ba-2fa1";

    fn conf(version: &str) -> String {
        json!({
            "cniVersion": version, "name": "k8s-pod-network", "type": "nodemesh-cni",
            "agentSocket": "/run/test.sock", "timeoutSeconds": 7,
            "prevResult": {"cniVersion": version,
                "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-1"}],
                "ips": [{"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 0},
                        {"address": "fd00::5/64", "interface": 0}]}
        })
        .to_string()
    }

    fn never(_: &Path, _: &Request, _: Duration) -> std::io::Result<Reply> {
        panic!("the agent must not be asked")
    }

    #[test]
    fn add_asks_the_agent_with_the_pod_and_passes_the_result_through() {
        let mut asked = None;
        let out = run(
            &env("ADD", POD_ARGS),
            &conf("1.0.0"),
            |socket, req, timeout| {
                asked = Some((socket.to_owned(), req.clone(), timeout));
                Ok(Reply::Enrolled)
            },
        );
        assert_eq!(out.exit_code, 0, "{out:?}");
        let printed: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(printed["ips"][0]["address"], "10.1.0.5/24");
        assert_eq!(printed["cniVersion"], "1.0.0");
        let (socket, req, timeout) = asked.unwrap();
        assert_eq!(socket, Path::new("/run/test.sock"));
        assert_eq!(timeout, Duration::from_secs(7));
        assert_eq!(
            req,
            Request {
                command: Command::Add,
                container_id: "c0ffee".into(),
                netns: "/var/run/netns/cni-1".into(),
                pod_namespace: "shop".into(),
                pod_name: "web-0".into(),
                pod_uid: "1b4e28ba-2fa1".into(),
                ips: vec!["10.1.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
                timeout_ms: 7000,
            }
        );
    }

    #[test]
    fn outcomes_table() {
        let unreachable = || {
            Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no socket",
            ))
        };
        type Ask = fn() -> std::io::Result<Reply>;
        let cases: [(&str, Ask, i32, Option<u32>); 8] = [
            (
                "ADD",
                || {
                    Ok(Reply::NotMeshed {
                        reason: "namespace shop is not opted in".into(),
                    })
                },
                0,
                None,
            ),
            (
                "ADD",
                || {
                    Ok(Reply::Failed {
                        message: "cgroup not found".into(),
                    })
                },
                1,
                Some(11),
            ),
            ("ADD", unreachable, 1, Some(11)),
            ("DEL", || Ok(Reply::Removed), 0, None),
            ("DEL", unreachable, 0, None),
            ("CHECK", || Ok(Reply::Enrolled), 0, None),
            (
                "CHECK",
                || {
                    Ok(Reply::Failed {
                        message: "not enrolled".into(),
                    })
                },
                1,
                Some(11),
            ),
            ("CHECK", unreachable, 1, Some(11)),
        ];
        for (command, reply, exit, code) in cases {
            let out = run(&env(command, POD_ARGS), &conf("1.0.0"), |_, _, _| reply());
            assert_eq!(out.exit_code, exit, "{command}: {out:?}");
            let printed: Value = serde_json::from_str(&out.stdout).unwrap_or(Value::Null);
            assert_eq!(
                printed["code"].as_u64().map(|c| c as u32),
                code,
                "{command}: {out:?}"
            );
            if code.is_some() {
                assert!(printed["msg"].as_str().is_some_and(|m| !m.is_empty()));
                assert!(printed["details"].as_str().unwrap().contains("shop/web-0"));
            }
        }
    }

    #[test]
    fn sandboxes_that_are_not_pods_and_version_queries_never_reach_the_agent() {
        let out = run(&env("ADD", "IgnoreUnknown=1"), &conf("0.4.0"), never);
        assert_eq!(out.exit_code, 0);
        let printed: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(printed["cniVersion"], "0.4.0");
        assert_eq!(printed["ips"][1]["address"], "fd00::5/64");

        let out = run(&env("VERSION", ""), "", never);
        let printed: Value = serde_json::from_str(&out.stdout).unwrap();
        assert!(
            printed["supportedVersions"]
                .as_array()
                .unwrap()
                .contains(&json!("1.0.0"))
        );
    }

    #[test]
    fn bad_input_gets_the_spec_error_codes() {
        let cases = [
            (env("ADD", POD_ARGS), "{not json".to_owned(), 6),
            (env("ADD", POD_ARGS), conf("9.9.9"), 1),
            (env("FROB", POD_ARGS), conf("1.0.0"), 4),
            (
                {
                    let mut e = env("ADD", POD_ARGS);
                    e.remove("CNI_NETNS");
                    e
                },
                conf("1.0.0"),
                4,
            ),
            (
                env("ADD", POD_ARGS),
                json!({"cniVersion": "1.0.0", "prevResult": {"ips": [{"address": "ten"}]}})
                    .to_string(),
                7,
            ),
        ];
        for (env, stdin, code) in cases {
            let out = run(&env, &stdin, never);
            assert_eq!(out.exit_code, 1, "{out:?}");
            let printed: Value = serde_json::from_str(&out.stdout).unwrap();
            assert_eq!(printed["code"], code, "{out:?}");
        }
    }
}
