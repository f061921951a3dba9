//! Following an operation until it ends (`--wait`).

use std::time::Duration;

use dr_proto::pb;
use dr_proto::pb::admin_service_client::AdminServiceClient;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::cli::Output;
use crate::connection::Connection;
use crate::error::CliError;
use crate::views::human_duration;

/// Follows an operation until it finishes or waits for a human, printing
/// each step as it starts, progresses and ends, with the time elapsed since
/// the watch began, plus a "still running" line when nothing happened for a
/// while. Returns the last state seen.
pub async fn watch(
    conn: &Connection,
    client: &mut AdminServiceClient<Channel>,
    id: &str,
    output: Output,
) -> Result<pb::Operation, CliError> {
    watch_from(conn, client, id, output, false).await
}

/// [`watch`] after a signal was sent to a waiting operation: its first
/// `waiting` states are the ones the signal answers, not a new wait.
pub async fn watch_after_signal(
    conn: &Connection,
    client: &mut AdminServiceClient<Channel>,
    id: &str,
    output: Output,
) -> Result<pb::Operation, CliError> {
    watch_from(conn, client, id, output, true).await
}

async fn watch_from(
    conn: &Connection,
    client: &mut AdminServiceClient<Channel>,
    id: &str,
    output: Output,
    signalled: bool,
) -> Result<pb::Operation, CliError> {
    let mut left_waiting = !signalled;
    let mut stream =
        client.watch_operation(pb::OperationRef { operation_id: id.to_owned() }).await.map_err(|s| conn.status_error(s))?.into_inner();
    let start = tokio::time::Instant::now();
    let mut seen: std::collections::HashMap<String, (String, String)> = Default::default();
    let mut last: Option<pb::Operation> = None;
    let mut last_print = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs(10));
    ticker.tick().await;
    let eprint = |line: String| {
        if output == Output::Text {
            println!("{line}");
        } else {
            eprintln!("{line}");
        }
    };
    loop {
        tokio::select! {
            next = stream.next() => {
                let op = match next {
                    Some(Ok(op)) => op,
                    Some(Err(s)) => return Err(match conn.status_error(s) {
                        CliError::Unreachable { url, cause } => CliError::Unreachable {
                            url,
                            cause: format!("{cause} (while following {id}, which may still be running: `drctl operation {id} --wait`)"),
                        },
                        other => other,
                    }),
                    None => break,
                };
                let t = start.elapsed().as_secs_f64();
                for s in &op.steps {
                    let key = (s.state.clone(), s.detail.clone());
                    if s.state != "pending" && seen.get(&s.name) != Some(&key) {
                        let text = if s.error.is_empty() { &s.detail } else { &s.error };
                        eprint(format!("[{t:>6.1}s] {:<16} {:<8} {}", s.name, s.state, text));
                        seen.insert(s.name.clone(), key);
                        last_print = tokio::time::Instant::now();
                    }
                }
                if op.state != "waiting" {
                    left_waiting = true;
                }
                let finished = matches!(op.state.as_str(), "succeeded" | "failed" | "cancelled")
                    || (op.state == "waiting" && left_waiting);
                last = Some(op);
                if finished {
                    break;
                }
            }
            _ = ticker.tick() => {
                if last_print.elapsed() >= Duration::from_secs(10) {
                    let step = last.as_ref().and_then(|op| op.steps.iter().find(|s| s.state == "running")).map(|s| s.name.clone()).unwrap_or_else(|| "starting".into());
                    eprint(format!("[{:>6.1}s] {step:<16} still running ({} so far)", start.elapsed().as_secs_f64(), human_duration(start.elapsed().as_millis() as u64)));
                    last_print = tokio::time::Instant::now();
                }
            }
        }
    }
    let lost = |cause: &str| CliError::Unreachable {
        url: conn.url.clone(),
        cause: format!("{cause}; {id} may still be running: follow it with `drctl operation {id} --wait`"),
    };
    match last {
        // A watch ends when the operation does: ending earlier means the
        // controller went away (a restart, a shutdown).
        Some(op) if matches!(op.state.as_str(), "running" | "cancelling") || (op.state == "waiting" && !left_waiting) => {
            Err(lost("the controller ended the watch before the operation finished"))
        }
        Some(op) => Ok(op),
        None => Err(lost("the controller ended the watch without an answer")),
    }
}
