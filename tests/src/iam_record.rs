//! Recording of the controller's AWS calls for the IAM evaluation
//! (`tests/iam/evaluate.mjs`, run by `tests/run.sh`).
//!
//! When `DR_IAM_RECORD_DIR` is set (or the controller's spec names its own
//! directory, [`crate::ControllerSpec::record_into`]), [`wrap`] puts a recording proxy in front
//! of the controller's AWS endpoint (moto, or a throttling, fault or data
//! plane proxy in front of it): the code under test is not touched, and
//! only the controller's calls are recorded (a test's own setup calls go
//! to moto directly). For every call it appends one JSON line to
//! `$DR_IAM_RECORD_DIR/<pid>.jsonl`: the service, action, region, account,
//! the principal (the static credentials, or the site role the access key
//! was issued for by an AssumeRole seen here), whether it was a DryRun,
//! moto's HTTP status, and the IAM authorization requests the call makes
//! on AWS: each with its action, resource ARN, the resource's tags at the
//! time of the call (moto's DescribeTags, asked before forwarding) and the
//! request's tags (TagSpecifications, CreateTags' tags, with the implied
//! `ec2:CreateTags` of a tag-on-create and its `ec2:CreateAction`). A tag
//! lookup that keeps failing is recorded as `"resource_tags": null` with
//! `"tags_lookup_error"` saying why, never as an empty (untagged) map.
//! Records of every controller of the process go to the same file, one
//! whole line per `write_all`, under a process-wide lock.
//!
//! moto 5.2.5 ignores CopyImage's TagSpecifications; AWS applies them. The
//! recorder applies them to the new image and its snapshots as AWS would, so that the
//! controller's fallback re-tagging (never needed on AWS) is not evaluated
//! as if it were a call AWS would see.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;
use hyper::body::Bytes;
use serde_json::{Value, json};

use crate::throttle::{Upstream, serve};

/// The account moto puts everything in.
pub const ACCOUNT: &str = "123456789012";
/// The environment variable naming the directory of the recordings.
pub const RECORD_DIR: &str = "DR_IAM_RECORD_DIR";

/// Serializes the appends of every [`Recorder`] of this process: several
/// controllers (tests running in parallel in one test binary) may record
/// into the same `<pid>.jsonl`, and each record is one `write_all` of a
/// whole line under this lock, so lines never interleave.
static APPEND: Mutex<()> = Mutex::new(());

/// How often a resource's tags are asked for before the lookup is recorded
/// as failed.
const TAG_LOOKUP_ATTEMPTS: u32 = 4;

/// The endpoint the controller should use: `endpoint` itself, or a
/// recording proxy in front of it. `record_into` is the directory of this
/// controller's recording (a test that evaluates its own controller's
/// calls); without it `DR_IAM_RECORD_DIR`, when set. `moto` is moto's own
/// URL, asked for the resources' tags (not through the proxies, whose call
/// counts tests check).
pub fn wrap(endpoint: &str, moto: &str, record_into: Option<&std::path::Path>) -> String {
    let dir = match record_into {
        Some(dir) => dir.to_owned(),
        None => match std::env::var_os(RECORD_DIR) {
            Some(dir) => std::path::PathBuf::from(dir),
            None => return endpoint.to_owned(),
        },
    };
    std::fs::create_dir_all(&dir).expect("create DR_IAM_RECORD_DIR");
    let (endpoint, moto) = (endpoint.to_owned(), moto.to_owned());
    let (tx, rx) = std::sync::mpsc::channel();
    // Its own thread and runtime: a test that blocks its thread (drctl run
    // synchronously) must not stall the controller's calls.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("recorder runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind recorder");
            let url = format!("http://{}", listener.local_addr().expect("addr"));
            let rec = Arc::new(Recorder {
                upstream: Upstream::new(&endpoint).expect("endpoint URL"),
                moto: Upstream::new(&moto).expect("moto URL"),
                file: Mutex::new(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(dir.join(format!("{}.jsonl", std::process::id())))
                        .expect("open the IAM recording"),
                ),
                roles: Mutex::new(HashMap::new()),
            });
            serve(listener, move |req: hyper::Request<hyper::body::Incoming>| {
                let rec = rec.clone();
                async move { rec.handle(req).await }
            });
            let _ = tx.send(url);
            std::future::pending::<()>().await;
        });
    });
    rx.recv().expect("recorder started")
}

struct Recorder {
    upstream: Upstream,
    moto: Upstream,
    file: Mutex<std::fs::File>,
    /// Access key id -> role ARN, from the AssumeRole answers seen.
    roles: Mutex<HashMap<String, String>>,
}

/// One IAM authorization a call needs.
struct Authz {
    action: String,
    resource: String,
    /// Resource id whose tags are looked up (and its region).
    lookup: Option<(String, String)>,
    request_tags: BTreeMap<String, String>,
    context: BTreeMap<String, String>,
}

impl Authz {
    fn new(action: &str, resource: String) -> Authz {
        Authz { action: action.to_owned(), resource, lookup: None, request_tags: BTreeMap::new(), context: BTreeMap::new() }
    }
    fn of(action: &str, region: &str, id: &str) -> Authz {
        Authz { lookup: Some((id.to_owned(), region.to_owned())), ..Authz::new(action, arn_of(region, id)) }
    }
    fn tags(mut self, tags: &BTreeMap<String, String>) -> Authz {
        self.request_tags = tags.clone();
        self
    }
}

/// The ARN of an EC2 resource id as IAM sees it.
fn arn_of(region: &str, id: &str) -> String {
    let (prefix, _) = id.split_once('-').unwrap_or((id, ""));
    match prefix {
        "ami" => format!("arn:aws:ec2:{region}::image/{id}"),
        "snap" => format!("arn:aws:ec2:{region}::snapshot/{id}"),
        "i" => format!("arn:aws:ec2:{region}:{ACCOUNT}:instance/{id}"),
        "vol" => format!("arn:aws:ec2:{region}:{ACCOUNT}:volume/{id}"),
        "eipalloc" => format!("arn:aws:ec2:{region}:{ACCOUNT}:elastic-ip/{id}"),
        "subnet" => format!("arn:aws:ec2:{region}:{ACCOUNT}:subnet/{id}"),
        "sg" => format!("arn:aws:ec2:{region}:{ACCOUNT}:security-group/{id}"),
        "eni" => format!("arn:aws:ec2:{region}:{ACCOUNT}:network-interface/{id}"),
        _ => format!("arn:aws:ec2:{region}:{ACCOUNT}:unknown/{id}"),
    }
}

fn new_arn(region: &str, kind: &str) -> String {
    match kind {
        "image" | "snapshot" => format!("arn:aws:ec2:{region}::{kind}/*"),
        _ => format!("arn:aws:ec2:{region}:{ACCOUNT}:{kind}/*"),
    }
}

/// `Credential=AKID/date/region/service/aws4_request` of a SigV4 header.
fn credential(parts: &hyper::http::request::Parts) -> (String, String, String) {
    let auth = parts.headers.get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let cred = auth.split("Credential=").nth(1).unwrap_or_default();
    let cred = cred.split([',', ' ']).next().unwrap_or_default();
    let fields: Vec<&str> = cred.split('/').collect();
    let get = |i: usize| fields.get(i).map(|s| s.to_string()).unwrap_or_default();
    (get(0), get(2), get(3))
}

/// Form parameters, decoded.
fn params(body: &[u8]) -> BTreeMap<String, String> {
    form_urlencoded::parse(body).into_owned().collect()
}

/// Values of `Prefix.1`, `Prefix.2`, ... in order.
fn list(p: &BTreeMap<String, String>, prefix: &str) -> Vec<String> {
    (1..).map_while(|n| p.get(&format!("{prefix}.{n}")).cloned()).collect()
}

/// The tags of `TagSpecification.N` per resource type.
fn tag_specs(p: &BTreeMap<String, String>) -> Vec<(String, BTreeMap<String, String>)> {
    (1..)
        .map_while(|n| {
            let kind = p.get(&format!("TagSpecification.{n}.ResourceType"))?;
            Some((kind.clone(), tags_at(p, &format!("TagSpecification.{n}.Tag"))))
        })
        .collect()
}

fn tags_at(p: &BTreeMap<String, String>, prefix: &str) -> BTreeMap<String, String> {
    (1..)
        .map_while(|n| {
            let k = p.get(&format!("{prefix}.{n}.Key"))?;
            Some((k.clone(), p.get(&format!("{prefix}.{n}.Value")).cloned().unwrap_or_default()))
        })
        .collect()
}

/// Per resource type: its tags and the implied `ec2:CreateTags`.
fn tag_on_create(region: &str, create_action: &str, specs: &[(String, BTreeMap<String, String>)], out: &mut Vec<Authz>) {
    for (kind, tags) in specs {
        let mut a = Authz::new("ec2:CreateTags", new_arn(region, kind)).tags(tags);
        a.context.insert("ec2:CreateAction".into(), create_action.into());
        out.push(a);
    }
}

fn spec_tags(specs: &[(String, BTreeMap<String, String>)], kind: &str) -> BTreeMap<String, String> {
    specs.iter().find(|(k, _)| k == kind).map(|(_, t)| t.clone()).unwrap_or_default()
}

/// The authorizations an EC2 query-API call needs on AWS.
fn ec2_authz(action: &str, region: &str, p: &BTreeMap<String, String>) -> Vec<Authz> {
    let iam = format!("ec2:{action}");
    let specs = tag_specs(p);
    let mut out = Vec::new();
    match action {
        "CreateImage" => {
            out.push(Authz::of(&iam, region, p.get("InstanceId").map(String::as_str).unwrap_or_default()));
            out.push(Authz::new(&iam, new_arn(region, "image")).tags(&spec_tags(&specs, "image")));
            out.push(Authz::new(&iam, new_arn(region, "snapshot")).tags(&spec_tags(&specs, "snapshot")));
            tag_on_create(region, action, &specs, &mut out);
        }
        "CopyImage" => {
            let source_region = p.get("SourceRegion").cloned().unwrap_or_else(|| region.to_owned());
            let tags = spec_tags(&specs, "image");
            out.push(Authz::new(&iam, new_arn(region, "image")).tags(&tags));
            out.push(Authz::of(&iam, &source_region, p.get("SourceImageId").map(String::as_str).unwrap_or_default()).tags(&tags));
            out.push(Authz::new(&iam, new_arn(region, "snapshot")).tags(&spec_tags(&specs, "snapshot")));
            tag_on_create(region, action, &specs, &mut out);
        }
        "RunInstances" => {
            out.push(Authz::of(&iam, region, p.get("ImageId").map(String::as_str).unwrap_or_default()));
            out.push(Authz::new(&iam, new_arn(region, "instance")).tags(&spec_tags(&specs, "instance")));
            out.push(Authz::new(&iam, new_arn(region, "volume")).tags(&spec_tags(&specs, "volume")));
            out.push(Authz::new(&iam, new_arn(region, "network-interface")));
            out.push(Authz::new(&iam, new_arn(region, "snapshot")));
            let mut ids: Vec<String> = list(p, "SecurityGroupId");
            ids.extend(p.get("SubnetId").cloned());
            for n in 1..=8 {
                ids.extend(p.get(&format!("NetworkInterface.{n}.SubnetId")).cloned());
                ids.extend(list(p, &format!("NetworkInterface.{n}.SecurityGroupId")));
            }
            for id in ids {
                out.push(Authz::new(&iam, arn_of(region, &id)));
            }
            if let Some(key) = p.get("KeyName") {
                out.push(Authz::new(&iam, format!("arn:aws:ec2:{region}:{ACCOUNT}:key-pair/{key}")));
            }
            tag_on_create(region, action, &specs, &mut out);
        }
        "CreateTags" | "DeleteTags" => {
            let tags = tags_at(p, "Tag");
            for id in list(p, "ResourceId") {
                out.push(Authz::of(&iam, region, &id).tags(&tags));
            }
        }
        "StopInstances" | "StartInstances" | "TerminateInstances" | "RebootInstances" => {
            for id in list(p, "InstanceId") {
                out.push(Authz::of(&iam, region, &id));
            }
        }
        "ModifyInstanceAttribute" => out.push(Authz::of(&iam, region, p.get("InstanceId").map(String::as_str).unwrap_or_default())),
        "DeregisterImage" => out.push(Authz::of(&iam, region, p.get("ImageId").map(String::as_str).unwrap_or_default())),
        "DeleteSnapshot" => out.push(Authz::of(&iam, region, p.get("SnapshotId").map(String::as_str).unwrap_or_default())),
        "DeleteVolume" => out.push(Authz::of(&iam, region, p.get("VolumeId").map(String::as_str).unwrap_or_default())),
        "AssociateAddress" | "DisassociateAddress" => {
            if let Some(alloc) = p.get("AllocationId") {
                out.push(Authz::of(&iam, region, alloc));
            }
            if let Some(id) = p.get("InstanceId") {
                out.push(Authz::of(&iam, region, id));
            }
            if let Some(id) = p.get("NetworkInterfaceId") {
                out.push(Authz::of(&iam, region, id));
            }
        }
        // Describe* and anything else: not resource-scoped.
        _ => out.push(Authz::new(&iam, "*".into())),
    }
    out
}

/// Route 53's REST API: the action and resource from method and path.
fn route53_authz(method: &hyper::Method, path: &str) -> Vec<Authz> {
    let rest = path.trim_start_matches('/').split_once('/').map(|(_, r)| r).unwrap_or_default();
    // The SDK's paths end with a `/` (`/2013-04-01/hostedzone/Z1/rrset/`).
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let (action, resource) = match (method.as_str(), segs.as_slice()) {
        ("POST", ["hostedzone", id, "rrset"]) => ("ChangeResourceRecordSets", format!("arn:aws:route53:::hostedzone/{id}")),
        ("GET", ["hostedzone", id, "rrset"]) => ("ListResourceRecordSets", format!("arn:aws:route53:::hostedzone/{id}")),
        ("GET", ["hostedzone", id]) => ("GetHostedZone", format!("arn:aws:route53:::hostedzone/{id}")),
        ("GET", ["change", id]) => ("GetChange", format!("arn:aws:route53:::change/{id}")),
        ("GET", ["hostedzone"]) => ("ListHostedZones", "*".to_owned()),
        ("GET", ["hostedzonesbyname"]) => ("ListHostedZonesByName", "*".to_owned()),
        ("GET", ["healthcheck", id, "status"]) => ("GetHealthCheckStatus", format!("arn:aws:route53:::healthcheck/{id}")),
        ("GET", ["healthcheck", id]) => ("GetHealthCheck", format!("arn:aws:route53:::healthcheck/{id}")),
        (m, _) => return vec![Authz::new(&format!("route53:{m} {path}"), "*".into())],
    };
    vec![Authz::new(&format!("route53:{action}"), resource)]
}

impl Recorder {
    async fn handle(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> Result<hyper::Response<http_body_util::Full<Bytes>>, hyper_util::client::legacy::Error> {
        let (parts, body) = req.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let (key, region, service) = credential(&parts);
        let p = params(&body);
        let action = p.get("Action").cloned().unwrap_or_default();
        let mut authz = match service.as_str() {
            "ec2" => ec2_authz(&action, &region, &p),
            "route53" => route53_authz(&parts.method, parts.uri.path()),
            "sts" => vec![Authz::new(&format!("sts:{action}"), p.get("RoleArn").cloned().unwrap_or_else(|| "*".into()))],
            other => vec![Authz::new(&format!("{other}:{action}"), "*".into())],
        };
        let action = authz.first().map(|a| a.action.clone()).unwrap_or_default();
        // The resources' tags as they are when the call is made.
        let mut tags: HashMap<(String, String), Result<BTreeMap<String, String>, String>> = HashMap::new();
        for a in &authz {
            if let Some(l) = &a.lookup
                && !l.0.is_empty()
                && !tags.contains_key(l)
            {
                let t = self.tags_of(&l.0, &l.1).await;
                tags.insert(l.clone(), t);
            }
        }
        let answer = self.upstream.forward(parts, body.clone()).await;
        let status = answer.as_ref().map(|r| r.status().as_u16()).unwrap_or(0);
        if let Ok(resp) = &answer
            && status == 200
        {
            let text = resp_text(resp);
            if action == "sts:AssumeRole"
                && let (Some(role), Some(akid)) = (p.get("RoleArn"), xml_text(&text, "AccessKeyId"))
            {
                self.roles.lock().expect("roles").insert(akid, role.clone());
            }
            if action == "ec2:CopyImage"
                && let Some(image) = xml_text(&text, "imageId")
            {
                let specs = tag_specs(&p);
                let t = spec_tags(&specs, "image");
                self.apply_tags(&image, &region, &t).await;
                // And the snapshot tags to the copy's snapshots, as AWS does.
                let t = spec_tags(&specs, "snapshot");
                for snapshot in self.snapshots_of(&image, &region).await {
                    self.apply_tags(&snapshot, &region, &t).await;
                }
            }
        }
        let role = self.roles.lock().expect("roles").get(&key).cloned();
        let account = role.as_deref().and_then(|r| r.split(':').nth(4)).unwrap_or(ACCOUNT).to_owned();
        let requests: Vec<Value> = authz
            .drain(..)
            .map(|a| {
                let mut request = json!({
                    "action": a.action,
                    "resource": a.resource,
                    "resource_tags": {},
                    "request_tags": a.request_tags,
                    "context": a.context,
                });
                match a.lookup.as_ref().and_then(|l| tags.get(l)) {
                    Some(Ok(t)) => request["resource_tags"] = json!(t),
                    // Unknown, not "untagged": the evaluator must not read
                    // a failed lookup as a resource without tags.
                    Some(Err(why)) => {
                        request["resource_tags"] = Value::Null;
                        request["tags_lookup_error"] = json!(why);
                    }
                    None => {}
                }
                request
            })
            .collect();
        let line = json!({
            "service": service,
            "action": action,
            "region": region,
            "account": account,
            "access_key": key,
            "role": role,
            "dry_run": p.get("DryRun").is_some_and(|v| v == "true"),
            "status": status,
            "requests": requests,
        });
        let mut record = line.to_string();
        record.push('\n');
        let _append = APPEND.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(mut f) = self.file.lock() {
            let _ = f.write_all(record.as_bytes());
        }
        answer
    }

    /// The tags of one resource (moto's DescribeTags in its region), asked
    /// up to [`TAG_LOOKUP_ATTEMPTS`] times; the last failure otherwise.
    async fn tags_of(&self, id: &str, region: &str) -> Result<BTreeMap<String, String>, String> {
        let mut why = String::new();
        for attempt in 1..=TAG_LOOKUP_ATTEMPTS {
            match self.tags_once(id, region).await {
                Ok(tags) => return Ok(tags),
                Err(e) => why = format!("DescribeTags of {id} in {region}, attempt {attempt}/{TAG_LOOKUP_ATTEMPTS}: {e}"),
            }
            tokio::time::sleep(std::time::Duration::from_millis(100 * u64::from(attempt))).await;
        }
        Err(why)
    }

    async fn tags_once(&self, id: &str, region: &str) -> Result<BTreeMap<String, String>, String> {
        let body = format!("Action=DescribeTags&Version=2016-11-15&Filter.1.Name=resource-id&Filter.1.Value.1={id}");
        let text = self.moto_call(region, body).await?;
        let doc = roxmltree::Document::parse(&text).map_err(|e| format!("unparsable answer ({e})"))?;
        if !doc.root_element().has_tag_name("DescribeTagsResponse") {
            return Err(format!("unexpected answer <{}>", doc.root_element().tag_name().name()));
        }
        Ok(doc
            .descendants()
            .filter(|n| n.has_tag_name("item"))
            .filter_map(|item| {
                let child = |name: &str| item.children().find(|c| c.has_tag_name(name)).and_then(|c| c.text()).map(str::to_owned);
                Some((child("key")?, child("value").unwrap_or_default()))
            })
            .collect())
    }

    /// The snapshots of an image's block device mappings (moto's DescribeImages).
    async fn snapshots_of(&self, image: &str, region: &str) -> Vec<String> {
        let body = format!("Action=DescribeImages&Version=2016-11-15&ImageId.1={image}");
        let Ok(text) = self.moto_call(region, body).await else {
            return Vec::new();
        };
        let Ok(doc) = roxmltree::Document::parse(&text) else {
            return Vec::new();
        };
        doc.descendants().filter(|n| n.has_tag_name("snapshotId")).filter_map(|n| n.text()).map(str::to_owned).collect()
    }

    async fn apply_tags(&self, id: &str, region: &str, tags: &BTreeMap<String, String>) {
        if tags.is_empty() {
            return;
        }
        let mut body = format!("Action=CreateTags&Version=2016-11-15&ResourceId.1={id}");
        for (n, (k, v)) in tags.iter().enumerate() {
            let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            body.push_str(&format!("&Tag.{}.Key={}&Tag.{}.Value={}", n + 1, enc(k), n + 1, enc(v)));
        }
        let _ = self.moto_call(region, body).await;
    }

    /// One EC2 query-API call to moto itself: the answer's text, or why
    /// there is none (unreachable, not a 200).
    async fn moto_call(&self, region: &str, body: String) -> Result<String, String> {
        let req = hyper::Request::builder()
            .method("POST")
            .uri("/")
            .header("content-type", "application/x-www-form-urlencoded")
            .header(
                hyper::header::AUTHORIZATION,
                format!("AWS4-HMAC-SHA256 Credential=testing/20260101/{region}/ec2/aws4_request, SignedHeaders=host, Signature=0"),
            )
            .body(())
            .map_err(|e| format!("request: {e}"))?;
        let (parts, ()) = req.into_parts();
        let resp = self.moto.forward(parts, Bytes::from(body)).await.map_err(|e| format!("moto unreachable: {e}"))?;
        match resp.status().as_u16() {
            200 => Ok(resp_text(&resp)),
            status => Err(format!("moto answered {status}: {}", resp_text(&resp).chars().take(200).collect::<String>())),
        }
    }
}

fn resp_text(resp: &hyper::Response<http_body_util::Full<Bytes>>) -> String {
    // A Full body is one chunk: read it without consuming the response.
    use hyper::body::Body;
    let mut body = resp.body().clone();
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    match std::pin::Pin::new(&mut body).poll_frame(&mut cx) {
        std::task::Poll::Ready(Some(Ok(frame))) => frame.into_data().map(|d| String::from_utf8_lossy(&d).into_owned()).unwrap_or_default(),
        _ => String::new(),
    }
}

/// The text of the first element named `name`.
fn xml_text(text: &str, name: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(text).ok()?;
    doc.descendants().find(|n| n.has_tag_name(name)).and_then(|n| n.text()).map(str::to_owned)
}
