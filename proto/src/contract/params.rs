//! Every step's parameters, and [`Request`]: the closed set of commands a
//! controller may send, in typed form, with the one conversion to and from
//! the wire's `Command.kind`. What a request does not name (paths, URLs,
//! tokens, timeouts) comes from the agent's own configuration.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::reports::Target;
use crate::pb;

/// What an app step does: stop or start, and for a stop whether to force it
/// (steps `app_stop`, `app_start`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppParams {
    pub target: Target,
    /// `app stop -f` (ignored for a start).
    #[serde(default)]
    pub force: bool,
}

/// Which hostname to set (step `set_hostname`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostnameParams {
    pub hostname: String,
}

/// One address to replace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressChange {
    pub old: IpAddr,
    pub new: IpAddr,
}

/// An `OLD=NEW` value that is not a pair of addresses of one family.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{flag} {value:?}: {message}")]
pub struct BadChange {
    pub flag: String,
    pub value: String,
    pub message: String,
}

impl AddressChange {
    /// Parses `OLD=NEW` (IPv6 may be bracketed); errors name `flag`.
    pub fn parse(flag: &str, value: &str) -> Result<AddressChange, BadChange> {
        let bad = |message: String| BadChange { flag: flag.to_owned(), value: value.to_owned(), message };
        let (old, new) = value.split_once('=').ok_or_else(|| bad("expected OLD=NEW".into()))?;
        let ip = |s: &str, which: &str| {
            let t = s.trim();
            let t = t.strip_prefix('[').and_then(|t| t.strip_suffix(']')).unwrap_or(t);
            t.parse::<IpAddr>().map_err(|_| bad(format!("{which} {s:?} is not an IP address")))
        };
        let change = AddressChange { old: ip(old, "OLD")?, new: ip(new, "NEW")? };
        if change.old.is_ipv4() != change.new.is_ipv4() {
            return Err(bad("OLD and NEW must both be IPv4 or both IPv6".into()));
        }
        Ok(change)
    }
}

/// What to rewrite in the Replicated files (step `rewrite_addresses`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RewriteParams {
    pub private: Vec<AddressChange>,
    pub public: Vec<AddressChange>,
}

/// The Nomad wipe takes everything else from the configuration (`root`,
/// `nomad.data_dir`, `replicated.*`) (step `wipe_nomad`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WipeParams {
    /// The data dir is on a mounted disk (`recover --offline --root`):
    /// nothing runs from it, so the app and process checks, which would
    /// look at the host, are skipped. The path rules still apply.
    #[serde(default)]
    pub offline: bool,
}

/// What to clean up (step `cleanup_builds`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanupParams {
    /// The cutoff, RFC 3339 (e.g. the backup's point in time): only running
    /// builds that started strictly before it are deleted.
    pub before: String,
}

/// What to freeze, and for how long at most (step `freeze`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FreezeParams {
    /// Mount points; empty means `freeze.mounts` from the configuration.
    pub mounts: Vec<PathBuf>,
    /// The watchdog thaws at this deadline whatever happens.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
}

/// Which mounts to thaw (step `thaw`; the wire names none).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ThawParams {
    /// Empty: `freeze.mounts` from the configuration, or else every freeze
    /// recorded in state_dir/freeze.
    pub mounts: Vec<PathBuf>,
}

impl ThawParams {
    /// No mounts named (serialized actions leave it out).
    pub fn is_default(&self) -> bool {
        self.mounts.is_empty()
    }
}

/// How to drain (step `drain`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainParams {
    /// Wait at most this long for running allocations; also Nomad's DrainSpec.Deadline.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// Fail (after the deadline) if allocations still run; default: report them.
    #[serde(default)]
    pub require_idle: bool,
}

/// What `recover` is asked to do (step `recover`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RecoverParams {
    pub builds_before: Option<String>,
    pub hostname: Option<String>,
    pub private_ip: Option<IpAddr>,
    pub public_ip: Option<IpAddr>,
    /// Only the file steps, on a mounted disk.
    pub offline: bool,
    /// Go on without evidence that this machine was restored.
    #[serde(default)]
    pub force: bool,
    /// The controller says this instance is a restore candidate (evidence
    /// enough).
    #[serde(default)]
    pub candidate: bool,
}

/// A command a controller may send: the closed set of the wire's
/// `Command.kind`, typed. There is deliberately no "run this" variant.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    AppStatus,
    AppStop { force: bool },
    AppStart,
    SetHostname { params: HostnameParams, dry_run: bool },
    RewriteAddresses { params: RewriteParams, dry_run: bool },
    WipeNomad { dry_run: bool },
    CleanupBuilds { params: CleanupParams, dry_run: bool },
    Freeze(FreezeParams),
    Thaw,
    Drain { deadline: Duration },
    Undrain,
    Recover { params: RecoverParams, dry_run: bool },
    HealthCheck,
}

/// A wire request that cannot be typed (the agent answers `invalid`, not run).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidRequest(pub String);

fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Unix milliseconds of an RFC 3339 time (0 when it does not parse: the
/// agent then refuses the request).
fn ms_of(rfc3339: &str) -> u64 {
    humantime::parse_rfc3339_weak(rfc3339)
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn wire_ms(d: Duration) -> u32 {
    d.as_millis().min(u128::from(u32::MAX)) as u32
}

impl Request {
    /// The step's name (the agent's action name, the journal's, the
    /// controller's command ids use their own).
    pub fn name(&self) -> &'static str {
        match self {
            Request::AppStatus => "app_status",
            Request::AppStop { .. } => "app_stop",
            Request::AppStart => "app_start",
            Request::SetHostname { .. } => "set_hostname",
            Request::RewriteAddresses { .. } => "rewrite_addresses",
            Request::WipeNomad { .. } => "wipe_nomad",
            Request::CleanupBuilds { .. } => "cleanup_builds",
            Request::Freeze(_) => "freeze",
            Request::Thaw => "thaw",
            Request::Drain { .. } => "drain",
            Request::Undrain => "undrain",
            Request::Recover { .. } => "recover",
            Request::HealthCheck => "health_check",
        }
    }

    /// Types a wire request. What cannot be typed is refused before any
    /// step runs: address pairs that are not two addresses of one family,
    /// a zero deadline, a clean-up without its cutoff. (The agent checks
    /// the rest, hostnames included, before it acts.)
    pub fn from_pb(kind: pb::command::Kind) -> Result<Request, InvalidRequest> {
        use pb::command::Kind;
        let ms = |v: u32, what: &str| {
            if v == 0 { Err(InvalidRequest(format!("{what} must be greater than zero"))) } else { Ok(Duration::from_millis(u64::from(v))) }
        };
        let changes = |list: Vec<pb::AddressChange>, flag: &str| -> Result<Vec<AddressChange>, InvalidRequest> {
            list.into_iter()
                .map(|c| AddressChange::parse(flag, &format!("{}={}", c.old_ip, c.new_ip)).map_err(|e| InvalidRequest(e.to_string())))
                .collect()
        };
        Ok(match kind {
            Kind::AppStatus(_) => Request::AppStatus,
            Kind::AppStop(r) => Request::AppStop { force: r.force },
            Kind::AppStart(_) => Request::AppStart,
            Kind::SetHostname(r) => Request::SetHostname { params: HostnameParams { hostname: r.hostname }, dry_run: r.dry_run },
            Kind::RewriteAddresses(r) => Request::RewriteAddresses {
                params: RewriteParams { private: changes(r.private, "private")?, public: changes(r.public, "public")? },
                dry_run: r.dry_run,
            },
            Kind::WipeNomad(r) => Request::WipeNomad { dry_run: r.dry_run },
            Kind::CleanupBuilds(r) => {
                if r.before_ms == 0 {
                    return Err(InvalidRequest("cleanup_builds needs before_ms (the backup's point in time)".into()));
                }
                Request::CleanupBuilds { params: CleanupParams { before: rfc3339_ms(r.before_ms) }, dry_run: r.dry_run }
            }
            Kind::Freeze(r) => Request::Freeze(FreezeParams {
                mounts: r.mounts.into_iter().map(PathBuf::from).collect(),
                deadline: ms(r.deadline_ms, "freeze deadline_ms")?,
            }),
            Kind::Thaw(_) => Request::Thaw,
            Kind::Drain(r) => Request::Drain { deadline: ms(r.deadline_ms, "drain deadline_ms")? },
            Kind::Undrain(_) => Request::Undrain,
            Kind::HealthCheck(_) => Request::HealthCheck,
            Kind::Recover(r) => Request::Recover {
                params: RecoverParams {
                    builds_before: (r.builds_before_ms > 0).then(|| rfc3339_ms(r.builds_before_ms)),
                    hostname: Some(r.hostname).filter(|h| !h.is_empty()),
                    private_ip: None,
                    public_ip: None,
                    offline: false,
                    force: r.force,
                    // The agent sets it from its role when the command arrives.
                    candidate: false,
                },
                dry_run: r.dry_run,
            },
        })
    }

    /// The wire's form. Fields the wire does not carry (a recover's
    /// addresses and `offline`, `candidate`) are left out.
    pub fn to_pb(&self) -> pb::command::Kind {
        use pb::command::Kind;
        let pairs =
            |v: &[AddressChange]| v.iter().map(|c| pb::AddressChange { old_ip: c.old.to_string(), new_ip: c.new.to_string() }).collect();
        match self {
            Request::AppStatus => Kind::AppStatus(pb::AppStatusRequest {}),
            Request::AppStop { force } => Kind::AppStop(pb::AppStopRequest { force: *force }),
            Request::AppStart => Kind::AppStart(pb::AppStartRequest {}),
            Request::SetHostname { params, dry_run } => {
                Kind::SetHostname(pb::SetHostnameRequest { hostname: params.hostname.clone(), dry_run: *dry_run })
            }
            Request::RewriteAddresses { params, dry_run } => Kind::RewriteAddresses(pb::RewriteAddressesRequest {
                private: pairs(&params.private),
                public: pairs(&params.public),
                dry_run: *dry_run,
            }),
            Request::WipeNomad { dry_run } => Kind::WipeNomad(pb::WipeNomadRequest { dry_run: *dry_run }),
            Request::CleanupBuilds { params, dry_run } => {
                Kind::CleanupBuilds(pb::CleanupBuildsRequest { before_ms: ms_of(&params.before), dry_run: *dry_run })
            }
            Request::Freeze(p) => Kind::Freeze(pb::FreezeRequest {
                mounts: p.mounts.iter().map(|m| m.to_string_lossy().into_owned()).collect(),
                deadline_ms: wire_ms(p.deadline),
            }),
            Request::Thaw => Kind::Thaw(pb::ThawRequest {}),
            Request::Drain { deadline } => Kind::Drain(pb::DrainRequest { deadline_ms: wire_ms(*deadline) }),
            Request::Undrain => Kind::Undrain(pb::UndrainRequest {}),
            Request::Recover { params, dry_run } => Kind::Recover(pb::RecoverRequest {
                builds_before_ms: params.builds_before.as_deref().map_or(0, ms_of),
                hostname: params.hostname.clone().unwrap_or_default(),
                dry_run: *dry_run,
                force: params.force,
            }),
            Request::HealthCheck => Kind::HealthCheck(pb::HealthCheckRequest {}),
        }
    }
}
