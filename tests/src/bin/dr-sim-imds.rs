//! dr-sim-imds: a fake EC2 instance metadata service (IMDSv2 subset) on a
//! loopback port, for tests. Prints `listening on <addr>` once bound.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use clap::Parser;

#[derive(Parser)]
#[command(name = "dr-sim-imds", about = "Fake IMDSv2 for tests")]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    #[arg(long)]
    instance_id: String,
    #[arg(long)]
    private_ip: String,
    /// Without it, meta-data/public-ipv4 answers 404.
    #[arg(long)]
    public_ip: Option<String>,
    /// PEM RSA key to sign the instance identity document with (AWS's, in
    /// a test); without it, dynamic/instance-identity/* answers 404.
    #[arg(long)]
    iid_key: Option<std::path::PathBuf>,
    #[arg(long, default_value = "123456789012")]
    account: String,
    #[arg(long, default_value = "us-east-1")]
    region: String,
}

struct Sim {
    instance_id: String,
    private_ip: String,
    public_ip: Option<String>,
    /// The document as AWS formats it, and its base64 signature.
    identity: Option<(String, String)>,
    tokens: Mutex<HashSet<String>>,
    counter: Mutex<u64>,
}

type Shared = Arc<Sim>;

async fn token(State(sim): State<Shared>, headers: HeaderMap) -> Response {
    let ttl = headers.get("x-aws-ec2-metadata-token-ttl-seconds").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u32>().ok());
    if !matches!(ttl, Some(1..=21600)) {
        return (StatusCode::BAD_REQUEST, "missing or invalid X-aws-ec2-metadata-token-ttl-seconds\n").into_response();
    }
    let n = {
        let mut c = sim.counter.lock().expect("counter lock");
        *c += 1;
        *c
    };
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let t = format!("AQAE{:x}{:x}{n:x}==", nanos, std::process::id());
    sim.tokens.lock().expect("tokens lock").insert(t.clone());
    t.into_response()
}

fn authorized(sim: &Sim, headers: &HeaderMap) -> bool {
    headers
        .get("x-aws-ec2-metadata-token")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| sim.tokens.lock().expect("tokens lock").contains(t))
}

fn item(sim: &Sim, headers: &HeaderMap, value: Option<&str>) -> Response {
    if !authorized(sim, headers) {
        return (StatusCode::UNAUTHORIZED, "").into_response();
    }
    match value {
        Some(v) => v.to_owned().into_response(),
        None => (StatusCode::NOT_FOUND, "Not Found\n").into_response(),
    }
}

async fn instance_id(State(sim): State<Shared>, headers: HeaderMap) -> Response {
    item(&sim, &headers, Some(&sim.instance_id))
}

async fn local_ipv4(State(sim): State<Shared>, headers: HeaderMap) -> Response {
    item(&sim, &headers, Some(&sim.private_ip))
}

async fn iid_document(State(sim): State<Shared>, headers: HeaderMap) -> Response {
    item(&sim, &headers, sim.identity.as_ref().map(|(d, _)| d.as_str()))
}

async fn iid_signature(State(sim): State<Shared>, headers: HeaderMap) -> Response {
    item(&sim, &headers, sim.identity.as_ref().map(|(_, s)| s.as_str()))
}

/// The identity document in AWS's layout, signed (RSA SHA-256, base64).
fn identity(args: &Args) -> Option<(String, String)> {
    use base64::Engine;
    use rcgen::SigningKey;
    let key_pem = std::fs::read_to_string(args.iid_key.as_ref()?).expect("read --iid-key");
    let key = rcgen::KeyPair::from_pem(&key_pem).expect("--iid-key is a PEM key");
    let document = format!(
        "{{\n  \"accountId\" : \"{}\",\n  \"architecture\" : \"x86_64\",\n  \"availabilityZone\" : \"{}a\",\n  \"imageId\" : \"ami-12345678\",\n  \"instanceId\" : \"{}\",\n  \"instanceType\" : \"m5.xlarge\",\n  \"pendingTime\" : \"2026-01-01T00:00:00Z\",\n  \"privateIp\" : \"{}\",\n  \"region\" : \"{}\",\n  \"version\" : \"2017-09-30\"\n}}",
        args.account, args.region, args.instance_id, args.private_ip, args.region
    );
    let signature = key.sign(document.as_bytes()).expect("sign the document");
    Some((document, base64::engine::general_purpose::STANDARD.encode(signature)))
}

async fn public_ipv4(State(sim): State<Shared>, headers: HeaderMap) -> Response {
    item(&sim, &headers, sim.public_ip.as_deref())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let identity = identity(&args);
    let sim = Arc::new(Sim {
        identity,
        instance_id: args.instance_id,
        private_ip: args.private_ip,
        public_ip: args.public_ip,
        tokens: Mutex::new(HashSet::new()),
        counter: Mutex::new(0),
    });
    let app = Router::new()
        .route("/latest/api/token", put(token))
        .route("/latest/meta-data/instance-id", get(instance_id))
        .route("/latest/meta-data/local-ipv4", get(local_ipv4))
        .route("/latest/meta-data/public-ipv4", get(public_ipv4))
        .route("/latest/dynamic/instance-identity/document", get(iid_document))
        .route("/latest/dynamic/instance-identity/signature", get(iid_signature))
        .fallback(|| async { (StatusCode::NOT_FOUND, "Not Found\n") })
        .with_state(sim);
    dr_tests::serve_simulator("dr-sim-imds", args.listen, app).await
}
