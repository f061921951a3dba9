//! The Replicated environment files: a strict parser of shell-style
//! `KEY=value` lines, and the token-exact IP scanner used to rewrite them.
//!
//! The parser accepts only what both a shell and systemd's EnvironmentFile
//! read the same way: blank lines, `#` comments, and `KEY=value` with the
//! value empty, unquoted (no whitespace, quote or backslash), double-quoted
//! (backslash escapes) or single-quoted. Anything else is refused with its
//! line number: we never guess what a line means before rewriting it.

use std::net::IpAddr;
use std::ops::Range;

/// One line of a file, without its line ending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line<'a> {
    /// 1-based.
    pub number: usize,
    pub text: &'a str,
    /// `"\n"`, `"\r\n"` or `""` (the last line without a newline).
    pub ending: &'a str,
    pub kind: LineKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LineKind {
    Blank,
    Comment,
    /// Byte ranges inside `text`; `value` is the raw value as written
    /// (quotes included, trailing whitespace excluded).
    Assign {
        key: Range<usize>,
        value: Range<usize>,
    },
}

impl Line<'_> {
    pub fn key(&self) -> Option<&str> {
        match &self.kind {
            LineKind::Assign { key, .. } => Some(&self.text[key.clone()]),
            _ => None,
        }
    }

    pub fn raw_value(&self) -> Option<&str> {
        match &self.kind {
            LineKind::Assign { value, .. } => Some(&self.text[value.clone()]),
            _ => None,
        }
    }
}

/// Why a line was not understood (the caller adds file and line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineError {
    pub line: usize,
    pub message: String,
}

/// Splits and parses a whole file. Errors name the first bad line.
pub fn parse(text: &str) -> Result<Vec<Line<'_>>, LineError> {
    let mut lines = Vec::new();
    for (i, chunk) in text.split_inclusive('\n').enumerate() {
        let number = i + 1;
        let (body, ending) = if let Some(b) = chunk.strip_suffix("\r\n") {
            (b, "\r\n")
        } else if let Some(b) = chunk.strip_suffix('\n') {
            (b, "\n")
        } else {
            (chunk, "")
        };
        let kind = parse_line(body).map_err(|message| LineError { line: number, message })?;
        lines.push(Line { number, text: body, ending, kind });
    }
    Ok(lines)
}

fn is_key_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_'
}

fn is_key_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn parse_line(text: &str) -> Result<LineKind, String> {
    let bytes = text.as_bytes();
    // A NUL ends the value for a C reader (systemd, the shell) but not for
    // us; a stray CR or other control character is invisible in an editor.
    if let Some((col, c)) = text.char_indices().find(|(_, c)| c.is_control() && *c != '\t') {
        return Err(format!(
            "control character U+{:04X}{} at column {}: not allowed in an environment file",
            c as u32,
            match c {
                '\0' => " (NUL)",
                '\r' => " (a carriage return not ending the line)",
                _ => "",
            },
            text[..col].chars().count() + 1
        ));
    }
    let start = bytes.iter().position(|b| *b != b' ' && *b != b'\t').unwrap_or(bytes.len());
    if start == bytes.len() {
        return Ok(LineKind::Blank);
    }
    if bytes[start] == b'#' {
        return Ok(LineKind::Comment);
    }
    if !text.contains('=') {
        return Err("no '=' in the line (expected KEY=value, a comment or a blank line)".into());
    }
    if !is_key_start(bytes[start]) {
        return Err("expected KEY=value, a comment or a blank line (a key starts with a letter or '_')".into());
    }
    let mut i = start;
    while i < bytes.len() && is_key_char(bytes[i]) {
        i += 1;
    }
    let key = start..i;
    if bytes[i] != b'=' {
        if &text[key.clone()] == "export" {
            return Err("`export KEY=value` is not supported (systemd does not read it)".into());
        }
        return Err(format!("expected '=' right after the key `{}` (characters allowed in a key: A-Z a-z 0-9 _)", &text[key]));
    }
    let vstart = i + 1;
    let mut vend = bytes.len();
    while vend > vstart && (bytes[vend - 1] == b' ' || bytes[vend - 1] == b'\t') {
        vend -= 1;
    }
    let value = &bytes[vstart..vend];
    check_value(value)?;
    Ok(LineKind::Assign { key, value: vstart..vend })
}

fn check_value(v: &[u8]) -> Result<(), String> {
    match v.first() {
        None => Ok(()),
        Some(b'"') => {
            let mut i = 1;
            while i < v.len() {
                match v[i] {
                    b'\\' => i += 2,
                    b'"' => break,
                    _ => i += 1,
                }
            }
            if i >= v.len() {
                return Err("unbalanced double quote (a value must close its quote on the same line)".into());
            }
            if i + 1 != v.len() {
                return Err("text after the closing double quote".into());
            }
            Ok(())
        }
        Some(b'\'') => match v[1..].iter().position(|b| *b == b'\'') {
            None => Err("unbalanced single quote (a value must close its quote on the same line)".into()),
            Some(p) if p + 2 != v.len() => Err("text after the closing single quote".into()),
            Some(_) => Ok(()),
        },
        Some(_) => {
            if let Some(b) = v.iter().find(|b| matches!(b, b' ' | b'\t' | b'"' | b'\'' | b'\\')) {
                return Err(match b {
                    b'"' | b'\'' => "unbalanced quote inside an unquoted value".into(),
                    b'\\' => "backslash in an unquoted value (escape or line continuation) is not supported".into(),
                    _ => "whitespace in an unquoted value (quote the value)".into(),
                });
            }
            Ok(())
        }
    }
}

/// The value with its quoting removed.
pub fn unquote(raw: &str) -> String {
    if let Some(inner) = raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        let mut out = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                if let Some(n) = chars.next() {
                    out.push(n);
                }
            } else {
                out.push(c);
            }
        }
        return out;
    }
    if let Some(inner) = raw.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')) {
        return inner.to_owned();
    }
    raw.to_owned()
}

/// Ranges of `NODENAME=...` words inside a raw value (for `-e NODENAME=` in
/// the *_OPTS strings): never rewritten.
pub fn nodename_ranges(raw: &str) -> Vec<Range<usize>> {
    let b = raw.as_bytes();
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(p) = raw[from..].find("NODENAME=") {
        let at = from + p;
        let boundary = at == 0 || matches!(b[at - 1], b' ' | b'\t' | b'"' | b'\'');
        let mut end = at + "NODENAME=".len();
        if boundary {
            while end < b.len() && !matches!(b[end], b' ' | b'\t' | b'"' | b'\'') {
                end += 1;
            }
            out.push(at..end);
        }
        from = end;
    }
    out
}

/// Characters that extend an address token: if one touches a candidate, the
/// candidate is part of something longer (a bigger IP, a hostname...).
fn extends_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')
}

fn is_v6_char(b: u8) -> bool {
    b.is_ascii_hexdigit() || b == b':' || b == b'.'
}

/// One address token found in a text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    pub range: Range<usize>,
    pub addr: IpAddr,
}

/// Every complete IP address token in `s` outside `skip`, in order.
///
/// An IPv4 token is a maximal run of digits and dots that parses as a
/// canonical dotted quad, with no letter, digit, `_`, `-`, `.` or `:` right
/// before it and no letter, digit, `_`, `-` or `.` right after it (a `:port`,
/// `]`, `,`, quote or space may follow). So `10.0.0.5` is never found inside
/// `10.0.0.50`, `110.0.0.5`, `10.0.0.5.1`, `ip-10-0-0-5` or `::ffff:10.0.0.5`.
/// An IPv6 token is a maximal run of hex digits, `:` and `.` containing a
/// `:` that parses as an IPv6 address, with the same boundaries (it is
/// normally bracketed: `[fd00::5]:9879`).
pub fn find_ips(s: &str, skip: &[Range<usize>]) -> Vec<Token> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if let Some(r) = skip.iter().find(|r| r.contains(&i)) {
            i = r.end;
            continue;
        }
        let prev = if i == 0 { None } else { Some(b[i - 1]) };
        let at_start = !prev.is_some_and(|p| extends_token(p) || p == b':');
        if !at_start || !is_v6_char(b[i]) {
            i += 1;
            continue;
        }
        // IPv6 candidate.
        let mut end = i;
        while end < b.len() && is_v6_char(b[end]) {
            end += 1;
        }
        let run = &s[i..end];
        let after_ok = |e: usize| e >= b.len() || !extends_token(b[e]);
        if run.contains(':')
            && after_ok(end)
            && let Ok(a) = run.parse::<std::net::Ipv6Addr>()
        {
            out.push(Token { range: i..end, addr: IpAddr::V6(a) });
            i = end;
            continue;
        }
        // IPv4 candidate.
        let mut end = i;
        while end < b.len() && (b[end].is_ascii_digit() || b[end] == b'.') {
            end += 1;
        }
        if end > i
            && after_ok(end)
            && let Ok(a) = s[i..end].parse::<std::net::Ipv4Addr>()
            && a.to_string() == s[i..end]
        {
            out.push(Token { range: i..end, addr: IpAddr::V4(a) });
            i = end;
            continue;
        }
        i += 1;
    }
    out
}

/// Replaces every token whose address is an `old` of `map` by its `new`.
/// Returns the new text and the number of replacements.
pub fn replace_ips(s: &str, skip: &[Range<usize>], map: &[(IpAddr, IpAddr)]) -> (String, usize) {
    let mut out = String::with_capacity(s.len());
    let mut last = 0;
    let mut count = 0;
    for t in find_ips(s, skip) {
        if let Some((_, new)) = map.iter().find(|(old, _)| *old == t.addr) {
            out.push_str(&s[last..t.range.start]);
            out.push_str(&new.to_string());
            last = t.range.end;
            count += 1;
        }
    }
    out.push_str(&s[last..]);
    (out, count)
}

/// Whether a hostname like `ip-10-0-0-5.ec2.internal` encodes `ip` (the
/// EC2 form, dashes for dots), or contains it as a dotted token.
pub fn hostname_encodes(host: &str, ip: IpAddr) -> bool {
    if find_ips(host, &[]).iter().any(|t| t.addr == ip) {
        return true;
    }
    let IpAddr::V4(v4) = ip else { return false };
    let dashed = v4.to_string().replace('.', "-");
    let b = host.as_bytes();
    let mut from = 0;
    while let Some(p) = host[from..].find(&dashed) {
        let at = from + p;
        let end = at + dashed.len();
        let before_ok = at == 0 || !b[at - 1].is_ascii_digit();
        let after_ok = end >= b.len() || !b[end].is_ascii_digit();
        if before_ok && after_ok {
            return true;
        }
        from = at + 1;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test ip")
    }

    fn rw(s: &str, pairs: &[(&str, &str)]) -> String {
        let map: Vec<_> = pairs.iter().map(|(o, n)| (ip(o), ip(n))).collect();
        replace_ips(s, &nodename_ranges(s), &map).0
    }

    #[test]
    fn parses_the_reference_shapes() {
        let text = "# comment\n\nRELEASE_CHANNEL=stable\nPRIVATE_ADDRESS=10.128.0.11\n  INDENTED=1\nREPLICATED_OPTS=\" -e DAEMON_TOKEN=abc123 -e NODENAME=ip-10-128-0-11.ec2.internal\"\nREPLICATED_UI_OPTS=\"\"\nEMPTY=\nSQ='a b'\nESC=\"a \\\" b\"   \nLAST=x";
        let lines = parse(text).expect("parses");
        assert_eq!(lines.len(), 11);
        assert_eq!(lines[0].kind, LineKind::Comment);
        assert_eq!(lines[1].kind, LineKind::Blank);
        assert_eq!(lines[3].key(), Some("PRIVATE_ADDRESS"));
        assert_eq!(lines[3].raw_value(), Some("10.128.0.11"));
        assert_eq!(lines[4].key(), Some("INDENTED"));
        assert_eq!(unquote(lines[5].raw_value().expect("value")), " -e DAEMON_TOKEN=abc123 -e NODENAME=ip-10-128-0-11.ec2.internal");
        assert_eq!(lines[6].raw_value(), Some("\"\""));
        assert_eq!(lines[7].raw_value(), Some(""));
        assert_eq!(unquote(lines[8].raw_value().expect("value")), "a b");
        assert_eq!(unquote(lines[9].raw_value().expect("value")), "a \" b");
        assert_eq!(lines[10].ending, "");
        assert_eq!(lines[9].ending, "\n");
        let rebuilt: String = lines.iter().map(|l| format!("{}{}", l.text, l.ending)).collect();
        assert_eq!(rebuilt, text);
    }

    #[test]
    fn refuses_what_it_does_not_understand() {
        let cases = [
            ("A=1\nno equals here\n", 2, "no '='"),
            ("A=1\nB=\"open\n", 2, "unbalanced double quote"),
            ("B='open\n", 1, "unbalanced single quote"),
            ("1KEY=2\n", 1, "key starts"),
            ("KEY-X=2\n", 1, "expected '='"),
            ("KEY =2\n", 1, "expected '='"),
            ("A=b c\n", 1, "whitespace"),
            ("A=b\"c\n", 1, "unbalanced quote"),
            ("A=\"b\" c\n", 1, "after the closing"),
            ("A=\"b\\\"\n", 1, "unbalanced double quote"),
            ("A=b\\\n", 1, "backslash"),
            ("export A=b\n", 1, "export"),
            ("A=1\r\nB=2\r\n=3\r\n", 3, "key starts"),
        ];
        for (text, line, needle) in cases {
            let e = parse(text).expect_err(text);
            assert_eq!(e.line, line, "{text:?}");
            assert!(e.message.contains(needle), "{text:?}: {}", e.message);
        }
    }

    #[test]
    fn token_exact_with_colliding_addresses() {
        let pairs = [("10.0.0.5", "10.1.1.9")];
        assert_eq!(rw("10.0.0.5", &pairs), "10.1.1.9");
        for untouched in [
            "10.0.0.50",
            "110.0.0.5",
            "10.0.0.5.1",
            "ip-10-0-0-5",
            "ip-10.0.0.5",
            "a10.0.0.5",
            "10.0.0.5a",
            "10.0.0.5_x",
            "10.0.0.5-x",
            "x_10.0.0.5",
            "1.10.0.0.5",
            "::ffff:10.0.0.5",
            "010.0.0.5",
            "10.0.0.05",
        ] {
            assert_eq!(rw(untouched, &pairs), untouched);
        }
        assert_eq!(rw("10.0.0.5,10.0.0.50,110.0.0.5,10.0.0.5", &pairs), "10.1.1.9,10.0.0.50,110.0.0.5,10.1.1.9");
        assert_eq!(rw("[10.0.0.5]:9879", &pairs), "[10.1.1.9]:9879");
        assert_eq!(rw("[10.0.0.5]", &pairs), "[10.1.1.9]");
        assert_eq!(rw("10.0.0.5:9879", &pairs), "10.1.1.9:9879");
        assert_eq!(rw("http://10.0.0.5:80/x", &pairs), "http://10.1.1.9:80/x");
        assert_eq!(rw("10.0.0.5/32", &pairs), "10.1.1.9/32");
        assert_eq!(
            rw("\" -e NO_PROXY=localhost,127.0.0.1,10.0.0.5,10.0.0.50 -e X=y\"", &pairs),
            "\" -e NO_PROXY=localhost,127.0.0.1,10.1.1.9,10.0.0.50 -e X=y\""
        );
    }

    #[test]
    fn swaps_do_not_chain_and_nodename_is_kept() {
        let pairs = [("10.0.0.5", "10.0.0.6"), ("10.0.0.6", "10.0.0.5")];
        assert_eq!(rw("10.0.0.5 10.0.0.6", &pairs), "10.0.0.6 10.0.0.5");
        let opts = "\" -e NODENAME=10.0.0.5 -e PUBLIC_ADDRESS=10.0.0.5 -e XNODENAME=10.0.0.5\"";
        assert_eq!(rw(opts, &[("10.0.0.5", "10.0.0.9")]), "\" -e NODENAME=10.0.0.5 -e PUBLIC_ADDRESS=10.0.0.9 -e XNODENAME=10.0.0.9\"");
    }

    #[test]
    fn ipv6() {
        let pairs = [("fd00::5", "fd00::9")];
        assert_eq!(rw("[fd00::5]:9879", &pairs), "[fd00::9]:9879");
        assert_eq!(rw("[FD00:0::5]", &pairs), "[fd00::9]");
        assert_eq!(rw("[fd00::55]", &pairs), "[fd00::55]");
        assert_eq!(rw("[fd00::5:1]", &pairs), "[fd00::5:1]");
        assert_eq!(rw("xfd00::5", &pairs), "xfd00::5");
        let v4 = [("10.0.0.5", "10.0.0.9")];
        assert_eq!(rw("[::ffff:10.0.0.5]", &v4), "[::ffff:10.0.0.5]");
    }

    #[test]
    fn hostnames() {
        assert!(hostname_encodes("ip-10-0-0-5.ec2.internal", ip("10.0.0.5")));
        assert!(hostname_encodes("ip-10-0-0-5", ip("10.0.0.5")));
        assert!(hostname_encodes("10.0.0.5", ip("10.0.0.5")));
        assert!(!hostname_encodes("ip-10-0-0-50.ec2.internal", ip("10.0.0.5")));
        assert!(!hostname_encodes("ip-110-0-0-5.ec2.internal", ip("10.0.0.5")));
        assert!(!hostname_encodes("ci.example.com", ip("10.0.0.5")));
    }
}
