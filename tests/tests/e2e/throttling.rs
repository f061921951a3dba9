//! EC2 throttling never surfaces as a failed backup: a proxy in front of
//! moto answers a share of requests with RequestLimitExceeded.

use std::time::Duration;

use dr_tests::*;

#[tokio::test(flavor = "multi_thread")]
async fn throttled_calls_are_absorbed_and_every_backup_completes_once() {
    let fleet = Fleet::start(8, 0.3, "").await;
    let ids = fleet.backup_all().await;
    let ops = fleet.wait_all(&ids, Duration::from_secs(120)).await;
    for op in &ops {
        assert_eq!(op.state, "succeeded", "{op:?}\n{}", fleet.controller.log());
    }
    let throttled = fleet.proxy.stats.throttled.load(std::sync::atomic::Ordering::Relaxed);
    assert!(throttled > 0, "the proxy throttled something");
    let ec2 = fleet.moto.client().await;
    for id in &ids {
        assert_eq!(images_tagged(&ec2, "dr:operation", id).await.len(), 1, "one AMI for {id}");
    }
    // Every AMI was created exactly once, however often EC2 said "slow down".
    assert_eq!(images_tagged(&ec2, "dr:created-by", "dr-controller").await.len(), ids.len());
    assert!(fleet.controller.log().contains("EC2 call will be retried"));
}
