//! In-pod sockets: a helper thread lives inside a pod's network namespace and
//! creates sockets there on request. Sockets keep the namespace they were created
//! in, so once made they are served by the ordinary tokio runtime.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex, mpsc};

use nix::sched::{CloneFlags, setns};
use socket2::Domain;
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// Upstream sockets kept ready per address family once a namespace has made its
/// first outbound connection; enough to absorb a burst between refills.
const SPARE_SOCKETS: usize = 8;

/// A handle on one pod network namespace; its helper thread exits when the last handle drops.
pub struct NetnsHandle {
    jobs: mpsc::Sender<Job>,
    /// Ready TCP sockets made in the namespace, so a new connection does not wait
    /// for a round trip to the helper thread. Index 0: IPv4, 1: IPv6.
    spare: Arc<[Mutex<SparePool>; 2]>,
    /// The kernel's netns cookie, as the eBPF programs see it.
    pub cookie: u64,
    /// Inode of the namespace file; identifies the namespace across opens.
    pub inode: u64,
}

impl NetnsHandle {
    /// Starts a helper thread inside the namespace at `ns_file` (`/proc/PID/ns/net` or a bind mount).
    pub async fn open(ns_file: &Path, thread_name: &str) -> io::Result<Self> {
        let ns = File::open(ns_file)?;
        let inode = ns.metadata()?.ino();
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = oneshot::channel::<io::Result<()>>();
        std::thread::Builder::new()
            .name(format!("netns-{thread_name}"))
            .spawn(move || {
                // Only this thread moves; the rest of the agent stays in the host namespace.
                let entered = setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from);
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if ok {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                }
            })?;
        ready_rx
            .await
            .map_err(|_| io::Error::other("netns helper thread died"))?
            .map_err(|e| io::Error::new(e.kind(), format!("entering network namespace: {e}")))?;
        let mut handle = NetnsHandle {
            jobs,
            spare: Arc::default(),
            cookie: 0,
            inode,
        };
        handle.cookie = handle
            .run(|| {
                let probe =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                netns_cookie(&probe)
            })
            .await??;
        Ok(handle)
    }

    /// A non-blocking TCP socket (with `TCP_NODELAY`) that lives in this namespace.
    /// Usually taken from the spare pool; the pool is topped up in the background.
    pub async fn tcp_socket(&self, domain: Domain) -> io::Result<std::net::TcpStream> {
        let slot = usize::from(domain == Domain::IPV6);
        let (taken, refill) = {
            let mut pool = self.spare[slot].lock().expect("spare socket lock");
            let taken = pool.sockets.pop();
            let refill = !pool.refilling && pool.sockets.len() < SPARE_SOCKETS / 2;
            pool.refilling |= refill;
            (taken, refill)
        };
        if refill {
            let spare = self.spare.clone();
            let job: Job = Box::new(move || {
                let mut made = Vec::with_capacity(SPARE_SOCKETS);
                for _ in 0..SPARE_SOCKETS {
                    match new_tcp_socket(domain) {
                        Ok(s) => made.push(s),
                        Err(e) => {
                            tracing::debug!(error = %e, "could not pre-create a socket");
                            break;
                        }
                    }
                }
                let mut pool = spare[slot].lock().expect("spare socket lock");
                let room = SPARE_SOCKETS.saturating_sub(pool.sockets.len());
                pool.sockets.extend(made.into_iter().take(room));
                pool.refilling = false;
            });
            if self.jobs.send(job).is_err() {
                self.spare[slot]
                    .lock()
                    .expect("spare socket lock")
                    .refilling = false;
            }
        }
        match taken {
            Some(socket) => Ok(socket),
            None => self.run(move || new_tcp_socket(domain)).await?,
        }
    }

    /// Runs `job` on the helper thread, inside the namespace.
    pub async fn run<T, F>(&self, job: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(job());
            }))
            .map_err(|_| io::Error::other("netns helper thread has exited"))?;
        rx.await
            .map_err(|_| io::Error::other("netns helper thread dropped the job"))
    }
}

#[derive(Default)]
struct SparePool {
    sockets: Vec<std::net::TcpStream>,
    refilling: bool,
}

fn new_tcp_socket(domain: Domain) -> io::Result<std::net::TcpStream> {
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    s.set_nonblocking(true)?;
    s.set_tcp_nodelay(true)?;
    Ok(s.into())
}

/// `SO_NETNS_COOKIE` (Linux 5.14): the same value `bpf_get_netns_cookie` returns.
pub fn netns_cookie(socket: &impl AsFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer and length for a u64 option.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
