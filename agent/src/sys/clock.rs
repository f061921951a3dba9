//! Time stamps for file names (dated backups, moved-aside trees).

use std::time::SystemTime;

/// `YYYYmmddTHHMMSSZ` in UTC, e.g. `20240229T123456Z`: sortable, and safe in
/// a file name.
pub(crate) fn utc_stamp(t: SystemTime) -> String {
    let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    time::OffsetDateTime::from(t).format(&format).expect("a UTC time formats with a fixed description")
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn stamps_are_utc_civil_time() {
        assert_eq!(utc_stamp(UNIX_EPOCH), "19700101T000000Z");
        assert_eq!(utc_stamp(UNIX_EPOCH + Duration::from_secs(1_709_210_096)), "20240229T123456Z");
        assert_eq!(utc_stamp(UNIX_EPOCH + Duration::from_secs(951_782_400)), "20000229T000000Z");
        assert_eq!(utc_stamp(UNIX_EPOCH + Duration::from_secs(4_107_542_399)), "21000228T235959Z");
    }
}
