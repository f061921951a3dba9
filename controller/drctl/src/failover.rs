//! `drctl failover` / `drctl restore`: the plan shown to a human (or as
//! JSON), the confirmation, and the RTO report of a finished failover.

use std::io::{BufRead, IsTerminal, Write};

use serde_json::Value;

use crate::error::CliError;
use crate::views::{human_duration, rfc3339};

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or("")
}

fn or_none(x: &str) -> &str {
    if x.is_empty() { "(none)" } else { x }
}

/// The plan, for a human.
pub fn print_plan(plan: &Value) {
    let b = &plan["backup"];
    let f = &plan["fence"];
    let l = &plan["launch"];
    let age = b["age_ms"].as_u64().unwrap_or(0);
    let drill = s(plan, "kind") == "drill";
    let kind = match s(plan, "kind") {
        "restore" => "Restore",
        "failback" => "Failback",
        "drill" => "Drill",
        _ => "Failover",
    };
    println!("{kind} plan for site {}", s(plan, "site_id"));
    println!(
        "  backup:     {} taken {} ({} ago: the data loss you accept), {}-consistent",
        s(b, "image_id"),
        rfc3339(b["started_at_ms"].as_u64().unwrap_or(0)).unwrap_or_default(),
        human_duration(age),
        s(b, "consistency")
    );
    if !s(b, "agent_cert").is_empty() {
        println!("  agent cert: {}", s(b, "agent_cert"));
    }
    let spare = plan["spare"].as_object().map(|_| &plan["spare"]);
    if let Some(sp) = spare {
        println!(
            "  hot spare:  {} ({} now): no launch, no disk hydration; its data is {} older than the newest backup {}",
            s(sp, "instance_id"),
            s(sp, "state"),
            human_duration(sp["lag_ms"].as_u64().unwrap_or(0)),
            s(sp, "newest_backup_image_id")
        );
    } else if s(b, "launch_image_id") != s(b, "image_id") {
        println!("              launched from its copy {} in {}", s(b, "launch_image_id"), s(l, "region"));
    }
    if drill {
        println!("  production: untouched (no fence, no Elastic IP or DNS move, no promotion); the copy is torn down at the end");
    } else {
        println!("  fence:      {} {} (now {})", f["mode"].as_str().unwrap_or(""), or_none(s(f, "instance_id")), s(f, "state"));
    }
    if let Some(v) = f["keeps_volumes"].as_array().filter(|v| !v.is_empty()) {
        println!("              volumes kept: {}", v.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", "));
    }
    if spare.is_some() {
        // The launch settings below are not used: the spare is started.
        println!("  (the launch settings below apply only if the spare is not used: drctl failover --fresh)");
    }
    let sources = &l["sources"];
    let src = |k: &str| sources[k].as_str().map(|x| format!(" [{x}]")).unwrap_or_default();
    println!("  launch in:  {}", s(l, "region"));
    println!("    type              {}{}", s(l, "instance_type"), src("instance_type"));
    println!("    subnet            {}{}", or_none(s(l, "subnet_id")), src("subnet_id"));
    println!(
        "    private IP        {}",
        if s(l, "private_ip").is_empty() { "new (from the subnet)".to_owned() } else { format!("{} (kept)", s(l, "private_ip")) }
    );
    let sgs: Vec<&str> = l["security_group_ids"].as_array().map(|a| a.iter().filter_map(|x| x.as_str()).collect()).unwrap_or_default();
    println!("    security groups   {}{}", or_none(&sgs.join(", ")), src("security_group_ids"));
    println!("    instance profile  {}{}", or_none(s(l, "iam_instance_profile")), src("iam_instance_profile"));
    println!("    key pair          {}{}", or_none(s(l, "key_name")), src("key_name"));
    println!("  Replicated files:");
    match plan["addresses"].as_array().filter(|a| !a.is_empty()) {
        Some(a) => a.iter().for_each(|c| println!("    {:<8} {} -> {}", s(c, "kind"), s(c, "old"), s(c, "new"))),
        None => println!("    no address changes"),
    }
    if !s(plan, "hostname").is_empty() {
        println!("  hostname:   set to {}", s(plan, "hostname"));
    }
    match plan["eip"].as_object() {
        None if drill => {}
        Some(_) => {
            println!("  Elastic IP: {} ({}): {}", s(&plan["eip"], "public_ip"), s(&plan["eip"], "allocation_id"), s(&plan["eip"], "note"))
        }
        None => println!("  Elastic IP: none recorded"),
    }
    match plan["dns"].as_object() {
        None if drill => {}
        Some(_) => println!(
            "  DNS:        UPSERT {} A <new address> (ttl {}) in zone {}",
            s(&plan["dns"], "name"),
            plan["dns"]["ttl"],
            s(&plan["dns"], "zone_id")
        ),
        None => println!("  DNS:        no record configured"),
    }
    println!(
        "  builds:     running builds that started before {} are deleted on the {}",
        rfc3339(plan["cleanup_builds_before_ms"].as_u64().unwrap_or(0)).unwrap_or_default(),
        if drill { "drill copy (its own data only)" } else { "restored machine" }
    );
    print_actions(&plan["human_actions"], "  still for a human afterwards:");
    for w in plan["warnings"].as_array().into_iter().flatten() {
        println!("  warning: {}", w.as_str().unwrap_or(""));
    }
}

fn print_actions(actions: &Value, title: &str) {
    if let Some(a) = actions.as_array().filter(|a| !a.is_empty()) {
        println!("{title}");
        for h in a {
            println!("    - [{}] {}", s(h, "kind"), s(h, "message"));
        }
    }
}

/// A finished failover's report, for a human.
pub fn print_report(report: &Value) {
    println!("  result:       {}", s(report, "site_state"));
    let rto = report["rto_ms"].as_u64().unwrap_or(0);
    if rto > 0 {
        println!(
            "  RTO:          {:.1} s (operation start to app started), data loss (RPO) {}",
            rto as f64 / 1000.0,
            human_duration(report["rpo_ms"].as_u64().unwrap_or(0))
        );
        if let Some(p) = report["phases"].as_object() {
            for k in ["fence", "launch_to_running", "agent_up", "app_stop", "file_steps", "app_start", "address_moves", "cleanup"] {
                if let Some(ms) = p.get(k).and_then(|v| v.as_u64()) {
                    println!("    {k:<18} {:>7.1} s", ms as f64 / 1000.0);
                }
            }
        }
    }
    print_actions(&report["human_actions"], "  for a human now:");
}

/// Asks a human at a terminal to type the site id. Scripts pass `--yes`
/// (`-o json` alone never confirms).
pub fn confirm(site: &str, what: &str) -> Result<(), CliError> {
    if !std::io::stdin().is_terminal() {
        return Err(CliError::Usage(format!(
            "{what} of {site} needs a confirmation: stdin is not a terminal, so pass --yes (after reading the plan: --plan)"
        )));
    }
    print!("Type the site id ({site}) to start the {what}, anything else to cancel: ");
    std::io::stdout().flush().ok();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).map_err(|e| CliError::Usage(format!("cannot read the confirmation: {e}")))?;
    if line.trim() != site {
        return Err(CliError::Usage(format!("{what} of {site} cancelled: nothing was changed")));
    }
    Ok(())
}
