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
    !s.is_empty() && s != "." && s != ".." && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-')
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
    if num.is_empty() || num.len() > 20 || !num.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("build number `{num}` is not a decimal number"));
    }
    let n: u64 = num.parse().map_err(|_| format!("build number `{num}` is out of range"))?;
    match expect.build_num {
        Some(b) if b == n && *num == b.to_string() => {}
        Some(b) => {
            return Err(format!("build number in the URL ({num}) is not the build's number ({b})"));
        }
        None => return Err("the build has no build_num to check the URL against".to_owned()),
    }
    match expect.username {
        Some(u) if u.eq_ignore_ascii_case(org) => {}
        other => {
            return Err(format!("org `{org}` in the URL is not the build's username ({other:?})"));
        }
    }
    match expect.reponame {
        Some(r) if r.eq_ignore_ascii_case(repo) => {}
        other => {
            return Err(format!("repository `{repo}` in the URL is not the build's reponame ({other:?})"));
        }
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
    use proptest::prelude::*;

    const HOST: &str = "ci.example.com";

    fn check(url: &str) -> Result<(), String> {
        validate_build_url(url, HOST, Expect { username: Some("my-org"), reponame: Some("my.project_1"), build_num: Some(1234) })
    }

    #[test]
    fn accepts_the_reference_shape() {
        check("https://ci.example.com/gh/my-org/my.project_1/1234").expect("valid");
        check("https://CI.example.com/bb/My-Org/my.project_1/1234").expect("case-insensitive host and org");
        // Found by the property test: 20-digit numbers (>= 10^19) were refused.
        let e = |n| Expect { username: Some("o"), reponame: Some("r"), build_num: Some(n) };
        validate_build_url("https://ci.example.com/gh/o/r/18446744073709551615", HOST, e(u64::MAX)).expect("u64::MAX");
        validate_build_url("https://ci.example.com/gh/o/r/10000000000000000000", HOST, e(10_000_000_000_000_000_000)).expect("10^19");
        let err = validate_build_url("https://ci.example.com/gh/o/r/18446744073709551616", HOST, e(7)).expect_err(">u64");
        assert!(err.contains("out of range"), "{err}");
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

    /// What an accepted URL must be, written independently of the validator.
    fn accepted_shape(url: &str, e: Expect<'_>) -> bool {
        let Some(rest) = url.strip_prefix("https://") else {
            return false;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let [host, vcs, org, repo, num] = parts.as_slice() else {
            return false;
        };
        let seg = |s: &str| !s.is_empty() && s != "." && s != ".." && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        host.eq_ignore_ascii_case(HOST)
            && matches!(*vcs, "gh" | "bb")
            && seg(org)
            && seg(repo)
            && e.build_num.is_some_and(|n| n.to_string() == *num)
            && e.username.is_some_and(|u| u.eq_ignore_ascii_case(org))
            && e.reponame.is_some_and(|r| r.eq_ignore_ascii_case(repo))
    }

    fn piece() -> impl Strategy<Value = String> {
        prop_oneof![
            12 => "[A-Za-z0-9_.-]{1,8}",
            1 => Just(String::new()),
            1 => Just("..".to_owned()),
            1 => any::<String>(),
            1 => prop::sample::select(vec!["\"", "\\", "%2e", " ", "\n", "?", "#", "@", "/", ":443", "é", "\u{0}", "(System/exit 1)"])
                .prop_map(str::to_owned),
        ]
    }

    #[test]
    fn the_validator_accepts_exactly_the_build_shape() {
        // Mostly right, one part at a time wrong: both verdicts are common.
        fn mostly<T: Clone + std::fmt::Debug + 'static>(good: T, bad: Vec<T>) -> impl Strategy<Value = T> {
            prop_oneof![6 => Just(good), 1 => prop::sample::select(bad)]
        }
        let host =
            mostly(HOST, vec!["CI.Example.COM", "evil.example.com", "ci.example.com:443", "x@ci.example.com", "ci.example.com.", ""]);
        let scheme = mostly("https://", vec!["http://", "HTTPS://", "https:/", ""]);
        let vcs = prop_oneof![3 => Just("gh"), 3 => Just("bb"), 1 => prop::sample::select(vec!["gl", "GH", ""])];
        let num = prop_oneof![
            3 => (0u64..100_000).prop_map(|n| n.to_string()),
            1 => any::<u64>().prop_map(|n| n.to_string()),
            1 => "0[0-9]{1,3}",
            1 => piece(),
        ];
        let built =
            (scheme, host, vcs, piece(), piece(), num, piece(), mostly(false, vec![true])).prop_map(|(s, h, v, o, r, n, tail, extra)| {
                let url = format!("{s}{h}/{v}/{o}/{r}/{n}");
                (if extra { format!("{url}{tail}") } else { url }, o, r, n)
            });
        let arbitrary = any::<String>().prop_map(|u| (u, "o".to_owned(), "r".to_owned(), "1".to_owned()));
        let accepted = std::cell::Cell::new(0u32);
        super::super::prop::check(
            "build-URL validator",
            4000,
            (prop_oneof![3 => built, 1 => arbitrary], mostly(true, vec![false]), mostly(true, vec![false])),
            |((url, org, repo, num), same_org, same_num)| {
                let e = Expect {
                    username: Some(if same_org { org.as_str() } else { "my-org" }),
                    reponame: Some(repo.as_str()),
                    build_num: if same_num { num.parse().ok() } else { Some(7) },
                };
                let verdict = validate_build_url(&url, HOST, e);
                prop_assert_eq!(verdict.is_ok(), accepted_shape(&url, e), "{:?}: {:?}", url, verdict);
                if verdict.is_ok() {
                    accepted.set(accepted.get() + 1);
                    let form = delete_form(&url);
                    prop_assert!(form.bytes().all(|b| (0x20..0x7f).contains(&b)), "{}", form);
                }
                Ok(())
            },
        );
        assert!(accepted.get() > 50, "the generator reaches valid URLs ({} accepted)", accepted.get());
    }

    #[test]
    fn literals_are_printable_ascii_and_quote_only_at_the_ends() {
        super::super::prop::check("literal writer (shape)", 2000, any::<String>(), |s| {
            let lit = clojure_string(&s);
            prop_assert!(lit.len() >= 2 && lit.starts_with('"') && lit.ends_with('"'));
            prop_assert!(lit.bytes().all(|b| (0x20..0x7f).contains(&b)), "{}", lit);
            // Every quote inside is escaped: an even run of backslashes never precedes one.
            let inner = &lit.as_bytes()[1..lit.len() - 1];
            let mut backslashes = 0usize;
            for &b in inner {
                if b == b'"' {
                    prop_assert!(!backslashes.is_multiple_of(2), "{}", lit);
                }
                backslashes = if b == b'\\' { backslashes + 1 } else { 0 };
            }
            prop_assert!(backslashes.is_multiple_of(2), "{}", lit);
            Ok(())
        });
    }
}
