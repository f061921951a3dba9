//! Test support: every key a configuration type accepts appears in its
//! example file (set, or commented out with its default). Used by the
//! agent's and the controller's configuration tests.
//!
//! The accepted keys are asked of the deserializer itself, not listed by
//! hand: an unknown key ([`PROBE`]) is put into each table of the example
//! and the error names the keys that table takes (serde's "expected one
//! of", with `deny_unknown_fields`). Tables found that way are walked in
//! turn; a key whose probe gives no such error is a setting.

use std::collections::BTreeSet;

/// The unknown key put into each table.
pub const PROBE: &str = "zz_probe_key";

/// How to ask a configuration type.
pub struct Probe<'a> {
    /// Deserializes the whole document; the error text on failure.
    pub parse: &'a dyn Fn(toml::Value) -> Result<(), String>,
    /// The keys an unknown-key error about [`PROBE`] names (usually
    /// [`serde_keys`]; a type with its own message adds its case).
    pub named_keys: &'a dyn Fn(&str) -> Option<Vec<String>>,
}

/// The keys serde's unknown-field error about [`PROBE`] names (None for
/// any other error: a scalar, an enum's variants).
pub fn serde_keys(error: &str) -> Option<Vec<String>> {
    if !error.contains(&format!("unknown field `{PROBE}`")) {
        return None;
    }
    // serde's `OneOf`: "expected `a`", "expected `a` or `b`", "expected one
    // of `a`, `b`, `c`"; text after the list (where in the document) is not
    // a key.
    let mut rest = error.split(", expected ").nth(1)?.trim_start_matches("one of ");
    let mut keys = Vec::new();
    while let Some(r) = rest.strip_prefix('`') {
        let (key, after) = r.split_once('`')?;
        keys.push(key.to_owned());
        match after.strip_prefix(", ").or_else(|| after.strip_prefix(" or ")) {
            Some(next) => rest = next,
            None => break,
        }
    }
    Some(keys)
}

/// The table at `path` in `doc`, made if missing: as a table, or with
/// `arrays` as an array of one table (`[[notify]]`); element 0 of an
/// existing array of tables; `Err` when something else is there.
fn table_at<'a>(doc: &'a mut toml::Table, path: &[String], arrays: bool) -> Result<&'a mut toml::Table, ()> {
    let Some((first, rest)) = path.split_first() else { return Ok(doc) };
    let value = doc.entry(first.clone()).or_insert_with(|| {
        if arrays { toml::Value::Array(vec![toml::Value::Table(toml::Table::new())]) } else { toml::Value::Table(toml::Table::new()) }
    });
    match value {
        toml::Value::Table(t) => table_at(t, rest, arrays),
        toml::Value::Array(a) => match a.first_mut() {
            Some(toml::Value::Table(t)) => table_at(t, rest, arrays),
            _ => Err(()),
        },
        _ => Err(()),
    }
}

/// Keys the table at `path` accepts, or None when it is no table of named
/// keys.
fn accepted(base: &toml::Table, path: &[String], probe: &Probe<'_>) -> Option<Vec<String>> {
    [false, true].into_iter().find_map(|arrays| {
        let mut doc = base.clone();
        let table = table_at(&mut doc, path, arrays).ok()?;
        table.insert(PROBE.into(), toml::Value::Integer(0));
        let error = (probe.parse)(toml::Value::Table(doc)).err()?;
        (probe.named_keys)(&error)
    })
}

/// `a.b.key` for every key accepted under `path`, depth first.
fn walk(base: &toml::Table, path: &mut Vec<String>, probe: &Probe<'_>, out: &mut BTreeSet<String>) {
    let Some(keys) = accepted(base, path, probe) else { return };
    // Tables the example has under this one (e.g. region tables).
    let mut doc = base.clone();
    let existing: Vec<String> = table_at(&mut doc, path, false)
        .map(|t| t.iter().filter(|(_, v)| v.is_table() || v.is_array()).map(|(k, _)| k.clone()).collect())
        .unwrap_or_default();
    let mut children: BTreeSet<String> = keys.iter().cloned().collect();
    children.extend(existing);
    for key in children {
        path.push(key.clone());
        // A table's own name is no setting: its keys are.
        if path.len() < 5 && accepted(base, path, probe).is_some() {
            walk(base, path, probe, out);
        } else if keys.contains(&key) {
            out.insert(path.join("."));
        }
        path.pop();
    }
}

/// `a.b.key` for every key `text` shows, set or commented out, under the
/// table headers it shows (also commented-out ones).
pub fn documented(text: &str) -> BTreeSet<String> {
    let mut section = String::new();
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let l = line.trim_start_matches('#').trim();
        if let Some(h) = l.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            let h = h.trim_start_matches('[').trim_end_matches(']');
            if h.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
                section = h.to_owned();
                continue;
            }
        }
        if let Some((key, _)) = l.split_once('=') {
            let key = key.trim();
            if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                out.insert(if section.is_empty() { key.to_owned() } else { format!("{section}.{key}") });
            }
        }
    }
    out
}

/// Every key the type accepts (walking the tables of the example `text`),
/// and those of them the example does not show, also not where
/// `documented_as` says it documents them.
///
/// # Panics
/// When `text` is not TOML (a test helper: the example must parse).
pub fn missing_keys(text: &str, probe: &Probe<'_>, documented_as: &dyn Fn(&str) -> String) -> (BTreeSet<String>, Vec<String>) {
    let base: toml::Table = toml::from_str(text).expect("the example file is TOML");
    let mut accepted = BTreeSet::new();
    walk(&base, &mut Vec::new(), probe, &mut accepted);
    let shown = documented(text);
    let missing = accepted.iter().filter(|k| !shown.contains(*k) && !shown.contains(&documented_as(k))).cloned().collect();
    (accepted, missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serdes_unknown_field_errors_name_the_keys() {
        let e = "TOML parse error\nunknown field `zz_probe_key`, expected one of `a`, `b_c`\nin `aws`";
        assert_eq!(serde_keys(e), Some(vec!["a".to_owned(), "b_c".to_owned()]));
        assert_eq!(serde_keys("unknown field `zz_probe_key`, expected `only`"), Some(vec!["only".to_owned()]));
        assert_eq!(serde_keys("unknown field `zz_probe_key`, expected `a` or `b`"), Some(vec!["a".to_owned(), "b".to_owned()]));
        assert_eq!(serde_keys("unknown variant `zz_probe_key`, expected one of `off`, `auto`"), None);
        assert_eq!(serde_keys("missing field `id`"), None);
    }

    #[test]
    fn the_example_shows_keys_set_or_commented_under_their_headers() {
        let shown = documented("a = 1\n# [x.y]\n# b = 2\n[[site]]\nid = \"p\"\n# [policy] prose, not a header\n");
        assert_eq!(shown, BTreeSet::from(["a", "x.y.b", "site.id"].map(str::to_owned)));
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Demo {
        name: Option<String>,
        #[serde(default)]
        inner: Inner,
    }
    #[derive(serde::Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        size: Option<u32>,
        mode: Option<String>,
    }

    #[test]
    fn a_key_the_example_does_not_show_is_missing() {
        let probe = Probe { parse: &|v| v.try_into::<Demo>().map(drop).map_err(|e| e.to_string()), named_keys: &serde_keys };
        let same = |k: &str| k.to_owned();
        let (accepted, missing) = missing_keys("name = \"x\"\n[inner]\n# size = 1\n", &probe, &same);
        assert_eq!(accepted, BTreeSet::from(["name", "inner.size", "inner.mode"].map(str::to_owned)));
        assert_eq!(missing, vec!["inner.mode".to_owned()]);
    }
}
