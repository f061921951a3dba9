//! The wire shared by dr-agent, dr-controller and drctl.
//!
//! - [`pb`]: code generated from `proto/dr.proto` (messages, clients, servers).
//!   Generated types stay at the edges: each binary converts them to its own
//!   domain types at the gRPC boundary.
//! - [`contract`]: what agent and controller agree on per step: its
//!   parameters, its report, its error kind (one type each, used by both,
//!   outside `pb` so the controller's workflows may name them).
//! - [`identity`]: the SPIFFE-style identities carried in certificates.
//! - [`backoff`]: the one retry/backoff curve both ends use.
//! - [`tls`]: loading PEM material and building the rustls configurations
//!   both ends use (TLS 1.3, client certificates required, aws-lc provider).
//! - [`transport`]: the agent's TCP connector (a dead controller is noticed
//!   by the kernel, `TCP_USER_TIMEOUT`, not by HTTP/2 pings the controller
//!   would have to answer 10,000 times over).

#![forbid(unsafe_code)]

/// The gRPC metadata key a standby controller names the leader's
/// `host:port` in, with its `UNAVAILABLE` answer to every call (agents and
/// drctl go there next).
pub const LEADER_METADATA: &str = "dr-leader";

/// With [`LEADER_METADATA`]: in how many milliseconds the leader's lease
/// ends unless renewed (and a standby may take it). A client that could not
/// reach the named leader waits that long before asking again.
pub const RETRY_AFTER_METADATA: &str = "dr-retry-after-ms";

pub mod backoff;
pub mod contract;
pub mod example_keys;
pub mod identity;
pub mod tls;
pub mod transport;

/// Generated protobuf and gRPC code (package `dr.v1`).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("dr.v1");
}
