//! N agents renewing their certificates within one jitter window against
//! one controller: the controller's CPU over the window, and the time a
//! renewal takes (CSR sent to certificate received, p50/p99/max), beside
//! the time to sign one CSR alone (in process). Also prints how long the
//! fleet rides out a controller outage with the default lifetime.
//!
//!   DR_MOTO_SERVER=$(bash tests/ensure-moto.sh) target/debug/dr-bench-renewal              # 10,000 agents, 60 s window
//!   DR_MOTO_SERVER=... target/debug/dr-bench-renewal --agents 1000 --controller target/release/dr-controller
//!
//! The agents are in-process tasks speaking the real wire: each enrols
//! (its instance identity document signed with the bench's stand-in for
//! AWS's key, no client certificate), opens its session with the instance
//! certificate and the document, heartbeats, and at a random moment of the
//! window sends a CSR for a key it generated. Everything runs on 127.0.0.1.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use clap::Parser;
use dr_proto::pb;
use dr_proto::pb::agent_message::Msg as AgentMsg;
use dr_proto::pb::controller_message::Msg as ControllerMsg;
use dr_tests::bench::{
    RestoreSomaxconn, cpu_seconds, default_controller, profile_of, raise_limits, raise_somaxconn, rss_mib, spawn_controller, wait_port,
};
use dr_tests::{ACCOUNT, Moto, Pki, REGION, TRUST_DOMAIN, free_port};
use rcgen::SigningKey;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;

#[derive(Parser)]
#[command(about = "N agents renewing within one jitter window against one dr-controller")]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    agents: usize,
    /// The window the renewals are spread over, in seconds (agents renew at
    /// half of their lifetime ±10 %: with 35-day certificates the real
    /// window is 7 days; 60 s is a far harder case).
    #[arg(long, default_value_t = 60)]
    window: u64,
    /// The dr-controller binary (default: target/release/dr-controller if
    /// built, else the debug one).
    #[arg(long)]
    controller: Option<std::path::PathBuf>,
    /// Enrolments and session openings at once.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
}

struct Agent {
    site: String,
    instance: String,
    document: String,
    signature: String,
}

fn csr() -> (String, Vec<u8>) {
    let k = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::default().serialize_request(&k).expect("csr").der().to_vec();
    (k.serialize_pem(), csr)
}

async fn channel(url: &str, ca: &[u8], identity: Option<(&[u8], &[u8])>) -> Result<tonic::transport::Channel, String> {
    let tls = dr_proto::tls::client_config_pem(ca, identity, "localhost");
    let endpoint =
        tonic::transport::Endpoint::from_shared(url.to_owned()).map_err(|e| e.to_string())?.tls_config(tls).map_err(|e| e.to_string())?;
    let connector = dr_proto::transport::Connector { user_timeout: Duration::from_secs(30) };
    endpoint.connect_with_connector(connector).await.map_err(|e| dr_tests::bench::error_chain(&e))
}

/// Enrols, opens the session, renews once at `at`; returns the renewal's
/// round trip.
async fn run_agent(
    url: Arc<String>,
    ca: Arc<Vec<u8>>,
    a: Agent,
    gate: Arc<Semaphore>,
    at: Instant,
    sessions: Arc<AtomicUsize>,
) -> Result<Duration, String> {
    let proof = pb::InstanceProof { document: a.document.clone().into_bytes(), signature: a.signature.clone(), token: String::new() };
    let (chain, key) = {
        let _permit = gate.acquire().await.map_err(|e| e.to_string())?;
        let (key, csr_der) = csr();
        let mut c = pb::agent_service_client::AgentServiceClient::new(channel(&url, &ca, None).await?);
        let r = c
            .enroll(pb::EnrollRequest { site_id: a.site.clone(), instance_id: a.instance.clone(), csr_der, proof: Some(proof.clone()) })
            .await
            .map_err(|s| format!("enrol: {}", s.message()))?
            .into_inner();
        (r.cert_chain_pem, key)
    };
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(16);
    let mut inbound = {
        let _permit = gate.acquire().await.map_err(|e| e.to_string())?;
        let mut c = pb::agent_service_client::AgentServiceClient::new(channel(&url, &ca, Some((chain.as_bytes(), key.as_bytes()))).await?);
        let hello = pb::Hello {
            site_id: a.site.clone(),
            facts: Some(pb::InstanceFacts { instance_id: a.instance.clone(), private_ip: "10.0.0.1".into(), ..Default::default() }),
            agent_version: "bench".into(),
            proof: Some(proof),
        };
        tx.send(pb::AgentMessage { msg: Some(AgentMsg::Hello(hello)) }).await.map_err(|_| "closed")?;
        let mut inbound = c.session(ReceiverStream::new(rx)).await.map_err(|s| format!("session: {}", s.message()))?.into_inner();
        match inbound.message().await.map_err(|s| s.to_string())? {
            Some(pb::ControllerMessage { msg: Some(ControllerMsg::Welcome(_)) }) => {}
            other => return Err(format!("expected a Welcome, got {other:?}")),
        }
        inbound
    };
    sessions.fetch_add(1, Ordering::Relaxed);
    // Heartbeats (the controller's default interval is 10 s).
    let hb = tx.clone();
    let beat = tokio::spawn(async move {
        let mut seq = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            seq += 1;
            if hb
                .send(pb::AgentMessage {
                    msg: Some(AgentMsg::Heartbeat(pb::Heartbeat { seq, app_state: "started".into(), renewal_error: String::new() })),
                })
                .await
                .is_err()
            {
                return;
            }
        }
    });
    tokio::time::sleep_until(at.into()).await;
    let (_key, csr_der) = csr();
    let started = Instant::now();
    tx.send(pb::AgentMessage { msg: Some(AgentMsg::Renew(pb::RenewRequest { csr_der })) }).await.map_err(|_| "closed")?;
    let result = loop {
        match inbound.message().await {
            Ok(Some(pb::ControllerMessage { msg: Some(ControllerMsg::Renewed(r)) })) if r.error.is_empty() => break Ok(started.elapsed()),
            Ok(Some(pb::ControllerMessage { msg: Some(ControllerMsg::Renewed(r)) })) => break Err(format!("renewal refused: {}", r.error)),
            Ok(Some(_)) => continue,
            Ok(None) => break Err("the stream ended".into()),
            Err(s) => break Err(format!("stream: {}", s.message())),
        }
    };
    beat.abort();
    result
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    dr_proto::tls::install_crypto_provider();
    raise_limits();
    let _somaxconn = RestoreSomaxconn(raise_somaxconn());
    let n = args.agents;
    let dir = tempfile::tempdir().expect("tempdir");
    let moto = Moto::start(dir.path());
    let pki = Pki::new(dir.path());

    // The signer alone: one CSR at a time, in process.
    let i = pki.dir.join("intermediate");
    let signer = dr_controller::pki::Signer::load(&i.join("ca.pem"), &i.join("ca.key"), TRUST_DOMAIN).expect("intermediate");
    let csrs: Vec<Vec<u8>> = (0..n.min(10_000)).map(|_| csr().1).collect();
    let mut sign_times = Vec::with_capacity(csrs.len());
    for (k, c) in csrs.iter().enumerate() {
        let id = dr_proto::identity::Identity::instance(TRUST_DOMAIN, &format!("site-{k}"), &format!("i-{:017x}", k + 1));
        let t = Instant::now();
        signer.sign_csr(c, &id, Duration::from_secs(35 * 24 * 3600)).expect("sign");
        sign_times.push(t.elapsed());
    }
    sign_times.sort();
    println!(
        "signing alone ({} CSRs, this binary's build): p50 {}, p99 {}, max {}",
        sign_times.len(),
        ms(percentile(&sign_times, 0.5)),
        ms(percentile(&sign_times, 0.99)),
        ms(percentile(&sign_times, 1.0))
    );

    // Documents signed with the stand-in for AWS's key.
    let t = Instant::now();
    let iid = rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.iid_key()).expect("IID key")).expect("pem");
    let agents: Vec<Agent> = (0..n)
        .map(|k| {
            let instance = format!("i-{:017x}", k + 1);
            let document = format!("{{\"accountId\":\"{ACCOUNT}\",\"instanceId\":\"{instance}\",\"region\":\"{REGION}\"}}");
            let signature = base64::engine::general_purpose::STANDARD.encode(iid.sign(document.as_bytes()).expect("sign"));
            Agent { site: format!("site-{k}"), instance, document, signature }
        })
        .collect();
    println!("setup: {n} identity documents in {:.1} s", t.elapsed().as_secs_f64());

    let port = free_port();
    let mut config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\ntrust_domain = \"{TRUST_DOMAIN}\"\n\n\
         [store]\npath = \"{}\"\n\n[aws]\nregion = \"{REGION}\"\nendpoint_url = \"{}\"\nmax_attempts = 1\n\n{}",
        pki.ca().display(),
        pki.dir.join("controller.pem").display(),
        pki.dir.join("controller.key").display(),
        dir.path().join("state.db").display(),
        moto.url,
        pki.controller_toml(""),
    );
    for a in &agents {
        config.push_str(&format!("\n[[site]]\nid = \"{}\"\ninstance_id = \"{}\"\n", a.site, a.instance));
    }
    let config_path = dir.path().join("controller.toml");
    std::fs::write(&config_path, config).expect("config");
    let bin = args.controller.clone().unwrap_or_else(default_controller);
    println!("controller: {} ({})", bin.display(), profile_of(&bin));
    let log = dir.path().join("controller.log");
    let controller = spawn_controller(&bin, &config_path, &log);
    assert!(wait_port(port, Duration::from_secs(300)).await, "the controller did not listen; log: {}", log.display());
    let pid = controller.child.id();

    let url = Arc::new(format!("https://127.0.0.1:{port}"));
    let ca = Arc::new(std::fs::read(pki.ca()).expect("ca"));
    let gate = Arc::new(Semaphore::new(args.concurrency));
    let sessions = Arc::new(AtomicUsize::new(0));
    // Enrolments and sessions first (not measured); the window starts once
    // every agent could be up.
    let setup = Duration::from_secs(30 + (n as u64) / 50);
    let window_start = Instant::now() + setup;
    let window = Duration::from_secs(args.window);
    let t = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for a in agents {
        let at = window_start + window.mul_f64(rand::random::<f64>());
        tasks.push(tokio::spawn(run_agent(url.clone(), ca.clone(), a, gate.clone(), at, sessions.clone())));
    }
    while Instant::now() < window_start && sessions.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let up = sessions.load(Ordering::Relaxed);
    println!("setup: {up}/{n} agents enrolled and in session after {:.1} s", t.elapsed().as_secs_f64());
    tokio::time::sleep_until(window_start.into()).await;
    let cpu0 = cpu_seconds(pid);
    let mut rtts = Vec::with_capacity(n);
    let mut errors: std::collections::BTreeMap<String, usize> = Default::default();
    for task in tasks {
        match task.await {
            Ok(Ok(d)) => rtts.push(d),
            Ok(Err(e)) => *errors.entry(e.chars().take(120).collect()).or_default() += 1,
            Err(e) => *errors.entry(e.to_string()).or_default() += 1,
        }
    }
    let elapsed = window_start.elapsed();
    let cpu1 = cpu_seconds(pid);
    rtts.sort();
    println!("\nrenewals within a {}-second window: {} ok, {} failed", args.window, rtts.len(), n - rtts.len());
    for (e, k) in &errors {
        println!("  {k} x {e}");
    }
    println!(
        "renewal round trip (CSR sent -> certificate received, recorded as next first): p50 {}, p99 {}, max {}",
        ms(percentile(&rtts, 0.5)),
        ms(percentile(&rtts, 0.99)),
        ms(percentile(&rtts, 1.0))
    );
    match (cpu0, cpu1) {
        (Some(a), Some(b)) => println!(
            "controller CPU over the window: {:.1} s of CPU in {:.1} s = {:.0} % of one core (sessions, heartbeats and renewals)",
            b - a,
            elapsed.as_secs_f64(),
            100.0 * (b - a) / elapsed.as_secs_f64()
        ),
        _ => println!("controller CPU: unreadable (/proc/{pid}/stat)"),
    }
    if let Some(rss) = rss_mib(pid) {
        println!("controller RSS at the end: {rss:.0} MiB");
    }
    let lifetime = dr_controller::config::PkiConfig::default().agent_cert_lifetime;
    println!(
        "\noutage survived without any agent going dark (default agent_cert_lifetime {:.0} days): at least {:.1} days \
         (renewal at 45-55 % of the lifetime; a certificate renewed just before the outage lasts its whole life)",
        lifetime.as_secs_f64() / 86400.0,
        lifetime.as_secs_f64() * 0.45 / 86400.0
    );
    drop(controller);
    if rtts.len() == n { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE }
}
