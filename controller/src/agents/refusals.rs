//! Refused agents, in memory: the TLS verifier's refusals (expired, not yet
//! valid, another CA) and the stream's (a Hello naming another site, a site
//! not configured, not a site certificate), aggregated per site, reason and
//! certificate. `reconcilers::refusals` flushes them to the store and
//! raises `agent.refused` once per certificate.
//!
//! Invariants:
//! - recording never changes a refusal: the TLS verifier decides first
//!   (`dr_proto::tls::server_config_observed`), this module only learns of
//!   it afterwards;
//! - a refused agent retrying costs a map update, not a store write: at
//!   most [`CAPACITY`] certificates are held (more are counted and logged,
//!   not kept), and the flush writes one row per certificate;
//! - a certificate is parsed (and its chain checked at its own validity)
//!   once, the first time it is refused: a retry only bumps its count.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dr_proto::identity::Role as IdentityRole;
use dr_proto::tls::{PresentedCert, RefusalObserver, Refused};
use rustls::CertificateError;

use crate::domain::model::{Millis, now_ms};
use crate::domain::refusal::{AgentRefusal, RefusalReason};

/// Certificates held at most between two flushes and after (the oldest
/// are forgotten after a day without a refusal).
pub const CAPACITY: usize = 4096;
/// A certificate not refused for this long is forgotten in memory (the
/// store keeps it).
const FORGET_AFTER_MS: Millis = 24 * 3600 * 1000;

tokio::task_local! {
    /// The address of the peer whose TLS handshake runs in this task.
    static HANDSHAKE_PEER: SocketAddr;
}

/// Runs a TLS handshake with its peer's address known to the refusal
/// observer (the verifier runs inside the handshake's poll, in this task).
pub async fn with_peer<F: Future>(peer: SocketAddr, handshake: F) -> F::Output {
    HANDSHAKE_PEER.scope(peer, handshake).await
}

#[derive(Debug)]
struct Entry {
    refusal: AgentRefusal,
    /// Refusals not flushed to the store yet.
    unflushed: u64,
    /// `agent.refused` was raised (or is being raised) by this process.
    evented: bool,
}

#[derive(Debug, Default)]
struct Inner {
    /// By (fingerprint, how it was refused).
    entries: Mutex<HashMap<Key, Entry>>,
    /// Wakes the flush when a certificate is refused for the first time.
    new: tokio::sync::Notify,
    /// Refusals not kept because [`CAPACITY`] was reached.
    dropped: AtomicU64,
}

/// The refusals of this process, shared by the TLS verifier, the agent
/// stream, the flush, status and the workflows. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Refusals {
    inner: Arc<Inner>,
}

/// A flushed batch: the rows to add (`count` = refusals since the last
/// flush) and those whose certificate is refused for the first time in
/// this process (their `agent.refused` is due; the store skips an event id
/// it already holds).
#[derive(Debug, Default)]
pub struct Batch {
    pub rows: Vec<AgentRefusal>,
    pub first: Vec<AgentRefusal>,
    keys: Vec<Key>,
    first_keys: Vec<Key>,
}

/// (certificate fingerprint, how the refusal was first classified).
type Key = (String, RefusalReason);

impl Batch {
    /// The first-time refusals after the first `n` (their events are
    /// raised later), as a batch of their own with no rows.
    pub fn split_first_after(&mut self, n: usize) -> Batch {
        let n = n.min(self.first.len());
        Batch { rows: vec![], first: self.first.split_off(n), keys: vec![], first_keys: self.first_keys.split_off(n) }
    }
}

fn fingerprint(der: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der).as_ref())
}

/// The reason a TLS verifier's error stands for.
fn reason_of(error: &rustls::Error) -> RefusalReason {
    match error {
        rustls::Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => RefusalReason::Expired,
        rustls::Error::InvalidCertificate(CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }) => {
            RefusalReason::NotYetValid
        }
        // Another CA, also one whose name equals ours (its signature does
        // not verify with our key).
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature) => RefusalReason::UnknownCa,
        _ => RefusalReason::InvalidCertificate,
    }
}

impl Refusals {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        self.inner.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one more refusal of a certificate already held; false when it
    /// is not held yet.
    fn bump(&self, key: &Key, peer: &str, detail: &str, now: Millis) -> bool {
        let mut entries = self.lock();
        let Some(e) = entries.get_mut(key) else { return false };
        e.refusal.count += 1;
        e.refusal.last_ms = now;
        e.unflushed += 1;
        if !peer.is_empty() {
            e.refusal.peer = peer.to_owned();
        }
        if e.refusal.detail != detail {
            e.refusal.detail = detail.to_owned();
        }
        true
    }

    /// Holds a certificate refused for the first time.
    fn insert(&self, key: Key, refusal: AgentRefusal) {
        {
            let mut entries = self.lock();
            if let Some(e) = entries.get_mut(&key) {
                // Two handshakes raced: count this one.
                e.refusal.count += 1;
                e.refusal.last_ms = refusal.last_ms;
                e.unflushed += 1;
                return;
            }
            if entries.len() >= CAPACITY {
                let n = self.inner.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n == 1 || n.is_power_of_two() {
                    tracing::warn!(held = CAPACITY, dropped = n, site = %refusal.site_id, reason = refusal.reason.as_str(),
                        "too many refused certificates at once: this one is logged, not recorded");
                }
                return;
            }
            tracing::warn!(site = %refusal.site_id, reason = refusal.reason.as_str(), serial = %refusal.serial,
                not_after = %crate::domain::refusal::rfc3339(refusal.not_after_ms), peer = %refusal.peer,
                ca_verified = refusal.ca_verified, detail = %refusal.detail, "agent refused (recorded; retries are counted)");
            entries.insert(key, Entry { refusal, unflushed: 1, evented: false });
        }
        self.inner.new.notify_one();
    }

    /// Records a refusal of the agent stream after the handshake (the
    /// chain was verified by TLS): a Hello naming another site, a site not
    /// configured, an identity that is not a site of our trust domain.
    /// `site` is what the certificate names ("" if nothing).
    pub fn record_stream(&self, site: &str, reason: RefusalReason, cert_der: Option<&[u8]>, peer: &str, identity: &str, detail: &str) {
        let now = now_ms();
        // The stream exists only after a client certificate was verified:
        // there is always one; without, the site keys the record.
        let fp = cert_der.map(fingerprint).unwrap_or_else(|| format!("no-certificate-{site}"));
        let key = (fp.clone(), reason);
        if self.bump(&key, peer, detail, now) {
            return;
        }
        let cert = cert_der.and_then(PresentedCert::from_der);
        let refusal = AgentRefusal {
            site_id: site.to_owned(),
            reason,
            fingerprint: fp,
            serial: cert.as_ref().map(|c| c.serial.clone()).unwrap_or_default(),
            not_before_ms: cert.as_ref().map_or(0, |c| c.not_before_ms),
            not_after_ms: cert.as_ref().map_or(0, |c| c.not_after_ms),
            identity: identity.to_owned(),
            ca_verified: true,
            detail: detail.to_owned(),
            peer: peer.to_owned(),
            first_ms: now,
            last_ms: now,
            count: 1,
        };
        self.insert(key, refusal);
    }

    /// Takes what is to be flushed, and forgets certificates not refused
    /// for a day.
    pub fn take(&self) -> Batch {
        let now = now_ms();
        let mut batch = Batch::default();
        let mut entries = self.lock();
        entries.retain(|_, e| e.unflushed > 0 || !e.evented || now.saturating_sub(e.refusal.last_ms) < FORGET_AFTER_MS);
        for (key, e) in entries.iter_mut().filter(|(_, e)| e.unflushed > 0 || !e.evented) {
            let mut row = e.refusal.clone();
            row.count = e.unflushed;
            if !e.evented {
                e.evented = true;
                batch.first.push(e.refusal.clone());
                batch.first_keys.push(key.clone());
            }
            e.unflushed = 0;
            batch.rows.push(row);
            batch.keys.push(key.clone());
        }
        batch
    }

    /// Puts a batch back after a failed flush (its counts are added again,
    /// its events are due again).
    pub fn restore(&self, batch: Batch) {
        let mut entries = self.lock();
        for (key, row) in batch.keys.iter().zip(&batch.rows) {
            if let Some(e) = entries.get_mut(key) {
                e.unflushed += row.count;
            }
        }
        for key in &batch.first_keys {
            if let Some(e) = entries.get_mut(key) {
                e.evented = false;
            }
        }
    }

    /// Waits until a certificate is refused for the first time.
    pub async fn first_refusal(&self) {
        self.inner.new.notified().await
    }

    /// The site's refusals last seen at or after `since_ms` (in this
    /// process), the most recent first.
    pub fn since(&self, site: &str, since_ms: Millis) -> Vec<AgentRefusal> {
        let mut out: Vec<AgentRefusal> = self
            .lock()
            .values()
            .filter(|e| e.refusal.site_id == site && e.refusal.last_ms >= since_ms)
            .map(|e| e.refusal.clone())
            .collect();
        out.sort_by_key(|r| std::cmp::Reverse(r.last_ms));
        out
    }

    /// The site's most recent refusal (in this process), if any.
    pub fn latest(&self, site: &str) -> Option<AgentRefusal> {
        self.since(site, 0).into_iter().next()
    }
}

impl RefusalObserver for Refusals {
    /// A certificate the TLS verifier refused. Only certificates that carry
    /// a site identity (of any trust domain) are recorded: an operator's
    /// refused certificate and one without an identity are only logged (by
    /// the listener).
    fn refused(&self, refused: &Refused<'_>) {
        let now = now_ms();
        let peer = HANDSHAKE_PEER.try_with(|p| p.to_string()).unwrap_or_default();
        let detail = refused.error.to_string();
        let first = reason_of(refused.error);
        let fp = fingerprint(refused.end_entity.as_ref());
        let key = (fp.clone(), first);
        if self.bump(&key, &peer, &detail, now) {
            return;
        }
        let Some(cert) = PresentedCert::from_der(refused.end_entity.as_ref()) else { return };
        let Ok(identity) = &cert.identity else { return };
        let IdentityRole::Site(site) = &identity.role else { return };
        // Whether the chain is ours apart from the time: checked at the
        // certificate's own validity. An expired certificate from another
        // CA is reported as from another CA.
        let (reason, ca_verified) = match first {
            RefusalReason::Expired | RefusalReason::NotYetValid => {
                let at = if first == RefusalReason::Expired { cert.not_after_ms } else { cert.not_before_ms } / 1000;
                match refused.verify_at(at) {
                    Ok(()) => (first, true),
                    Err(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer | CertificateError::BadSignature)) => {
                        (RefusalReason::UnknownCa, false)
                    }
                    Err(_) => (first, false),
                }
            }
            other => (other, false),
        };
        let refusal = AgentRefusal {
            site_id: site.clone(),
            reason,
            fingerprint: fp,
            serial: cert.serial.clone(),
            not_before_ms: cert.not_before_ms,
            not_after_ms: cert.not_after_ms,
            identity: identity.to_string(),
            ca_verified,
            detail,
            peer,
            first_ms: now,
            last_ms: now,
            count: 1,
        };
        self.insert(key, refusal);
    }
}

#[cfg(test)]
impl Refusals {
    /// Records a refusal as if an agent had just been refused with it.
    pub fn record_for_test(&self, refusal: AgentRefusal) {
        self.insert((refusal.fingerprint.clone(), refusal.reason), refusal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_counted_not_kept() {
        let r = Refusals::default();
        for _ in 0..10_000 {
            r.record_stream(
                "s1",
                RefusalReason::WrongSite,
                Some(b"not a certificate"),
                "127.0.0.1:1",
                "spiffe://d/site/s1",
                "Hello names s2",
            );
        }
        let batch = r.take();
        assert_eq!(batch.rows.len(), 1);
        assert_eq!(batch.rows[0].count, 10_000);
        assert_eq!(batch.first.len(), 1, "one event for the certificate");
        r.record_stream("s1", RefusalReason::WrongSite, Some(b"not a certificate"), "127.0.0.1:2", "", "Hello names s2");
        let again = r.take();
        assert_eq!((again.rows.len(), again.rows[0].count, again.first.len()), (1, 1, 0), "no second event");
        assert_eq!(r.latest("s1").map(|x| (x.count, x.peer)), Some((10_001, "127.0.0.1:2".to_owned())));
        r.restore(again);
        assert_eq!(r.take().rows[0].count, 1, "a failed flush is retried");
        assert!(r.take().rows.is_empty());
    }
}
