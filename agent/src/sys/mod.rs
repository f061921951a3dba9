//! Access to the machine, below every step: the HTTP client ([`http`]),
//! IMDS ([`imds`]), the one crash-safe file write ([`atomic`]), the mount
//! table ([`mounts`]) and the freeze ioctls ([`fsfreeze`], the only unsafe
//! code of the agent), instance facts ([`facts`]) and identity
//! ([`identity`]), `replicatedctl` ([`replicated`]), time stamps
//! ([`clock`]).

pub(crate) mod atomic;
pub(crate) mod clock;
pub mod facts;
#[allow(unsafe_code)]
pub(crate) mod fsfreeze;
pub mod http;
pub(crate) mod identity;
pub mod imds;
pub mod mounts;
pub mod replicated;
