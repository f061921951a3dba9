//! The copy reconciler: every `backup.copy_poll`, one pass of
//! [`crate::workflows::copies::reconcile`] over unfinished DR-region copies.

use std::time::Duration;

/// Forever, every `every`.
pub async fn run(engine: crate::workflows::Engine, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = crate::workflows::copies::reconcile(engine.deps(), every).await {
            tracing::error!(error = %e, "copy reconciler pass failed");
        }
    }
}
