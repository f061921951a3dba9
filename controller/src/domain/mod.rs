//! The domain: records, policies and recovery settings as plain data and
//! pure rules. Imports nothing else from the controller (checked by
//! `crate::layering`).

pub mod events;
pub mod health;
pub mod model;
pub mod policy;
pub mod recovery;
pub mod refusal;
pub mod tags;
