//! Loops that drive the fleet towards what the policies ask, outside any
//! one operation: [`scheduler`] starts due backups, [`copies`] drives
//! DR-region copies to an end.

pub mod catalog;
pub mod copies;
pub mod scheduler;
