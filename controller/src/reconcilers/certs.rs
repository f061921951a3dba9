//! The controller's own certificate and its intermediate CA, watched.
//!
//! - The server certificate (`tls.cert`) is renewed from the intermediate at
//!   two thirds of its life: a new key, the same DNS/IP names, written back
//!   to `tls.cert`/`tls.key` crash-safely (so a restart presents it too)
//!   and presented from the next handshake on. Open streams are not
//!   touched: a TLS session keeps the certificate it was made with.
//! - The intermediate's end raises `pki.intermediate_expiring` at two
//!   thirds of its life (once per controller run); an operator installs a
//!   new one (`drctl pki intermediate`) and restarts the controller.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use dr_proto::tls::{PresentedCert, ServerTls};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::notify::{Notifier, event};
use crate::agents::enrol::Authority;
use crate::domain::events::EventKind;
use crate::domain::model::now_ms;
use crate::pki::ca::stamp;

/// Where the controller's certificate lives.
#[derive(Clone)]
pub struct OwnCert {
    pub tls: ServerTls,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub lifetime: Duration,
}

/// Longest sleep between two looks (a clock jump is seen within it).
const LOOK_EVERY: Duration = Duration::from_secs(600);

/// The point at `fraction` of a validity window.
fn at_fraction(not_before_ms: u64, not_after_ms: u64, fraction: f64) -> u64 {
    not_before_ms + ((not_after_ms.saturating_sub(not_before_ms)) as f64 * fraction) as u64
}

/// Renews the controller's certificate when due and warns of the
/// intermediate's end; runs for the controller's life.
pub async fn run(own: OwnCert, authority: Arc<Authority>, notifier: Notifier) {
    let mut warned_intermediate = false;
    let mut failures = 0u32;
    loop {
        let now = now_ms();
        if let Some(signer) = authority.signer() {
            let (nb, na) = signer.validity_ms();
            if !warned_intermediate && now >= at_fraction(nb, na, 2.0 / 3.0) {
                warned_intermediate = true;
                let summary =
                    format!("the controller's intermediate CA ends at {}: install a new one (`drctl pki intermediate`)", stamp(na));
                let _ = notifier
                    .record(
                        vec![],
                        vec![event(
                            "",
                            EventKind::PkiIntermediateExpiring,
                            "warning",
                            summary,
                            serde_json::json!({"not_after_ms": na}),
                            "",
                        )],
                    )
                    .await;
            }
        }
        let current = own.tls.certificate();
        let Some(presented) = PresentedCert::from_der(current.as_ref()) else {
            tracing::error!("the controller's own certificate cannot be parsed; not renewing it");
            return;
        };
        let due = at_fraction(presented.not_before_ms, presented.not_after_ms, 2.0 / 3.0);
        let mut wait = Duration::from_millis(due.saturating_sub(now)).min(LOOK_EVERY);
        if now >= due {
            match renew(&own, &authority, &current) {
                Ok(until) => {
                    failures = 0;
                    tracing::info!(until = %stamp(until), cert = %own.cert_path.display(), "the controller's certificate was renewed");
                    let summary = format!("the controller's certificate was renewed until {}", stamp(until));
                    let _ = notifier
                        .record(
                            vec![],
                            vec![event(
                                "",
                                EventKind::ControllerCertRenewed,
                                "info",
                                summary,
                                serde_json::json!({"not_after_ms": until}),
                                "",
                            )],
                        )
                        .await;
                    continue;
                }
                Err(e) => {
                    failures += 1;
                    wait = dr_proto::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(300)).delay(failures);
                    tracing::error!(error = %e, ends = %stamp(presented.not_after_ms), retry_in = ?wait, "cannot renew the controller's certificate");
                }
            }
        }
        tokio::time::sleep(wait.max(Duration::from_millis(200))).await;
    }
}

fn renew(own: &OwnCert, authority: &Authority, _current: &CertificateDer<'_>) -> Result<u64, String> {
    let signer = authority.signer().ok_or("no intermediate CA is configured (pki.intermediate_cert)")?;
    renew_with(own, &signer)
}

/// A new certificate for the controller from `signer` (its names copied
/// from the one presented now), written back and presented from the next
/// handshake. Returns its end.
pub fn renew_with(own: &OwnCert, signer: &crate::pki::Signer) -> Result<u64, String> {
    let current = own.tls.certificate();
    let (issued, key) = signer.sign_server(&current, own.lifetime).map_err(|e| e.to_string())?;
    let chain = dr_proto::tls::parse_certs(issued.chain_pem.as_bytes(), &own.cert_path).map_err(|e| e.to_string())?;
    let key_pem = match &key {
        PrivateKeyDer::Pkcs8(k) => pem_encode("PRIVATE KEY", k.secret_pkcs8_der()),
        _ => return Err("unexpected key format".into()),
    };
    // The old key is kept as `<key>.previous`, then the new key and the new
    // certificate replace the files, each crash-safely. A crash between the
    // two leaves the old certificate with the new key: at start the
    // controller then pairs the certificate with `<key>.previous`
    // (`load_own_certificate`) and renews again at once.
    let old_key = std::fs::read(&own.key_path).map_err(|e| format!("cannot read {}: {e}", own.key_path.display()))?;
    write_atomic(&previous_key(&own.key_path), &old_key, 0o600)?;
    write_atomic(&own.key_path, key_pem.as_bytes(), 0o600)?;
    write_atomic(&own.cert_path, issued.chain_pem.as_bytes(), 0o644)?;
    own.tls.set_certificate(chain, key).map_err(|e| e.to_string())?;
    Ok(issued.not_after_ms)
}

/// `<key>.previous`: the key of the certificate before the last renewal.
pub fn previous_key(key: &Path) -> PathBuf {
    let mut name = key.as_os_str().to_owned();
    name.push(".previous");
    PathBuf::from(name)
}

/// The controller's certificate chain and the key that matches it: `key`,
/// or `<key>.previous` after a crash in the middle of a renewal.
pub fn load_own_certificate(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), dr_proto::tls::TlsError> {
    let chain = dr_proto::tls::load_certs(cert)?;
    let k = dr_proto::tls::load_key(key)?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    match rustls::sign::CertifiedKey::from_der(chain.clone(), k.clone_key(), &provider) {
        Ok(_) => Ok((chain, k)),
        Err(e) => {
            let prev = previous_key(key);
            let older = prev.exists().then(|| dr_proto::tls::load_key(&prev)).transpose()?;
            match older {
                Some(p) if rustls::sign::CertifiedKey::from_der(chain.clone(), p.clone_key(), &provider).is_ok() => {
                    tracing::warn!(cert = %cert.display(), key = %prev.display(), "a renewal was interrupted: the certificate matches the previous key; renewing again");
                    Ok((chain, p))
                }
                _ => Err(e.into()),
            }
        }
    }
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or(""));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// [`write_atomic`], for the rotation's files.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    write_atomic(path, bytes, mode)
}

/// Temp file in the same directory, fsync, rename, fsync of the directory.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    let err = |what: &str, e: std::io::Error| format!("{what} {}: {e}", path.display());
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("cert")));
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(|e| err("cannot write", e))?;
    f.write_all(bytes).map_err(|e| err("cannot write", e))?;
    f.sync_all().map_err(|e| err("cannot sync", e))?;
    std::fs::rename(&tmp, path).map_err(|e| err("cannot replace", e))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| err("cannot sync the directory of", e))
}
