//! A cluster of `kstore-node` processes against a real broker: gossip membership, one
//! cluster-wide view that every node serves, standby placement that follows joins, leaves
//! and kills, and standbys kept current by the state updater until they equal their actives.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::{Layout, Node, Scenario, expected_features, run_async, wait_for_agreement};
use kstore_cli::generator::{GeneratorConfig, OrderGenerator};
use kstore_core::orders::OrderEvent;
use kstore_core::partitioner::partition_for_key;
use kstore_proto::v1::{
    CustomerFeatures, GetRequest, Liveness, MetadataRequest, Role, get_response,
};
use prost::Message as _;

const PARTITIONS: u32 = 12;

/// Waits until `node`'s view says `about` is suspect or dead, and returns how long that took.
async fn wait_until_not_live(node: &mut Node, about: &str, timeout: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let metadata = node.metadata().await?;
        let live = metadata
            .nodes
            .iter()
            .any(|n| n.node_id == about && n.liveness() == Liveness::Live);
        if !live {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!("{} still sees {about} live after {timeout:?}", node.id);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn nodes_share_one_view_and_standbys_follow_joins_leaves_and_kills() -> Result<()> {
    run_async(async {
        let scenario = Scenario::new("cluster-view", PARTITIONS).await?;
        let mut node1 = Node::start(&scenario, "node-1", "only").await?;
        let mut node2 = Node::start(&scenario, "node-2", "only").await?;
        let mut node3 = Node::start(&scenario, "node-3", "only").await?;

        let three = ["node-1", "node-2", "node-3"];
        // Placement moves a copy only once a change has held for a second, so the first
        // complete layout the nodes agree on may still be on its way to the even spread.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let layout = wait_for_agreement(
                &mut [&mut node1, &mut node2, &mut node3],
                &three,
                Duration::from_secs(120),
            )
            .await?;
            let counts = layout.standbys_per_node();
            let (max, min) = (counts.values().max(), counts.values().min());
            if counts.len() == 3 && max.zip(min).is_some_and(|(max, min)| max - min <= 1) {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "standbys are not spread evenly: per node {counts:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // Every copy states its offsets and lag in every node's view.
        let metadata = node2.metadata().await?;
        ensure!(
            metadata.cluster_id == scenario.app,
            "{}",
            metadata.cluster_id
        );
        for node in &metadata.nodes {
            ensure!(
                !node.grpc_address.is_empty() && node.incarnation > 0,
                "{node:?}"
            );
            for copy in &node.copies {
                ensure!(
                    copy.lag >= 0 && copy.input_end == copy.input_offset + copy.lag,
                    "{copy:?}"
                );
            }
        }

        // A fourth node: the watch delivers a view with it, and it receives standbys.
        let mut watch = node1
            .client
            .watch_metadata(MetadataRequest {})
            .await?
            .into_inner();
        let first = watch.message().await?.context("the watch's first view")?;
        ensure!(first.nodes.len() == 3, "first view: {:?}", first.nodes);
        let mut node4 = Node::start(&scenario, "node-4", "only").await?;
        let joined = async {
            while let Some(view) = watch.message().await? {
                if view
                    .nodes
                    .iter()
                    .any(|n| n.node_id == "node-4" && n.liveness() == Liveness::Live)
                {
                    return anyhow::Ok(view.view_version);
                }
            }
            bail!("the watch ended")
        };
        let version = tokio::time::timeout(Duration::from_secs(60), joined)
            .await
            .context("a view with node-4 from the watch")??;
        ensure!(version > first.view_version, "view versions increase");

        let four = ["node-1", "node-2", "node-3", "node-4"];
        let layout = wait_for_agreement(
            &mut [&mut node1, &mut node2, &mut node3, &mut node4],
            &four,
            Duration::from_secs(120),
        )
        .await?;
        ensure!(
            layout
                .standbys_per_node()
                .get("node-4")
                .copied()
                .unwrap_or(0)
                > 0,
            "node-4 holds no standby: {layout:?}"
        );

        // It leaves: its standbys are placed on the others again.
        let status = node4.process.terminate(Duration::from_secs(60))?;
        ensure!(status.success(), "node-4 exit: {status}");
        wait_for_agreement(
            &mut [&mut node1, &mut node2, &mut node3],
            &three,
            Duration::from_secs(120),
        )
        .await?;

        // kill -9: the others stop seeing node-3 as live within seconds.
        node3.process.kill9()?;
        let killed = Instant::now();
        let seen_by_1 = wait_until_not_live(&mut node1, "node-3", Duration::from_secs(30)).await?;
        let seen_by_2 = wait_until_not_live(&mut node2, "node-3", Duration::from_secs(30)).await?;
        eprintln!(
            "kill -9 of node-3: node-1 saw it suspect after {seen_by_1:?}, node-2 after {:?}",
            killed.elapsed().max(seen_by_2)
        );
        for node in [&mut node1, &mut node2] {
            let status = node.process.terminate(Duration::from_secs(60))?;
            ensure!(status.success(), "{} exit: {status}", node.id);
        }
        Ok(())
    })
}

#[test]
fn standbys_converge_to_their_actives_and_both_equal_the_recomputed_state() -> Result<()> {
    run_async(async {
        let scenario = Scenario::new("cluster-standby", PARTITIONS).await?;
        let generator = GeneratorConfig {
            customers: 3_000,
            seed: 21,
            ..GeneratorConfig::default()
        };
        let count = 40_000u64;
        let events: Vec<OrderEvent> = OrderGenerator::new(generator.clone())
            .take(count as usize)
            .collect();
        let mut nodes = Vec::new();
        for id in ["node-1", "node-2", "node-3"] {
            nodes.push(Node::start(&scenario, id, "only").await?);
        }
        let three = ["node-1", "node-2", "node-3"];
        {
            let mut refs: Vec<&mut Node> = nodes.iter_mut().collect();
            wait_for_agreement(&mut refs, &three, Duration::from_secs(120)).await?;
        }

        // Events flow while actives ingest and standbys follow.
        scenario.produce(&generator, count)?;
        scenario.wait_committed(Duration::from_secs(300), || Ok(()))?;

        // Every standby reaches its active's changelog position.
        let deadline = Instant::now() + Duration::from_secs(120);
        let layout = loop {
            let metadata = nodes[0].metadata().await?;
            let mut positions: BTreeMap<u32, Vec<(Role, i64)>> = BTreeMap::new();
            for node in &metadata.nodes {
                for copy in &node.copies {
                    positions
                        .entry(copy.partition)
                        .or_default()
                        .push((copy.role(), copy.changelog_offset));
                }
            }
            let converged = (0..PARTITIONS).all(|p| {
                let copies = positions.get(&p).cloned().unwrap_or_default();
                let active = copies.iter().find(|(r, _)| *r == Role::Active);
                active.is_some_and(|(_, offset)| {
                    *offset > 0 && copies.len() >= 2 && copies.iter().all(|(_, o)| o == offset)
                })
            });
            if converged {
                break Layout::of(&metadata);
            }
            if Instant::now() > deadline {
                bail!("standbys did not reach their actives: {positions:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };

        // Every key, read from the active's node and from the standby's node, is exactly
        // the recomputed state.
        let expected = expected_features(&events);
        let ids: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
        let index = |id: &str| ids.iter().position(|n| n == id).unwrap();
        let mut standby_reads = 0;
        for (customer, features) in &expected {
            let partition = partition_for_key(customer.as_bytes(), PARTITIONS);
            let active = &layout.actives[&partition][0];
            let standby = layout.standbys[&partition].first().context("a standby")?;
            for (holder, role) in [(active, Role::Active), (standby, Role::Standby)] {
                let node = &mut nodes[index(holder)];
                let answer = node
                    .client
                    .get(GetRequest {
                        store: "features".into(),
                        key: customer.as_bytes().to_vec(),
                        partition: None,
                        options: None,
                    })
                    .await?
                    .into_inner();
                let read = answer.read.context("read metadata")?;
                ensure!(
                    read.node_id == *holder && read.role() == role,
                    "{customer} from {holder}: {read:?}"
                );
                let Some(get_response::Value::Message(any)) = answer.value else {
                    bail!("{customer} not found on {holder} ({role:?})");
                };
                ensure!(
                    CustomerFeatures::decode(any.value.as_slice())? == *features,
                    "{customer}'s features on {holder} ({role:?})"
                );
                standby_reads += usize::from(role == Role::Standby);
            }
        }
        ensure!(standby_reads == expected.len());
        for node in &mut nodes {
            let status = node.process.terminate(Duration::from_secs(60))?;
            ensure!(status.success(), "{} exit: {status}", node.id);
        }
        Ok(())
    })
}

/// Starts a gossip member inside the test, as another process would be, with `node_id` in
/// `cluster_id`, joining through `seed`.
async fn fake_member(
    node_id: &str,
    cluster_id: &str,
    seed: &str,
) -> Result<chitchat::ChitchatHandle> {
    fake_member_with(node_id, cluster_id, seed, None).await
}

/// Like [`fake_member`], its datagrams authenticated with `secret`.
async fn fake_member_with(
    node_id: &str,
    cluster_id: &str,
    seed: &str,
    secret: Option<&str>,
) -> Result<chitchat::ChitchatHandle> {
    use chitchat::{ChitchatConfig, ChitchatId, FailureDetectorConfig, ProtocolVersion};
    use kstore_server::gossip::transport::BoundTransport;
    let (transport, address) = BoundTransport::bind("127.0.0.1:0".parse()?, secret).await?;
    let config = ChitchatConfig {
        chitchat_id: ChitchatId::new(node_id, 1, address),
        cluster_id: cluster_id.into(),
        gossip_interval: Duration::from_millis(100),
        listen_addr: address,
        seed_nodes: vec![seed.into()],
        failure_detector_config: FailureDetectorConfig {
            initial_interval: Duration::from_millis(100),
            ..FailureDetectorConfig::default()
        },
        marked_for_deletion_grace_period: Duration::from_secs(3600),
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: ProtocolVersion::V0,
    };
    let values = vec![
        ("grpc".to_owned(), "127.0.0.1:1".to_owned()),
        ("status".to_owned(), "running".to_owned()),
        // A value that does not decode: reported and counted, the member still shows.
        ("copies".to_owned(), "not:a:copy".to_owned()),
    ];
    chitchat::spawn_chitchat(config, values, &transport).await
}

/// Returns a counter's value from a node's Prometheus metrics (0 if absent).
fn counter(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn with_a_cluster_secret_only_members_that_know_it_join_snapshot_or_forward_and_forgeries_are_counted()
-> Result<()> {
    run_async(async {
        let secret = "0123456789abcdef0123456789abcdef-cluster";
        let mut scenario = Scenario::new("cluster-gossip-secret", 4).await?;
        scenario.extra.push("metrics-address=127.0.0.1:0".into());
        scenario.extra.push(format!("cluster-secret={secret}"));
        let mut node = Node::start(&scenario, "node-1", "only").await?;
        let gossip = scenario.wait_gossiping(&mut node.process)?;
        let metrics_address = scenario.metrics_address(&mut node.process)?;

        // A forger that names the cluster but has no secret, one with a wrong secret, and a
        // member with the right one.
        let forger = fake_member("node-8", &scenario.app, &gossip).await?;
        let wrong = fake_member_with(
            "node-9",
            &scenario.app,
            &gossip,
            Some("not-the-cluster-secret-0123456789abc"),
        )
        .await?;
        let member = fake_member_with("node-7", &scenario.app, &gossip, Some(secret)).await?;

        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let metadata = node.metadata().await?;
            let seen = |id: &str| metadata.nodes.iter().any(|n| n.node_id == id);
            let metrics = kstore_testkit::process::http_get(&metrics_address, "/metrics")?;
            let unauthenticated =
                counter(&metrics, "kstore_gossip_unauthenticated_datagrams_total");
            if seen("node-7") && unauthenticated >= 2.0 {
                // The forgers never got in, however long they tried.
                ensure!(!seen("node-8") && !seen("node-9"), "{metadata:?}");
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "after 60 s: member seen {}, forgers seen {} {}, unauthenticated {unauthenticated}",
                seen("node-7"),
                seen("node-8"),
                seen("node-9")
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        drop((forger, wrong, member));

        // Only nodes may fetch snapshots or send reads marked as forwarded.
        use kstore_proto::v1::FetchSnapshotRequest;
        use kstore_proto::v1::peer_client::PeerClient;
        use tonic_types::StatusExt;
        let refused = |status: &tonic::Status| {
            status.code() == tonic::Code::Unauthenticated
                && status
                    .get_details_error_info()
                    .is_some_and(|i| i.reason == "CLUSTER_SECRET_REQUIRED")
        };
        fn with_token<T>(token: Option<&str>, request: &mut tonic::Request<T>) {
            if let Some(token) = token {
                let value = format!("Bearer {token}").parse().unwrap();
                request.metadata_mut().insert("authorization", value);
            }
        }
        let uri = scenario.grpc_uri(&mut node.process)?;
        let mut peer = PeerClient::connect(uri).await?;
        for token in [None, Some("not-the-cluster-secret-0123456789abc")] {
            let mut fetch = tonic::Request::new(FetchSnapshotRequest {
                store: "features".into(),
                partition: 0,
            });
            with_token(token, &mut fetch);
            match peer.fetch_snapshot(fetch).await {
                Err(status) => ensure!(refused(&status), "snapshot with {token:?}: {status:?}"),
                Ok(_) => bail!("a snapshot was sent to a caller with {token:?}"),
            }
        }
        let forwarded = |token: Option<&str>| {
            let mut get = tonic::Request::new(GetRequest {
                store: "features".into(),
                key: b"c-1".to_vec(),
                ..Default::default()
            });
            get.metadata_mut()
                .insert("kstore-forwarded-from", "node-7".parse().unwrap());
            with_token(token, &mut get);
            get
        };
        let status = node.client.get(forwarded(None)).await.unwrap_err();
        ensure!(
            refused(&status),
            "forwarded read without the secret: {status:?}"
        );
        // With it, the read is the node's to answer (once it holds the key's partition).
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Err(status) = node.client.get(forwarded(Some(secret))).await {
            ensure!(!refused(&status), "refused with the secret: {status:?}");
            ensure!(Instant::now() < deadline, "after 60 s: {status:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        let status = node.process.terminate(Duration::from_secs(60))?;
        ensure!(status.success(), "exit: {status}");
        Ok(())
    })
}

#[test]
fn bad_gossip_is_dropped_and_counted_and_a_claimed_node_id_shows_as_conflicting() -> Result<()> {
    run_async(async {
        let mut scenario = Scenario::new("cluster-bad-gossip", 4).await?;
        scenario.extra.push("metrics-address=127.0.0.1:0".into());
        let mut node = Node::start(&scenario, "node-1", "only").await?;
        let gossip = scenario.wait_gossiping(&mut node.process)?;
        let metrics_address = scenario.metrics_address(&mut node.process)?;

        // Datagrams that are no gossip at all.
        let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
        for garbage in [&b""[..], b"\xff\xff\xff", &[7u8; 2_000]] {
            socket.send_to(garbage, &gossip)?;
        }
        // A member of another cluster, and a second process that claims node-1.
        let stranger = fake_member("node-9", "another-cluster", &gossip).await?;
        let impostor = fake_member("node-1", &scenario.app, &gossip).await?;

        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let metadata = node.metadata().await?;
            let claims: Vec<_> = metadata
                .nodes
                .iter()
                .filter(|n| n.node_id == "node-1")
                .collect();
            let conflicting = claims.len() == 2 && claims.iter().all(|n| n.conflicting);
            let stranger_unseen = metadata.nodes.iter().all(|n| n.node_id != "node-9");
            let metrics = kstore_testkit::process::http_get(&metrics_address, "/metrics")?;
            let bad = counter(&metrics, "kstore_gossip_bad_datagrams_total");
            let foreign = counter(&metrics, "kstore_gossip_foreign_cluster_messages_total");
            let bad_values = counter(&metrics, "kstore_gossip_bad_values_total");
            if conflicting && stranger_unseen && bad >= 3.0 && foreign >= 1.0 && bad_values >= 1.0 {
                break;
            }
            ensure!(
                stranger_unseen,
                "a member of another cluster joined the view"
            );
            if Instant::now() > deadline {
                bail!(
                    "claims {claims:?}; bad datagrams {bad}, foreign messages {foreign}, bad \
                     values {bad_values}"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        ensure!(
            node.process
                .output()
                .contains("two live processes claim this node id"),
            "the conflict is logged"
        );
        drop((stranger, impostor));
        let status = node.process.terminate(Duration::from_secs(60))?;
        ensure!(status.success(), "exit: {status}");
        Ok(())
    })
}

#[test]
fn reads_of_partitions_held_elsewhere_are_forwarded_once_or_answered_with_the_holders() -> Result<()>
{
    use kstore_proto::v1::{ErrorReason, MultiGetRequest, ReadOptions};
    use kstore_server::grpc::error::partition_holders;
    use kstore_server::grpc::forward::FORWARDED_FROM;
    use tonic_types::StatusExt;

    run_async(async {
        let scenario = Scenario::new("cluster-forward", PARTITIONS).await?;
        let generator = GeneratorConfig {
            customers: 500,
            seed: 5,
            ..GeneratorConfig::default()
        };
        let count = 5_000u64;
        let events: Vec<OrderEvent> = OrderGenerator::new(generator.clone())
            .take(count as usize)
            .collect();
        scenario.produce(&generator, count)?;
        let mut node1 = Node::start(&scenario, "node-1", "only").await?;
        let mut node2 = Node::start(&scenario, "node-2", "only").await?;
        let mut node3 = Node::start(&scenario, "node-3", "only").await?;
        let three = ["node-1", "node-2", "node-3"];
        scenario.wait_committed(Duration::from_secs(120), || Ok(()))?;
        let layout = wait_for_agreement(
            &mut [&mut node1, &mut node2, &mut node3],
            &three,
            Duration::from_secs(120),
        )
        .await?;
        let expected = expected_features(&events);
        let held_by_1 = |p: u32| {
            layout.actives[&p].contains(&"node-1".to_owned())
                || layout.standbys[&p].contains("node-1")
        };
        let (customer, partition) = expected
            .keys()
            .map(|c| (c.clone(), partition_for_key(c.as_bytes(), PARTITIONS)))
            .find(|(_, p)| !held_by_1(*p))
            .context("a customer whose partition node-1 does not hold")?;
        let get = |no_forward: bool| GetRequest {
            store: "features".into(),
            key: customer.as_bytes().to_vec(),
            partition: None,
            options: Some(ReadOptions {
                min_input_offset: None,
                no_forward,
            }),
        };

        // Forwarded once, to the active; the answer names the node that answered.
        let answer = node1.client.get(get(false)).await?.into_inner();
        let read = answer.read.context("read metadata")?;
        let active = &layout.actives[&partition][0];
        ensure!(
            read.node_id == *active && read.role() == Role::Active,
            "forwarded answer: {read:?}"
        );
        let Some(get_response::Value::Message(any)) = answer.value else {
            bail!("{customer} not found through node-1");
        };
        ensure!(CustomerFeatures::decode(any.value.as_slice())? == expected[&customer]);

        // No forwarding: the holders, best (the active) first.
        let status = node1.client.get(get(true)).await.unwrap_err();
        ensure!(status.code() == tonic::Code::Unavailable, "{status:?}");
        ensure!(
            status.get_details_error_info().map(|i| i.reason)
                == Some(ErrorReason::PartitionNotHosted.as_str_name().to_owned())
        );
        let holders = partition_holders(&status).context("a PartitionHolders detail")?;
        let named: Vec<(&str, Role)> = holders
            .holders
            .iter()
            .map(|h| (h.node_id.as_str(), h.role()))
            .collect();
        let standby = layout.standbys[&partition].first().context("a standby")?;
        ensure!(
            holders.partition == partition
                && named
                    == [
                        (active.as_str(), Role::Active),
                        (standby.as_str(), Role::Standby)
                    ],
            "holders: {named:?}"
        );
        ensure!(holders.holders.iter().all(|h| !h.grpc_address.is_empty()));

        // A forwarded read is never forwarded again: no loop, whatever the views say.
        let mut marked = tonic::Request::new(get(false));
        marked
            .metadata_mut()
            .insert(FORWARDED_FROM, "node-2".parse()?);
        let status = node1.client.get(marked).await.unwrap_err();
        ensure!(status.code() == tonic::Code::Unavailable, "{status:?}");

        // MultiGet through one node: every key answered, the unheld ones by forwarding.
        let customers: Vec<&String> = expected.keys().collect();
        let request = |no_forward: bool| MultiGetRequest {
            store: "features".into(),
            keys: customers.iter().map(|c| c.as_bytes().to_vec()).collect(),
            options: Some(ReadOptions {
                min_input_offset: None,
                no_forward,
            }),
        };
        let answer = node1.client.multi_get(request(false)).await?.into_inner();
        ensure!(answer.results.len() == customers.len() && answer.holders.is_empty());
        for (result, customer) in answer.results.iter().zip(&customers) {
            ensure!(result.error == 0, "{customer}: {:?}", result.error());
            let got = result.result.as_ref().context("a result")?;
            let Some(get_response::Value::Message(any)) = &got.value else {
                bail!("{customer} not found in the MultiGet");
            };
            ensure!(CustomerFeatures::decode(any.value.as_slice())? == expected[*customer]);
        }
        let answer = node1.client.multi_get(request(true)).await?.into_inner();
        let unheld: BTreeSet<u32> = (0..PARTITIONS).filter(|p| !held_by_1(*p)).collect();
        for (result, customer) in answer.results.iter().zip(&customers) {
            let p = partition_for_key(customer.as_bytes(), PARTITIONS);
            let not_hosted = result.error() == ErrorReason::PartitionNotHosted;
            ensure!(
                not_hosted == unheld.contains(&p),
                "{customer} (partition {p})"
            );
        }
        let with_holders: BTreeSet<u32> = answer.holders.iter().map(|h| h.partition).collect();
        ensure!(
            with_holders == unheld,
            "holders for {with_holders:?}, unheld {unheld:?}"
        );

        for node in [&mut node1, &mut node2, &mut node3] {
            let status = node.process.terminate(Duration::from_secs(60))?;
            ensure!(status.success(), "{} exit: {status}", node.id);
        }
        Ok(())
    })
}

#[test]
fn a_drained_node_hands_its_partitions_over_at_once_while_every_read_answers() -> Result<()> {
    use kstore_proto::v1::DrainRequest;
    use kstore_proto::v1::admin_client::AdminClient;

    run_async(async {
        let mut scenario = Scenario::new("cluster-drain", PARTITIONS).await?;
        // Without leaving the group, a stopped static member's partitions would wait this
        // long before moving.
        let session_timeout = Duration::from_secs(60);
        scenario.extra.push(format!(
            "kafka.session.timeout.ms={}",
            session_timeout.as_millis()
        ));
        let generator = GeneratorConfig {
            customers: 300,
            seed: 9,
            ..GeneratorConfig::default()
        };
        let events: Vec<OrderEvent> = OrderGenerator::new(generator.clone()).take(6_000).collect();
        scenario.produce(&generator, 3_000)?;
        let mut node1 = Node::start(&scenario, "node-1", "only").await?;
        let mut node2 = Node::start(&scenario, "node-2", "only").await?;
        let mut node3 = Node::start(&scenario, "node-3", "only").await?;
        wait_for_agreement(
            &mut [&mut node1, &mut node2, &mut node3],
            &["node-1", "node-2", "node-3"],
            Duration::from_secs(120),
        )
        .await?;

        // A reader asks the staying nodes for every customer, in turn, all the while.
        let customers: Vec<String> = (0..300).map(OrderGenerator::customer_id).collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let clients = [node1.client.clone(), node2.client.clone()];
            let customers = customers.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut answered, mut failed) = (0u64, Vec::new());
                let mut turn = 0usize;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for customer in &customers {
                        let mut client = clients[turn % 2].clone();
                        turn += 1;
                        let request = GetRequest {
                            store: "features".into(),
                            key: customer.as_bytes().to_vec(),
                            partition: None,
                            options: None,
                        };
                        match client.get(request).await {
                            Ok(_) => answered += 1,
                            Err(status) => failed.push(format!("{customer}: {status}")),
                        }
                    }
                }
                (answered, failed)
            })
        };

        let mut admin = AdminClient::connect(format!(
            "http://{}",
            node3
                .process
                .logged_address("serving gRPC", Duration::from_secs(5))?
        ))
        .await?;
        let drained = Instant::now();
        let answer = admin.drain(DrainRequest {}).await?.into_inner();
        ensure!(answer.node_id == "node-3" && !answer.active_partitions.is_empty());
        let again = admin.drain(DrainRequest {}).await.unwrap_err();
        ensure!(
            again.code() == tonic::Code::FailedPrecondition,
            "a second drain: {again:?}"
        );
        // Events keep coming while the node drains.
        scenario.produce_from(&generator, 3_000, 3_000)?;
        let status = node3.process.wait_exit(Duration::from_secs(180))?;
        let took = drained.elapsed();
        ensure!(
            status.success(),
            "node-3 exit: {status}\n{}",
            node3.process.tail()
        );
        ensure!(
            node3.process.output().contains("drained: every partition"),
            "node-3 did not see its partitions run elsewhere:\n{}",
            node3.process.tail()
        );
        ensure!(
            took < session_timeout,
            "the drain took {took:?}: its partitions waited for the session timeout"
        );
        eprintln!("node-3 drained in {took:?}");

        scenario.wait_committed(Duration::from_secs(120), || Ok(()))?;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (answered, failed) = reader.await?;
        ensure!(
            failed.is_empty(),
            "{} of {} reads failed during the drain: {:?}",
            failed.len(),
            answered + failed.len() as u64,
            &failed[..failed.len().min(5)]
        );

        // Every partition runs on the staying nodes, and the state is exact: each customer
        // as its active copy (on whichever of them holds it) answers.
        let expected = expected_features(&events);
        let deadline = Instant::now() + Duration::from_secs(60);
        for customer in &customers {
            let mut last = Vec::new();
            'customer: loop {
                last.clear();
                for node in [&mut node1, &mut node2] {
                    let answer = node
                        .client
                        .get(GetRequest {
                            store: "features".into(),
                            key: customer.as_bytes().to_vec(),
                            partition: None,
                            options: None,
                        })
                        .await?
                        .into_inner();
                    let read = answer.read.clone().context("read metadata")?;
                    let features = match &answer.value {
                        Some(get_response::Value::Message(any)) => {
                            Some(CustomerFeatures::decode(any.value.as_slice())?)
                        }
                        _ => None,
                    };
                    if read.role() == Role::Active && features.as_ref() == expected.get(customer) {
                        ensure!(read.node_id != "node-3");
                        break 'customer;
                    }
                    last.push(read);
                }
                ensure!(Instant::now() < deadline, "{customer}: {last:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        for node in [&mut node1, &mut node2] {
            let status = node.process.terminate(Duration::from_secs(60))?;
            ensure!(status.success(), "{} exit: {status}", node.id);
        }
        Ok(())
    })
}
