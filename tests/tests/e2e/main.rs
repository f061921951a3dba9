//! Every end-to-end test in one test binary (one link of the AWS SDK instead
//! of one per area): a module per area, named as its file was when each area
//! was its own binary (`backup::`, `failover::`, ...), so
//! `cargo test --test e2e backup::` (or `tests/run.sh backup::`) runs one area.
//!
//! The tests of all areas now share one process: nothing here may rely on
//! process-global state (environment variables, `OnceLock`s, the current
//! directory). What is machine-wide (a process named `nomad`, which
//! `wipe-nomad` refuses to run next to) is arbitrated by
//! [`dr_tests::nomad_shared`] / [`dr_tests::nomad_exclusive`].

mod app_steps;
mod auto_failover;
mod backup;
mod cleanup_builds;
mod clojure_literal;
mod crash_drill;
mod crash_each_step;
mod crash_failover;
mod crash_spare;
mod dataplane;
mod drain;
mod drctl;
mod drill;
mod failover;
mod faults;
mod fleet;
mod freeze;
mod ha;
mod harness;
mod iam;
mod iam_conditions;
mod identity;
mod instances;
mod mtls;
mod quiesce;
mod recover;
mod recovery;
mod spare;
mod steps_over_the_wire;
mod store;
mod throttling;
mod webhooks;
mod wipe;
