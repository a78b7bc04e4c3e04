//! The sidecar-style baseline: one HAProxy next to each pod, mutual TLS between
//! them, the way a classic sidecar mesh carries a request (client app → local
//! proxy → TLS → remote proxy → server app). HAProxy runs in TCP mode, which is
//! the cheapest thing a sidecar can do and the same layer as the node agent.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use nodemesh_testkit::{Pod, Process, run, wait_until};

/// Plaintext ports the client-side proxy listens on, on the client pod's loopback.
pub const HTTP_PORT: u16 = 15101;
/// See [`HTTP_PORT`]; this one leads to the bulk sink.
pub const BULK_PORT: u16 = 15102;
const TLS_HTTP_PORT: u16 = 15443;
const TLS_BULK_PORT: u16 = 15444;
const SERVER_NAME: &str = "bench-server";

/// Both proxies; killed on drop.
pub struct SidecarPair {
    client_proxy: Process,
    server_proxy: Process,
    _dir: tempfile::TempDir,
}

impl SidecarPair {
    /// Starts the pair: `client` reaches `server`'s HTTP app and sink through them.
    pub fn start(
        client: &Pod,
        server: &Pod,
        http_port: u16,
        sink_port: u16,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let pki = Pki::create(dir.path())?;
        let server_cfg = dir.path().join("server.cfg");
        std::fs::write(
            &server_cfg,
            format!(
                "{defaults}\
                 frontend in_http\n  bind {ip}:{TLS_HTTP_PORT} ssl crt {cert} ca-file {ca} verify required\n  default_backend app_http\n\
                 backend app_http\n  server app {ip}:{http_port}\n\
                 frontend in_bulk\n  bind {ip}:{TLS_BULK_PORT} ssl crt {cert} ca-file {ca} verify required\n  default_backend app_bulk\n\
                 backend app_bulk\n  server app {ip}:{sink_port}\n",
                defaults = DEFAULTS,
                ip = server.ip,
                cert = pki.server.display(),
                ca = pki.ca.display(),
            ),
        )?;
        let client_cfg = dir.path().join("client.cfg");
        let upstream = |port: u16| {
            format!(
                "  server s {ip}:{port} ssl verify required ca-file {ca} crt {cert} verifyhost {SERVER_NAME} sni str({SERVER_NAME})\n",
                ip = server.ip,
                ca = pki.ca.display(),
                cert = pki.client.display(),
            )
        };
        std::fs::write(
            &client_cfg,
            format!(
                "{DEFAULTS}\
                 frontend out_http\n  bind 127.0.0.1:{HTTP_PORT}\n  default_backend up_http\n\
                 backend up_http\n{}\
                 frontend out_bulk\n  bind 127.0.0.1:{BULK_PORT}\n  default_backend up_bulk\n\
                 backend up_bulk\n{}",
                upstream(TLS_HTTP_PORT),
                upstream(TLS_BULK_PORT),
            ),
        )?;
        let server_proxy = start_haproxy(
            server,
            &server_cfg,
            [TLS_HTTP_PORT, TLS_BULK_PORT],
            "server-side HAProxy",
        )?;
        let client_proxy = start_haproxy(
            client,
            &client_cfg,
            [HTTP_PORT, BULK_PORT],
            "client-side HAProxy",
        )?;
        Ok(SidecarPair {
            client_proxy,
            server_proxy,
            _dir: dir,
        })
    }

    /// Process ids of both proxies (for CPU and memory accounting).
    pub fn pids(&self) -> [u32; 2] {
        [self.client_proxy.pid(), self.server_proxy.pid()]
    }
}

/// One worker thread each, as a sidecar with a one-CPU limit would run.
const DEFAULTS: &str = "global\n  nbthread 1\n  maxconn 8000\n\
defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n";

fn start_haproxy(pod: &Pod, config: &Path, ports: [u16; 2], name: &str) -> anyhow::Result<Process> {
    let mut cmd = pod.command(Path::new("/usr/sbin/haproxy"))?;
    cmd.arg("-db").arg("-f").arg(config);
    let process = Process::spawn(&mut cmd, name)?;
    // Ready when both of its listeners are bound inside the pod.
    let mut listening = pod.command(Path::new("/usr/bin/ss"))?;
    listening.arg("-Htln");
    wait_until(name, Duration::from_secs(10), || {
        let out = run(&mut listening)?;
        Ok(ports.iter().all(|p| out.contains(&format!(":{p} "))))
    })
    .with_context(|| format!("{name} did not start"))?;
    Ok(process)
}

/// A throwaway CA with a server and a client certificate (ECDSA P-256), made
/// with the openssl CLI as a sidecar mesh's CA would issue them.
struct Pki {
    ca: PathBuf,
    server: PathBuf,
    client: PathBuf,
}

impl Pki {
    fn create(dir: &Path) -> anyhow::Result<Self> {
        let openssl = |args: &[&str]| run(Command::new("openssl").current_dir(dir).args(args));
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.crt",
                    "-subj",
                    "/CN=bench-ca",
                    "-days",
                    "2",
                ],
            ]
            .concat(),
        )?;
        for (name, san) in [
            ("server", format!("DNS:{SERVER_NAME}")),
            ("client", "DNS:bench-client".to_owned()),
        ] {
            let (key, csr, crt, ext) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.crt"),
                format!("{name}.ext"),
            );
            std::fs::write(dir.join(&ext), format!("subjectAltName={san}\n"))?;
            openssl(
                &[
                    &["req"][..],
                    &ec,
                    &[
                        "-keyout",
                        &key,
                        "-out",
                        &csr,
                        "-subj",
                        &format!("/CN={name}"),
                    ],
                ]
                .concat(),
            )?;
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &ext,
            ])?;
            let pem = [
                std::fs::read(dir.join(&crt))?,
                std::fs::read(dir.join(&key))?,
            ]
            .concat();
            std::fs::write(dir.join(format!("{name}.pem")), pem)?;
        }
        Ok(Pki {
            ca: dir.join("ca.crt"),
            server: dir.join("server.pem"),
            client: dir.join("client.pem"),
        })
    }
}
