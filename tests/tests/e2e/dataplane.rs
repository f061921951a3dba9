//! The simulated data plane in front of moto: an adopted machine runs a
//! real agent; CreateImage keeps a point-in-time copy of its disk; a
//! RunInstances of that AMI boots a new machine from a copy with its own
//! IMDS (moto's instance id and IPs); StopInstances stops it; a host loss
//! kills it without EC2 knowing; a stock AMI boots nothing.

use std::time::Duration;

use dr_tests::fake_control_plane::FakeControlPlane;
use dr_tests::*;

const BOOT_DELAY: Duration = Duration::from_millis(300);

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

async fn instance_state(ec2: &aws_sdk_ec2::Client, id: &str) -> String {
    let out = ec2.describe_instances().instance_ids(id).send().await.expect("DescribeInstances");
    let i = &out.reservations()[0].instances()[0];
    i.state().and_then(|s| s.name()).map(|n| n.as_str().to_owned()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn images_and_launches_run_real_agents_on_point_in_time_disks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let moto = Moto::start(dir.path());
    let pki = Pki::new(dir.path());
    let mut cp = FakeControlPlane::start(&pki).await;
    let dp = DataPlane::start(&dir.path().join("dataplane"), &moto.url, BOOT_DELAY);
    let ec2 = ec2_client(&dp.url, REGION);
    let primary = launch_instance(&moto.client().await).await;
    let disk = site_disk(&dir.path().join("primary"), &pki, "prod-1", &cp.url, &primary, "");

    // Bad disks are refused, naming what is wrong; nothing becomes known.
    let missing = dir.path().join("no-such-disk");
    let err = dp.adopt(&primary.id, &missing).await.expect_err("a missing disk is refused");
    assert_eq!(err.status, 400, "{err:?}");
    assert!(err.message.contains(&missing.display().to_string()) && err.message.contains("does not exist"), "{err:?}");
    let bare = services_machine_root(&dir.path().join("bare"), &primary.private_ip, "54.1.2.3");
    let err = dp.adopt(&primary.id, &bare).await.expect_err("a disk without agent config is refused");
    assert_eq!(err.status, 400, "{err:?}");
    assert!(err.message.contains("etc/dr-agent/agent.toml.in"), "{err:?}");
    let err = dp.adopt("i-00000000000000dea", &disk).await.expect_err("an instance moto does not know");
    assert_eq!(err.status, 404, "{err:?}");
    assert!(err.message.contains("i-00000000000000dea"), "{err:?}");
    assert!(dp.machines().await.is_empty());

    // The adopted primary boots now, its agent saying who it is.
    let adopted = dp.adopt(&primary.id, &disk).await.expect("adopt the primary");
    assert!(adopted.running && adopted.image_id.is_none() && adopted.disk == disk, "{adopted:?}");
    let mut first = cp.next_session().await;
    assert_eq!(first.hello.site_id, "prod-1");
    let facts = first.hello.facts.clone().expect("facts");
    assert_eq!((facts.instance_id.as_str(), facts.private_ip.as_str()), (primary.id.as_str(), primary.private_ip.as_str()));

    // CreateImage keeps the disk as it was at that moment.
    let ami = ec2
        .create_image()
        .instance_id(&primary.id)
        .name("dataplane-test")
        .no_reboot(true)
        .send()
        .await
        .expect("CreateImage through the data plane")
        .image_id()
        .expect("image id")
        .to_owned();
    std::fs::write(disk.join("var/lib/dr-sim/after-backup.txt"), "written after the image").expect("write");
    // A CreateImage that EC2 refuses keeps nothing.
    ec2.create_image().instance_id(&primary.id).name("dry").dry_run(true).send().await.expect_err("a dry run fails");
    let images = dp.images().await;
    assert_eq!(images.len(), 1, "{images:?}");
    let kept: Vec<_> = std::fs::read_dir(dp.dir.join("images")).expect("images dir").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(kept, [std::ffi::OsString::from(&ami)], "no half-made snapshot is left");
    let image_disk = images.get(&ami).unwrap_or_else(|| panic!("no disk for {ami}: {images:?}\n{}", dp.log()));
    assert!(read(&image_disk.join("etc/default/replicated")).contains(&format!("PRIVATE_ADDRESS={}", primary.private_ip)));
    assert!(image_disk.join("opt/nomad/server/raft/raft.db").exists());
    assert!(!image_disk.join("var/lib/dr-sim/after-backup.txt").exists(), "the image is a point-in-time copy");

    // A launch from the AMI boots a new machine from a copy of that disk.
    let out = ec2.run_instances().image_id(&ami).min_count(1).max_count(1).send().await.expect("RunInstances");
    let launched = &out.instances()[0];
    let new_id = launched.instance_id().expect("id").to_owned();
    let new_private = launched.private_ip_address().expect("private ip").to_owned();
    assert_ne!(new_id, primary.id);
    let mut second = cp.next_session().await;
    let facts = second.hello.facts.clone().expect("facts");
    assert_eq!(facts.instance_id, new_id, "the restored agent reports its new instance");
    assert_eq!(facts.private_ip, new_private, "and moto's private IP for it");
    assert_eq!(Some(facts.public_ip.as_str()).filter(|p| !p.is_empty()), launched.public_ip_address());
    let machine = dp.machine(&new_id).await.expect("the launched machine is known");
    assert!(machine.running && machine.boots == 1 && machine.image_id.as_deref() == Some(ami.as_str()), "{machine:?}");
    assert_eq!(machine.disk, dp.dir.join("machines").join(&new_id).join("disk"));
    assert_ne!(machine.disk, *image_disk, "the machine runs on its own copy");
    let replicated = read(&machine.disk.join("etc/default/replicated-operator"));
    assert!(replicated.contains(&format!("PRIVATE_ADDRESS={}", primary.private_ip)), "old IPs until rewritten: {replicated}");
    assert!(!machine.disk.join("var/lib/dr-sim/after-backup.txt").exists());
    let config = read(&machine.disk.join("etc/dr-agent/agent.toml"));
    assert!(config.contains(&format!("root = \"{}\"", machine.disk.display())), "{config}");
    assert!(config.contains(machine.imds_url.as_deref().expect("imds url")), "{config}");

    // An Elastic IP moved onto it shows in its IMDS, as on EC2.
    let eip = ec2.allocate_address().send().await.expect("AllocateAddress");
    let eip_ip = eip.public_ip().expect("public ip").to_owned();
    ec2.associate_address()
        .instance_id(&new_id)
        .allocation_id(eip.allocation_id().expect("allocation"))
        .send()
        .await
        .expect("AssociateAddress");
    let imds = dr_agent::sys::imds::ImdsClient::new(machine.imds_url.as_deref().expect("imds url"), Duration::from_secs(2)).expect("imds");
    let mut seen = None;
    for _ in 0..50 {
        if let Ok(token) = imds.token().await {
            seen = imds.meta_data(&token, "public-ipv4").await.ok().flatten();
            if seen.as_deref() == Some(eip_ip.as_str()) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen.as_deref(), Some(eip_ip.as_str()), "IMDS public-ipv4 after AssociateAddress\n{}", dp.log());
    let moved = dp.machine(&new_id).await.expect("known");
    assert!(moved.running && moved.public_ip.as_deref() == Some(eip_ip.as_str()), "{moved:?}");
    assert_ne!(moved.imds_pid, machine.imds_pid, "a new IMDS process on the same port");

    // StopInstances stops it; the primary runs on.
    ec2.stop_instances().instance_ids(&new_id).send().await.expect("StopInstances");
    assert!(second.ends_within(Duration::from_secs(10)).await, "the stopped machine's session ends\n{}", dp.machine_log(&new_id));
    assert_eventually!(
        Duration::from_secs(5),
        dp.machine(&new_id).await.is_some_and(|m| !m.running && m.state == "stopped"),
        "the data plane says stopped: {:?}",
        dp.machine(&new_id).await
    );
    assert!(dp.machine(&primary.id).await.expect("known").running);

    // StartInstances boots the same disk again.
    assert_eventually!(Duration::from_secs(10), instance_state(&ec2, &new_id).await == "stopped", "moto says stopped");
    ec2.start_instances().instance_ids(&new_id).send().await.expect("StartInstances");
    let mut third = cp.next_session().await;
    assert_eq!(third.hello.facts.as_ref().expect("facts").instance_id, new_id);
    let restarted = dp.machine(&new_id).await.expect("known");
    assert!(restarted.running && restarted.boots == 2 && restarted.disk == machine.disk, "{restarted:?}");
    ec2.terminate_instances().instance_ids(&new_id).send().await.expect("TerminateInstances");
    assert!(third.ends_within(Duration::from_secs(10)).await, "the terminated machine's session ends");
    assert_eventually!(
        Duration::from_secs(5),
        dp.machine(&new_id).await.is_some_and(|m| !m.running && m.state == "terminated"),
        "the data plane says terminated: {:?}",
        dp.machine(&new_id).await
    );

    // A copy in another region shares the disk; a launch there boots with
    // that region's instance facts.
    let west = ec2_client(&dp.url, "us-west-2");
    let copy = west
        .copy_image()
        .source_image_id(&ami)
        .source_region(REGION)
        .name("dataplane-test-dr")
        .send()
        .await
        .expect("CopyImage")
        .image_id()
        .expect("copy id")
        .to_owned();
    assert_eq!(dp.images().await.get(&copy), Some(image_disk));
    let out = west.run_instances().image_id(&copy).min_count(1).max_count(1).send().await.expect("RunInstances in us-west-2");
    let west_id = out.instances()[0].instance_id().expect("id").to_owned();
    let mut fourth = cp.next_session().await;
    let facts = fourth.hello.facts.clone().expect("facts");
    assert_eq!(facts.instance_id, west_id);
    assert_eq!(Some(facts.private_ip.as_str()), out.instances()[0].private_ip_address());
    let west_machine = dp.machine(&west_id).await.expect("known");
    assert_eq!(west_machine.region, "us-west-2");
    west.stop_instances().instance_ids(&west_id).send().await.expect("StopInstances in us-west-2");
    assert!(fourth.ends_within(Duration::from_secs(10)).await, "the west machine's session ends");

    // A stock AMI has no disk: nothing boots.
    let stock = launch_instance(&ec2).await;
    assert_quiet_for!(
        BOOT_DELAY * 4,
        dp.machine(&stock.id).await.is_some() || cp.sessions.try_recv().is_ok(),
        "a machine or an agent came up for a stock AMI"
    );

    // A lost host dies without EC2 knowing.
    let lost = dp.lose(&primary.id).await;
    assert!(!lost.running && lost.state == "lost", "{lost:?}");
    assert!(first.ends_within(Duration::from_secs(5)).await, "the lost machine's session ends");
    assert_eq!(instance_state(&ec2, &primary.id).await, "running", "EC2 was not told");

    // DeregisterImage forgets the image's disk once no copy shares it; the
    // launched machines keep theirs.
    ec2.deregister_image().image_id(&ami).send().await.expect("DeregisterImage");
    assert!(!dp.images().await.contains_key(&ami));
    assert!(image_disk.exists(), "the DR copy still uses it");
    west.deregister_image().image_id(&copy).send().await.expect("DeregisterImage of the copy");
    assert!(dp.images().await.is_empty());
    assert!(!image_disk.exists());
    assert!(machine.disk.join("etc/default/replicated").exists());
}

/// Dead, or a zombie nobody reaps (the process no longer runs).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn machines_die_with_the_data_plane_on_sigterm_and_on_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let moto = Moto::start(dir.path());
    let pki = Pki::new(dir.path());
    let mut cp = FakeControlPlane::start(&pki).await;
    let primary = launch_instance(&moto.client().await).await;
    let disk = site_disk(&dir.path().join("primary"), &pki, "prod-1", &cp.url, &primary, "");

    for signal in ["SIGTERM", "SIGKILL"] {
        let mut dp = DataPlane::start(&dir.path().join(format!("dataplane-{signal}")), &moto.url, BOOT_DELAY);
        let m = dp.adopt(&primary.id, &disk).await.expect("adopt");
        let (agent, imds) = (m.agent_pid.expect("agent pid"), m.imds_pid.expect("imds pid"));
        let mut session = cp.next_session().await;
        assert!(!gone(agent) && !gone(imds));
        if signal == "SIGTERM" {
            let status = dp.proc.terminate(Duration::from_secs(10)).expect("the data plane exits on SIGTERM");
            assert!(status.success(), "{status:?}\n{}", dp.log());
        } else {
            dp.proc.kill();
        }
        assert!(session.ends_within(Duration::from_secs(10)).await, "{signal}: the agent's session ends");
        assert_eventually!(Duration::from_secs(5), gone(agent) && gone(imds), "{signal}: agent {agent} and IMDS {imds} are gone");
    }
}
