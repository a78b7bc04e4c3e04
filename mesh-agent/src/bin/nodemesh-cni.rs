//! `nodemesh-cni`: the CNI plugin the container runtime chains after the pod
//! network's, so that a meshed pod's containers start only once the node agent
//! has enrolled it. See `mesh_agent::cni::plugin`.

use std::collections::HashMap;
use std::io::Read;
use std::process::ExitCode;

use mesh_agent::cni::plugin;

fn main() -> ExitCode {
    let env: HashMap<String, String> = std::env::vars().collect();
    let mut stdin = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut stdin) {
        eprintln!("nodemesh-cni: reading the network config from stdin: {e}");
    }
    let out = plugin::run(&env, &stdin, plugin::ask_agent);
    if let Some(line) = &out.log {
        eprintln!("{line}");
    }
    print!("{}", out.stdout);
    ExitCode::from(u8::try_from(out.exit_code).unwrap_or(1))
}
