//! `nodemesh-soak`: the soak at full size (see `nodemesh_testkit::soak`), run by
//! `cargo xtask soak`. Writes `soak.md` (a table) and `soak.svg` (a plot) and
//! fails on any leak or lost byte.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use nodemesh_testkit::Tools;
use nodemesh_testkit::soak::{SoakSettings, run};

#[derive(Parser)]
struct Cli {
    /// How long the load runs.
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Long-lived connections in all (half within a node, half across nodes).
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// New short connections per second.
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Where soak.md and soak.svg go.
    #[arg(long, default_value = "target/soak")]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let podtool = std::env::var_os("NODEMESH_PODTOOL_BIN")
        .map(PathBuf::from)
        .context("NODEMESH_PODTOOL_BIN is not set: run the soak with `cargo xtask soak`")?;
    let settings = SoakSettings {
        duration: Duration::from_secs_f64(cli.minutes * 60.0),
        connections: cli.connections,
        rate: cli.rate,
    };
    eprintln!(
        "soak: {} long-lived connections, {} new/s, {} minutes",
        settings.connections, settings.rate, cli.minutes
    );
    let report = run(Tools::new(podtool)?, &settings)?;
    // A row a minute in a 10-minute run, every 5 s in a short one.
    let every = (settings.duration.as_secs_f64() / 10.0).max(5.0);
    report.write(&settings, &cli.out, every)?;
    print!("{}", report.markdown(&settings, every));
    eprintln!("wrote {}/soak.md and soak.svg", cli.out.display());
    anyhow::ensure!(report.passed(), "the soak found leaks or lost bytes");
    Ok(())
}
