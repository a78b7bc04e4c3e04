//! In-pod sockets: a helper thread lives inside a pod's network namespace and
//! creates sockets there on request. Sockets keep the namespace they were created
//! in, so once made they are served by the ordinary tokio runtime.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::mpsc;

use nix::sched::{CloneFlags, setns};
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// A handle on one pod network namespace; its helper thread exits when the last handle drops.
pub struct NetnsHandle {
    jobs: mpsc::Sender<Job>,
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
