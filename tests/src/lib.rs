//! End-to-end harness: real processes (dr-controller, dr-agent, drctl, the
//! simulators) wired together on loopback, EC2 played by moto's server.
//!
//! Nothing here reaches beyond 127.0.0.0/8: every child gets static AWS
//! credentials, `AWS_EC2_METADATA_DISABLED=true` and explicit endpoints.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use drctl::pki::{self, Subject, Validity};

pub mod bench;
pub mod dataplane;
pub mod faults;
pub mod iam_record;
pub mod recovery_world;
pub mod throttle;
pub mod webhook;

/// What every HTTP simulator does once its routes are built: bind, print
/// `listening on <addr>` (tests read it to learn the port), serve until
/// SIGTERM or SIGINT.
pub async fn serve_simulator(name: &str, listen: std::net::SocketAddr, app: axum::Router) -> std::process::ExitCode {
    use std::io::Write;
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{name}: cannot listen on {listen}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().expect("a bound listener has an address");
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on {addr}");
        let _ = out.flush();
    }
    let shutdown = async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        eprintln!("{name}: {e}");
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}

/// Who may run next to a process named `nomad`: `dr-agent wipe-nomad` (run
/// by the wipe tests and by every failover, drill and recovery's
/// `wipe_nomad` step) refuses while any process of that name runs on the
/// machine, so the one test that starts a fake `nomad` must run alone among
/// them. Tests whose agents may wipe hold a shared guard ([`nomad_shared`];
/// [`World`], [`DataPlane`] hold one), the fake-`nomad` test an exclusive one
/// ([`nomad_exclusive`]). A waiting exclusive request stops new shared ones
/// (no starvation with two test threads).
pub struct NomadGuard {
    exclusive: bool,
}

struct NomadState {
    shared: usize,
    exclusive: bool,
    exclusive_waiting: usize,
}

static NOMAD: std::sync::Mutex<NomadState> = std::sync::Mutex::new(NomadState { shared: 0, exclusive: false, exclusive_waiting: 0 });
static NOMAD_CHANGED: std::sync::Condvar = std::sync::Condvar::new();

fn nomad_state() -> std::sync::MutexGuard<'static, NomadState> {
    NOMAD.lock().unwrap_or_else(|e| e.into_inner())
}

thread_local! {
    /// Shared guards this thread holds: a thread that holds one may take
    /// another (a world with a data plane) without waiting behind a waiting
    /// exclusive request, which waits for it (a deadlock otherwise).
    static NOMAD_SHARED_HERE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A shared [`NomadGuard`]: no fake `nomad` runs while it is held.
pub fn nomad_shared() -> NomadGuard {
    let mut st = nomad_state();
    let reentrant = NOMAD_SHARED_HERE.get() > 0;
    while st.exclusive || (st.exclusive_waiting > 0 && !reentrant) {
        st = NOMAD_CHANGED.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    st.shared += 1;
    NOMAD_SHARED_HERE.set(NOMAD_SHARED_HERE.get() + 1);
    NomadGuard { exclusive: false }
}

/// An exclusive [`NomadGuard`]: no agent that may wipe runs while it is held.
pub fn nomad_exclusive() -> NomadGuard {
    let mut st = nomad_state();
    st.exclusive_waiting += 1;
    while st.exclusive || st.shared > 0 {
        st = NOMAD_CHANGED.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    st.exclusive_waiting -= 1;
    st.exclusive = true;
    NomadGuard { exclusive: true }
}

impl Drop for NomadGuard {
    fn drop(&mut self) {
        let mut st = nomad_state();
        if self.exclusive {
            st.exclusive = false;
        } else {
            st.shared -= 1;
            NOMAD_SHARED_HERE.set(NOMAD_SHARED_HERE.get().saturating_sub(1));
        }
        NOMAD_CHANGED.notify_all();
    }
}

pub const REGION: &str = "us-east-1";
pub const TRUST_DOMAIN: &str = "dr.test";

/// Retries an assertion until it holds or the timeout passes (then panics
/// with the last failure).
#[macro_export]
macro_rules! assert_eventually {
    ($timeout:expr, $check:expr, $($msg:tt)+) => {{
        let deadline = std::time::Instant::now() + $timeout;
        loop {
            if $check {
                break;
            }
            if std::time::Instant::now() > deadline {
                panic!("not true within {:?}: {}", $timeout, format!($($msg)+));
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }};
}

/// Asserts that something does NOT happen during a quiet period: polls
/// `$forbidden` every 100 ms for `$period` and panics as soon as it holds
/// (not only at the end), with the message and when it happened. Start the
/// period at an observable point (the event after which nothing may
/// happen), and make it long enough to cover what would trigger the
/// forbidden thing (e.g. several health passes past `confirm_for`).
#[macro_export]
macro_rules! assert_quiet_for {
    ($period:expr, $forbidden:expr, $($msg:tt)+) => {{
        let period: std::time::Duration = $period;
        let start = std::time::Instant::now();
        loop {
            if $forbidden {
                panic!("happened {:?} into a quiet period of {:?}: {}", start.elapsed(), period, format!($($msg)+));
            }
            if start.elapsed() >= period {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }};
}

/// Environment every child process gets: nothing may reach a real AWS or
/// the instance metadata address.
pub fn aws_env(cmd: &mut Command) -> &mut Command {
    cmd.env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_SESSION_TOKEN", "testing")
        .env("AWS_REGION", REGION)
        .env("AWS_DEFAULT_REGION", REGION)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_CONFIG_FILE")
        .env_remove("AWS_SHARED_CREDENTIALS_FILE")
}

/// A built binary of the workspace (tests/run.sh builds them all first).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // Tests run from target/<profile>/deps, bench binaries from target/<profile>.
    let mut dir = exe.parent().expect("the executable's directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("target/<profile>");
    }
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --workspace --bins` first (tests/run.sh does)", path.display());
    path
}

/// A port that was free a moment ago. Racy (another process may take it
/// before the child binds it): prefer letting the child bind port 0 and
/// report its address ([`logged_port`], [`spawn_listening`]). Left for the
/// benchmarks, which must write the controller's URL into disks before the
/// controller starts.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A loopback port on which connections are refused, and stay refused for
/// as long as the returned socket lives: bound, never listening, so no other
/// process can take the port meanwhile.
pub fn closed_port() -> (std::os::fd::OwnedFd, u16) {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain socket(2)/bind(2)/getsockname(2) on a socket we own;
    // the address structs are fully initialised and their sizes passed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let owned = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(libc::bind(fd, (&raw const addr).cast(), len), 0, "bind: {}", std::io::Error::last_os_error());
        let mut got: libc::sockaddr_in = std::mem::zeroed();
        let mut got_len = len;
        assert_eq!(libc::getsockname(fd, (&raw mut got).cast(), &mut got_len), 0, "getsockname: {}", std::io::Error::last_os_error());
        (owned, u16::from_be(got.sin_port))
    }
}

/// Strips ANSI escape sequences (colored log output).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The port a child bound itself (port 0) and logged: waits for a line of
/// `log`, past byte `from` (the log's length when the child was started),
/// that contains `marker` and then `key` directly followed by the port
/// (e.g. `"Running on"`, `"http://127.0.0.1:"`). Fails when the child exits
/// first, or after `timeout`, showing the log.
pub fn logged_port(proc: &mut Proc, log: &Path, from: u64, marker: &str, key: &str, timeout: Duration) -> u16 {
    let deadline = Instant::now() + timeout;
    loop {
        let bytes = std::fs::read(log).unwrap_or_default();
        let new = String::from_utf8_lossy(bytes.get(from as usize..).unwrap_or_default()).into_owned();
        for line in new.lines().map(strip_ansi) {
            if let Some(at) = line.find(marker)
                && let Some(k) = line[at..].find(key)
            {
                let digits: String = line[at + k + key.len()..].chars().take_while(char::is_ascii_digit).collect();
                if let Ok(port) = digits.parse::<u16>()
                    && port != 0
                {
                    return port;
                }
            }
        }
        if let Ok(Some(status)) = proc.child.try_wait() {
            panic!("{} exited ({status}) before logging its address; {}:\n{new}", proc.name, log.display());
        }
        assert!(Instant::now() < deadline, "{} logged no address within {timeout:?}; {}:\n{new}", proc.name, log.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

pub fn wait_for_port(port: u16, timeout: Duration) {
    assert_eventually!(timeout, std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(), "port {port} to accept");
}

/// Makes `cmd`'s process die (SIGKILL) with the test process, also when the
/// test run itself is killed (`kill -9`, a CI timeout): Linux's
/// `PR_SET_PDEATHSIG`, set in the child between fork and exec.
///
/// The signal fires when the *thread* that spawned the child ends, not only
/// the process. Tests spawn from their test thread, which ends when the
/// test ends; the [`Proc`] is dropped (and killed) then anyway, so that is
/// the intended lifetime. Spawning a long-lived child from a short-lived
/// helper thread would kill it early: spawn from the test thread.
pub fn die_with_test(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe functions (prctl, getppid); it allocates
    // nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The test may have died between fork and prctl: then the
            // signal will never come, so do not start.
            if libc::getppid() != parent {
                return Err(std::io::Error::other("the test process died before its child started"));
            }
            Ok(())
        })
    }
}

/// A child process killed (SIGKILL) when dropped, and when the test process
/// dies ([`die_with_test`]).
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Proc {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = die_with_test(cmd).stdout(out).stderr(err).stdin(Stdio::null()).spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc { child, name: name.to_owned() }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: kill(2) on a child pid we own.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.wait_exit(timeout)
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// moto's EC2 server on a loopback port.
/// The repository's root (tests/ is one of its crates).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

pub struct Moto {
    pub url: String,
    _proc: Proc,
}

impl Moto {
    pub fn start(dir: &Path) -> Moto {
        let server = std::env::var("DR_MOTO_SERVER").map(PathBuf::from).unwrap_or_else(|_| repo_root().join(".venv/bin/moto_server"));
        assert!(server.exists(), "{} is missing: tests/run.sh installs moto[server] into .venv", server.display());
        let (proc, url) = Self::spawn(Command::new(server), &dir.join("moto.log"));
        Moto { url, _proc: proc }
    }

    /// Starts a moto server command (`moto_server`, or a script calling its
    /// `main`) on port 0: werkzeug binds a free port itself and logs
    /// ` * Running on http://127.0.0.1:<port>`. Returns it with its URL.
    pub fn spawn(mut cmd: Command, log: &Path) -> (Proc, String) {
        let from = file_len(log);
        let mut proc = Proc::spawn("moto", aws_env(cmd.args(["-H", "127.0.0.1", "-p", "0"])), log);
        let port = logged_port(&mut proc, log, from, "Running on", "http://127.0.0.1:", Duration::from_secs(30));
        wait_for_port(port, Duration::from_secs(30));
        (proc, format!("http://127.0.0.1:{port}"))
    }

    pub async fn client(&self) -> aws_sdk_ec2::Client {
        ec2_client(&self.url, REGION)
    }
}

/// An EC2 client for a loopback endpoint (moto, or a proxy in front of it):
/// static credentials, retries off.
pub fn ec2_client(endpoint: &str, region: &str) -> aws_sdk_ec2::Client {
    let creds = aws_credential_types::Credentials::new("testing", "testing", None, None, "static");
    let config = aws_sdk_ec2::config::Builder::new()
        .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
        .region(aws_sdk_ec2::config::Region::new(region.to_owned()))
        .credentials_provider(creds)
        .endpoint_url(endpoint)
        .retry_config(aws_sdk_ec2::config::retry::RetryConfig::disabled())
        .build();
    aws_sdk_ec2::Client::from_conf(config)
}

/// An instance registered in moto: the services machine to protect.
pub struct Instance {
    pub id: String,
    pub private_ip: String,
    pub public_ip: String,
}

pub async fn launch_instance(ec2: &aws_sdk_ec2::Client) -> Instance {
    let images = ec2.describe_images().owners("amazon").send().await.expect("moto lists its stock AMIs");
    let ami = images.images().first().and_then(|i| i.image_id()).expect("moto has a stock AMI").to_owned();
    let out = ec2
        .run_instances()
        .image_id(ami)
        .instance_type(aws_sdk_ec2::types::InstanceType::M5Xlarge)
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .expect("RunInstances");
    let i = &out.instances()[0];
    Instance {
        id: i.instance_id().expect("id").to_owned(),
        private_ip: i.private_ip_address().expect("private ip").to_owned(),
        public_ip: i.public_ip_address().unwrap_or_default().to_owned(),
    }
}

/// AMIs carrying tag `key=value`.
pub async fn images_tagged(ec2: &aws_sdk_ec2::Client, key: &str, value: &str) -> Vec<aws_sdk_ec2::types::Image> {
    ec2.describe_images()
        .owners("self")
        .filters(aws_sdk_ec2::types::Filter::builder().name(format!("tag:{key}")).values(value).build())
        .send()
        .await
        .expect("DescribeImages")
        .images()
        .to_vec()
}

/// The deployment's certificates.
pub struct Pki {
    pub dir: PathBuf,
}

/// The account moto runs every test's instances in (its default).
pub const ACCOUNT: &str = "123456789012";

impl Pki {
    /// A root CA, the controller's intermediate (`intermediate/`) and its
    /// server certificate from it, an operator certificate, and the key and
    /// certificate the fake IMDS signs instance identity documents with
    /// (standing in for AWS's).
    pub fn new(dir: &Path) -> Pki {
        let dir = dir.join("pki");
        pki::init_ca(&dir, TRUST_DOMAIN, Validity::days(1).expect("one day")).expect("CA");
        pki::intermediate(&dir, &dir.join("intermediate"), Validity::days(1).expect("one day")).expect("intermediate CA");
        pki::issue(
            &dir.join("intermediate"),
            &Subject::Controller { dns: vec!["localhost".into()], ips: vec!["127.0.0.1".parse().expect("ip")] },
            Validity::days(1).expect("one day"),
            &dir,
            "controller",
        )
        .expect("controller cert");
        write_iid_signer(&dir.join("aws-iid.pem"), &dir.join("aws-iid.key"));
        pki::issue(&dir, &Subject::Operator("tester".into()), Validity::days(1).expect("one day"), &dir, "operator-tester")
            .expect("operator");
        Pki { dir }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Issues (once) and returns (cert, key) of a site's agent.
    pub fn site(&self, site: &str) -> (PathBuf, PathBuf) {
        let stem = format!("site-{site}");
        let cert = self.dir.join(format!("{stem}.pem"));
        if !cert.exists() {
            pki::issue(&self.dir, &Subject::Site(site.into()), Validity::days(1).expect("one day"), &self.dir, &stem).expect("site cert");
        }
        (cert, self.dir.join(format!("{stem}.key")))
    }

    pub fn operator(&self) -> (PathBuf, PathBuf) {
        (self.dir.join("operator-tester.pem"), self.dir.join("operator-tester.key"))
    }

    /// The key the fake IMDS signs identity documents with.
    pub fn iid_key(&self) -> PathBuf {
        self.dir.join("aws-iid.key")
    }

    /// The controller's `[pki]` table, with `extra` lines (lifetimes, ...).
    pub fn controller_toml(&self, extra: &str) -> String {
        let i = self.dir.join("intermediate");
        format!(
            "[pki]\nintermediate_cert = \"{}\"\nintermediate_key = \"{}\"\ninstance_identity_certificates = \"{}\"\naccount_id = \"{ACCOUNT}\"\n{extra}\n",
            i.join("ca.pem").display(),
            i.join("ca.key").display(),
            self.dir.join("aws-iid.pem").display()
        )
    }
}

/// An RSA key and a self-signed certificate for it, as AWS's instance
/// identity certificate in tests (PEM files).
pub fn write_iid_signer(cert: &Path, key: &Path) {
    let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("RSA key");
    let c = rcgen::CertificateParams::new(vec!["ec2.amazonaws.com".to_owned()]).expect("params").self_signed(&k).expect("self-signed");
    std::fs::write(key, k.serialize_pem()).expect("write the IID key");
    std::fs::write(cert, c.pem()).expect("write the IID certificate");
}

/// A fake instance metadata service for one simulated host.
pub struct Imds {
    pub url: String,
    _proc: Proc,
}

impl Imds {
    /// Serves `instance`'s metadata, and its identity document signed with
    /// the test's IID key: `pki/aws-iid.key` (made by [`Pki::new`]) in `dir`
    /// or the nearest directory above it (a machine's directory is inside
    /// the test's).
    pub fn start(dir: &Path, instance: &Instance, public_ip: Option<&str>) -> Imds {
        let key = dir.ancestors().take(4).map(|d| d.join("pki").join("aws-iid.key")).find(|k| k.exists());
        Self::start_signed(instance, public_ip, key.as_deref(), ACCOUNT)
    }

    /// [`Imds::start`] signing with `key` (None: no identity document) for
    /// `account`: what an impostor's fake IMDS, or another account, serves.
    pub fn start_signed(instance: &Instance, public_ip: Option<&str>, key: Option<&Path>, account: &str) -> Imds {
        let mut cmd = Command::new(bin("dr-sim-imds"));
        cmd.args(["--listen", "127.0.0.1:0", "--instance-id", &instance.id, "--private-ip", &instance.private_ip]);
        cmd.args(["--account", account, "--region", REGION]);
        if let Some(k) = key {
            cmd.arg("--iid-key").arg(k);
        }
        if let Some(ip) = public_ip {
            cmd.args(["--public-ip", ip]);
        }
        let mut child = die_with_test(&mut cmd).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn dr-sim-imds");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read IMDS address");
        let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected IMDS line {line:?}"));
        Imds { url: format!("http://{addr}"), _proc: Proc { child, name: "imds".into() } }
    }
}

/// Starts a simulator that prints `listening on <addr>` once bound; returns
/// it with its `http://<addr>` URL.
pub fn spawn_listening(name: &str, args: &[&str]) -> (Proc, String) {
    spawn_listening_cmd(name, Command::new(bin(name)).args(args), Stdio::null())
}

/// [`spawn_listening`] of a prepared command, its stderr sent to `stderr`.
pub fn spawn_listening_cmd(name: &str, cmd: &mut Command, stderr: Stdio) -> (Proc, String) {
    let mut child = die_with_test(cmd).stdout(Stdio::piped()).stderr(stderr).spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read the address");
    let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("{name} printed {line:?}"));
    let url = format!("http://{addr}");
    (Proc { child, name: name.to_owned() }, url)
}

/// A temporary root shaped like a Debian services machine.
pub fn services_machine_root(dir: &Path, private_ip: &str, public_ip: &str) -> PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("etc/default")).expect("mkdir");
    std::fs::create_dir_all(root.join("opt/nomad/server/raft")).expect("mkdir");
    std::fs::create_dir_all(root.join("var/lib/dr-sim")).expect("mkdir");
    let node = format!("ip-{}.ec2.internal", private_ip.replace('.', "-"));
    std::fs::write(
        root.join("etc/default/replicated"),
        format!(
            "RELEASE_CHANNEL=stable\nPRIVATE_ADDRESS={private_ip}\nSKIP_OPERATOR_INSTALL=0\nREPLICATED_OPTS=\" -e DAEMON_TOKEN=abc123 -e LOG_LEVEL=info -e NODENAME={node}\"\nREPLICATED_UI_OPTS=\"\"\n"
        ),
    )
    .expect("write");
    std::fs::write(
        root.join("etc/default/replicated-operator"),
        format!(
            "RELEASE_CHANNEL=stable\nDAEMON_ENDPOINT={private_ip}:9879\nDAEMON_TOKEN=abc123\nDAEMON_HOST={private_ip}\nPRIVATE_ADDRESS={private_ip}\nREPLICATED_OPERATOR_OPTS=\" -e PUBLIC_ADDRESS={public_ip} -e TAGS=local -e LOG_LEVEL=info -e NODENAME={node}\"\n"
        ),
    )
    .expect("write");
    std::fs::write(root.join("opt/nomad/server/raft/raft.db"), b"raft").expect("write");
    root
}

/// A disk for the simulated data plane ([`dataplane`]): a services machine
/// root (`<dir>/root`, see [`services_machine_root`]) with the site's
/// certificate, key and CA in `etc/dr-agent/` and the agent config template
/// `etc/dr-agent/agent.toml.in` (`@ROOT@`: the disk, `@IMDS@`: the machine's
/// IMDS URL, filled in at each boot). `extra_agent_toml` is appended to the
/// template (e.g. `[freeze]` tables). Use one `dir` per disk.
pub fn site_disk(dir: &Path, pki: &Pki, site: &str, controller_url: &str, instance: &Instance, extra_agent_toml: &str) -> PathBuf {
    let public = Some(instance.public_ip.as_str()).filter(|p| !p.is_empty()).unwrap_or("54.10.20.30");
    let root = services_machine_root(dir, &instance.private_ip, public);
    let etc = root.join("etc/dr-agent");
    std::fs::create_dir_all(&etc).expect("mkdir etc/dr-agent");
    std::fs::create_dir_all(root.join("var/lib/dr-agent")).expect("mkdir var/lib/dr-agent");
    let (cert, key) = pki.site(site);
    for (from, to) in [(pki.ca(), "ca.pem"), (cert, "agent.pem"), (key, "agent.key")] {
        std::fs::copy(&from, etc.join(to)).unwrap_or_else(|e| panic!("copy {} into the disk: {e}", from.display()));
    }
    std::fs::write(
        etc.join("agent.toml.in"),
        format!(
            "site_id = \"{site}\"\ncontroller_url = \"{controller_url}\"\nstate_dir = \"@ROOT@/var/lib/dr-agent\"\nroot = \"@ROOT@\"\n\n\
             [tls]\nca = \"@ROOT@/etc/dr-agent/ca.pem\"\ncert = \"@ROOT@/etc/dr-agent/agent.pem\"\nkey = \"@ROOT@/etc/dr-agent/agent.key\"\n\n\
             [imds]\nendpoint = \"@IMDS@\"\n\n\
             [replicated]\nreplicatedctl = \"{}\"\npoll_interval = \"100ms\"\n\n[reconnect]\ninitial = \"200ms\"\nmax = \"2s\"\n\n{extra_agent_toml}\n",
            bin("dr-sim-replicatedctl").display(),
        ),
    )
    .expect("write agent.toml.in");
    root
}

/// What the data plane's control API answered when it refused a request.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

/// A `dr-sim-dataplane` process in front of moto: use [`DataPlane::url`] as
/// the EC2 endpoint. Its work dir is `dir`, its log `dir/dataplane.log`,
/// each machine's agent and IMDS log `dir/machines/<instance-id>.log`.
pub struct DataPlane {
    pub url: String,
    pub proc: Proc,
    pub dir: PathBuf,
    /// Its machines' agents may wipe Nomad's state.
    _nomad: NomadGuard,
}

impl DataPlane {
    pub fn start(dir: &Path, moto_url: &str, boot_delay: Duration) -> DataPlane {
        let nomad = nomad_shared();
        std::fs::create_dir_all(dir).expect("mkdir data plane dir");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("dataplane.log")).expect("log file");
        let mut cmd = Command::new(bin("dr-sim-dataplane"));
        aws_env(&mut cmd)
            .args(["--listen", "127.0.0.1:0", "--moto", moto_url, "--app-secs", "0.5"])
            .arg("--dir")
            .arg(dir)
            .arg("--boot-delay")
            .arg(format!("{}ms", boot_delay.as_millis()))
            // The test's "AWS" key (Pki::new beside this dir) signs each
            // machine's identity document.
            .arg("--iid-key")
            .arg(dir.parent().unwrap_or(dir).join("pki").join("aws-iid.key"));
        let (proc, url) = spawn_listening_cmd("dr-sim-dataplane", &mut cmd, Stdio::from(log));
        DataPlane { url, proc, dir: dir.to_owned(), _nomad: nomad }
    }

    /// `POST /dataplane/adopt`: the instance (launched by the test) runs
    /// from `disk` in place, booted now.
    pub async fn adopt(&self, instance_id: &str, disk: &Path) -> Result<dataplane::MachineView, ApiError> {
        let body = serde_json::json!({ "instance_id": instance_id, "disk": disk });
        let (status, value) = self.call("POST", "/dataplane/adopt", Some(body)).await;
        if status == 200 {
            Ok(serde_json::from_value(value).expect("a machine view"))
        } else {
            Err(ApiError { status, message: value["error"].as_str().unwrap_or_default().to_owned() })
        }
    }

    pub async fn machines(&self) -> Vec<dataplane::MachineView> {
        let (status, value) = self.call("GET", "/dataplane/machines", None).await;
        assert_eq!(status, 200, "GET /dataplane/machines: {value}");
        serde_json::from_value(value).expect("machine views")
    }

    pub async fn machine(&self, instance_id: &str) -> Option<dataplane::MachineView> {
        self.machines().await.into_iter().find(|m| m.instance_id == instance_id)
    }

    /// `POST /dataplane/lose`: the host dies (SIGKILL) without EC2 knowing.
    pub async fn lose(&self, instance_id: &str) -> dataplane::MachineView {
        let body = serde_json::json!({ "instance_id": instance_id });
        let (status, value) = self.call("POST", "/dataplane/lose", Some(body)).await;
        assert_eq!(status, 200, "POST /dataplane/lose: {value}");
        serde_json::from_value(value).expect("a machine view")
    }

    /// `GET /dataplane/images`: AMI id to disk.
    pub async fn images(&self) -> std::collections::BTreeMap<String, PathBuf> {
        let (status, value) = self.call("GET", "/dataplane/images", None).await;
        assert_eq!(status, 200, "GET /dataplane/images: {value}");
        serde_json::from_value(value).expect("images")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dataplane.log")).unwrap_or_default()
    }

    pub fn machine_log(&self, instance_id: &str) -> String {
        std::fs::read_to_string(self.dir.join("machines").join(format!("{instance_id}.log"))).unwrap_or_default()
    }

    async fn call(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
        use http_body_util::BodyExt;
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<http_body_util::Full<hyper::body::Bytes>>();
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(hyper::body::Bytes::from(body.map(|b| b.to_string()).unwrap_or_default())))
            .expect("request");
        let resp = client.request(req).await.unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", self.log()));
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{method} {path} answered {status} without JSON ({e}): {}", text(&bytes)));
        (status, value)
    }
}

/// Options of a controller under test.
#[derive(Clone)]
pub struct ControllerSpec {
    /// The port to listen on; 0: the controller binds a free port itself
    /// and logs it ([`Controller::restart`] reads it; restarts reuse it).
    pub port: u16,
    pub heartbeat: &'static str,
    pub poll_initial: &'static str,
    pub sites: Vec<(String, String)>,
    /// Extra TOML placed before the sites (e.g. a `[policy]` table).
    pub extra: String,
    /// EC2 endpoint instead of moto's own URL (e.g. a throttling proxy).
    pub endpoint: Option<String>,
    /// Record this controller's AWS calls into this directory (a test that
    /// evaluates its own controller's calls); `None`: into
    /// `DR_IAM_RECORD_DIR` when set ([`iam_record::wrap`]).
    pub record_into: Option<PathBuf>,
}

/// A dr-controller process with its config and store in `dir`.
pub struct Controller {
    pub dir: PathBuf,
    pub port: u16,
    pub url: String,
    pub config: PathBuf,
    pub proc: Option<Proc>,
    /// Where the running process's lines start in `controller.log`.
    log_from: u64,
}

impl Controller {
    pub fn write_config(dir: &Path, pki: &Pki, moto: &Moto, spec: &ControllerSpec) -> PathBuf {
        let mut text = format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\nheartbeat_interval = \"{}\"\nshutdown_grace = \"3s\"\n\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\ntrust_domain = \"{TRUST_DOMAIN}\"\n\n\
             {}[aws]\nregion = \"{REGION}\"\nendpoint_url = \"{}\"\nmax_attempts = 1\n\n\
             [backup]\npoll_initial = \"{}\"\npoll_max = \"5s\"\ntimeout = \"10m\"\nagent_call_timeout = \"10s\"\n\
             copy_poll = \"500ms\"\nscheduler_tick = \"500ms\"\n\n{}\n",
            spec.port,
            spec.heartbeat,
            pki.ca().display(),
            pki.dir.join("controller.pem").display(),
            pki.dir.join("controller.key").display(),
            // A test's own `[store]` (PostgreSQL) replaces the SQLite file.
            if spec.extra.contains("[store]\n") {
                String::new()
            } else {
                format!("[store]\npath = \"{}\"\n\n", dir.join("state.db").display())
            },
            iam_record::wrap(spec.endpoint.as_deref().unwrap_or(&moto.url), &moto.url, spec.record_into.as_deref()),
            spec.poll_initial,
            spec.extra,
        );
        // A test's own `[pki]` keys go into the harness's table.
        if text.contains("[pki]\n") {
            text = text.replacen("[pki]\n", &pki.controller_toml(""), 1);
        } else {
            text.push_str(&pki.controller_toml(""));
        }
        for (id, instance) in &spec.sites {
            text.push_str(&format!("\n[[site]]\nid = \"{id}\"\ninstance_id = \"{instance}\"\n"));
        }
        let path = dir.join("controller.toml");
        std::fs::write(&path, text).expect("write controller config");
        path
    }

    pub fn start(dir: &Path, pki: &Pki, moto: &Moto, spec: &ControllerSpec) -> Controller {
        let config = Self::write_config(dir, pki, moto, spec);
        Self::start_with_config(dir, config, spec.port)
    }

    /// Starts a controller of a config written by [`Controller::write_config`]
    /// (and maybe edited) listening on `port`; 0: on a port it binds itself.
    pub fn start_with_config(dir: &Path, config: PathBuf, port: u16) -> Controller {
        let mut c = Controller { dir: dir.to_owned(), port, url: format!("https://127.0.0.1:{port}"), config, proc: None, log_from: 0 };
        c.restart(&[]);
        c
    }

    /// Starts a replica of a shared (PostgreSQL) store that is expected to
    /// wait as a standby: returns once it answers as one.
    pub fn start_standby(dir: &Path, config: PathBuf, port: u16) -> Controller {
        let mut c = Controller { dir: dir.to_owned(), port, url: format!("https://127.0.0.1:{port}"), config, proc: None, log_from: 0 };
        c.start_expecting(&[], "standby: waiting for the leader lease");
        c
    }

    /// Waits until the running process logs that it leads and listens as
    /// the leader (a standby that took over).
    pub fn wait_leading(&mut self, within: Duration) {
        let log = self.dir.join("controller.log");
        let proc = self.proc.as_mut().expect("the controller runs");
        let port = logged_port(proc, &log, self.log_from, "dr-controller listening", "addr=127.0.0.1:", within);
        assert_eq!(port, self.port, "the standby leads on the port it answered on");
    }

    /// Starts the process again (after a kill), with extra environment.
    pub fn restart(&mut self, env: &[(&str, &str)]) {
        self.start_expecting(env, "dr-controller listening");
    }

    /// Starts the process and waits for `ready` (a log message carrying
    /// `addr=`) within 30 s.
    pub fn start_expecting(&mut self, env: &[(&str, &str)], ready: &str) {
        // The one before is gone first (an SQLite store admits one
        // controller: the lock is released when the process ends).
        if let Some(mut old) = self.proc.take() {
            old.kill();
        }
        let mut cmd = Command::new(bin("dr-controller"));
        aws_env(&mut cmd).arg("--config").arg(&self.config).env("RUST_LOG", "info,aws=warn,h2=warn,hyper=warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let log = self.dir.join("controller.log");
        let from = file_len(&log);
        self.log_from = from;
        let proc = self.proc.insert(Proc::spawn("dr-controller", &mut cmd, &log));
        // The address the controller logs once bound (no pick-then-release
        // of a port: with port 0 in the config it binds a free one).
        let port = logged_port(proc, &log, from, ready, "addr=127.0.0.1:", Duration::from_secs(30));
        if self.port == 0 {
            // Restarts must come back at the same address (the agents know
            // it): the config names the port from now on.
            let text = std::fs::read_to_string(&self.config).expect("read the controller config");
            let pinned = text.replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{port}\""), 1);
            std::fs::write(&self.config, pinned).expect("pin the controller's port in its config");
            self.port = port;
            self.url = format!("https://127.0.0.1:{port}");
        }
        assert_eq!(port, self.port, "the controller listens on its configured port");
        wait_for_port(self.port, Duration::from_secs(30));
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("controller.log")).unwrap_or_default()
    }

    /// The port the running controller's `[metrics]` listener bound (it
    /// logs it; configure `listen = "127.0.0.1:0"`).
    pub fn metrics_port(&mut self) -> u16 {
        let log = self.dir.join("controller.log");
        let proc = self.proc.as_mut().expect("the controller runs");
        logged_port(proc, &log, self.log_from, "metrics listening", "addr=127.0.0.1:", Duration::from_secs(30))
    }
}

/// A dr-agent process for one simulated services machine.
pub struct Agent {
    pub config: PathBuf,
    pub root: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    pub proc: Option<Proc>,
}

impl Agent {
    pub fn start(dir: &Path, pki: &Pki, site: &str, controller_url: &str, imds: &Imds, root: &Path) -> Agent {
        Self::start_with(dir, pki, site, controller_url, imds, root, "")
    }

    /// Like [`Agent::start`], with extra TOML appended to the agent's config
    /// (e.g. `[freeze]` or `[nomad]` tables).
    pub fn start_with(dir: &Path, pki: &Pki, site: &str, controller_url: &str, imds: &Imds, root: &Path, extra: &str) -> Agent {
        let (cert, key) = pki.site(site);
        let state_dir = dir.join(format!("agent-{site}"));
        std::fs::create_dir_all(&state_dir).expect("mkdir");
        let config = state_dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "site_id = \"{site}\"\ncontroller_url = \"{controller_url}\"\nstate_dir = \"{}\"\nroot = \"{}\"\n\n\
                 [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n[imds]\nendpoint = \"{}\"\n\n\
                 [replicated]\nreplicatedctl = \"{}\"\npoll_interval = \"100ms\"\n\n[reconnect]\ninitial = \"200ms\"\nmax = \"2s\"\n\n{}\n",
                state_dir.display(),
                root.display(),
                pki.ca().display(),
                cert.display(),
                key.display(),
                imds.url,
                bin("dr-sim-replicatedctl").display(),
                extra,
            ),
        )
        .expect("write agent config");
        let mut a = Agent { config, root: root.to_owned(), log: state_dir.join("agent.log"), state_dir, proc: None };
        a.restart();
        a
    }

    pub fn restart(&mut self) {
        let mut cmd = Command::new(bin("dr-agent"));
        aws_env(&mut cmd)
            .args(["run", "--config"])
            .arg(&self.config)
            .env("DR_SIM_STATE_DIR", self.root.join("var/lib/dr-sim"))
            .env("DR_SIM_STOP_SECS", "0.5")
            .env("DR_SIM_START_SECS", "0.5")
            .env("RUST_LOG", "info");
        self.proc = Some(Proc::spawn("dr-agent", &mut cmd, &self.log));
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Calls the simulated replicatedctl has received, by argument list.
    pub fn replicatedctl_calls(&self, args: &str) -> usize {
        replicatedctl_calls(&self.root, args)
    }
}

/// Calls the simulated replicatedctl of the machine at `root` has received,
/// with exactly these arguments (e.g. "app stop").
pub fn replicatedctl_calls(root: &Path, args: &str) -> usize {
    let log = std::fs::read_to_string(root.join("var/lib/dr-sim/calls.log")).unwrap_or_default();
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["args"].as_array().map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(" ")) == Some(args.to_owned())
        })
        .count()
}

/// A drctl command against a controller with the given client certificate.
pub fn drctl_command(controller_url: &str, ca: &Path, cert: &Path, key: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("drctl"));
    aws_env(&mut cmd)
        .env("DRCTL_CONTROLLER", controller_url)
        .env("DRCTL_CA", ca)
        .env("DRCTL_CERT", cert)
        .env("DRCTL_KEY", key)
        .env_remove("DRCTL_CONFIG")
        .env_remove("DRCTL_SERVER_NAME")
        .args(args);
    cmd
}

/// Runs drctl against a controller with the given client certificate.
pub fn drctl_as(controller_url: &str, ca: &Path, cert: &Path, key: &Path, args: &[&str]) -> Output {
    drctl_command(controller_url, ca, cert, key, args).output().expect("run drctl")
}

/// Runs drctl as the test operator.
pub fn drctl(pki: &Pki, controller_url: &str, args: &[&str]) -> Output {
    let (cert, key) = pki.operator();
    drctl_as(controller_url, &pki.ca(), &cert, &key, args)
}

/// drctl's JSON output, or a panic showing what it printed.
pub fn drctl_json(pki: &Pki, controller_url: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    let out = drctl(pki, controller_url, &all);
    assert!(out.status.success(), "drctl {args:?} failed: {}{}", text(&out.stdout), text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("drctl {args:?} printed no JSON ({e}): {}", text(&out.stdout)))
}

/// drctl's `--output json` is JSON lines: every value it printed, in order.
pub fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    text(stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("drctl printed a line that is not JSON ({e}): {l}")))
        .collect()
}

/// The last JSON line drctl printed (`backup --wait -o json`: the finished
/// operation, after the line with its id).
pub fn last_json(stdout: &[u8]) -> serde_json::Value {
    json_lines(stdout).pop().unwrap_or_else(|| panic!("drctl printed no JSON: {}", text(stdout)))
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The status entry of one site.
pub fn site_status(pki: &Pki, controller_url: &str, site: &str) -> serde_json::Value {
    let status = drctl_json(pki, controller_url, &["status"]);
    status["sites"].as_array().and_then(|s| s.iter().find(|x| x["site_id"] == site).cloned()).unwrap_or_default()
}

pub fn agent_connected(pki: &Pki, controller_url: &str, site: &str) -> bool {
    let s = site_status(pki, controller_url, site);
    s["agent"]["connected"] == true && s["agent"]["role"] == "primary"
}

/// A full single-site world: moto, PKI, one instance, its simulated machine
/// with IMDS, a controller and an agent.
pub struct World {
    pub dir: tempfile::TempDir,
    pub moto: Moto,
    pub pki: Pki,
    pub instance: Instance,
    pub imds: Imds,
    pub controller: Controller,
    pub agent: Agent,
    pub site: String,
    /// Its agent may be asked to wipe Nomad's state.
    _nomad: NomadGuard,
}

impl World {
    pub async fn start(site: &str, poll_initial: &'static str) -> World {
        Self::start_with(site, poll_initial, &[]).await
    }

    /// Like [`World::start`], with more configured sites (id, instance id)
    /// that have no agent.
    pub async fn start_with(site: &str, poll_initial: &'static str, extra_sites: &[(&str, &str)]) -> World {
        Self::start_full(site, poll_initial, extra_sites, "").await
    }

    /// Like [`World::start_with`], with extra controller TOML (policies, metrics).
    pub async fn start_full(site: &str, poll_initial: &'static str, extra_sites: &[(&str, &str)], extra_config: &str) -> World {
        Self::start_custom(site, poll_initial, extra_sites, extra_config, "").await
    }

    /// The most general start: extra controller TOML and extra agent TOML.
    pub async fn start_custom(
        site: &str,
        poll_initial: &'static str,
        extra_sites: &[(&str, &str)],
        extra_config: &str,
        agent_config: &str,
    ) -> World {
        let nomad = nomad_shared();
        let dir = tempfile::tempdir().expect("tempdir");
        let moto = Moto::start(dir.path());
        let ec2 = moto.client().await;
        let instance = launch_instance(&ec2).await;
        let pki = Pki::new(dir.path());
        let public = Some(instance.public_ip.as_str()).filter(|p| !p.is_empty());
        let imds = Imds::start(dir.path(), &instance, public);
        let root = services_machine_root(dir.path(), &instance.private_ip, public.unwrap_or("54.10.20.30"));
        let spec = ControllerSpec {
            port: 0,
            heartbeat: "1s",
            poll_initial,
            sites: std::iter::once((site.to_owned(), instance.id.clone()))
                .chain(extra_sites.iter().map(|(s, i)| (s.to_string(), i.to_string())))
                .collect(),
            extra: extra_config.to_owned(),
            endpoint: None,
            record_into: None,
        };
        let controller = Controller::start(dir.path(), &pki, &moto, &spec);
        let agent = Agent::start_with(dir.path(), &pki, site, &controller.url, &imds, &root, agent_config);
        World { dir, moto, pki, instance, imds, controller, agent, site: site.to_owned(), _nomad: nomad }
    }

    pub fn wait_agent(&self) {
        assert_eventually!(
            Duration::from_secs(30),
            agent_connected(&self.pki, &self.controller.url, &self.site),
            "agent of {} connected as primary; agent log:\n{}\ncontroller log:\n{}",
            self.site,
            self.agent.log(),
            self.controller.log()
        );
    }
}

/// A scriptable stand-in for the controller's agent stream (real TLS, real
/// certificates): each agent session is handed to the test, which sends
/// commands and reads what the agent answers.
pub mod fake_control_plane {
    use std::pin::Pin;
    use std::time::Duration;

    use dr_proto::pb;
    use tokio::sync::mpsc;
    use tokio_stream::StreamExt;
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::{Request, Response, Status, Streaming};

    use super::Pki;

    pub struct FakeSession {
        pub hello: pb::Hello,
        to_agent: mpsc::Sender<Result<pb::ControllerMessage, Status>>,
        from_agent: mpsc::Receiver<pb::AgentMessage>,
    }

    impl FakeSession {
        /// Sends an app-status command.
        pub async fn send_command(&self, id: &str) {
            self.send(id, pb::command::Kind::AppStatus(pb::AppStatusRequest {})).await;
        }

        /// Sends any command.
        pub async fn send(&self, id: &str, kind: pb::command::Kind) {
            let cmd = pb::Command { id: id.to_owned(), deadline_ms: 30_000, target: None, kind: Some(kind) };
            self.to_agent
                .send(Ok(pb::ControllerMessage { msg: Some(pb::controller_message::Msg::Command(cmd)) }))
                .await
                .expect("agent stream open");
        }

        /// Whether the agent's stream ends within `timeout` (what it sends
        /// until then is skipped).
        pub async fn ends_within(&mut self, timeout: Duration) -> bool {
            tokio::time::timeout(timeout, async { while self.from_agent.recv().await.is_some() {} }).await.is_ok()
        }

        /// The next command result, skipping heartbeats.
        pub async fn next_result(&mut self) -> pb::CommandResult {
            loop {
                let msg = tokio::time::timeout(Duration::from_secs(20), self.from_agent.recv())
                    .await
                    .expect("a result within 20s")
                    .expect("agent stream open");
                if let Some(pb::agent_message::Msg::Result(r)) = msg.msg {
                    return r;
                }
            }
        }
    }

    pub struct FakeControlPlane {
        pub url: String,
        pub sessions: mpsc::Receiver<FakeSession>,
    }

    #[derive(Clone)]
    struct Service {
        sessions: mpsc::Sender<FakeSession>,
        heartbeat_ms: u32,
        /// Signs enrolments for whatever instance asks (a fake: no checks).
        signer: std::sync::Arc<dr_controller::pki::Signer>,
        bundle: String,
    }

    type Out = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ControllerMessage, Status>> + Send>>;

    #[tonic::async_trait]
    impl pb::agent_service_server::AgentService for Service {
        type SessionStream = Out;

        async fn session(&self, request: Request<Streaming<pb::AgentMessage>>) -> Result<Response<Self::SessionStream>, Status> {
            let mut inbound = request.into_inner();
            let Some(Ok(pb::AgentMessage { msg: Some(pb::agent_message::Msg::Hello(hello)) })) = inbound.next().await else {
                return Err(Status::invalid_argument("expected Hello"));
            };
            let (to_agent, rx) = mpsc::channel(16);
            let (from_tx, from_agent) = mpsc::channel(64);
            let welcome = pb::Welcome {
                heartbeat_interval_ms: self.heartbeat_ms,
                role: "primary".into(),
                reason: String::new(),
                operation_id: String::new(),
            };
            to_agent
                .send(Ok(pb::ControllerMessage { msg: Some(pb::controller_message::Msg::Welcome(welcome)) }))
                .await
                .map_err(|_| Status::internal("closed"))?;
            tokio::spawn(async move {
                while let Some(Ok(m)) = inbound.next().await {
                    if from_tx.send(m).await.is_err() {
                        break;
                    }
                }
            });
            let _ = self.sessions.send(FakeSession { hello, to_agent, from_agent }).await;
            let out: Out = Box::pin(ReceiverStream::new(rx));
            Ok(Response::new(out))
        }

        async fn enroll(&self, request: Request<pb::EnrollRequest>) -> Result<Response<pb::EnrollReply>, Status> {
            let r = request.into_inner();
            let identity = dr_proto::identity::Identity::instance(crate::TRUST_DOMAIN, &r.site_id, &r.instance_id);
            let issued = self
                .signer
                .sign_csr(&r.csr_der, &identity, Duration::from_secs(3600))
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            Ok(Response::new(pb::EnrollReply { cert_chain_pem: issued.chain_pem, trust_bundle_pem: self.bundle.clone() }))
        }
    }

    impl FakeControlPlane {
        /// Serves on a free loopback port with the PKI's controller cert.
        /// Heartbeats are set to 5 minutes so that only commands and Hellos
        /// run steps on the agent.
        pub async fn start(pki: &Pki) -> FakeControlPlane {
            dr_proto::tls::install_crypto_provider();
            let files = dr_proto::tls::TlsFiles { ca: pki.ca(), cert: pki.dir.join("controller.pem"), key: pki.dir.join("controller.key") };
            let config = dr_proto::tls::server_config(&files).expect("server TLS");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let port = listener.local_addr().expect("addr").port();
            let incoming = dr_controller::api::server::tls_incoming(listener, config, Duration::from_secs(5));
            let (tx, sessions) = mpsc::channel(8);
            let i = pki.dir.join("intermediate");
            let signer = dr_controller::pki::Signer::load(&i.join("ca.pem"), &i.join("ca.key"), crate::TRUST_DOMAIN).expect("intermediate");
            let bundle = std::fs::read_to_string(pki.ca()).expect("read the CA");
            let svc = Service { sessions: tx, heartbeat_ms: 300_000, signer: std::sync::Arc::new(signer), bundle };
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(pb::agent_service_server::AgentServiceServer::new(svc))
                    .serve_with_incoming(incoming),
            );
            FakeControlPlane { url: format!("https://127.0.0.1:{port}"), sessions }
        }

        pub async fn next_session(&mut self) -> FakeSession {
            tokio::time::timeout(Duration::from_secs(30), self.sessions.recv())
                .await
                .expect("an agent session within 30s")
                .expect("server running")
        }
    }
}

/// Many sites without agents (crash-consistent backups need none), their
/// instances in moto, a controller whose EC2 endpoint is a throttling proxy.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub moto: Moto,
    pub proxy: throttle::ThrottleProxy,
    pub pki: Pki,
    pub controller: Controller,
    pub sites: Vec<String>,
}

impl Fleet {
    pub async fn start(n: usize, throttle_share: f64, extra_config: &str) -> Fleet {
        let dir = tempfile::tempdir().expect("tempdir");
        let moto = Moto::start(dir.path());
        let ec2 = moto.client().await;
        let mut sites = Vec::new();
        let images = ec2.describe_images().owners("amazon").send().await.expect("stock AMIs");
        let ami = images.images().first().and_then(|i| i.image_id()).expect("an AMI").to_owned();
        let mut launched = Vec::new();
        let mut left = n;
        while left > 0 {
            let batch = left.min(50);
            let out =
                ec2.run_instances().image_id(&ami).min_count(batch as i32).max_count(batch as i32).send().await.expect("RunInstances");
            launched.extend(out.instances().iter().map(|i| i.instance_id().expect("id").to_owned()));
            left -= batch;
        }
        for (i, id) in launched.iter().enumerate() {
            sites.push((format!("site-{i:04}"), id.clone()));
        }
        let proxy = throttle::start(&moto.url, throttle_share, 7).await;
        let pki = Pki::new(dir.path());
        let spec = ControllerSpec {
            port: 0,
            heartbeat: "10s",
            poll_initial: "200ms",
            sites: sites.clone(),
            extra: extra_config.to_owned(),
            endpoint: Some(proxy.url.clone()),
            record_into: None,
        };
        let controller = Controller::start(dir.path(), &pki, &moto, &spec);
        Fleet { dir, moto, proxy, pki, controller, sites: sites.into_iter().map(|(s, _)| s).collect() }
    }

    /// Starts a backup of every site through the admin API; returns the
    /// operation ids.
    pub async fn backup_all(&self) -> Vec<String> {
        let mut client = self.admin().await;
        let mut ids = Vec::new();
        for site in &self.sites {
            let op =
                client.start_backup(dr_proto::pb::StartBackupRequest { site_id: site.clone() }).await.expect("StartBackup").into_inner();
            ids.push(op.operation_id);
        }
        ids
    }

    /// Waits until every operation finished; returns them.
    pub async fn wait_all(&self, ids: &[String], timeout: Duration) -> Vec<dr_proto::pb::Operation> {
        let mut client = self.admin().await;
        let deadline = Instant::now() + timeout;
        loop {
            let mut done = Vec::new();
            for id in ids {
                let op =
                    client.get_operation(dr_proto::pb::OperationRef { operation_id: id.clone() }).await.expect("GetOperation").into_inner();
                if op.state == "running" {
                    break;
                }
                done.push(op);
            }
            if done.len() == ids.len() {
                return done;
            }
            assert!(Instant::now() < deadline, "operations still running after {timeout:?}:\n{}", self.controller.log());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn admin(&self) -> dr_proto::pb::admin_service_client::AdminServiceClient<tonic::transport::Channel> {
        admin_client(&self.pki, &self.controller.url).await
    }
}

/// An admin API client of the controller at `url`, as the test operator.
pub async fn admin_client(pki: &Pki, url: &str) -> dr_proto::pb::admin_service_client::AdminServiceClient<tonic::transport::Channel> {
    dr_proto::tls::install_crypto_provider();
    let (cert, key) = pki.operator();
    let files = dr_proto::tls::TlsFiles { ca: pki.ca(), cert, key };
    let tls = dr_proto::tls::client_config(&files, "127.0.0.1").expect("client TLS");
    let channel = tonic::transport::Channel::from_shared(url.to_owned())
        .expect("url")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("connect to the controller");
    dr_proto::pb::admin_service_client::AdminServiceClient::new(channel)
}

/// A real ext4 file system on a loop device, mounted under a temp dir;
/// unmounted (thawed first) and detached on drop. Panics (never skips) when
/// loop devices are unavailable: these tests need root.
pub struct LoopFs {
    pub mount: PathBuf,
    dev: String,
    _dir: tempfile::TempDir,
}

impl LoopFs {
    pub fn new(size_mb: u32) -> LoopFs {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("fs.img");
        let mount = dir.path().join("mnt");
        std::fs::create_dir_all(&mount).expect("mkdir");
        let ok = |cmd: &mut Command| {
            let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
            assert!(out.status.success(), "{cmd:?} failed: {}", text(&out.stderr));
            text(&out.stdout).trim().to_owned()
        };
        ok(Command::new("truncate").arg("-s").arg(format!("{size_mb}M")).arg(&img));
        ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
        let dev = ok(Command::new("losetup").args(["--find", "--show"]).arg(&img));
        ok(Command::new("mount").arg(&dev).arg(&mount));
        LoopFs { mount, dev, _dir: dir }
    }

    /// Whether a small write completes within `timeout` (a frozen file
    /// system blocks writers). The writer is a child process, killed if it
    /// blocks; its write completes once the file system thaws.
    pub fn writable_within(&self, timeout: Duration) -> bool {
        let target = self.mount.join(format!("probe-{}", std::process::id()));
        let mut child = die_with_test(&mut Command::new("sh"))
            .arg("-c")
            .arg(format!("echo x > '{}' && sync -f '{}'", target.display(), target.display()))
            .spawn()
            .expect("spawn writer");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        // Reaped once the file system thaws (a writer blocked on a frozen
        // file system dies only then).
        std::thread::spawn(move || child.wait());
        false
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.mount).stderr(Stdio::null()).status();
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// A new, empty database on the test PostgreSQL server (`DR_TEST_PG`, which
/// tests/run.sh starts): its URL, for a `[store] url`.
pub fn postgres_database() -> String {
    let server = std::env::var("DR_TEST_PG")
        .unwrap_or_else(|_| panic!("DR_TEST_PG is not set: run tests/run.sh, or `tests/postgres.sh start DIR` and export its URL"));
    postgres_database_on(&server)
}

/// A PostgreSQL server of one test's own (tests/postgres.sh), for tests
/// that restart it; stopped when dropped.
pub struct OwnPostgres {
    pub dir: PathBuf,
    pub url: String,
}

impl OwnPostgres {
    pub fn start(dir: &Path) -> OwnPostgres {
        let dir = dir.to_owned();
        let out =
            Command::new("bash").arg(repo_root().join("tests/postgres.sh")).arg("start").arg(&dir).output().expect("tests/postgres.sh");
        assert!(out.status.success(), "tests/postgres.sh start: {}", text(&out.stderr));
        OwnPostgres { dir, url: text(&out.stdout).trim().to_owned() }
    }

    /// `pg_ctl restart -m fast`: every session is cut; the same port after.
    pub fn restart(&self) {
        let out = Command::new("bash")
            .arg(repo_root().join("tests/postgres.sh"))
            .arg("restart")
            .arg(&self.dir)
            .output()
            .expect("tests/postgres.sh");
        assert!(out.status.success(), "tests/postgres.sh restart: {}", text(&out.stderr));
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(repo_root().join("tests/postgres.sh")).arg("stop").arg(&self.dir).output();
    }
}

/// A new, empty database on the PostgreSQL server at `server`: its URL.
pub fn postgres_database_on(server: &str) -> String {
    let server = server.to_owned();
    let name = format!("dr_e2e_{:016x}", rand::random::<u64>());
    let (url, db) = (server.clone(), name.clone());
    // rust-postgres' blocking client runs its own runtime: not on a tokio thread.
    std::thread::spawn(move || {
        let target = dr_controller::store::PgTarget::new(&url, None, None).expect("DR_TEST_PG is a PostgreSQL URL");
        target.create_database(&db).expect("create the test database");
    })
    .join()
    .expect("create the test database");
    match server.rfind('/') {
        Some(at) if server[..at].contains("://") && !server[..at].ends_with('/') => format!("{}/{name}", &server[..at]),
        _ => panic!("DR_TEST_PG `{server}` is not a postgres://host:port/db URL"),
    }
}

/// `GET path` on a loopback HTTP port (metrics, `/leader`): the whole
/// response, status line included.
pub fn http_get(port: u16, path: &str) -> String {
    try_http_get(port, path).unwrap_or_else(|e| panic!("GET 127.0.0.1:{port}{path}: {e}"))
}

/// [`http_get`], or why there was no answer (nothing listening).
pub fn try_http_get(port: u16, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Sends signal `sig` (`TERM`, `STOP`, `CONT`, ...) to a process.
pub fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().expect("kill");
    assert!(st.success(), "kill -{sig} {pid}");
}
