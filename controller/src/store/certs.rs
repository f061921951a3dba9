//! Certificates per instance, revocations and enrolment tokens (migration 11).

use std::collections::HashMap;

use super::sql::{OptionalExt, Row, SqlResult, args};

use super::{Db, Store, StoreError};
use crate::domain::model::Millis;

/// One instance's certificates, as the controller issued them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentCert {
    pub site_id: String,
    pub instance_id: String,
    /// `instance-identity` or `token`.
    pub attestation: String,
    pub current_serial: String,
    pub current_not_after_ms: Millis,
    /// Signed by a renewal and not used yet ("" when none).
    pub next_serial: String,
    pub next_not_after_ms: Millis,
    pub enrolled_at_ms: Millis,
    pub renewed_at_ms: Millis,
    /// Why the last renewal failed on the controller's side ("" when it worked).
    pub renewal_error: String,
    pub reenrol_allowed: bool,
}

/// What a serial presented by an agent is, for its instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialState {
    Current,
    /// The renewed one, now promoted to current.
    Promoted,
    /// Neither current nor next: an older certificate (a copy of an old disk).
    Superseded {
        current: String,
    },
    /// The instance never enrolled with this controller.
    Unknown,
}

const COLS: &str = "site_id, instance_id, attestation, current_serial, current_not_after_ms, next_serial, next_not_after_ms,
    enrolled_at_ms, renewed_at_ms, renewal_error, reenrol_allowed";

fn cert_row(r: &Row<'_>) -> SqlResult<AgentCert> {
    Ok(AgentCert {
        site_id: r.get(0)?,
        instance_id: r.get(1)?,
        attestation: r.get(2)?,
        current_serial: r.get(3)?,
        current_not_after_ms: r.get::<i64>(4)? as u64,
        next_serial: r.get(5)?,
        next_not_after_ms: r.get::<i64>(6)? as u64,
        enrolled_at_ms: r.get::<i64>(7)? as u64,
        renewed_at_ms: r.get::<i64>(8)? as u64,
        renewal_error: r.get(9)?,
        reenrol_allowed: r.get(10)?,
    })
}

impl Db<'_> {
    pub fn agent_cert(&self, site_id: String, instance_id: String) -> Result<Option<AgentCert>, StoreError> {
        self.0
            .query_row(
                &format!("SELECT {COLS} FROM agent_certs WHERE site_id = ?1 AND instance_id = ?2"),
                args![site_id, instance_id],
                cert_row,
            )
            .optional()
    }

    pub fn agent_certs(&self) -> Result<HashMap<(String, String), AgentCert>, StoreError> {
        let stmt = self.0.prepare(&format!("SELECT {COLS} FROM agent_certs"))?;
        let rows = stmt.query_map((), cert_row)?.collect::<Result<Vec<_>, _>>()?;
        Ok(rows.into_iter().map(|c| ((c.site_id.clone(), c.instance_id.clone()), c)).collect())
    }

    /// An enrolment: the new certificate becomes the instance's current one
    /// (any earlier one and any pending renewal are superseded).
    pub fn put_enrolment(&self, c: AgentCert) -> Result<(), StoreError> {
        self.0.execute(
            &format!(
                "INSERT INTO agent_certs ({COLS}) VALUES (?1, ?2, ?3, ?4, ?5, '', 0, ?6, ?6, '', 0)
                 ON CONFLICT(site_id, instance_id) DO UPDATE SET attestation = excluded.attestation,
                     current_serial = excluded.current_serial, current_not_after_ms = excluded.current_not_after_ms,
                     next_serial = '', next_not_after_ms = 0, enrolled_at_ms = excluded.enrolled_at_ms,
                     renewed_at_ms = excluded.renewed_at_ms, renewal_error = '', reenrol_allowed = 0"
            ),
            args![c.site_id, c.instance_id, c.attestation, c.current_serial, c.current_not_after_ms as i64, c.enrolled_at_ms as i64],
        )?;
        Ok(())
    }

    /// A renewal signed `serial`: recorded as next before the agent hears of it.
    pub fn put_renewal(
        &self,
        site_id: String,
        instance_id: String,
        serial: String,
        not_after_ms: Millis,
        at_ms: Millis,
    ) -> Result<(), StoreError> {
        let n = self.0.execute(
            "UPDATE agent_certs SET next_serial = ?3, next_not_after_ms = ?4, renewed_at_ms = ?5, renewal_error = ''
             WHERE site_id = ?1 AND instance_id = ?2",
            args![site_id, instance_id, serial, not_after_ms as i64, at_ms as i64],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("no certificate record for site `{site_id}` instance {instance_id}")));
        }
        Ok(())
    }

    pub fn set_renewal_error(&self, site_id: String, instance_id: String, error: String) -> Result<(), StoreError> {
        self.0.execute(
            "UPDATE agent_certs SET renewal_error = ?3 WHERE site_id = ?1 AND instance_id = ?2",
            args![site_id, instance_id, error],
        )?;
        Ok(())
    }

    /// What `serial` is for the instance; a next serial seen for the first
    /// time is promoted to current in the same transaction.
    pub fn present_serial(&self, site_id: String, instance_id: String, serial: String) -> Result<SerialState, StoreError> {
        let tx = self.0.transaction()?;
        let Some(c) = Db(&tx).agent_cert(site_id.clone(), instance_id.clone())? else { return Ok(SerialState::Unknown) };
        let state = if c.current_serial == serial {
            SerialState::Current
        } else if !c.next_serial.is_empty() && c.next_serial == serial {
            tx.execute(
                "UPDATE agent_certs SET current_serial = next_serial, current_not_after_ms = next_not_after_ms,
                     next_serial = '', next_not_after_ms = 0 WHERE site_id = ?1 AND instance_id = ?2",
                args![site_id, instance_id],
            )?;
            SerialState::Promoted
        } else {
            SerialState::Superseded { current: c.current_serial }
        };
        tx.commit()?;
        Ok(state)
    }

    pub fn allow_reenrol(&self, site_id: String, instance_id: String) -> Result<bool, StoreError> {
        let n = self
            .0
            .execute("UPDATE agent_certs SET reenrol_allowed = 1 WHERE site_id = ?1 AND instance_id = ?2", args![site_id, instance_id])?;
        Ok(n > 0)
    }

    /// Revokes `serial` of a site ("" = every certificate of the site).
    pub fn revoke(&self, site_id: String, serial: String, reason: String, by: String, at_ms: Millis) -> Result<(), StoreError> {
        self.0.execute(
            "INSERT INTO revocations (site_id, serial, reason, revoked_by, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(site_id, serial) DO UPDATE SET reason = excluded.reason, revoked_by = excluded.revoked_by, at_ms = excluded.at_ms",
            args![site_id, serial, reason, by, at_ms as i64],
        )?;
        Ok(())
    }

    /// Lifts the whole-site revocation; returns whether there was one.
    pub fn unrevoke_site(&self, site_id: String) -> Result<bool, StoreError> {
        Ok(self.0.execute("DELETE FROM revocations WHERE site_id = ?1 AND serial = ''", args![site_id])? > 0)
    }

    /// Every revocation: (site, serial) -> reason.
    pub fn revocations(&self) -> Result<HashMap<(String, String), String>, StoreError> {
        let stmt = self.0.prepare("SELECT site_id, serial, reason FROM revocations")?;
        let rows = stmt.query_map((), |r| Ok(((r.get::<String>(0)?, r.get::<String>(1)?), r.get::<String>(2)?)))?;
        rows.collect::<Result<_, _>>()
    }

    pub fn put_enrol_token(
        &self,
        sha256: String,
        site_id: String,
        instance_id: String,
        by: String,
        expires_at_ms: Millis,
    ) -> Result<(), StoreError> {
        self.0.execute(
            "INSERT INTO enrol_tokens (token_sha256, site_id, instance_id, created_by, expires_at_ms, used_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, 0)",
            args![sha256, site_id, instance_id, by, expires_at_ms as i64],
        )?;
        Ok(())
    }

    /// Uses a token once: Ok(Ok(())) when it was valid for (site, instance)
    /// and is now spent; Ok(Err(why)) otherwise.
    pub fn use_enrol_token(
        &self,
        sha256: String,
        site_id: String,
        instance_id: String,
        now_ms: Millis,
    ) -> Result<Result<(), String>, StoreError> {
        let tx = self.0.transaction()?;
        let row: Option<(String, String, i64, i64)> = tx
            .query_row(
                "SELECT site_id, instance_id, expires_at_ms, used_at_ms FROM enrol_tokens WHERE token_sha256 = ?1",
                args![sha256],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let verdict = match row {
            None => Err("the enrolment token is not known".to_owned()),
            Some((s, i, _, _)) if s != site_id || i != instance_id => {
                Err(format!("the enrolment token was made for site `{s}` instance {i}, not site `{site_id}` instance {instance_id}"))
            }
            Some((_, _, _, used)) if used > 0 => Err("the enrolment token was used already (tokens are single-use)".to_owned()),
            Some((_, _, exp, _)) if (exp as u64) <= now_ms => Err("the enrolment token has expired".to_owned()),
            Some(_) => {
                tx.execute("UPDATE enrol_tokens SET used_at_ms = ?2 WHERE token_sha256 = ?1", args![sha256, now_ms as i64])?;
                Ok(())
            }
        };
        tx.commit()?;
        Ok(verdict)
    }
}

/// A CA rotation in progress (`reconcilers::rotation`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RotationRecord {
    pub phase: String,
    pub since_ms: Millis,
    /// The roots trusted before the rotation began.
    pub old_roots_pem: String,
    pub new_root_pem: String,
    /// The new intermediate's files, in the controller's state directory.
    pub new_cert_path: String,
    pub new_key_path: String,
}

impl Db<'_> {
    pub fn rotation(&self) -> Result<Option<RotationRecord>, StoreError> {
        self.0
            .query_row(
                "SELECT phase, since_ms, old_roots_pem, new_root_pem, new_cert_path, new_key_path FROM ca_rotation WHERE id = 1",
                (),
                |r| {
                    Ok(RotationRecord {
                        phase: r.get(0)?,
                        since_ms: r.get::<i64>(1)? as u64,
                        old_roots_pem: r.get(2)?,
                        new_root_pem: r.get(3)?,
                        new_cert_path: r.get(4)?,
                        new_key_path: r.get(5)?,
                    })
                },
            )
            .optional()
    }

    /// Writes the rotation (None: there is none any more).
    pub fn put_rotation(&self, r: Option<RotationRecord>) -> Result<(), StoreError> {
        match r {
            None => {
                self.0.execute("DELETE FROM ca_rotation", ())?;
            }
            Some(r) => {
                self.0.execute(
                    "INSERT INTO ca_rotation (id, phase, since_ms, old_roots_pem, new_root_pem, new_cert_path, new_key_path)
                     VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT(id) DO UPDATE SET phase = excluded.phase, since_ms = excluded.since_ms,
                         old_roots_pem = excluded.old_roots_pem, new_root_pem = excluded.new_root_pem,
                         new_cert_path = excluded.new_cert_path, new_key_path = excluded.new_key_path",
                    args![r.phase, r.since_ms as i64, r.old_roots_pem, r.new_root_pem, r.new_cert_path, r.new_key_path],
                )?;
            }
        }
        Ok(())
    }

    pub fn put_trust_ack(&self, site_id: String, instance_id: String, bundle_id: String, at_ms: Millis) -> Result<(), StoreError> {
        self.0.execute(
            "INSERT INTO trust_acks (site_id, instance_id, bundle_id, at_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(site_id, instance_id) DO UPDATE SET bundle_id = excluded.bundle_id, at_ms = excluded.at_ms",
            args![site_id, instance_id, bundle_id, at_ms as i64],
        )?;
        Ok(())
    }

    pub fn trust_ack(&self, site_id: String, instance_id: String) -> Result<Option<String>, StoreError> {
        self.0
            .query_row("SELECT bundle_id FROM trust_acks WHERE site_id = ?1 AND instance_id = ?2", args![site_id, instance_id], |r| {
                r.get(0)
            })
            .optional()
    }

    /// Which bundle each instance acknowledged last.
    pub fn trust_acks(&self) -> Result<HashMap<(String, String), String>, StoreError> {
        let stmt = self.0.prepare("SELECT site_id, instance_id, bundle_id FROM trust_acks")?;
        let rows = stmt.query_map((), |r| Ok(((r.get::<String>(0)?, r.get::<String>(1)?), r.get::<String>(2)?)))?;
        rows.collect::<Result<_, _>>()
    }
}

impl Store {
    db_call!(rotation() -> Option<RotationRecord>);
    db_call!(put_rotation(r: Option<RotationRecord>) -> ());
    db_call!(put_trust_ack(site_id: String, instance_id: String, bundle_id: String, at_ms: Millis) -> ());
    db_call!(trust_acks() -> HashMap<(String, String), String>);
    db_call!(trust_ack(site_id: String, instance_id: String) -> Option<String>);
    db_call!(agent_cert(site_id: String, instance_id: String) -> Option<AgentCert>);
    db_call!(
        /// Every instance's certificate record, in one query (status).
        agent_certs() -> HashMap<(String, String), AgentCert>);
    db_call!(put_enrolment(c: AgentCert) -> ());
    db_call!(put_renewal(site_id: String, instance_id: String, serial: String, not_after_ms: Millis, at_ms: Millis) -> ());
    db_call!(set_renewal_error(site_id: String, instance_id: String, error: String) -> ());
    db_call!(present_serial(site_id: String, instance_id: String, serial: String) -> SerialState);
    db_call!(allow_reenrol(site_id: String, instance_id: String) -> bool);
    db_call!(revoke(site_id: String, serial: String, reason: String, by: String, at_ms: Millis) -> ());
    db_call!(unrevoke_site(site_id: String) -> bool);
    db_call!(revocations() -> HashMap<(String, String), String>);
    db_call!(put_enrol_token(sha256: String, site_id: String, instance_id: String, by: String, expires_at_ms: Millis) -> ());
    db_call!(use_enrol_token(sha256: String, site_id: String, instance_id: String, now_ms: Millis) -> Result<(), String>);
}
