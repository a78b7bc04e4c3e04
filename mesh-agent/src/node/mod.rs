//! This host's kernel side: the eBPF capture programs and their maps, cgroup v2
//! discovery and start-up checks, pinned kernel state that outlives the agent,
//! sockets made inside pod network namespaces, and the kernel's verdict trace.

pub mod capture;
pub mod cgroup;
pub mod netns;
pub mod pins;
pub mod splice;
pub mod trace;
