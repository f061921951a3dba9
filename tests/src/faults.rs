//! A fault-injecting proxy in front of moto, for end-to-end tests of
//! automatic failover: it makes EC2 report what moto cannot simulate.
//!
//! Like the throttling proxy ([`crate::throttle`]) it forwards EC2
//! query-API requests and counts calls per Action, and on top of that
//! injects faults that a test switches on and off through [`Faults`]:
//!
//! - failed status checks (`systemStatus` / `instanceStatus` impaired,
//!   reachability failed) and scheduled events (`eventsSet`) in
//!   DescribeInstanceStatus answers: the request goes to moto, its XML
//!   answer is edited for the affected instances;
//! - instances that will not stop: StopInstances naming them is answered
//!   with a success without reaching moto, so they keep running;
//! - instances the caller may not stop: StopInstances naming them is
//!   answered HTTP 403 `UnauthorizedOperation`, as IAM refuses it;
//! - a failed region: every request signed for it is answered HTTP 503
//!   `Unavailable`, as during a regional outage;
//! - Route 53 health checks (GetHealthCheckStatus, which moto always
//!   answers with one healthy checker): a scripted check is answered by the
//!   proxy with eight checkers in Route 53's regions, all reaching the
//!   endpoint or all failing, as AWS's checkers would report.
//!
//! Everything else passes through unchanged. Faults are keyed by instance
//! id and apply in every region; moto keeps instances of each region apart
//! by the request's signing region, the proxy does not need to.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

use crate::throttle::{Stats, Upstream, form_value, serve};

/// The proxy on its loopback port, and the switches of its faults.
pub struct FaultProxy {
    /// `http://127.0.0.1:<port>`: the EC2 endpoint to give clients.
    pub url: String,
    /// Calls per Action (every request counts, also those answered by a
    /// fault).
    pub stats: Arc<Stats>,
    pub faults: Arc<Faults>,
}

/// The faults in force; shared with the running proxy, so switching one
/// takes effect on the next request.
#[derive(Default)]
pub struct Faults {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Instance id -> when its system status check started failing.
    system_impaired: HashMap<String, String>,
    /// Instance id -> when its instance status check started failing.
    instance_impaired: HashMap<String, String>,
    /// Instance id -> its scheduled events, in the order scheduled.
    events: HashMap<String, Vec<Event>>,
    wont_stop: HashSet<String>,
    deny_stop: HashSet<String>,
    failed_regions: HashSet<String>,
    /// Instance ids of every StopInstances seen, in arrival order.
    stop_calls: Vec<String>,
    /// The same, with their arrival time (Unix ms).
    stop_times: Vec<(String, u64)>,
    /// Numbers the events' ids.
    next_event: u64,
    /// Route 53 health check id -> whether its checkers reach the endpoint.
    health_checks: HashMap<String, bool>,
    /// Instance id -> the state DescribeInstanceStatus reports instead of
    /// moto's (a transient or wrong view of EC2).
    states: HashMap<String, String>,
}

/// A scheduled event as DescribeInstanceStatus lists it.
struct Event {
    id: String,
    code: String,
    not_before: String,
}

impl Faults {
    /// DescribeInstanceStatus reports the instance's system status check
    /// as failed: `systemStatus` impaired, reachability failed (AWS's
    /// hardware or network under the instance is at fault).
    pub fn impair_system(&self, instance_id: &str) {
        self.lock().system_impaired.insert(instance_id.to_owned(), timestamp(time::Duration::ZERO));
    }

    /// DescribeInstanceStatus reports the instance's own status check as
    /// failed: `instanceStatus` impaired, reachability failed (the guest
    /// does not answer).
    pub fn impair_instance(&self, instance_id: &str) {
        self.lock().instance_impaired.insert(instance_id.to_owned(), timestamp(time::Duration::ZERO));
    }

    /// Adds a scheduled event to the instance's `eventsSet` in
    /// DescribeInstanceStatus: `code` (e.g. `instance-retirement`,
    /// `system-reboot`), a description, `notBefore` one day from now.
    pub fn schedule_event(&self, instance_id: &str, code: &str) {
        let mut state = self.lock();
        state.next_event += 1;
        let event = Event {
            id: format!("instance-event-{:017x}", state.next_event),
            code: code.to_owned(),
            not_before: timestamp(time::Duration::days(1)),
        };
        state.events.entry(instance_id.to_owned()).or_default().push(event);
    }

    /// StopInstances naming the instance is answered with a success
    /// (currentState stopping, previousState running) without reaching
    /// moto: the instance keeps running.
    pub fn wont_stop(&self, instance_id: &str) {
        self.lock().wont_stop.insert(instance_id.to_owned());
    }

    /// StopInstances naming the instance is answered HTTP 403
    /// `UnauthorizedOperation` (nothing is stopped), as when the IAM policy
    /// does not allow it.
    pub fn deny_stop(&self, instance_id: &str) {
        self.lock().deny_stop.insert(instance_id.to_owned());
    }

    /// Every request signed for `region` is answered HTTP 503 with EC2's
    /// error code `Unavailable`.
    pub fn fail_region(&self, region: &str) {
        self.lock().failed_regions.insert(region.to_owned());
    }

    /// Removes the instance's impairments, events and refusal to stop.
    pub fn clear(&self, instance_id: &str) {
        let mut state = self.lock();
        state.system_impaired.remove(instance_id);
        state.instance_impaired.remove(instance_id);
        state.events.remove(instance_id);
        state.wont_stop.remove(instance_id);
        state.deny_stop.remove(instance_id);
        state.states.remove(instance_id);
    }

    /// DescribeInstanceStatus reports the running instance in `state`
    /// (e.g. `shutting-down`) until [`Faults::clear`].
    pub fn report_state(&self, instance_id: &str, state: &str) {
        self.lock().states.insert(instance_id.to_owned(), state.to_owned());
    }

    /// GetHealthCheckStatus of `id` is answered by the proxy: eight
    /// checkers, all reaching the endpoint (`healthy`) or all failing.
    pub fn health_check(&self, id: &str, healthy: bool) {
        self.lock().health_checks.insert(id.to_owned(), healthy);
    }

    /// Requests signed for `region` pass through again.
    pub fn heal_region(&self, region: &str) {
        self.lock().failed_regions.remove(region);
    }

    /// Instance ids of every StopInstances seen, forwarded or swallowed, in
    /// arrival order. Not counted: dry runs (`DryRun=true`, a permission
    /// check that stops nothing; forwarded unchanged) and requests of a
    /// failed region (answered 503, neither forwarded nor swallowed).
    pub fn stop_calls(&self) -> Vec<String> {
        self.lock().stop_calls.clone()
    }

    /// [`Faults::stop_calls`] with the time each arrived (Unix ms); denied
    /// ones included.
    pub fn stop_times(&self) -> Vec<(String, u64)> {
        self.lock().stop_times.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("faults lock")
    }

    fn region_failed(&self, region: &str) -> bool {
        self.lock().failed_regions.contains(region)
    }
}

/// Starts the proxy on a free loopback port, forwarding to `upstream`
/// (`http://host:port` of moto). No faults are in force at first.
pub async fn start(upstream: &str) -> FaultProxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind fault proxy");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let stats = Arc::new(Stats::default());
    let faults = Arc::new(Faults::default());
    let upstream = Arc::new(Upstream::new(upstream).expect("upstream URL"));
    let (stats2, faults2) = (stats.clone(), faults.clone());
    serve(listener, move |req: hyper::Request<hyper::body::Incoming>| {
        let (stats, faults, upstream) = (stats2.clone(), faults2.clone(), upstream.clone());
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            // Route 53 is a REST API: GET /2013-04-01/healthcheck/<id>/status.
            if let Some(id) = parts.uri.path().strip_prefix("/2013-04-01/healthcheck/").and_then(|p| p.strip_suffix("/status")) {
                *stats.calls.lock().expect("lock").entry("GetHealthCheckStatus".into()).or_default() += 1;
                let scripted = faults.lock().health_checks.get(id).copied();
                if let Some(healthy) = scripted {
                    return Ok(health_check_status(healthy));
                }
                return upstream.forward(parts, body).await;
            }
            let action = form_value(&body, "Action").unwrap_or_else(|| "?".into());
            *stats.calls.lock().expect("lock").entry(action.clone()).or_default() += 1;
            if signing_region(&parts.headers).is_some_and(|r| faults.region_failed(&r)) {
                return Ok(xml_response(503, UNAVAILABLE.to_owned()));
            }
            match action.as_str() {
                "StopInstances" => stop_instances(&faults, &upstream, parts, body).await,
                "DescribeInstanceStatus" => {
                    let resp = upstream.forward(parts, body).await?;
                    Ok(faults.rewrite_instance_status(resp).await)
                }
                _ => upstream.forward(parts, body).await,
            }
        }
    });
    FaultProxy { url, stats, faults }
}

const UNAUTHORIZED: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>UnauthorizedOperation</Code><Message>You are not authorized to perform this operation.</Message></Error></Errors><RequestID>00000000-0000-0000-0000-000000000000</RequestID></Response>";

const UNAVAILABLE: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>Unavailable</Code><Message>The service is unavailable. Please try again shortly.</Message></Error></Errors><RequestID>00000000-0000-0000-0000-000000000000</RequestID></Response>";

/// A GetHealthCheckStatus answer: one observation per Route 53 checker
/// region, in the shape of AWS's documented response.
fn health_check_status(healthy: bool) -> hyper::Response<Full<Bytes>> {
    let regions = ["us-east-1", "us-west-1", "us-west-2", "eu-west-1", "ap-southeast-1", "ap-southeast-2", "ap-northeast-1", "sa-east-1"];
    let status = if healthy {
        "Success: HTTP Status Code 200, OK"
    } else {
        "Failure: Connection timed out. The endpoint or the internet connection is down, or requests are being blocked by your firewall."
    };
    let checked = timestamp(time::Duration::ZERO);
    let mut obs = String::new();
    for (i, r) in regions.iter().enumerate() {
        obs.push_str(&format!(
            "<HealthCheckObservation><Region>{r}</Region><IPAddress>15.177.{i}.10</IPAddress><StatusReport><Status>{status}</Status><CheckedTime>{checked}</CheckedTime></StatusReport></HealthCheckObservation>"
        ));
    }
    xml_response(
        200,
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<GetHealthCheckStatusResponse xmlns=\"https://route53.amazonaws.com/doc/2013-04-01/\"><HealthCheckObservations>{obs}</HealthCheckObservations></GetHealthCheckStatusResponse>"
        ),
    )
}

/// The region a request is signed for: the third field of the SigV4
/// credential scope in its `Authorization` header
/// (`Credential=AKID/20261202/us-east-1/ec2/aws4_request, ...`).
fn signing_region(headers: &hyper::HeaderMap) -> Option<String> {
    let auth = headers.get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
    let (_, credential) = auth.split_once("Credential=")?;
    let scope = credential.split([',', ' ']).next()?;
    scope.split('/').nth(2).filter(|r| !r.is_empty()).map(str::to_owned)
}

/// StopInstances: the instances that won't stop are answered for by the
/// proxy, the others (if any) are stopped by moto; one answer lists all.
async fn stop_instances(
    faults: &Faults,
    upstream: &Upstream,
    mut parts: hyper::http::request::Parts,
    body: Bytes,
) -> Result<hyper::Response<Full<Bytes>>, hyper_util::client::legacy::Error> {
    let pairs: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    if pairs.iter().any(|(k, v)| k == "DryRun" && v.eq_ignore_ascii_case("true")) {
        return upstream.forward(parts, body).await;
    }
    let is_id = |k: &str| k.strip_prefix("InstanceId.").is_some_and(|n| n.parse::<u32>().is_ok());
    let mut named: Vec<(u32, String)> = pairs
        .iter()
        .filter(|(k, _)| is_id(k))
        .filter_map(|(k, v)| Some((k.strip_prefix("InstanceId.")?.parse().ok()?, v.clone())))
        .collect();
    named.sort();
    let swallowed: HashSet<String> = {
        let mut state = faults.lock();
        state.stop_calls.extend(named.iter().map(|(_, id)| id.clone()));
        let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        state.stop_times.extend(named.iter().map(|(_, id)| (id.clone(), at)));
        if named.iter().any(|(_, id)| state.deny_stop.contains(id)) {
            return Ok(xml_response(403, UNAUTHORIZED.to_owned()));
        }
        named.iter().filter(|(_, id)| state.wont_stop.contains(id)).map(|(_, id)| id.clone()).collect()
    };
    if swallowed.is_empty() {
        return upstream.forward(parts, body).await;
    }
    let mut items = String::new();
    for (_, id) in named.iter().filter(|(_, id)| swallowed.contains(id)) {
        items.push_str(&format!(
            "<item><instanceId>{}</instanceId><currentState><code>64</code><name>stopping</name></currentState><previousState><code>16</code><name>running</name></previousState></item>",
            escape(id)
        ));
    }
    if named.iter().all(|(_, id)| swallowed.contains(id)) {
        return Ok(xml_response(
            200,
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<StopInstancesResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>00000000-0000-0000-0000-000000000000</requestId><instancesSet>{items}</instancesSet></StopInstancesResponse>"
            ),
        ));
    }
    // Some do stop: moto gets the request without the others (renumbered;
    // moto does not check signatures, so the changed body is fine) and its
    // answer gets their items added.
    let body = {
        let mut form = form_urlencoded::Serializer::new(String::new());
        let mut n = 0;
        for (k, v) in &pairs {
            if !is_id(k) {
                form.append_pair(k, v);
            } else if !swallowed.contains(v) {
                n += 1;
                form.append_pair(&format!("InstanceId.{n}"), v);
            }
        }
        Bytes::from(form.finish())
    };
    parts.headers.insert(hyper::header::CONTENT_LENGTH, body.len().into());
    let resp = upstream.forward(parts, body).await?;
    Ok(edit_xml(resp, |doc, edits| {
        let set = doc.descendants().find(|n| n.has_tag_name("instancesSet"))?;
        edits.push(append_children(doc.input_text(), set, &items));
        Some(())
    })
    .await)
}

impl Faults {
    /// Edits moto's DescribeInstanceStatus answer: the items of instances
    /// with faults get failed checks and scheduled events. Only running
    /// instances are edited: moto reports the checks of others as
    /// `not-applicable`, as EC2 does, and so they stay.
    async fn rewrite_instance_status(&self, resp: hyper::Response<Full<Bytes>>) -> hyper::Response<Full<Bytes>> {
        {
            let state = self.lock();
            if state.system_impaired.is_empty() && state.instance_impaired.is_empty() && state.events.is_empty() && state.states.is_empty()
            {
                return resp;
            }
        }
        edit_xml(resp, |doc, edits| {
            // Locked only while editing (no await in here).
            let state = self.lock();
            let text = doc.input_text();
            let set = doc.descendants().find(|n| n.has_tag_name("instanceStatusSet"))?;
            for item in set.children().filter(|n| n.has_tag_name("item")) {
                let Some(id) = child(item, "instanceId").and_then(|n| n.text()) else { continue };
                let running = child(item, "instanceState").and_then(|s| child(s, "name")).and_then(|n| n.text()) == Some("running");
                if !running {
                    continue;
                }
                if let Some(name) = state.states.get(id) {
                    if let Some(n) = child(item, "instanceState").and_then(|s| child(s, "name")) {
                        edits.push((n.range(), format!("<name>{}</name>", escape(name))));
                    }
                    continue;
                }
                for (tag, impaired) in [("systemStatus", &state.system_impaired), ("instanceStatus", &state.instance_impaired)] {
                    let Some(since) = impaired.get(id) else { continue };
                    let failed = format!(
                        "<{tag}><status>impaired</status><details><item><name>reachability</name><status>failed</status><impairedSince>{since}</impairedSince></item></details></{tag}>"
                    );
                    match child(item, tag) {
                        Some(old) => edits.push((old.range(), failed)),
                        None => edits.push(append_children(text, item, &failed)),
                    }
                }
                let Some(events) = state.events.get(id).filter(|e| !e.is_empty()) else { continue };
                let items: String = events
                    .iter()
                    .map(|e| {
                        format!(
                            "<item><instanceEventId>{}</instanceEventId><code>{}</code><description>{}</description><notBefore>{}</notBefore></item>",
                            escape(&e.id),
                            escape(&e.code),
                            escape(describe_event(&e.code)),
                            e.not_before
                        )
                    })
                    .collect();
                match child(item, "eventsSet") {
                    Some(set) => edits.push(append_children(text, set, &items)),
                    None => edits.push(append_children(text, item, &format!("<eventsSet>{items}</eventsSet>"))),
                }
            }
            Some(())
        })
        .await
    }
}

/// What EC2 says about a scheduled event of that code.
fn describe_event(code: &str) -> &'static str {
    match code {
        "instance-retirement" | "instance-stop" => "The instance is running on degraded hardware",
        "system-reboot" | "instance-reboot" => "scheduled reboot",
        "system-maintenance" => "scheduled maintenance",
        _ => "scheduled event",
    }
}

/// A replacement of bytes of the original XML text (an empty range
/// inserts).
type Edit = (Range<usize>, String);

/// Applies `edit` to the body of a successful XML answer: `edit` looks at
/// the parsed document and lists byte-range edits of its text, which are
/// spliced in; the rest of the answer stays byte for byte as moto wrote it
/// (Content-Length follows the new size). An answer that is not a 200, not
/// XML, or that `edit` gives up on (`None`) is returned unchanged.
async fn edit_xml<F>(resp: hyper::Response<Full<Bytes>>, edit: F) -> hyper::Response<Full<Bytes>>
where
    F: FnOnce(&roxmltree::Document<'_>, &mut Vec<Edit>) -> Option<()>,
{
    if resp.status() != 200 {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let edited = std::str::from_utf8(&bytes).ok().and_then(|text| {
        let doc = roxmltree::Document::parse(text).ok()?;
        let mut edits = Vec::new();
        edit(&doc, &mut edits)?;
        // From the end backwards, so that earlier ranges keep their offsets.
        edits.sort_by_key(|e| std::cmp::Reverse((e.0.start, e.0.end)));
        let mut out = text.to_owned();
        for (range, with) in edits {
            out.replace_range(range, &with);
        }
        Some(Bytes::from(out))
    });
    let Some(out) = edited else { return hyper::Response::from_parts(parts, Full::new(bytes)) };
    parts.headers.insert(hyper::header::CONTENT_LENGTH, out.len().into());
    hyper::Response::from_parts(parts, Full::new(out))
}

/// An edit adding `xml` as the last children of element `node`.
fn append_children(text: &str, node: roxmltree::Node<'_, '_>, xml: &str) -> Edit {
    let range = node.range();
    let source = &text[range.clone()];
    if source.ends_with("/>") {
        // `<name/>`: written out anew with the children.
        let name = node.tag_name().name();
        return (range, format!("<{name}>{xml}</{name}>"));
    }
    // Just before the end tag, the last thing in the element's text.
    let end_tag = source.rfind("</").map(|i| range.start + i).unwrap_or(range.end);
    (end_tag..end_tag, xml.to_owned())
}

/// The first child element of `node` named `name`.
fn child<'a, 'i>(node: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    node.children().find(|n| n.has_tag_name(name))
}

/// An EC2 timestamp (`2026-12-03T01:09:17.000Z`), `from_now` ahead.
fn timestamp(from_now: time::Duration) -> String {
    let at = time::OffsetDateTime::now_utc() + from_now;
    at.format(time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].000Z")).expect("a UTC date formats")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn xml_response(status: u16, body: String) -> hyper::Response<Full<Bytes>> {
    hyper::Response::builder()
        .status(status)
        .header("content-type", "text/xml")
        .body(Full::new(Bytes::from(body)))
        .expect("static response")
}
