//! Loops that drive the fleet towards what the policies ask, outside any
//! one operation: [`scheduler`] starts due backups, [`copies`] drives
//! DR-region copies to an end, [`drills`] terminates drill copies whose
//! `dr:keep-until` has passed, [`spares`] keeps each site's hot spare
//! current. [`catalog`] checks the store against EC2 at start.

pub mod catalog;
pub mod copies;
pub mod drills;
pub mod scheduler;
pub mod spares;
