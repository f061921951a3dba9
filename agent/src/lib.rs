//! dr-agent: performs typed, local recovery steps on a CircleCI Server
//! services machine, for a controller or by hand.
//!
//! Grouped by what the modules do, one folder per layer, lowest first; a
//! layer imports only from layers below it (checked by `layering.rs`):
//!
//! - [`config`]: the TOML configuration.
//! - [`sys`]: access to the machine: HTTP client, IMDS, crash-safe writes,
//!   mount table and the freeze ioctls, instance facts and identity,
//!   `replicatedctl`, the clock's stamps.
//! - [`steps`]: the typed steps (one module per step) and their executor;
//!   parameters and reports are the contract's (`dr_proto::contract`).
//! - [`daemon`]: the gRPC session with the controller, the journal, the
//!   fence, the hand-run reads.
//! - [`cli`]: the hand-run command line, a layer over [`steps`] (parse,
//!   run through the same executor, exit code, render), and log setup.
#![deny(unsafe_code)]

pub mod cli;
pub mod config;
pub(crate) mod daemon;
#[cfg(test)]
mod layering;
pub mod steps;
pub mod sys;
