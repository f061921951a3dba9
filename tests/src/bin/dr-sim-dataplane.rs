//! dr-sim-dataplane: the simulated data plane in front of moto (see
//! `dr_tests::dataplane`). Prints `listening on <addr>` once bound, logs to
//! stderr, stops every simulated machine on SIGTERM or SIGINT.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use dr_tests::dataplane::{Options, Server};

#[derive(Parser)]
#[command(name = "dr-sim-dataplane", about = "Simulated EC2 data plane: boots dr-agents on copies of AMI disks")]
struct Args {
    /// Address to listen on, loopback only (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// moto's URL, e.g. http://127.0.0.1:5000.
    #[arg(long)]
    moto: String,
    /// Work dir: images/<ami-id>, machines/<instance-id>/disk and logs.
    #[arg(long)]
    dir: PathBuf,
    /// Wait between RunInstances/StartInstances and the boot.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    boot_delay: Duration,
    /// Seconds the simulated replicatedctl takes to stop or start the app.
    #[arg(long, default_value_t = 0.5)]
    app_secs: f64,
    /// dr-agent binary (default: next to this executable).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// dr-sim-imds binary (default: next to this executable).
    #[arg(long)]
    imds_bin: Option<PathBuf>,
    /// Key each machine's IMDS signs its identity document with (when the
    /// file exists at the machine's boot).
    #[arg(long)]
    iid_key: Option<PathBuf>,
}

fn sibling(name: &str) -> PathBuf {
    std::env::current_exe().ok().and_then(|exe| exe.parent().map(|d| d.join(name))).unwrap_or_else(|| PathBuf::from(name))
}

// Current-thread: every child is forked by the main thread, so their
// PR_SET_PDEATHSIG fires only when this process ends.
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,aws=warn,hyper=warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false).init();
    let args = Args::parse();
    if !(args.app_secs.is_finite() && args.app_secs >= 0.0) {
        eprintln!("dr-sim-dataplane: --app-secs must be a number of seconds >= 0, not {}", args.app_secs);
        return std::process::ExitCode::FAILURE;
    }
    let opts = Options {
        moto_url: args.moto,
        dir: args.dir,
        boot_delay: args.boot_delay,
        app_secs: args.app_secs,
        agent_bin: args.agent_bin.unwrap_or_else(|| sibling("dr-agent")),
        imds_bin: args.imds_bin.unwrap_or_else(|| sibling("dr-sim-imds")),
        iid_key: args.iid_key,
    };
    let server = match Server::start(args.listen, opts).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dr-sim-dataplane: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {}", server.addr);
        let _ = out.flush();
    }
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    server.shutdown().await;
    std::process::ExitCode::SUCCESS
}
