//! Loops that drive the fleet towards what the policies ask, outside any
//! one operation: [`scheduler`] starts due backups, [`copies`] drives
//! DR-region copies to an end, [`drills`] terminates drill copies whose
//! `dr:keep-until` has passed, [`fences`] stops again a fenced old primary
//! seen running, [`spares`] keeps each site's hot spare
//! current, [`health`] watches every site and climbs the recovery ladder,
//! [`notify`] records events and delivers them to webhooks, [`refusals`]
//! records refused agents and raises `agent.refused`. [`catalog`]
//! checks the store against EC2 at start. [`supervisor`] runs each of these
//! loops and starts it again when it ends or panics.

pub mod catalog;
pub mod certs;
pub mod copies;
pub mod drills;
pub mod fences;
pub mod health;
pub mod notify;
pub mod refusals;
pub mod rotation;
pub mod scheduler;
pub mod spares;
pub mod supervisor;
#[cfg(test)]
mod tests;

#[cfg(test)]
pub(crate) mod tests_support {
    /// The process's rustls provider (the app probe's HTTPS client needs one).
    pub fn install_crypto() {
        dr_proto::tls::install_crypto_provider();
    }
}
