//! Intents: side effects that must happen once per operation even when a
//! step runs again after a crash or a retry.
//!
//! - For an API with an idempotency token (RunInstances, CopyImage):
//!   [`Ctx::token`] records the token before the first call and returns the
//!   same one on every retry of that attempt; [`Ctx::renew_token`] starts a
//!   new attempt deliberately (after the previous one is known to have
//!   failed). EC2 emulators ignore tokens, so callers also tag what they
//!   create with the operation and look the tag up first.
//! - For an API without one (CreateImage): [`Ctx::find_or_create`] looks
//!   the resource up (by its tag) before creating it.
//!
//! Either way the resource id is recorded ([`Ctx::intent_resource`]).

use std::future::Future;

use super::{Ctx, StepError};

/// `dr-<operation>-<attempt>-<name>`, at most 64 characters (EC2's limit
/// for ClientTokens): the name is shortened, never the operation or attempt.
fn token_of(op_id: &str, name: &str, attempt: u32) -> String {
    let mut t = format!("dr-{op_id}-{attempt}-");
    let room = 64usize.saturating_sub(t.len());
    t.extend(name.chars().filter(char::is_ascii).take(room));
    t
}

impl<D: Send + Sync + 'static> Ctx<D> {
    /// The idempotency token of intent `name`: recorded (committed) before
    /// it is returned the first time, the same on every later call.
    pub async fn token(&self, name: &str) -> Result<String, StepError> {
        if let Some((token, _)) = self.store().intent(self.op_id.clone(), name.to_owned()).await? {
            return Ok(token);
        }
        let token = token_of(&self.op_id, name, 1);
        self.store().put_intent(self.op_id.clone(), self.epoch(), name.to_owned(), token.clone(), String::new()).await?;
        Ok(token)
    }

    /// A new token for intent `name` (attempt `attempt`), recorded before
    /// it is returned: for a retry after the previous attempt failed.
    pub async fn renew_token(&self, name: &str, attempt: u32) -> Result<String, StepError> {
        let token = token_of(&self.op_id, name, attempt);
        self.store().put_intent(self.op_id.clone(), self.epoch(), name.to_owned(), token.clone(), String::new()).await?;
        Ok(token)
    }

    /// Records the resource intent `name` produced.
    pub async fn intent_done(&self, name: &str, resource_id: &str) -> Result<(), StepError> {
        let token = self.token(name).await?;
        self.store().put_intent(self.op_id.clone(), self.epoch(), name.to_owned(), token, resource_id.to_owned()).await?;
        Ok(())
    }

    /// The resource recorded for intent `name`, if any.
    pub async fn intent_resource(&self, name: &str) -> Result<Option<String>, StepError> {
        Ok(self.store().intent(self.op_id.clone(), name.to_owned()).await?.map(|(_, r)| r).filter(|r| !r.is_empty()))
    }

    /// For an API without an idempotency token: `find` looks the resource up
    /// (by the operation's tag); only when it finds none is `create` called.
    /// Returns the id and whether it already existed.
    pub async fn find_or_create<F, FF, C, CF>(&self, name: &str, find: F, create: C) -> Result<(String, bool), StepError>
    where
        F: FnOnce() -> FF,
        FF: Future<Output = Result<Option<String>, StepError>>,
        C: FnOnce() -> CF,
        CF: Future<Output = Result<String, StepError>>,
    {
        if let Some(id) = find().await? {
            self.intent_done(name, &id).await?;
            return Ok((id, true));
        }
        let id = create().await?;
        self.intent_done(name, &id).await?;
        Ok((id, false))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_fit_ec2s_limit_and_differ_per_attempt() {
        let long = "backup-20261201t120000-abcdef12";
        let t1 = super::token_of(long, "copy-ap-southeast-2", 1);
        let t2 = super::token_of(long, "copy-ap-southeast-2", 2);
        assert!(t1.len() <= 64 && t2.len() <= 64);
        assert_ne!(t1, t2);
        let huge = super::token_of(long, &"x".repeat(100), 12);
        assert_eq!(huge.len(), 64);
        assert!(huge.starts_with(&format!("dr-{long}-12-")));
    }
}
