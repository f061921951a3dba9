//! Rewriting the old private/public IPs in the Replicated environment files.
//!
//! - Layout: RHEL when `<root>/etc/sysconfig/replicated` exists (the
//!   installer picks /etc/sysconfig when systemd runs and that folder
//!   exists), else Debian `<root>/etc/default/replicated`; the
//!   `replicated-operator` file beside it is rewritten too (its absence is a
//!   warning). When both sets exist, both are rewritten (with a warning
//!   naming them): none keeps the old addresses.
//! - Every file is parsed strictly first ([`envfile`]); one line that is not
//!   understood fails the step, naming file and line, before anything is
//!   written to any file.
//! - Addresses are replaced token-exactly ([`envfile::find_ips`]), in values
//!   only (comments are kept byte for byte), never inside `NODENAME`.
//! - Dry run and real run compute the same plan; the dry run prints it as a
//!   unified diff.
//! - Writes are crash-safe ([`atomic`]): dated backup, temporary file, fsync,
//!   owner and mode, rename, directory fsync, under a directory lock.

pub(crate) mod atomic;
mod diff;
pub mod envfile;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

pub(crate) use dr_proto::contract::{AddressChange, BadChange, FileReport, Layout, RewriteParams, RewriteReport};

use crate::config::Config;
use crate::steps::error::ErrorKind;

#[derive(Debug, thiserror::Error)]
pub(crate) enum RewriteError {
    #[error(transparent)]
    BadChange(#[from] BadChange),
    #[error("nothing to rewrite: give at least one --private OLD=NEW or --public OLD=NEW")]
    NothingRequested,
    #[error("{old} is rewritten to {first} and to {second}: give one new address per old address")]
    Conflict { old: IpAddr, first: IpAddr, second: IpAddr },
    #[error("no Replicated environment file under {root}: looked for {rhel} and {debian}")]
    NoFiles { root: PathBuf, rhel: PathBuf, debian: PathBuf },
    #[error("{path}:{line}: {message}; nothing was written")]
    Parse { path: PathBuf, line: usize, message: String },
    #[error("{path}:{line}: not valid UTF-8; nothing was written")]
    NotUtf8 { path: PathBuf, line: usize },
    #[error("{path}:{line}: {key} {value:?} is not an IP address")]
    BadAddress { path: PathBuf, line: usize, key: String, value: String },
    #[error("{path} is not a regular file (symlink or other); refusing to replace it")]
    NotRegular { path: PathBuf },
    #[error("another rewrite is running (it holds the lock on {dir})")]
    Busy { dir: PathBuf },
    #[error("{path} changed while it was being rewritten; run the step again")]
    Changed { path: PathBuf },
    #[error("cannot {op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("internal error: {0}")]
    Internal(String),
}

impl RewriteError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            RewriteError::BadChange(_)
            | RewriteError::NothingRequested
            | RewriteError::Conflict { .. }
            | RewriteError::NoFiles { .. }
            | RewriteError::Parse { .. }
            | RewriteError::NotUtf8 { .. }
            | RewriteError::BadAddress { .. } => ErrorKind::Invalid,
            RewriteError::NotRegular { .. } | RewriteError::Busy { .. } => ErrorKind::Refused,
            RewriteError::Changed { .. } | RewriteError::Io { .. } | RewriteError::Internal(_) => ErrorKind::Failed,
        }
    }
}

/// The names of the two files, in the order they are rewritten.
pub(crate) const FILES: [&str; 2] = ["replicated", "replicated-operator"];

/// The layout of the machine under `root`.
pub(crate) fn detect_layout(root: &Path) -> Result<Layout, RewriteError> {
    let rhel = root.join(Layout::Rhel.dir()).join(FILES[0]);
    let debian = root.join(Layout::Debian.dir()).join(FILES[0]);
    if rhel.symlink_metadata().is_ok() {
        Ok(Layout::Rhel)
    } else if debian.symlink_metadata().is_ok() {
        Ok(Layout::Debian)
    } else {
        Err(RewriteError::NoFiles { root: root.to_path_buf(), rhel, debian })
    }
}

/// The parameters from the CLI's `--private` / `--public` values.
pub(crate) fn params_from_flags(private: &[String], public: &[String]) -> Result<RewriteParams, RewriteError> {
    let private = private.iter().map(|v| AddressChange::parse("--private", v)).collect::<Result<_, _>>()?;
    let public = public.iter().map(|v| AddressChange::parse("--public", v)).collect::<Result<_, _>>()?;
    let p = RewriteParams { private, public };
    validate(&p)?;
    Ok(p)
}

/// At least one change, one family per change, one new address per old.
pub(crate) fn validate(p: &RewriteParams) -> Result<(), RewriteError> {
    if p.private.is_empty() && p.public.is_empty() {
        return Err(RewriteError::NothingRequested);
    }
    let all: Vec<(&str, &AddressChange)> =
        p.private.iter().map(|c| ("--private", c)).chain(p.public.iter().map(|c| ("--public", c))).collect();
    for (i, (flag, c)) in all.iter().enumerate() {
        if c.old.is_ipv4() != c.new.is_ipv4() {
            return Err(RewriteError::BadChange(BadChange {
                flag: (*flag).to_owned(),
                value: format!("{}={}", c.old, c.new),
                message: "OLD and NEW must both be IPv4 or both IPv6".into(),
            }));
        }
        if let Some((_, d)) = all[..i].iter().find(|(_, d)| d.old == c.old && d.new != c.new) {
            return Err(RewriteError::Conflict { old: c.old, first: d.new, second: c.new });
        }
    }
    Ok(())
}

/// (kind, change) for every change that moves an address.
fn effective(p: &RewriteParams) -> Vec<(&'static str, AddressChange)> {
    let mut out: Vec<(&'static str, AddressChange)> = Vec::new();
    let all = p.private.iter().map(|c| ("private", *c)).chain(p.public.iter().map(|c| ("public", *c)));
    for (kind, c) in all {
        if c.old != c.new && !out.iter().any(|(_, d)| d.old == c.old) {
            out.push((kind, c));
        }
    }
    out
}

/// The addresses a machine's files carry (for `recover`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FoundAddresses {
    pub layout: Layout,
    /// `PRIVATE_ADDRESS`.
    pub private: Option<IpAddr>,
    /// `-e PUBLIC_ADDRESS=` in the opts (or a `PUBLIC_ADDRESS` line).
    pub public: Option<IpAddr>,
    /// Every distinct private address, in file order. More than one when
    /// the files disagree, e.g. after a rewrite interrupted between the two
    /// files: rewrite each of them (other than the current one) to the
    /// current address.
    pub private_all: Vec<IpAddr>,
    /// Every distinct public address, in file order.
    pub public_all: Vec<IpAddr>,
}

/// One file read and parsed.
struct Loaded {
    rel: String,
    path: PathBuf,
    bytes: Vec<u8>,
    meta: std::fs::Metadata,
}

impl Loaded {
    fn text(&self) -> Result<&str, RewriteError> {
        std::str::from_utf8(&self.bytes).map_err(|e| RewriteError::NotUtf8 {
            path: self.path.clone(),
            line: self.bytes[..e.valid_up_to()].iter().filter(|b| **b == b'\n').count() + 1,
        })
    }

    fn lines(&self) -> Result<Vec<envfile::Line<'_>>, RewriteError> {
        envfile::parse(self.text()?).map_err(|e| RewriteError::Parse { path: self.path.clone(), line: e.line, message: e.message })
    }
}

/// Reads the files of the layout; missing operator file -> warning.
fn load(root: &Path, warnings: &mut Vec<String>) -> Result<(Layout, Vec<Loaded>), RewriteError> {
    let layout = detect_layout(root)?;
    let mut layouts = vec![layout];
    if layout == Layout::Rhel && root.join(Layout::Debian.dir()).join(FILES[0]).symlink_metadata().is_ok() {
        // Both sets: the service reads one of them, but whoever switches to
        // the other (a re-install, a unit edited by hand) must not find the
        // old addresses there. Both are rewritten, RHEL's first.
        warnings.push(format!(
            "both {} and {} exist: rewriting both sets",
            root.join(Layout::Rhel.dir()).join(FILES[0]).display(),
            root.join(Layout::Debian.dir()).join(FILES[0]).display()
        ));
        layouts.push(Layout::Debian);
    }
    let mut out = Vec::new();
    for (layout, name) in layouts.into_iter().flat_map(|l| FILES.into_iter().map(move |n| (l, n))) {
        let rel = format!("{}/{name}", layout.dir());
        let path = root.join(&rel);
        let meta = match path.symlink_metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                warnings.push(format!("{} is missing; only the other file was read", path.display()));
                continue;
            }
            Err(source) => {
                return Err(RewriteError::Io { op: "stat", path, source });
            }
        };
        if !meta.file_type().is_file() {
            return Err(RewriteError::NotRegular { path });
        }
        let bytes = std::fs::read(&path).map_err(|source| RewriteError::Io { op: "read", path: path.clone(), source })?;
        out.push(Loaded { rel, path, bytes, meta });
    }
    Ok((layout, out))
}

/// The addresses written in the files under `root`.
pub(crate) fn find_addresses(root: &Path) -> Result<FoundAddresses, RewriteError> {
    let mut warnings = Vec::new();
    let (layout, files) = load(root, &mut warnings)?;
    let mut private_all: Vec<IpAddr> = Vec::new();
    let mut public_all: Vec<IpAddr> = Vec::new();
    let note = |all: &mut Vec<IpAddr>, ip: IpAddr| {
        if !all.contains(&ip) {
            all.push(ip);
        }
    };
    for f in &files {
        for line in f.lines()? {
            let (Some(key), Some(raw)) = (line.key(), line.raw_value()) else {
                continue;
            };
            let value = envfile::unquote(raw);
            let parse = |key: &str, v: &str| {
                let t = v.strip_prefix('[').and_then(|t| t.strip_suffix(']')).unwrap_or(v);
                t.parse::<IpAddr>().map_err(|_| RewriteError::BadAddress {
                    path: f.path.clone(),
                    line: line.number,
                    key: key.to_owned(),
                    value: v.to_owned(),
                })
            };
            match key {
                "PRIVATE_ADDRESS" if !value.trim().is_empty() => note(&mut private_all, parse(key, value.trim())?),
                "PUBLIC_ADDRESS" if !value.trim().is_empty() => note(&mut public_all, parse(key, value.trim())?),
                _ => {}
            }
            for word in value.split_whitespace() {
                if let Some(v) = word.strip_prefix("PUBLIC_ADDRESS=")
                    && !v.is_empty()
                {
                    note(&mut public_all, parse("PUBLIC_ADDRESS", v)?);
                }
            }
        }
    }
    Ok(FoundAddresses { layout, private: private_all.first().copied(), public: public_all.first().copied(), private_all, public_all })
}

/// The rewrite of one file.
struct FilePlan {
    loaded: Loaded,
    new: String,
    changed_lines: usize,
    replacements: usize,
    diff: String,
}

/// Computes the new content of every file; fails on the first bad line of
/// any file. Pure: reads only.
fn plan(files: Vec<Loaded>, changes: &[(&'static str, AddressChange)], warnings: &mut Vec<String>) -> Result<Vec<FilePlan>, RewriteError> {
    let map: Vec<(IpAddr, IpAddr)> = changes.iter().map(|(_, c)| (c.old, c.new)).collect();
    let mut seen: Vec<IpAddr> = Vec::new();
    let mut per_old = vec![0usize; changes.len()];
    let mut plans = Vec::new();
    for loaded in files {
        let text = loaded.text()?;
        let lines = loaded.lines()?;
        let mut new = String::with_capacity(text.len() + 64);
        let mut pairs: Vec<(String, String)> = Vec::with_capacity(lines.len());
        let mut changed_lines = 0;
        let mut replacements = 0;
        for line in &lines {
            let old_line = format!("{}{}", line.text, line.ending);
            let new_line = match &line.kind {
                envfile::LineKind::Assign { key, value } => {
                    let raw = &line.text[value.clone()];
                    let whole_nodename = &line.text[key.clone()] == "NODENAME";
                    let skip = if whole_nodename { std::iter::once(0..raw.len()).collect() } else { envfile::nodename_ranges(raw) };
                    for t in envfile::find_ips(raw, &skip) {
                        seen.push(t.addr);
                        if let Some(i) = changes.iter().position(|(_, c)| c.old == t.addr) {
                            per_old[i] += 1;
                        }
                    }
                    // NODENAME values that encode an old address: reported.
                    let hosts: Vec<String> = if whole_nodename {
                        vec![envfile::unquote(raw)]
                    } else {
                        skip.iter().map(|r| raw[r.start + "NODENAME=".len()..r.end].to_owned()).collect()
                    };
                    for host in hosts {
                        for (kind, c) in changes {
                            if envfile::hostname_encodes(&host, c.old) {
                                warnings.push(format!(
                                    "{}:{}: NODENAME={host} encodes the old {kind} IP {}; it was not rewritten \
                                     (NODENAME is the OS hostname): check the new machine's hostname and change \
                                     NODENAME by hand if Replicated must follow it",
                                    loaded.path.display(),
                                    line.number,
                                    c.old
                                ));
                            }
                        }
                    }
                    let (rewritten, n) = envfile::replace_ips(raw, &skip, &map);
                    replacements += n;
                    format!("{}{}{}{}", &line.text[..value.start], rewritten, &line.text[value.end..], line.ending)
                }
                _ => old_line.clone(),
            };
            if new_line != old_line {
                changed_lines += 1;
            }
            new.push_str(&new_line);
            pairs.push((old_line, new_line));
        }
        let refs: Vec<(&str, &str)> = pairs.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let diff = diff::unified(&format!("a/{}", loaded.rel), &format!("b/{}", loaded.rel), &refs);
        plans.push(FilePlan { loaded, new, changed_lines, replacements, diff });
    }
    for (i, (kind, c)) in changes.iter().enumerate() {
        if per_old[i] == 0 && !seen.contains(&c.new) {
            warnings.push(format!(
                "neither the old {kind} IP {} nor the new one {} appears in the files: check the addresses given",
                c.old, c.new
            ));
        }
    }
    Ok(plans)
}

/// Runs the step on the machine under `config.root`.
pub(crate) async fn run(config: &Config, params: &RewriteParams, dry_run: bool) -> Result<RewriteReport, RewriteError> {
    let root = config.root.clone();
    let params = params.clone();
    tokio::task::spawn_blocking(move || execute(&root, &params, dry_run, SystemTime::now()))
        .await
        .map_err(|e| RewriteError::Internal(format!("the rewrite task failed: {e}")))?
}

/// The step, synchronously (`now` names the backups).
pub(crate) fn execute(root: &Path, params: &RewriteParams, dry_run: bool, now: SystemTime) -> Result<RewriteReport, RewriteError> {
    validate(params)?;
    let changes = effective(params);
    let mut warnings = Vec::new();
    let layout = detect_layout(root)?;
    let dir = root.join(layout.dir());
    let _lock = if dry_run { None } else { Some(atomic::DirLock::acquire(&dir)?) };
    let (layout, files) = load(root, &mut warnings)?;
    let plans = plan(files, &changes, &mut warnings)?;

    let mut removed_temp_files = Vec::new();
    for p in &plans {
        for t in atomic::stray_temps(&p.loaded.path)? {
            if !dry_run {
                std::fs::remove_file(&t).map_err(|source| RewriteError::Io {
                    op: "remove stray temporary file",
                    path: t.clone(),
                    source,
                })?;
                tracing::info!(step = "rewrite-addresses", path = %t.display(), "removed a temporary file of an interrupted run");
            }
            removed_temp_files.push(t);
        }
    }
    if !dry_run && !removed_temp_files.is_empty() {
        atomic::fsync_dir(&dir)?;
    }

    let mut files = Vec::new();
    let mut diff = String::new();
    for p in &plans {
        diff.push_str(&p.diff);
        let mut report = FileReport {
            path: p.loaded.path.clone(),
            changed_lines: p.changed_lines,
            replacements: p.replacements,
            backup: None,
            written: false,
        };
        if p.changed_lines > 0 && !dry_run {
            let path = &p.loaded.path;
            let current = std::fs::read(path).map_err(|source| RewriteError::Io { op: "read", path: path.clone(), source })?;
            if current != p.loaded.bytes {
                return Err(RewriteError::Changed { path: path.clone() });
            }
            let backup = atomic::backup(path, &p.loaded.bytes, &p.loaded.meta, now)?;
            atomic::replace(path, p.new.as_bytes(), &p.loaded.meta)?;
            tracing::info!(
                step = "rewrite-addresses",
                path = %path.display(),
                backup = %backup.display(),
                changed_lines = p.changed_lines,
                "rewrote"
            );
            report.backup = Some(backup);
            report.written = true;
        }
        files.push(report);
    }
    let up_to_date = plans.iter().all(|p| p.changed_lines == 0);

    let mut actions = Vec::new();
    if !up_to_date {
        actions
            .push("restart Replicated for the new addresses to take effect: systemctl restart replicated replicated-operator".to_owned());
    }
    for (kind, c) in &changes {
        match *kind {
            "private" => actions.push(format!(
                "builders still point at the old private IP {}:4647; update the Nomad clients \
                 (servers = [\"{}:4647\"]) and restart them",
                fmt_host(c.old),
                fmt_host(c.new)
            )),
            _ => actions.push(format!("update DNS records and firewall rules that name the old public IP {} (now {})", c.old, c.new)),
        }
    }

    Ok(RewriteReport {
        root: root.to_path_buf(),
        layout,
        dry_run,
        private: params.private.clone(),
        public: params.public.clone(),
        files,
        up_to_date,
        removed_temp_files,
        diff,
        warnings,
        actions,
    })
}

fn fmt_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

#[cfg(test)]
mod tests;
