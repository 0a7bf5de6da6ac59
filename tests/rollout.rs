//! Staged rollouts end to end: the plan lives in the raft store (it
//! survives a leader change, and compare-and-set keeps writers apart);
//! gateways send each user to the canary or the stable routers by the
//! plan's sticky hash; routers judge the canary from the gateways' reports
//! and roll a bad one back by themselves.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use chat_rollout::{Plan, StartArgs, State, Thresholds};
use chat_router::rollout::Faults;
use chat_store::StoreError;
use chat_store::testkit::{Cluster, ClusterOptions};
use chat_tests::stack::Stack;
use chatctl::plan;

fn args(steps: Vec<u32>, interval_ms: u64) -> StartArgs {
    StartArgs {
        id: format!("test-{}", plan::now_ms()),
        service: "router".into(),
        canary: "canary".into(),
        steps,
        interval_ms,
        thresholds: Thresholds {
            min_requests: 5,
            ..chat_rollout::default_thresholds()
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_survives_a_store_leader_change_and_writers_never_overwrite_each_other()
-> anyhow::Result<()> {
    let mut store = Cluster::start(3, ClusterOptions::default()).await?;
    let leader = store.wait_leader(Duration::from_secs(15)).await?;
    let client = store.client();
    let started = plan::update(&client, "router", |current| {
        chat_rollout::start(args(vec![10, 100], 30_000), current, plan::now_ms())
    })
    .await?;

    store.kill(leader).await;
    let new_leader = store.wait_leader(Duration::from_secs(15)).await?;
    assert_ne!(new_leader, leader);
    let (revision, read) = plan::read(&client, "router")
        .await?
        .expect("the plan is stored");
    assert_eq!(read, started, "the plan as written, from the new leader");

    // A second rollout cannot start over a running one.
    let err = plan::update(&client, "router", |current| {
        chat_rollout::start(args(vec![50, 100], 30_000), current, plan::now_ms())
    })
    .await
    .expect_err("one rollout at a time");
    assert!(
        err.to_string().contains("abort or promote it first"),
        "{err}"
    );

    // A write based on an old revision is refused and changes nothing.
    let key = chat_rollout::plan_key("router");
    let stale = client
        .put_setting(&key, b"stale".to_vec(), Some(revision - 1))
        .await
        .expect_err("stale revision");
    assert!(matches!(stale, StoreError::Conflict(_)), "{stale:?}");
    let paused = plan::update(&client, "router", |current| {
        chat_rollout::command(
            current.expect("stored"),
            chat_rollout::Command::Pause,
            0,
            "test",
        )
    })
    .await?;
    assert_eq!(paused.state(), State::Paused);
    let (_, read) = plan::read(&client, "router").await?.expect("stored");
    assert_eq!(read.state(), State::Paused);

    // Bad settings are refused with a clear error.
    let bad = client
        .put_setting("rollout/ router", Vec::new(), None)
        .await
        .expect_err("a key with a space");
    assert!(matches!(bad, StoreError::InvalidArgument(_)), "{bad:?}");
    let big = client
        .put_setting("big", vec![0; 65 * 1024], None)
        .await
        .expect_err("too large");
    assert!(big.to_string().contains("limit"), "{big}");
    store.stop_all().await;
    Ok(())
}

/// Sends one message per user, all at once; returns who failed and how.
async fn round(stack: &Stack, users: &[String], k: usize) -> HashMap<String, tonic::Code> {
    let mut set = tokio::task::JoinSet::new();
    for u in users {
        let (c, u) = (stack.client(u), u.clone());
        set.spawn(async move {
            let r = c
                .send(&format!("c-{u}"), &format!("m{k}"), b"hi".to_vec())
                .await;
            (u, r.err().map(|s| s.code()))
        });
    }
    let mut failed = HashMap::new();
    while let Some(joined) = set.join_next().await {
        if let Ok((u, Some(code))) = joined {
            failed.insert(u, code);
        }
    }
    failed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_canary_reaches_only_its_users_and_is_rolled_back_by_itself() -> anyhow::Result<()> {
    let canary = Faults {
        error_rate: 1.0,
        latency: Duration::ZERO,
    };
    let mut stack = Stack::start_with(vec![("canary".into(), canary)]).await?;
    let users: Vec<String> = (0..30).map(|i| format!("user-{i}")).collect();
    for u in &users {
        stack
            .client(u)
            .create_conversation(&format!("c-{u}"), &[])
            .await?;
    }
    let client = stack.store.client();
    let started: Plan = plan::update(&client, "router", |current| {
        chat_rollout::start(args(vec![50, 100], 1_000), current, plan::now_ms())
    })
    .await?;
    let on_canary: BTreeSet<String> = users
        .iter()
        .filter(|u| chat_rollout::is_canary(&started, u))
        .cloned()
        .collect();
    assert!(
        !on_canary.is_empty() && on_canary.len() < users.len(),
        "half the users, roughly: {on_canary:?}"
    );
    stack.start_pending().await?;

    // Traffic until the plan is aborted and every user gets through again.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut failed_users = BTreeSet::new();
    let mut k = 0;
    let final_plan = loop {
        anyhow::ensure!(
            Instant::now() < deadline,
            "not rolled back within 60 s; users with errors: {failed_users:?}"
        );
        k += 1;
        let failures = round(&stack, &users, k).await;
        for (u, code) in &failures {
            assert_eq!(*code, tonic::Code::Internal, "{u}: {code:?}");
            failed_users.insert(u.clone());
        }
        let (_, p) = plan::read(&client, "router").await?.expect("stored");
        if p.state() == State::Aborted && failures.is_empty() {
            break p;
        }
    };
    assert!(
        !failed_users.is_empty(),
        "the canary got traffic (its errors show it)"
    );
    let outside: Vec<&String> = failed_users.difference(&on_canary).collect();
    assert!(
        outside.is_empty(),
        "errors reached stable users: {outside:?}"
    );
    assert_eq!(final_plan.weight, 0);
    let abort = final_plan
        .decisions
        .iter()
        .find(|d| d.action == "abort")
        .expect("an abort decision");
    assert!(abort.reason.contains("success"), "{}", abort.reason);
    stack.stop().await;
    Ok(())
}
