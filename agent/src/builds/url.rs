//! Build URLs: what may reach the REPL, and how it is written there.
//!
//! The dev-console evaluates arbitrary Clojure as an administrator, so a URL
//! is checked against a strict shape before it is written, and then written
//! as an escaped string literal anyway (defence in depth).

/// Checks a configured hostname: DNS name characters, optionally `:port`.
/// Returns it lower-cased.
pub fn normalize_hostname(hostname: &str) -> Result<String, String> {
    let h = hostname.trim();
    if h.is_empty() {
        return Err("is empty".to_owned());
    }
    let (name, port) = match h.split_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (h, None),
    };
    if name.is_empty()
        || name.starts_with(['.', '-'])
        || name.contains("..")
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
    {
        return Err(format!("`{hostname}` is not a host name (letters, digits, `.` and `-` only)"));
    }
    if let Some(p) = port
        && (p.is_empty() || p.len() > 5 || !p.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(format!("`{hostname}` has an invalid port"));
    }
    Ok(h.to_ascii_lowercase())
}

/// What a build says about itself besides its URL.
#[derive(Clone, Copy, Debug)]
pub struct Expect<'a> {
    pub username: Option<&'a str>,
    pub reponame: Option<&'a str>,
    pub build_num: Option<u64>,
}

fn segment_ok(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-')
}

/// Validates a build URL: `https://<hostname>/(gh|bb)/<org>/<repo>/<number>`,
/// nothing more, and matching the build's own org, repo and number. The
/// error says why the URL is refused. `hostname` must come from
/// [`normalize_hostname`].
pub fn validate_build_url(url: &str, hostname: &str, expect: Expect<'_>) -> Result<(), String> {
    if let Some(c) = url.chars().find(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!("contains a control or space character ({:?})", c));
    }
    let Some(rest) = url.strip_prefix("https://") else {
        return Err("is not an https:// URL".to_owned());
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return Err("carries user information (`user@`) before the host".to_owned());
    }
    if !authority.eq_ignore_ascii_case(hostname) {
        return Err(format!("host `{authority}` is not the installation's hostname `{hostname}`"));
    }
    if path.contains('?') {
        return Err("has a query string".to_owned());
    }
    if path.contains('#') {
        return Err("has a fragment".to_owned());
    }
    if path.contains('%') {
        return Err("has percent-encoded characters".to_owned());
    }
    if let Some(c) = path.chars().find(|&c| !(c.is_ascii_alphanumeric() || "/_.-".contains(c))) {
        return Err(format!("has a character not allowed in a build path: {c:?}"));
    }
    let parts: Vec<&str> = path.split('/').collect();
    let [empty, vcs, org, repo, num] = parts.as_slice() else {
        return Err("path is not /gh|bb/<org>/<repo>/<number>".to_owned());
    };
    if !empty.is_empty() || !matches!(*vcs, "gh" | "bb") {
        return Err("path does not start with /gh/ or /bb/".to_owned());
    }
    if !segment_ok(org) || !segment_ok(repo) {
        return Err("org or repository is empty, `.`, `..` or has characters outside [A-Za-z0-9_.-]".to_owned());
    }
    if num.is_empty() || num.len() > 19 || !num.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("build number `{num}` is not a decimal number"));
    }
    let n: u64 = num.parse().map_err(|_| format!("build number `{num}` is out of range"))?;
    match expect.build_num {
        Some(b) if b == n && *num == b.to_string() => {}
        Some(b) => return Err(format!("build number in the URL ({num}) is not the build's number ({b})")),
        None => return Err("the build has no build_num to check the URL against".to_owned()),
    }
    match expect.username {
        Some(u) if u.eq_ignore_ascii_case(org) => {}
        other => return Err(format!("org `{org}` in the URL is not the build's username ({other:?})")),
    }
    match expect.reponame {
        Some(r) if r.eq_ignore_ascii_case(repo) => {}
        other => return Err(format!("repository `{repo}` in the URL is not the build's reponame ({other:?})")),
    }
    Ok(())
}

/// Writes `s` as a Clojure string literal, quotes included.
pub fn clojure_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() || !c.is_ascii() => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The form sent to the REPL for one (validated) URL.
pub fn delete_form(url: &str) -> String {
    format!("(admin/delete-build {})", clojure_string(url))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "ci.example.com";

    fn check(url: &str) -> Result<(), String> {
        validate_build_url(
            url,
            HOST,
            Expect { username: Some("my-org"), reponame: Some("my.project_1"), build_num: Some(1234) },
        )
    }

    #[test]
    fn accepts_the_reference_shape() {
        check("https://ci.example.com/gh/my-org/my.project_1/1234").expect("valid");
        check("https://CI.example.com/bb/My-Org/my.project_1/1234").expect("case-insensitive host and org");
    }

    #[test]
    fn refuses_everything_else() {
        for (url, why) in [
            ("http://ci.example.com/gh/my-org/my.project_1/1234", "https"),
            ("https://ci.example.com/gh/my-org/my.project_1/1234\") (System/exit 1) (\"", "space"),
            ("https://ci.example.com/gh/my-org/my.project_1/1234\"", "character"),
            ("https://ci.example.com/gh/my-org/my.project_1/1234\\", "character"),
            ("https://ci.example.com/gh/my-org/my.project_1/(System/exit)", "character"),
            ("https://evil.example.com/gh/my-org/my.project_1/1234", "host"),
            ("https://ci.example.com.evil.com/gh/my-org/my.project_1/1234", "host"),
            ("https://ci.example.com:8443/gh/my-org/my.project_1/1234", "host"),
            ("https://evil@ci.example.com/gh/my-org/my.project_1/1234", "user information"),
            ("https://ci.example.com/gh/my-org/../1234", "`..`"),
            ("https://ci.example.com/gh/my-org/x/../my.project_1/1234", "path"),
            ("https://ci.example.com/gh/../my.project_1/1234", "`..`"),
            ("https://ci.example.com/gh/my-org/my.project_1/1234?x=1", "query"),
            ("https://ci.example.com/gh/my-org/my.project_1/1234#x", "fragment"),
            ("https://ci.example.com/gh/my-org/my.project_1/12a4", "number"),
            ("https://ci.example.com/gh/my-org/my.project_1/01234", "not the build's number"),
            ("https://ci.example.com/gh/my-org/my.project_1/1235", "not the build's number"),
            ("https://ci.example.com/gh/other/my.project_1/1234", "username"),
            ("https://ci.example.com/gh/my-org/other/1234", "reponame"),
            ("https://ci.example.com/gl/my-org/my.project_1/1234", "/gh/"),
            ("https://ci.example.com/gh/my-org/my.project_1/1234/", "path"),
            ("https://ci.example.com/gh/my%2dorg/my.project_1/1234", "percent"),
            ("https://ci.example.com/gh/my-org/my.project_1/1234\n", "control"),
            ("", "https"),
        ] {
            let err = check(url).expect_err(url);
            assert!(err.contains(why), "{url}: {err} (expected `{why}`)");
        }
    }

    #[test]
    fn literals_are_escaped() {
        assert_eq!(clojure_string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(clojure_string("x\ny"), r#""x\ny""#);
        assert_eq!(clojure_string("é"), r#""\u00e9""#);
        assert_eq!(
            delete_form("https://ci.example.com/gh/org/repo/1234"),
            r#"(admin/delete-build "https://ci.example.com/gh/org/repo/1234")"#
        );
    }

    #[test]
    fn hostnames() {
        assert_eq!(normalize_hostname(" CI.example.com ").as_deref(), Ok("ci.example.com"));
        assert!(normalize_hostname("ci.example.com:8443").is_ok());
        for bad in ["", "a b", "ci/x", "ci.example.com:x", "..", "a@b"] {
            assert!(normalize_hostname(bad).is_err(), "{bad}");
        }
    }
}
