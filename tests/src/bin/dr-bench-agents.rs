//! N agent streams against one controller with its default config: time to
//! all-connected and primary, controller CPU and RSS at steady state, time
//! to notice silent agents, time for all to return after a SIGKILL restart.
//! With `--store-url` (an empty PostgreSQL database) two replicas share it:
//! the last phase SIGKILLs the leader and measures the standby's takeover
//! (default lease) and the agents re-homed on it, then a SIGTERM handover
//! back to the first replica.
//!
//!   DR_MOTO_SERVER=$(bash tests/ensure-moto.sh) target/debug/dr-bench-agents            # 10,000 agents
//!   DR_MOTO_SERVER=... target/debug/dr-bench-agents --agents 1000 --controller target/release/dr-controller
//!   DR_MOTO_SERVER=... target/debug/dr-bench-agents --store-url postgres://postgres@127.0.0.1:5432/bench
//!
//! The agents are in-process tasks speaking the real wire (one TLS
//! connection each, with the site's own certificate); the controller is the
//! real process. Everything runs on 127.0.0.1. Each phase has a deadline and
//! reports what it reached; the exit status is 1 when a target is missed.
//! Raises this process's RLIMIT_NOFILE (the controller inherits it, as the
//! systemd unit's LimitNOFILE=65536 does) and net.core.somaxconn to the
//! controller's default listen_backlog, and says so.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use dr_proto::backoff::Backoff;
use dr_proto::pb;
use dr_proto::pb::agent_message::Msg as AgentMsg;
use dr_proto::pb::controller_message::Msg as ControllerMsg;
use dr_tests::{Moto, Pki, REGION, TRUST_DOMAIN, free_port};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use dr_tests::bench::{
    RestoreSomaxconn, cpu_seconds, default_controller, error_chain, profile_of, raise_limits, raise_somaxconn, rss_mib, spawn_controller,
    wait_port,
};
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);
const RECONNECT: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
/// Targets of issue 7, section 6.
const TARGET_SILENT: Duration = Duration::from_secs(20);
const TARGET_RESTART: Duration = Duration::from_secs(30);
const TARGET_CPU: f64 = 10.0;
/// Targets of issue 23: a standby leads within 20 s of the leader's SIGKILL
/// (default lease), every agent is back within 30 s of that, and a SIGTERM
/// hands over in under 2 s.
const TARGET_TAKEOVER: Duration = Duration::from_secs(20);
const TARGET_REHOME: Duration = Duration::from_secs(30);
const TARGET_HANDOVER: Duration = Duration::from_secs(2);

fn file_size(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Waits until `marker` appears in `path` after byte `from`; how long that took.
async fn wait_log(path: &std::path::Path, from: u64, marker: &str, timeout: Duration) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        let bytes = std::fs::read(path).unwrap_or_default();
        if String::from_utf8_lossy(bytes.get(from as usize..).unwrap_or_default()).contains(marker) {
            return Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[derive(Parser)]
#[command(about = "N agent streams against one dr-controller (default config)")]
struct Args {
    /// Number of agents (one site and one moto instance each).
    #[arg(long, default_value_t = 10_000)]
    agents: usize,
    /// The dr-controller binary (default: target/release/dr-controller if
    /// built, else the debug one next to this binary).
    #[arg(long)]
    controller: Option<PathBuf>,
    /// Share of the agents that stop heartbeating (stream kept open).
    #[arg(long, default_value_t = 0.1)]
    silent_share: f64,
    /// Deadline of each phase, in seconds.
    #[arg(long, default_value_t = 120)]
    phase_timeout: u64,
    /// Steady-state window for the controller's CPU, in seconds.
    #[arg(long, default_value_t = 30)]
    cpu_window: u64,
    /// Keep the work directory (controller and moto logs, store) and print it.
    #[arg(long)]
    keep: bool,
    /// An empty PostgreSQL database: two controller replicas on it, and the
    /// restart phase becomes a takeover by the standby.
    #[arg(long)]
    store_url: Option<String>,
}

const DOWN: u8 = 0;
const PENDING: u8 = 1;
const PRIMARY: u8 = 2;
const OTHER: u8 = 3;

/// One fake agent's observable state.
struct Slot {
    site: String,
    instance: String,
    private_ip: String,
    tls: tonic::transport::ClientTlsConfig,
    state: AtomicU8,
    /// Streams that ended (any reason).
    ended: AtomicU32,
    /// Send nothing on the stream while set.
    silent: AtomicBool,
    /// Do not reconnect while set (a silent agent whose stream was closed).
    hold: AtomicBool,
    /// Last message sent, ms since the bench's epoch.
    last_sent_ms: AtomicU64,
    /// When the stream of a silent agent ended, ms since the epoch (0: open).
    silent_closed_ms: AtomicU64,
    /// Which of `Shared::urls` the next connection goes to.
    target: AtomicUsize,
    /// 1 + the replica found down on the last attempt (0: none).
    unreachable: AtomicUsize,
    /// Replicas found down in a row since the last full round.
    rotated: AtomicUsize,
    /// The pause before the next attempt that the replicas' answers call
    /// for, instead of the backoff (ms; 0: none).
    pause_ms: AtomicU64,
}

struct Shared {
    /// The controller replicas (one without `--store-url`).
    urls: Vec<String>,
    epoch: Instant,
    slots: Vec<Slot>,
    go: tokio::sync::watch::Receiver<bool>,
    released: Notify,
    welcomed: [AtomicUsize; 4],
    role_changes: AtomicUsize,
    connect_errors: AtomicUsize,
    last_error: std::sync::Mutex<String>,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
    fn counts(&self) -> [usize; 4] {
        let mut c = [0; 4];
        for s in &self.slots {
            c[s.state.load(Ordering::Relaxed) as usize] += 1;
        }
        c
    }
    fn welcomed(&self) -> [usize; 4] {
        [0, 1, 2, 3].map(|i| self.welcomed[i].load(Ordering::Relaxed))
    }
}

fn role_code(role: &str) -> u8 {
    match role {
        "primary" => PRIMARY,
        "pending" => PENDING,
        _ => OTHER,
    }
}

/// One session, as dr-agent runs it: connect, Hello, Welcome, heartbeats at
/// the Welcome's interval until the stream ends.
/// As dr-agent does (`agent/src/daemon/session.rs`): a standby's answer
/// names the leader: go there, or, when that leader was just found down,
/// ask the standby again when the lease ends; a replica that cannot be
/// reached makes way for the next, at once until all failed in a row.
fn retarget(shared: &Shared, slot: &Slot, status: Option<&tonic::Status>) {
    let n = shared.urls.len();
    if n < 2 {
        return;
    }
    let meta = |key: &str| status.and_then(|s| s.metadata().get(key)).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let leader = meta(dr_proto::LEADER_METADATA).and_then(|l| shared.urls.iter().position(|u| u.ends_with(&l)));
    let retry_ms: u64 = meta(dr_proto::RETRY_AFTER_METADATA).and_then(|v| v.parse().ok()).unwrap_or(0);
    match leader {
        Some(i) if slot.unreachable.load(Ordering::Relaxed) == i + 1 => {
            slot.unreachable.store(0, Ordering::Relaxed);
            slot.pause_ms.store(retry_ms.clamp(500, 120_000) + rand::random_range(0..=2000), Ordering::Relaxed);
        }
        Some(i) => {
            slot.target.store(i, Ordering::Relaxed);
            slot.pause_ms.store(rand::random_range(50..=1000), Ordering::Relaxed);
        }
        None if status.is_none_or(|s| s.code() == tonic::Code::Unavailable) => {
            let at = slot.target.load(Ordering::Relaxed);
            slot.unreachable.store(at + 1, Ordering::Relaxed);
            slot.target.store((at + 1) % n, Ordering::Relaxed);
            if slot.rotated.fetch_add(1, Ordering::Relaxed) + 1 < n {
                slot.pause_ms.store(rand::random_range(50..=1000), Ordering::Relaxed);
            } else {
                slot.rotated.store(0, Ordering::Relaxed);
            }
        }
        None => {}
    }
}

async fn session(shared: &Shared, slot: &Slot, backoff: &mut Backoff) -> Result<(), String> {
    let url = shared.urls[slot.target.load(Ordering::Relaxed) % shared.urls.len()].clone();
    let endpoint = tonic::transport::Endpoint::from_shared(url)
        .map_err(|e| e.to_string())?
        .tls_config(slot.tls.clone())
        .map_err(|e| e.to_string())?
        .connect_timeout(CONNECT_TIMEOUT);
    // As dr-agent connects: TCP_USER_TIMEOUT, no HTTP/2 pings.
    let connector = dr_proto::transport::Connector { user_timeout: Duration::from_secs(30) };
    let channel = match tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(1), endpoint.connect_with_connector(connector)).await {
        Err(_) => {
            retarget(shared, slot, None);
            return Err("connect: timed out".into());
        }
        Ok(Err(e)) => {
            retarget(shared, slot, None);
            return Err(format!("connect: {}", error_chain(&e)));
        }
        Ok(Ok(c)) => c,
    };
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(64);
    let hello = pb::Hello {
        site_id: slot.site.clone(),
        facts: Some(pb::InstanceFacts {
            instance_id: slot.instance.clone(),
            private_ip: slot.private_ip.clone(),
            public_ip: String::new(),
            boot_id: format!("bench-{}", slot.site),
            os_family: "debian".into(),
            app_state: "started".into(),
        }),
        agent_version: "bench".into(),
        proof: None,
    };
    tx.send(pb::AgentMessage { msg: Some(AgentMsg::Hello(hello)) }).await.map_err(|_| "Hello: stream closed")?;
    slot.last_sent_ms.store(shared.now_ms(), Ordering::Relaxed);
    let response = tokio::time::timeout(WELCOME_TIMEOUT, client.session(ReceiverStream::new(rx)))
        .await
        .map_err(|_| "stream: timed out".to_owned())?
        .map_err(|s| {
            retarget(shared, slot, Some(&s));
            format!("stream: {:?} {}", s.code(), s.message())
        })?;
    let mut inbound = response.into_inner();
    let first = tokio::time::timeout(WELCOME_TIMEOUT, inbound.message())
        .await
        .map_err(|_| "Welcome: timed out".to_owned())?
        .map_err(|s| {
            retarget(shared, slot, Some(&s));
            format!("Welcome: {:?} {}", s.code(), s.message())
        })?
        .ok_or("ended before the Welcome")?;
    let Some(ControllerMsg::Welcome(w)) = first.msg else { return Err("first message is not a Welcome".into()) };
    backoff.reset();
    slot.unreachable.store(0, Ordering::Relaxed);
    slot.rotated.store(0, Ordering::Relaxed);
    let code = role_code(&w.role);
    shared.welcomed[code as usize].fetch_add(1, Ordering::Relaxed);
    slot.state.store(code, Ordering::Relaxed);
    let every = Duration::from_millis(u64::from(w.heartbeat_interval_ms).clamp(1000, 300_000));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0;
    loop {
        tokio::select! {
            m = inbound.message() => match m {
                Ok(None) => {
                    retarget(shared, slot, None);
                    return Ok(());
                }
                Err(s) => {
                    retarget(shared, slot, Some(&s));
                    return Err(format!("stream: {:?} {}", s.code(), s.message()));
                }
                Ok(Some(pb::ControllerMessage { msg: Some(ControllerMsg::RoleChange(r)) })) => {
                    shared.role_changes.fetch_add(1, Ordering::Relaxed);
                    slot.state.store(role_code(&r.role), Ordering::Relaxed);
                }
                Ok(Some(_)) => {}
            },
            _ = ticker.tick() => {
                if slot.silent.load(Ordering::Relaxed) {
                    continue;
                }
                seq += 1;
                let hb = pb::Heartbeat { seq, app_state: "started".into(), renewal_error: String::new() };
                if tx.try_send(pb::AgentMessage { msg: Some(AgentMsg::Heartbeat(hb)) }).is_ok() {
                    slot.last_sent_ms.store(shared.now_ms(), Ordering::Relaxed);
                }
            }
        }
    }
}

/// An agent: sessions forever, capped exponential backoff with full jitter
/// between them (initial 200 ms, max 10 s), as dr-agent does.
async fn agent(shared: Arc<Shared>, i: usize) {
    let _ = shared.go.clone().wait_for(|go| *go).await;
    let slot = &shared.slots[i];
    let mut backoff = RECONNECT;
    loop {
        let result = session(&shared, slot, &mut backoff).await;
        let was_up = slot.state.swap(DOWN, Ordering::Relaxed) != DOWN;
        if was_up {
            slot.ended.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = result {
            shared.connect_errors.fetch_add(1, Ordering::Relaxed);
            *shared.last_error.lock().expect("lock") = e;
        }
        if was_up && slot.silent.load(Ordering::Relaxed) {
            slot.silent_closed_ms.store(shared.now_ms().max(1), Ordering::Relaxed);
        }
        while slot.hold.load(Ordering::Relaxed) {
            let released = shared.released.notified();
            if !slot.hold.load(Ordering::Relaxed) {
                break;
            }
            released.await;
        }
        match slot.pause_ms.swap(0, Ordering::Relaxed) {
            0 => tokio::time::sleep(backoff.next_delay()).await,
            ms => tokio::time::sleep(Duration::from_millis(ms)).await,
        }
    }
}

/// Polls until every agent is connected and primary, or the deadline.
/// Returns (time to all connected, time to all primary).
async fn wait_all_primary(shared: &Shared, since: Instant, deadline: Duration, label: &str) -> (Option<Duration>, Option<Duration>) {
    let n = shared.slots.len();
    let (mut connected_at, mut last_print) = (None, Instant::now());
    loop {
        let [down, pending, primary, other] = shared.counts();
        if connected_at.is_none() && down == 0 {
            connected_at = Some(since.elapsed());
        }
        if primary == n {
            return (connected_at, Some(since.elapsed()));
        }
        if since.elapsed() > deadline {
            println!("  {label}: DEADLINE {deadline:?} reached: {primary} primary, {pending} pending, {other} other, {down} not connected");
            return (connected_at, None);
        }
        if last_print.elapsed() > Duration::from_secs(10) {
            println!(
                "  {label} +{:.0}s: {} connected ({primary} primary, {pending} pending, {other} other), {down} not; last error: {}",
                since.elapsed().as_secs_f64(),
                n - down,
                shared.last_error.lock().expect("lock")
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "not reached".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()))
}

fn pct(part: usize, whole: usize) -> f64 {
    100.0 * part as f64 / whole.max(1) as f64
}

fn welcome_line(before: [usize; 4], after: [usize; 4]) -> String {
    let d = [0, 1, 2, 3].map(|i| after[i] - before[i]);
    let total: usize = d.iter().sum();
    format!(
        "{total} Welcomes: {:.1} % primary, {:.1} % pending, {:.1} % other",
        pct(d[PRIMARY as usize], total),
        pct(d[PENDING as usize], total),
        pct(d[OTHER as usize], total)
    )
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let n = args.agents;
    assert!(n > 0 && n <= 99_999, "--agents must be between 1 and 99999 (site ids are s00001..s99999)");
    assert!((0.0..=1.0).contains(&args.silent_share), "--silent-share must be between 0 and 1");
    let deadline = Duration::from_secs(args.phase_timeout);
    dr_proto::tls::install_crypto_provider();
    let controller_bin = args.controller.clone().unwrap_or_else(default_controller);
    assert!(controller_bin.exists(), "{} does not exist", controller_bin.display());
    println!("dr-bench-agents: {n} agents, silent share {}", args.silent_share);
    println!("controller: {} [{}]", controller_bin.display(), profile_of(&controller_bin));
    raise_limits();
    let _somaxconn = RestoreSomaxconn(raise_somaxconn());

    let dir = tempfile::tempdir().expect("tempdir");
    // 1. moto and N instances.
    let t = Instant::now();
    let moto = Moto::start(dir.path());
    let ec2 = moto.client().await;
    let images = ec2.describe_images().owners("amazon").send().await.expect("moto lists its stock AMIs");
    let ami = images.images().first().and_then(|i| i.image_id()).expect("moto has a stock AMI").to_owned();
    let mut instances: Vec<(String, String)> = Vec::with_capacity(n);
    while instances.len() < n {
        let batch = (n - instances.len()).min(500) as i32;
        let out = ec2.run_instances().image_id(&ami).min_count(batch).max_count(batch).send().await.expect("RunInstances");
        for i in out.instances() {
            instances.push((i.instance_id().expect("id").to_owned(), i.private_ip_address().expect("private ip").to_owned()));
        }
    }
    println!("setup: moto and {n} instances in {:.1} s", t.elapsed().as_secs_f64());
    // Counts EC2 calls by Action on their way to moto (throttles nothing).
    let proxy = dr_tests::throttle::start(&moto.url, 0.0, 1).await;

    // 2. PKI: CA, controller certificate, one certificate per site.
    let t = Instant::now();
    let pki = Pki::new(dir.path());
    let sites: Vec<String> = (1..=n).map(|i| format!("s{i:05}")).collect();
    let mut slots = Vec::with_capacity(n);
    for (site, (instance, private_ip)) in sites.iter().zip(&instances) {
        let (cert, key) = pki.site(site);
        let files = dr_proto::tls::TlsFiles { ca: pki.ca(), cert, key };
        let tls = dr_proto::tls::client_config(&files, "127.0.0.1").expect("site TLS");
        slots.push(Slot {
            site: site.clone(),
            instance: instance.clone(),
            private_ip: private_ip.clone(),
            tls,
            state: AtomicU8::new(DOWN),
            ended: AtomicU32::new(0),
            silent: AtomicBool::new(false),
            hold: AtomicBool::new(false),
            last_sent_ms: AtomicU64::new(0),
            silent_closed_ms: AtomicU64::new(0),
            target: AtomicUsize::new(0),
            unreachable: AtomicUsize::new(0),
            rotated: AtomicUsize::new(0),
            pause_ms: AtomicU64::new(0),
        });
    }
    println!("setup: {n} site certificates in {:.1} s", t.elapsed().as_secs_f64());

    // 3. Controller config: default [server] settings (and lease).
    let port = free_port();
    let store = match &args.store_url {
        Some(url) => format!("[store]\nurl = \"{url}\"\nreplica_id = \"a\"\nstate_dir = \"{}\"\n", dir.path().display()),
        None => format!("[store]\npath = \"{}\"\n", dir.path().join("state.db").display()),
    };
    let mut config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n\n\
         [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\ntrust_domain = \"{TRUST_DOMAIN}\"\n\n\
         {store}\n[aws]\nregion = \"{REGION}\"\nendpoint_url = \"{}\"\nmax_attempts = 1\n",
        pki.ca().display(),
        pki.dir.join("controller.pem").display(),
        pki.dir.join("controller.key").display(),
        proxy.url,
    );
    // The agents here hold site-wide certificates (the session path is
    // what is measured): the setting of a fleet moving over allows them.
    config.push_str(&pki.controller_toml("allow_site_certificates = true"));
    for (site, (instance, _)) in sites.iter().zip(&instances) {
        config.push_str(&format!("\n[[site]]\nid = \"{site}\"\ninstance_id = \"{instance}\"\n"));
    }
    let config_path = dir.path().join("controller.toml");
    std::fs::write(&config_path, config).expect("write controller config");
    let log = dir.path().join("controller.log");
    let t = Instant::now();
    let mut controller = spawn_controller(&controller_bin, &config_path, &log);
    assert!(wait_port(port, Duration::from_secs(300)).await, "the controller did not listen within 300 s; log: {}", log.display());
    println!("setup: controller listening after {:.1} s (pid {})", t.elapsed().as_secs_f64(), controller.child.id());
    // The standby replica, on its own port and log.
    let standby =
        match &args.store_url {
            None => None,
            Some(_) => {
                let b_port = free_port();
                let text = std::fs::read_to_string(&config_path).expect("config");
                let b_text = text
                    .replacen(&format!("listen = \"127.0.0.1:{port}\""), &format!("listen = \"127.0.0.1:{b_port}\""), 1)
                    .replacen("replica_id = \"a\"", "replica_id = \"b\"", 1);
                let b_config = dir.path().join("controller-b.toml");
                std::fs::write(&b_config, b_text).expect("write b's config");
                let b_log = dir.path().join("controller-b.log");
                let b = spawn_controller(&controller_bin, &b_config, &b_log);
                assert!(wait_port(b_port, Duration::from_secs(120)).await, "the standby did not listen; log: {}", b_log.display());
                println!("setup: standby replica answering on port {b_port} (pid {})", b.child.id());
                Some((b, b_port, b_config, b_log))
            }
        };

    // 4. N agents, all at once.
    let (go, go_rx) = tokio::sync::watch::channel(false);
    let shared = Arc::new(Shared {
        urls: std::iter::once(port).chain(standby.as_ref().map(|(_, p, _, _)| *p)).map(|p| format!("https://127.0.0.1:{p}")).collect(),
        epoch: Instant::now(),
        slots,
        go: go_rx,
        released: Notify::new(),
        welcomed: Default::default(),
        role_changes: AtomicUsize::new(0),
        connect_errors: AtomicUsize::new(0),
        last_error: std::sync::Mutex::new(String::new()),
    });
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        tasks.push(tokio::spawn(agent(shared.clone(), i)));
    }
    let mut missed = Vec::new();

    println!("\nphase 1: {n} agents connect at once (cold store: nothing verified with EC2 yet)");
    let describes_before = proxy.stats.calls_of("DescribeInstances");
    let start = Instant::now();
    go.send_replace(true);
    let (connected, primary) = wait_all_primary(&shared, start, deadline, "phase 1").await;
    let [_, pending, prim, other] = shared.counts();
    println!("  all connected after:          {}", secs(connected));
    println!("  all connected and primary:    {}", secs(primary));
    println!("  primary at that point:        {:.1} % ({prim} of {n}; {pending} pending, {other} other)", pct(prim, n));
    println!("  {}", welcome_line([0; 4], shared.welcomed()));
    println!("  RoleChange messages:          {}", shared.role_changes.load(Ordering::Relaxed));
    println!("  DescribeInstances calls:      {}", proxy.stats.calls_of("DescribeInstances") - describes_before);
    println!("  failed connection attempts:   {}", shared.connect_errors.load(Ordering::Relaxed));
    if primary.is_none() {
        missed.push(format!("phase 1: not all {n} agents primary within {deadline:?}"));
    }

    // 5. Steady state.
    let pid = controller.child.id();
    println!("\nsteady state: {}s window", args.cpu_window);
    if primary.is_none() {
        println!("  (NOT a steady state: phase 1 did not finish; agents are still being verified or reconnecting)");
    }
    let ended_before: u32 = shared.slots.iter().map(|s| s.ended.load(Ordering::Relaxed)).sum();
    let (c0, b0, t0) = (cpu_seconds(pid), cpu_seconds(std::process::id()), Instant::now());
    tokio::time::sleep(Duration::from_secs(args.cpu_window)).await;
    let (c1, b1, wall) = (cpu_seconds(pid), cpu_seconds(std::process::id()), t0.elapsed().as_secs_f64());
    let ended_after: u32 = shared.slots.iter().map(|s| s.ended.load(Ordering::Relaxed)).sum();
    let cpu = match (c0, c1) {
        (Some(a), Some(b)) => Some(100.0 * (b - a) / wall),
        _ => None,
    };
    match cpu {
        Some(c) => println!("  controller CPU:               {c:.1} % of one core"),
        None => println!("  controller CPU:               unreadable (/proc/{pid}/stat)"),
    }
    if let (Some(a), Some(b)) = (b0, b1) {
        println!("  (this bench's own CPU:        {:.1} % of one core)", 100.0 * (b - a) / wall);
    }
    match rss_mib(pid) {
        Some(r) => println!("  controller RSS:               {r:.0} MiB"),
        None => println!("  controller RSS:               unreadable"),
    }
    println!("  streams ended in the window:  {}", ended_after - ended_before);
    if cpu.is_none_or(|c| c >= TARGET_CPU) {
        missed.push(format!("steady-state CPU {} (target < {TARGET_CPU} %)", cpu.map_or("unknown".into(), |c| format!("{c:.1} %"))));
    }

    // 6. Silent agents.
    let silent_n = ((n as f64) * args.silent_share).round() as usize;
    if silent_n > 0 {
        println!("\nsilence: {silent_n} agents stop sending (stream kept open)");
        let stride = n as f64 / silent_n as f64;
        let chosen: Vec<usize> = (0..silent_n).map(|k| ((k as f64 * stride) as usize).min(n - 1)).collect();
        let ended0: Vec<u32> = shared.slots.iter().map(|s| s.ended.load(Ordering::Relaxed)).collect();
        let began = shared.now_ms();
        for &i in &chosen {
            shared.slots[i].hold.store(true, Ordering::Relaxed);
            shared.slots[i].silent.store(true, Ordering::Relaxed);
        }
        let t = Instant::now();
        let silence_deadline = deadline.min(Duration::from_secs(60));
        loop {
            let closed = chosen.iter().filter(|&&i| shared.slots[i].silent_closed_ms.load(Ordering::Relaxed) > 0).count();
            if closed == silent_n || t.elapsed() > silence_deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut since_silence = Vec::new();
        let mut since_last = Vec::new();
        for &i in &chosen {
            let s = &shared.slots[i];
            let closed = s.silent_closed_ms.load(Ordering::Relaxed);
            if closed > 0 {
                since_silence.push(closed.saturating_sub(began));
                since_last.push(closed.saturating_sub(s.last_sent_ms.load(Ordering::Relaxed)));
            }
        }
        since_silence.sort_unstable();
        since_last.sort_unstable();
        let q = |v: &[u64], f: f64| {
            v.get(((v.len() as f64 - 1.0) * f).round() as usize).map_or("-".into(), |ms| format!("{:.1} s", *ms as f64 / 1000.0))
        };
        let others_ended =
            (0..n).filter(|i| !chosen.contains(i)).filter(|&i| shared.slots[i].ended.load(Ordering::Relaxed) != ended0[i]).count();
        println!("  closed by the controller:     {} of {silent_n}", since_last.len());
        println!("  after the agent's last message: p50 {}, max {}", q(&since_last, 0.5), q(&since_last, 1.0));
        println!("  after silence began:            p50 {}, max {}", q(&since_silence, 0.5), q(&since_silence, 1.0));
        println!("  other agents whose stream ended meanwhile: {others_ended} of {}", n - silent_n);
        let max_last = since_last.last().copied().map(Duration::from_millis);
        if since_last.len() < silent_n || max_last.is_none_or(|m| m > TARGET_SILENT) {
            missed.push(format!(
                "silent agents: {} of {silent_n} noticed, max {} (target ≤ {TARGET_SILENT:?})",
                since_last.len(),
                q(&since_last, 1.0)
            ));
        }
        if others_ended > 0 {
            missed.push(format!("{others_ended} agents that kept heartbeating lost their stream"));
        }
        // They come back.
        for &i in &chosen {
            shared.slots[i].silent.store(false, Ordering::Relaxed);
            shared.slots[i].hold.store(false, Ordering::Relaxed);
        }
        shared.released.notify_waiters();
        let t = Instant::now();
        let (_, back) = wait_all_primary(&shared, t, deadline, "rejoin").await;
        println!("  silent agents back, all {n} primary after: {}", secs(back));
    }

    // 7'. Replicas: the leader SIGKILLed, the standby takes over; then a
    // SIGTERM hands the lease back to the first, started again.
    if let Some((mut b, _b_port, _b_config, b_log)) = standby {
        println!("\ntakeover: SIGKILL the leader; the standby takes the lease (default lease_ttl 15 s)");
        let welcomed_before = shared.welcomed();
        let from = file_size(&b_log);
        let killed = Instant::now();
        controller.kill();
        let lease = wait_log(&b_log, from, "leading: this replica holds the lease", Duration::from_secs(120)).await;
        let takeover =
            wait_log(&b_log, from, "dr-controller listening", Duration::from_secs(120)).await.map(|t| t + lease.unwrap_or_default());
        println!("  standby holds the lease after: {}", secs(lease));
        println!("  standby serving after:        {}", secs(takeover));
        let (_, primary) = wait_all_primary(&shared, killed, deadline, "takeover").await;
        println!("  all {n} primary again after:  {}", secs(primary));
        if let (Some(t), Some(p)) = (takeover, primary) {
            println!("  re-homed after the takeover:  {:.1} s", (p - t).as_secs_f64());
        }
        println!("  {}", welcome_line(welcomed_before, shared.welcomed()));
        if takeover.is_none_or(|t| t > TARGET_TAKEOVER) {
            missed.push(format!("takeover after SIGKILL in {} (target ≤ {TARGET_TAKEOVER:?})", secs(takeover)));
        }
        if takeover.zip(primary).is_none_or(|(t, p)| p - t > TARGET_REHOME) {
            missed.push(format!(
                "agents re-homed {} after the takeover (target ≤ {TARGET_REHOME:?})",
                secs(primary.zip(takeover).map(|(p, t)| p - t))
            ));
        }
        // The first replica again, as a standby; a clean stop of the leader.
        let from_a = file_size(&log);
        controller = spawn_controller(&controller_bin, &config_path, &log);
        wait_log(&log, from_a, "standby: waiting for the leader lease", Duration::from_secs(120)).await;
        let stopped = Instant::now();
        let _ = std::process::Command::new("kill").args(["-TERM", &b.child.id().to_string()]).status();
        let handover = wait_log(&log, from_a, "leading: this replica holds the lease", Duration::from_secs(60)).await;
        let serving =
            wait_log(&log, from_a, "dr-controller listening", Duration::from_secs(60)).await.map(|t| t + handover.unwrap_or_default());
        println!("  SIGTERM handover: the first replica holds the lease after {}, serves after {}", secs(handover), secs(serving));
        let (_, primary) = wait_all_primary(&shared, stopped, deadline, "handover").await;
        println!("  all {n} primary again after:  {}", secs(primary));
        if handover.is_none_or(|h| h > TARGET_HANDOVER) {
            missed.push(format!("lease handed over after SIGTERM in {} (target < {TARGET_HANDOVER:?})", secs(handover)));
        }
        b.kill();
    } else {
        // 7. Controller SIGKILL and restart on the same store.
        println!("\nrestart: SIGKILL the controller, start it again on the same store");
        let welcomed_before = shared.welcomed();
        let describes_before = proxy.stats.calls_of("DescribeInstances");
        let errors_before = shared.connect_errors.load(Ordering::Relaxed);
        let killed = Instant::now();
        controller.kill();
        controller = spawn_controller(&controller_bin, &config_path, &log);
        let listening = wait_port(port, Duration::from_secs(300)).await;
        println!("  controller listening again after {:.1} s", killed.elapsed().as_secs_f64());
        let (connected, primary) = if listening { wait_all_primary(&shared, killed, deadline, "restart").await } else { (None, None) };
        let [_, pending, prim, other] = shared.counts();
        println!("  all connected after the kill: {}", secs(connected));
        println!("  all primary after the kill:   {}", secs(primary));
        println!("  primary at the end:           {:.1} % ({prim} of {n}; {pending} pending, {other} other)", pct(prim, n));
        println!("  {}", welcome_line(welcomed_before, shared.welcomed()));
        println!("  DescribeInstances calls:      {}", proxy.stats.calls_of("DescribeInstances") - describes_before);
        println!("  failed connection attempts:   {}", shared.connect_errors.load(Ordering::Relaxed) - errors_before);
        if primary.is_none_or(|p| p > TARGET_RESTART) {
            missed.push(format!("after a restart, all primary in {} (target ≤ {TARGET_RESTART:?})", secs(primary)));
        }
        if let Some(r) = rss_mib(controller.child.id()) {
            println!("  controller RSS:               {r:.0} MiB");
        }
    }

    for t in &tasks {
        t.abort();
    }
    controller.kill();
    let warnings = std::fs::read_to_string(&log).unwrap_or_default().lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).count();
    println!("\ncontroller log: {warnings} WARN/ERROR lines");
    if args.keep {
        println!("work dir kept: {}", dir.keep().display());
    }
    if missed.is_empty() {
        println!("all targets met");
        std::process::ExitCode::SUCCESS
    } else {
        println!("targets MISSED:");
        for m in &missed {
            println!("  - {m}");
        }
        std::process::ExitCode::FAILURE
    }
}
