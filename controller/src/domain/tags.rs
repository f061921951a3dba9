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
/// On a drill copy: when it may be terminated by the drill reaper
/// (RFC 3339, UTC), if its drill has not torn it down by then.
pub const TAG_KEEP_UNTIL: &str = "dr:keep-until";

/// The `dr:keep-until` value for a time in Unix milliseconds.
pub fn keep_until_value(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}

/// A `dr:keep-until` value back in Unix milliseconds (`None`: not one of ours).
pub fn parse_keep_until(value: &str) -> Option<u64> {
    let t = humantime::parse_rfc3339(value).ok()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as u64)
}
