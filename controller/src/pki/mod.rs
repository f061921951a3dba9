//! The controller's certificate authority work: signing agents' and its own
//! certificates with its intermediate CA ([`ca`]), and checking the EC2
//! instance identity documents agents enrol with ([`iid`]).
//!
//! The root CA stays offline (`drctl pki init`); the intermediate
//! (`drctl pki intermediate`, path length 0) is the only CA key on a running
//! machine. What is issued, to whom and when is recorded by the store
//! (`agent_certs`); the rules of who may enrol live in `agents::enrol`.

pub mod ca;
pub mod iid;

pub use ca::{Issued, Signer, SignerError};
pub use iid::{IidError, IidVerifier, InstanceDocument};
