//! drctl, the operator's CLI for dr-controller. It depends on the wire
//! (`dr-proto`) only: building it needs neither the AWS SDK nor SQLite.
//!
//! - [`cli`]: the command-line grammar and what each command does.
//! - [`connection`]: reaching the admin API over mutual TLS, and telling
//!   apart why a connection failed (unreachable, our certificate refused,
//!   the controller's certificate not trusted, local files wrong).
//! - [`error`]: [`error::CliError`], its exit codes and its JSON form.
//! - [`views`]: answers of the admin API turned into serializable views.
//! - [`print`]: views printed for humans, or as JSON lines for scripts.
//! - [`watch`]: following an operation until it ends.
//! - [`pki`]: `drctl pki init` / `issue`, the deployment's certificates.

#![forbid(unsafe_code)]

pub mod cli;
pub mod connection;
pub mod error;
pub mod failover;
pub mod pki;
pub mod print;
pub mod views;
pub mod watch;

pub use error::CliError;
