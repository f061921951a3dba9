//! EC2 tag keys the controller writes and reads back. Every AMI, snapshot
//! and instance it creates carries `dr:site`, `dr:operation` and
//! `dr:created-by`; retention, the catalog and the reconcilers find their
//! objects by these.

pub const TAG_SITE: &str = "dr:site";
pub const TAG_OPERATION: &str = "dr:operation";
pub const TAG_CREATED_BY: &str = "dr:created-by";
/// The value of `dr:created-by`.
pub const CREATED_BY: &str = "dr-controller";
/// On a DR-region copy: the backup AMI it copies.
pub const TAG_SOURCE_IMAGE: &str = "dr:source-image";
/// On a launched instance: why it exists (`candidate`, `drill`, `spare`).
pub const TAG_ROLE: &str = "dr:role";
/// On a fenced instance: the operation that fenced it.
pub const TAG_FENCED_FROM: &str = "dr:fenced-from";
