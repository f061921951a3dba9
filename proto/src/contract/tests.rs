use std::time::Duration;

use super::*;

fn app_report() -> AppReport {
    AppReport {
        target: Target::Stopped,
        previous_state: "started".into(),
        previous_transitioning: false,
        final_state: "stopped".into(),
        already: false,
        issued: true,
        dry_run: false,
        elapsed_ms: 1200,
        polls: 3,
        unknown_states: vec![],
        actions: vec![],
        warnings: vec!["slow".into()],
    }
}

#[test]
fn every_error_kind_crosses_the_wire_and_back() {
    for k in
        [ErrorKind::Invalid, ErrorKind::Refused, ErrorKind::Failed, ErrorKind::Interrupted, ErrorKind::TimedOut, ErrorKind::NotSupported]
    {
        assert_eq!(ErrorKind::from_wire(ErrorKind::to_wire(Some(k))), Some(k), "{k:?}");
        // The journal's and the CLI's JSON name is the one `as_str` gives.
        assert_eq!(serde_json::to_value(k).expect("serializes"), k.as_str());
    }
    assert_eq!(ErrorKind::to_wire(None), pb::ErrorKind::Unspecified as i32);
    assert_eq!(ErrorKind::from_wire(pb::ErrorKind::Unspecified as i32), None);
    assert_eq!(ErrorKind::from_wire(999), None, "a kind of a newer version");
}

#[test]
fn a_report_is_read_back_as_written() {
    let report = Report::App(app_report());
    let json = report.to_json();
    for key in ["dry_run", "already_done", "actions", "warnings"] {
        assert!(json.get(key).is_some(), "the envelope's {key} is on the wire: {json}");
    }
    let back: AppReport = parse_report("app_stop", &json.to_string()).expect("parses");
    assert_eq!(back, app_report());
}

#[test]
fn a_renamed_field_is_named_with_the_step() {
    let mut json = Report::App(app_report()).to_json();
    let m = json.as_object_mut().expect("an object");
    let v = m.remove("already").expect("the field");
    m.insert("was_already".into(), v);
    let e = parse_report::<AppReport>("app_stop", &json.to_string()).expect_err("the field is missing");
    assert_eq!((e.step.as_str(), e.report), ("app_stop", "AppReport"));
    let text = e.to_string();
    assert!(text.contains("app_stop") && text.contains("`already`"), "{text}");
    assert!(e.detail.starts_with("already:"), "{e:?}");
}

#[test]
fn a_mistyped_field_is_named_by_its_path() {
    let e = parse_report::<HealthReport>("health_check", r#"{"url":"http://x/","status":"ok","elapsed_ms":1}"#).expect_err("mistyped");
    assert!(e.detail.starts_with("status:"), "{e:?}");
    let e = parse_report::<ThawReport>("thaw", "").expect_err("empty");
    assert!(e.to_string().contains("no report"), "{e}");
    let e = parse_report::<ThawReport>("thaw", "not json").expect_err("garbage");
    assert!(e.to_string().contains("thaw"), "{e}");
}

#[test]
fn an_added_field_of_a_newer_agent_is_ignored() {
    let mut json = Report::App(app_report()).to_json();
    json.as_object_mut().expect("object").insert("new_in_v9".into(), serde_json::json!(1));
    assert_eq!(parse_report::<AppReport>("app_start", &json.to_string()).expect("parses"), app_report());
}

#[test]
fn requests_cross_the_wire_and_back() {
    let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
    let requests = [
        Request::AppStatus,
        Request::AppStop { force: true },
        Request::AppStart,
        Request::SetHostname { params: HostnameParams { hostname: "ci.example.com".into() }, dry_run: false },
        Request::RewriteAddresses {
            params: RewriteParams {
                private: vec![AddressChange { old: ip("10.0.0.5"), new: ip("10.9.8.7") }],
                public: vec![AddressChange { old: ip("fd00::1"), new: ip("fd00::2") }],
            },
            dry_run: true,
        },
        Request::WipeNomad { dry_run: false },
        Request::CleanupBuilds { params: CleanupParams { before: "2024-05-01T12:00:00.250Z".into() }, dry_run: false },
        Request::Freeze(FreezeParams { mounts: vec!["/data".into()], deadline: Duration::from_secs(60) }),
        Request::Thaw,
        Request::Drain { deadline: Duration::from_secs(300) },
        Request::Undrain,
        Request::Recover {
            params: RecoverParams {
                builds_before: Some("2024-05-01T12:00:00.000Z".into()),
                hostname: Some("ci.example.com".into()),
                force: true,
                ..RecoverParams::default()
            },
            dry_run: true,
        },
        Request::HealthCheck,
    ];
    for r in requests {
        assert_eq!(Request::from_pb(r.to_pb()).as_ref(), Ok(&r), "{}", r.name());
    }
}

#[test]
fn untypable_requests_are_refused() {
    use pb::command::Kind;
    let bad = |k: Kind| Request::from_pb(k).expect_err("refused").0;
    assert!(bad(Kind::Freeze(pb::FreezeRequest { mounts: vec![], deadline_ms: 0 })).contains("greater than zero"));
    assert!(bad(Kind::Drain(pb::DrainRequest { deadline_ms: 0 })).contains("greater than zero"));
    assert!(bad(Kind::CleanupBuilds(pb::CleanupBuildsRequest { before_ms: 0, dry_run: false })).contains("before_ms"));
    let mixed = pb::AddressChange { old_ip: "10.0.0.1".into(), new_ip: "fd00::1".into() };
    let e = bad(Kind::RewriteAddresses(pb::RewriteAddressesRequest { private: vec![mixed], public: vec![], dry_run: false }));
    assert!(e.contains("must both be IPv4 or both IPv6"), "{e}");
}
