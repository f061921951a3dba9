//! The mount table: the one parser of /proc/self/mountinfo, used by the
//! freeze's mount checks and by the Nomad wipe (mounts below its dir).

use std::path::PathBuf;

/// Where the kernel lists this mount namespace's mounts.
pub const MOUNTINFO: &str = "/proc/self/mountinfo";

/// One line of /proc/self/mountinfo (the fields we use).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
}

/// Parses /proc/self/mountinfo text. Mount points are unescaped (`\040`...).
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            let mount_point = fields.get(4)?;
            Some(MountEntry {
                mount_point: PathBuf::from(unescape(mount_point)),
                fs_type: fields.get(sep + 1).map(|s| (*s).to_owned()).unwrap_or_default(),
                source: fields.get(sep + 2).map(|s| unescape(s)).unwrap_or_default(),
            })
        })
        .collect()
}

/// Undoes the kernel's octal escapes of space, tab, newline and backslash.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let v = (bytes[i + 1] - b'0') as u32 * 64 + (bytes[i + 2] - b'0') as u32 * 8 + (bytes[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This mount namespace's mount table.
pub fn mount_table() -> std::io::Result<Vec<MountEntry>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(MOUNTINFO)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
        40 27 7:0 / /mnt/data\\040disk rw,relatime shared:1 - ext4 /dev/loop0 rw\n\
        41 27 0:30 / /proc rw - proc proc rw\n";

    #[test]
    fn parses_mountinfo_with_escapes_and_optional_fields() {
        let t = parse_mountinfo(SAMPLE);
        assert_eq!(t.len(), 3);
        assert_eq!(t[1].mount_point, PathBuf::from("/mnt/data disk"));
        assert_eq!(t[1].fs_type, "ext4");
        assert_eq!(t[1].source, "/dev/loop0");
        assert_eq!(t[0].mount_point, PathBuf::from("/"));
    }
}
