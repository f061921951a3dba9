//! What can go wrong in drctl, the exit status of each, and the JSON error
//! object scripts read on stdout with `--output json`.

use serde::Serialize;

/// Every failure drctl reports. The message is the whole story an operator
/// needs (what failed, where, what to check); [`CliError::exit_code`] and
/// [`CliError::kind`] classify it for scripts.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A wrong flag, a missing setting, an unreadable `--config`.
    #[error("{0}")]
    Usage(String),
    /// Our own TLS material is unusable: a file missing or not PEM, a key
    /// that does not belong to the certificate, a CA file without a usable
    /// certificate. Nothing was sent.
    #[error("{0}")]
    LocalTls(String),
    #[error(transparent)]
    Tls(#[from] dr_proto::tls::TlsError),
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    /// No TCP connection, a connection closed or reset, the controller gone
    /// in the middle of a command.
    #[error("cannot reach the controller at {url}: {cause}")]
    Unreachable { url: String, cause: String },
    /// The controller is a standby replica; it named the leader (drctl
    /// asks the leader once by itself).
    #[error("the controller at {url} is a standby; the leader is at {leader}")]
    NotLeader { url: String, leader: String },
    /// The controller refused our certificate (TLS alert) or our identity
    /// (an operator certificate is required).
    #[error("{0}")]
    Refused(String),
    /// drctl refused the controller's certificate: another CA than `--ca`,
    /// a name other than `--server-name`, expired or not yet valid.
    #[error("{0}")]
    Untrusted(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Failed(String),
}

/// Exit statuses, as documented in README.md ("drctl exit codes").
pub mod exit {
    pub const FAILED: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const UNREACHABLE: u8 = 3;
    pub const REFUSED: u8 = 4;
    pub const NOT_FOUND: u8 = 5;
    pub const BUSY: u8 = 6;
    pub const UNTRUSTED: u8 = 7;
    /// `--wait` ended because the operation waits for a human (`drctl
    /// operation resume|abort ID`).
    pub const WAITING: u8 = 8;
}

impl CliError {
    /// 1 operation failed, 2 usage or local files (certificates, keys),
    /// 3 controller unreachable, 4 the controller refused our certificate,
    /// 5 unknown site/operation, 6 busy, 7 drctl does not trust the
    /// controller's certificate.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Failed(_) => exit::FAILED,
            CliError::Usage(_) | CliError::LocalTls(_) | CliError::Tls(_) | CliError::Pki(_) => exit::USAGE,
            CliError::Unreachable { .. } | CliError::NotLeader { .. } => exit::UNREACHABLE,
            CliError::Refused(_) => exit::REFUSED,
            CliError::NotFound(_) => exit::NOT_FOUND,
            CliError::Busy(_) => exit::BUSY,
            CliError::Untrusted(_) => exit::UNTRUSTED,
        }
    }

    /// A stable word for scripts: `usage`, `local_tls`, `pki`,
    /// `unreachable`, `refused`, `untrusted`, `not_found`, `busy`, `failed`.
    pub fn kind(&self) -> &'static str {
        match self {
            CliError::Usage(_) => "usage",
            CliError::LocalTls(_) | CliError::Tls(_) => "local_tls",
            CliError::Pki(_) => "pki",
            CliError::Unreachable { .. } | CliError::NotLeader { .. } => "unreachable",
            CliError::Refused(_) => "refused",
            CliError::Untrusted(_) => "untrusted",
            CliError::NotFound(_) => "not_found",
            CliError::Busy(_) => "busy",
            CliError::Failed(_) => "failed",
        }
    }

    /// `{"error": {"kind": …, "message": …, "exit_code": …}}`.
    pub fn to_json(&self) -> ErrorObject {
        ErrorObject { error: ErrorBody { kind: self.kind(), message: self.to_string(), exit_code: self.exit_code() } }
    }
}

/// The JSON error object printed on stdout with `--output json`.
#[derive(Debug, Serialize)]
pub struct ErrorObject {
    pub error: ErrorBody,
}

#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub kind: &'static str,
    pub message: String,
    pub exit_code: u8,
}
