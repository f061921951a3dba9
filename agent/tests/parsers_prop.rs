//! Property tests of the parsers that read input the agent does not
//! control: the Replicated env files and the token-exact IP scanner,
//! /proc/self/mountinfo, replicatedctl's JSON, IMDS answers, os-release and
//! the agent's TOML configuration. Fixed seed-free case counts keep each
//! property to a few seconds in tests/run.sh; `PROPTEST_CASES=100000` runs
//! longer. Regression cases found go to `regressions` below.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use dr_agent::config::Config;
use dr_agent::steps::rewrite::envfile;
use dr_agent::sys::facts;
use dr_agent::sys::mounts::parse_mountinfo;
use dr_agent::sys::replicated::parse_app_status;
use proptest::prelude::*;

/// Cases per property: PROPTEST_CASES, else 512.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

fn ipv4() -> impl Strategy<Value = Ipv4Addr> {
    any::<[u8; 4]>().prop_map(Ipv4Addr::from)
}

/// Text shaped like env-file lines: keys, `=`, quotes, escapes, IPs, NUL
/// and other control characters, CRLF.
fn envish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("PRIVATE_ADDRESS=".to_owned()),
        Just("REPLICATED_OPTS=\"".to_owned()),
        Just(" -e NODENAME=ip-10-0-0-1 ".to_owned()),
        Just("\"".to_owned()),
        Just("'".to_owned()),
        Just("\\".to_owned()),
        Just("#".to_owned()),
        Just("\n".to_owned()),
        Just("\r\n".to_owned()),
        Just("\0".to_owned()),
        Just("[".to_owned()),
        Just("]:9879".to_owned()),
        ipv4().prop_map(|ip| ip.to_string()),
        "[a-zA-Z0-9_.:,= -]{0,12}",
        any::<char>().prop_map(|c| c.to_string()),
    ];
    prop::collection::vec(piece, 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn envfile_parse_never_panics_and_names_a_line(text in envish()) {
        match envfile::parse(&text) {
            Ok(lines) => {
                // Lines and endings put back together give the text.
                let back: String = lines.iter().map(|l| format!("{}{}", l.text, l.ending)).collect();
                prop_assert_eq!(back, text.clone());
                for l in &lines {
                    prop_assert!(!l.text.contains('\0'), "a NUL was accepted: {:?}", l.text);
                    if let (Some(k), Some(v)) = (l.key(), l.raw_value()) {
                        prop_assert!(!k.is_empty());
                        let _ = envfile::unquote(v);
                        let _ = envfile::nodename_ranges(v);
                    }
                }
            }
            Err(e) => {
                prop_assert!(e.line >= 1 && e.line <= text.split_inclusive('\n').count().max(1), "{e:?}");
                prop_assert!(!e.message.is_empty());
            }
        }
    }

    #[test]
    fn the_ip_scanner_never_matches_a_partial_token(a in ipv4(), pre in "[0-9a-z._:-]{0,3}", post in "[0-9a-z._:-]{0,3}") {
        let s = format!("{pre}{a}{post}");
        for t in envfile::find_ips(&s, &[]) {
            // A token found is exactly an address, with no token character around it.
            prop_assert_eq!(&s[t.range.clone()].parse::<IpAddr>().ok(), &Some(t.addr));
            let before = s[..t.range.start].chars().last();
            let after = s[t.range.end..].chars().next();
            let tokenish = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            prop_assert!(!tokenish(before) && !tokenish(after), "partial token {:?} in {:?}", &s[t.range.clone()], s);
        }
        // The scanner's boundaries: no letter, digit, `_`, `-`, `.` or `:`
        // before; no letter, digit, `_`, `-` or `.` after (`:port` may follow).
        let bad_before = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':');
        let bad_after = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        let clean = pre.chars().last().is_none_or(|c| !bad_before(c)) && post.chars().next().is_none_or(|c| !bad_after(c));
        let exact = pre.len()..pre.len() + a.to_string().len();
        let hit = envfile::find_ips(&s, &[]).iter().any(|t| t.range == exact && t.addr == IpAddr::V4(a));
        prop_assert_eq!(hit, clean, "{:?}", s);
    }

    #[test]
    fn ten_0_0_1_is_never_found_inside_a_longer_address(x in 0u8..=255, y in 1u8..=99) {
        let s = format!("NO_PROXY=10.0.0.1{y},{x}10.0.0.1,10.0.0.1.{x},10.0.0.1");
        let hits: Vec<_> = envfile::find_ips(&s, &[]).into_iter().filter(|t| t.addr == "10.0.0.1".parse::<IpAddr>().expect("ip")).collect();
        prop_assert_eq!(hits.len(), 1, "{}", s);
        prop_assert_eq!(hits[0].range.end, s.len());
    }

    #[test]
    fn rewriting_round_trips(text in envish(), a in ipv4(), b in ipv4()) {
        prop_assume!(a != b && !text.contains(&b.to_string()) && !text.contains(&a.to_string()));
        let with_a = format!("{text} {a} ");
        let (to_b, n) = envfile::replace_ips(&with_a, &[], &[(IpAddr::V4(a), IpAddr::V4(b))]);
        let (back, m) = envfile::replace_ips(&to_b, &[], &[(IpAddr::V4(b), IpAddr::V4(a))]);
        prop_assert_eq!(n, m);
        prop_assert_eq!(back, with_a);
    }

    #[test]
    fn mountinfo_parsing_never_panics(lines in prop::collection::vec(
        prop_oneof![
            "[0-9]{1,3} [0-9]{1,3} [0-9]{1,3}:[0-9]{1,3} /[a-z\\\\0-7 ]{0,10} /[a-z\\\\0-7]{0,10} rw(,[a-z]+)? ([a-z]+:[0-9]+ )?- [a-z0-9]{1,6} [a-z/\\\\0-9]{0,8} rw",
            any::<String>(),
        ], 0..8)) {
        let text = lines.join("\n");
        for e in parse_mountinfo(&text) {
            prop_assert!(!e.mount_point.as_os_str().is_empty() || text.contains("  "));
        }
    }

    #[test]
    fn mountinfo_unescapes_octal(name in "[a-z]{1,6}( [a-z]{1,6}){0,2}") {
        let escaped = name.replace(' ', "\\040");
        let line = format!("36 35 98:0 / /mnt/{escaped} rw,noatime master:1 - ext4 /dev/loop0 rw");
        let t = parse_mountinfo(&line);
        prop_assert_eq!(t.len(), 1);
        prop_assert_eq!(t[0].mount_point.clone(), Path::new("/mnt").join(&name));
    }

    #[test]
    fn replicatedctl_status_parsing_never_panics(s in prop_oneof![
        any::<String>(),
        "\\[\\{\"AppID\":\"[a-z0-9]{0,4}\",\"State\":\"(started|stopped|[a-z]{0,5})\",\"IsTransitioning\":(true|false|1|null),\"DesiredState\":\"[a-z]{0,8}\"\\}\\]",
        "\\{\"State\":[0-9\"a-z\\[\\]{}]{0,10}\\}",
    ]) {
        if let Ok(st) = parse_app_status(&s) {
            prop_assert!(s.contains(&st.state));
        }
    }

    #[test]
    fn instance_ids_and_os_release_never_panic(s in any::<String>(), os in "((ID|ID_LIKE|NAME)=\"?[a-z ]{0,12}\"?\n){0,4}") {
        if facts::valid_instance_id(&s) {
            prop_assert!(s.starts_with("i-") && s.len() <= 34 && s[2..].bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        }
        let _ = facts::os_release_family(&s);
        let _ = facts::os_release_family(&os);
    }

    #[test]
    fn config_parse_never_panics_and_errors_name_a_key(text in prop_oneof![
        any::<String>(),
        prop::collection::vec(prop_oneof![
            Just("site_id = \"prod-1\"\n".to_owned()),
            Just("[nomad]\n".to_owned()),
            Just("[imds]\n".to_owned()),
            Just("[freeze]\n".to_owned()),
            "(data_dir|unmount_below|timeout|deadline|mounts|endpoint|bogus) = (\"[a-z0-9/:. ]{0,8}\"|true|[0-9]{1,3}|\\[\\])\n",
        ], 0..6).prop_map(|v| v.concat()),
    ]) {
        match Config::parse(&text, Path::new("/etc/dr-agent/agent.toml")) {
            Ok(c) => prop_assert!(c.validate("x").is_ok()),
            Err(e) => {
                let m = e.to_string();
                prop_assert!(m.contains("/etc/dr-agent/agent.toml") && m.contains("key `"), "{}", m);
            }
        }
    }
}

/// IMDS answers: whatever the metadata service says, the facts are either
/// valid or a clear error (against a real HTTP server on loopback).
mod imds_answers {
    use super::*;
    use std::io::{Read, Write};

    pub fn serve_once_each(answers: Vec<(String, String)>) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Bounded: at most 8 connections or 5 s, then the listener closes
        // (a case that asks less must not leak it).
        listener.set_nonblocking(true).expect("nonblocking");
        std::thread::spawn(move || {
            let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
            let mut served = 0;
            while served < 8 && std::time::Instant::now() < until {
                let Ok((mut s, _)) = listener.accept() else {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    continue;
                };
                served += 1;
                let _ = s.set_nonblocking(false);
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).into_owned();
                let path = req.split_whitespace().nth(1).unwrap_or_default().to_owned();
                let body = if path.ends_with("/api/token") {
                    "token".to_owned()
                } else {
                    answers.iter().find(|(k, _)| path.ends_with(k.as_str())).map(|(_, v)| v.clone()).unwrap_or_default()
                };
                let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            }
        });
        format!("http://{addr}")
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).map(|c: u32| c / 8 + 1).unwrap_or(48), failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn imds_facts_are_valid_or_a_clear_error(id in prop_oneof![Just("i-0123456789abcdef0".to_owned()), "[ -~]{0,20}"], ip in prop_oneof![ipv4().prop_map(|i| i.to_string()), "[ -~]{0,16}"], public in "[0-9.]{0,15}") {
            let url = serve_once_each(vec![("instance-id".into(), id.clone()), ("local-ipv4".into(), ip.clone()), ("public-ipv4".into(), public.clone())]);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            let client = dr_agent::sys::imds::ImdsClient::new(&url, std::time::Duration::from_secs(2)).expect("client");
            match rt.block_on(facts::imds_facts(&client)) {
                Ok(f) => {
                    prop_assert!(facts::valid_instance_id(&f.instance_id));
                    prop_assert_eq!(f.private_ip.to_string(), ip.trim().parse::<IpAddr>().map(|i| i.to_string()).unwrap_or_default());
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }
}

/// Nomad's answers to the drain step (`GET /v1/nodes`): whatever they are,
/// a dry-run drain plans only valid node ids or fails naming the URL.
mod nomad_answers {
    use super::*;

    fn node() -> impl Strategy<Value = String> {
        (
            prop_oneof![Just("aaaa-1".to_owned()), "[ -~]{0,12}"],
            prop_oneof![Just("ready"), Just("down"), Just("")],
            any::<bool>(),
            prop_oneof![Just("eligible"), Just("ineligible"), Just("x")],
        )
            .prop_map(|(id, st, d, e)| {
                serde_json::json!({"ID": id, "Name": "n", "Status": st, "Drain": d, "SchedulingEligibility": e}).to_string()
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).map(|c: u32| c / 8 + 1).unwrap_or(48), failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn drain_plans_valid_nodes_or_names_the_url(body in prop_oneof![
            prop::collection::vec(node(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
            any::<String>(),
            "\\[\\{\"ID\":[0-9a-z\"\\[\\]{}]{0,8}\\}\\]",
        ]) {
            let url = imds_answers::serve_once_each(vec![("/v1/nodes".into(), body.clone())]);
            let dir = tempfile::tempdir().expect("tempdir");
            let mut c = Config::default();
            c.nomad.api_url = url.clone();
            c.state_dir = dir.path().to_owned();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            let params = dr_agent::steps::drain::DrainParams { deadline: std::time::Duration::from_secs(1), require_idle: false };
            match rt.block_on(dr_agent::steps::drain::drain(&c, &params, true)) {
                Ok(r) => {
                    for n in &r.drained {
                        prop_assert!(!n.id.is_empty() && n.id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'), "{:?}", n);
                    }
                }
                Err(e) => prop_assert!(e.to_string().contains(&url) || e.to_string().contains("node"), "{}", e),
            }
        }
    }
}

/// Crashes found by the properties, kept as plain cases (none so far).
mod regressions {}
