//! Instance facts: what a Hello carries.

use std::net::IpAddr;
use std::path::Path;

use serde::Serialize;

use crate::sys::imds::{ImdsClient, ImdsError};

/// The running kernel's boot id (never under `--root`).
pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

#[derive(Debug, thiserror::Error)]
pub enum FactsError {
    #[error(transparent)]
    Imds(#[from] ImdsError),
    #[error("IMDS meta-data/{item} is missing")]
    Missing { item: &'static str },
    #[error("IMDS meta-data/{item} answered `{value}`, which is not {expected}")]
    Invalid { item: &'static str, value: String, expected: &'static str },
    #[error("cannot read the boot id from {path}: {source}")]
    BootId { path: String, source: std::io::Error },
}

/// Family of the services machine's OS, as seen from its root filesystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OsFamily {
    Debian,
    Rhel,
    Unknown,
}

impl OsFamily {
    pub fn as_str(self) -> &'static str {
        match self {
            OsFamily::Debian => "debian",
            OsFamily::Rhel => "rhel",
            OsFamily::Unknown => "unknown",
        }
    }
}

/// Facts about this instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InstanceFacts {
    pub instance_id: String,
    pub private_ip: String,
    /// Empty when the instance has no public address.
    pub public_ip: String,
    pub boot_id: String,
    pub os_family: OsFamily,
    /// Replicated app State, "unknown" if unreadable.
    pub app_state: String,
}

/// What IMDS says about this instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImdsFacts {
    pub instance_id: String,
    pub private_ip: IpAddr,
    pub public_ip: Option<IpAddr>,
}

/// Reads instance id and addresses from IMDSv2 and validates them.
pub async fn imds_facts(imds: &ImdsClient) -> Result<ImdsFacts, FactsError> {
    let token = imds.token().await?;
    let instance_id = imds.meta_data(&token, "instance-id").await?.ok_or(FactsError::Missing { item: "instance-id" })?;
    if !valid_instance_id(&instance_id) {
        return Err(FactsError::Invalid { item: "instance-id", value: instance_id, expected: "an instance id (i-...)" });
    }
    let private = imds.meta_data(&token, "local-ipv4").await?.ok_or(FactsError::Missing { item: "local-ipv4" })?;
    let private_ip = parse_ip("local-ipv4", &private)?;
    let public_ip = match imds.meta_data(&token, "public-ipv4").await? {
        None => None,
        Some(s) if s.is_empty() => None,
        Some(s) => Some(parse_ip("public-ipv4", &s)?),
    };
    Ok(ImdsFacts { instance_id, private_ip, public_ip })
}

fn parse_ip(item: &'static str, value: &str) -> Result<IpAddr, FactsError> {
    value.parse().map_err(|_| FactsError::Invalid { item, value: value.to_owned(), expected: "an IP address" })
}

/// `i-` followed by lower-case hex digits.
pub fn valid_instance_id(id: &str) -> bool {
    id.strip_prefix("i-")
        .is_some_and(|hex| !hex.is_empty() && hex.len() <= 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// Reads a boot id file (normally [`BOOT_ID_PATH`]).
pub fn read_boot_id(path: &Path) -> Result<String, FactsError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| FactsError::BootId { path: path.display().to_string(), source })
}

/// The OS family of the filesystem under `root`.
pub fn detect_os_family(root: &Path) -> OsFamily {
    if root.join("etc/sysconfig/replicated").exists() {
        return OsFamily::Rhel;
    }
    if root.join("etc/default/replicated").exists() {
        return OsFamily::Debian;
    }
    match std::fs::read_to_string(root.join("etc/os-release")) {
        Ok(text) => os_release_family(&text),
        Err(_) => OsFamily::Unknown,
    }
}

/// Classifies an os-release file by its ID, then ID_LIKE.
pub fn os_release_family(text: &str) -> OsFamily {
    let value = |key: &str| {
        text.lines().find_map(|line| {
            let (k, v) = line.trim().split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches(|c| c == '"' || c == '\'').to_ascii_lowercase())
        })
    };
    let classify = |word: &str| match word {
        "debian" | "ubuntu" => Some(OsFamily::Debian),
        "rhel" | "centos" | "fedora" | "amzn" => Some(OsFamily::Rhel),
        _ => None,
    };
    if let Some(f) = value("ID").as_deref().and_then(classify) {
        return f;
    }
    value("ID_LIKE").and_then(|like| like.split_whitespace().find_map(classify)).unwrap_or(OsFamily::Unknown)
}

/// Gathers every fact; `app_state` is supplied by the caller.
pub async fn gather(imds: &ImdsClient, root: &Path, boot_id_path: &Path, app_state: String) -> Result<InstanceFacts, FactsError> {
    let from_imds = imds_facts(imds).await?;
    Ok(InstanceFacts {
        instance_id: from_imds.instance_id,
        private_ip: from_imds.private_ip.to_string(),
        public_ip: from_imds.public_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        boot_id: read_boot_id(boot_id_path)?,
        os_family: detect_os_family(root),
        app_state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_ids() {
        assert!(valid_instance_id("i-0123456789abcdef0"));
        assert!(!valid_instance_id("i-"));
        assert!(!valid_instance_id("i-XYZ"));
        assert!(!valid_instance_id("ami-123"));
    }

    #[test]
    fn os_family_from_files() {
        let root = tempfile::tempdir().expect("tempdir");
        assert_eq!(detect_os_family(root.path()), OsFamily::Unknown);
        std::fs::create_dir_all(root.path().join("etc/default")).expect("mkdir");
        std::fs::write(root.path().join("etc/os-release"), "ID=centos\n").expect("write");
        assert_eq!(detect_os_family(root.path()), OsFamily::Rhel);
        std::fs::write(root.path().join("etc/default/replicated"), "X=1\n").expect("write");
        assert_eq!(detect_os_family(root.path()), OsFamily::Debian);
        std::fs::create_dir_all(root.path().join("etc/sysconfig")).expect("mkdir");
        std::fs::write(root.path().join("etc/sysconfig/replicated"), "X=1\n").expect("write");
        assert_eq!(detect_os_family(root.path()), OsFamily::Rhel);
    }

    #[test]
    fn os_release_parsing() {
        assert_eq!(os_release_family("NAME=\"Ubuntu\"\nID=ubuntu\nID_LIKE=debian\n"), OsFamily::Debian);
        assert_eq!(os_release_family("ID=\"amzn\"\nID_LIKE=\"centos rhel fedora\"\n"), OsFamily::Rhel);
        assert_eq!(os_release_family("ID=rocky\nID_LIKE=\"rhel centos fedora\"\n"), OsFamily::Rhel);
        assert_eq!(os_release_family("ID=arch\n"), OsFamily::Unknown);
    }
}
