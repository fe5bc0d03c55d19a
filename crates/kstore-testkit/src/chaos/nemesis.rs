//! The randomized nemesis of [`super::Fault::Random`]: for the soak's duration it waits a
//! few seconds, then injects one fault chosen by a seeded random generator (kill -9 and a
//! restart later, SIGSTOP and SIGCONT, a rolling restart, scale-out or a drained scale-in, a
//! damaged copy on disk, a full disk that comes back), and waits until every partition has
//! a live active and standby again before the next. The same seed gives the same schedule,
//! which the report lists, so that a failure can be replayed.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use kstore_proto::v1::admin_client::AdminClient;
use kstore_proto::v1::{CreateBackupRequest, DrainRequest};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{Cluster, signal};

/// The node that scale-out adds and scale-in drains.
const EXTRA_NODE: &str = "node-4";

/// How long the cluster may take to have every partition served again after a fault.
const SETTLE: Duration = Duration::from_secs(180);

/// One fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Move {
    Kill,
    Pause,
    RollingRestart,
    ScaleOut,
    ScaleIn,
    DamageCopy,
    FullDisk,
}

/// Runs the nemesis, adding the schedule it ran to `notes`.
pub(super) async fn run(cluster: &mut Cluster, notes: &mut Vec<(String, String)>) -> Result<()> {
    let soak = cluster.options.soak.clone();
    let mut rng = ChaCha8Rng::seed_from_u64(soak.seed);
    notes.push(("seed".into(), soak.seed.to_string()));
    let started = Instant::now();
    let mut count = 0;
    while started.elapsed() < soak.duration {
        tokio::time::sleep(Duration::from_secs(rng.random_range(3..=10))).await;
        let running = cluster.running();
        let candidates: Vec<(Move, u32)> = [
            (Move::Kill, 2),
            (Move::Pause, 2),
            (Move::RollingRestart, 1),
            (
                Move::ScaleOut,
                u32::from(!running.iter().any(|n| n == EXTRA_NODE)),
            ),
            (
                Move::ScaleIn,
                u32::from(running.iter().any(|n| n == EXTRA_NODE)),
            ),
            (Move::DamageCopy, 1),
            (Move::FullDisk, 2),
        ]
        .into_iter()
        .filter(|(_, weight)| *weight > 0)
        .collect();
        let total: u32 = candidates.iter().map(|(_, w)| w).sum();
        let mut pick = rng.random_range(0..total);
        let chosen = candidates
            .iter()
            .find(|(_, weight)| {
                if pick < *weight {
                    true
                } else {
                    pick -= weight;
                    false
                }
            })
            .map(|(chosen, _)| *chosen)
            .context("no fault to choose")?;
        let victim = running[rng.random_range(0..running.len())].clone();
        let at = started.elapsed().as_secs();
        count += 1;
        let what = inject(cluster, chosen, &victim, &mut rng).await?;
        tracing::info!(count, at, what, "nemesis");
        notes.push((format!("move {count} at {at} s"), what));
        let members = cluster.running();
        let members: Vec<&str> = members.iter().map(String::as_str).collect();
        cluster.wait_complete(&members, SETTLE).await?;
    }
    notes.push(("moves".into(), count.to_string()));
    Ok(())
}

/// Injects one fault on `victim` (where the fault concerns one node) and returns what it did.
async fn inject(
    cluster: &mut Cluster,
    chosen: Move,
    victim: &str,
    rng: &mut ChaCha8Rng,
) -> Result<String> {
    Ok(match chosen {
        Move::Kill => {
            let down = Duration::from_secs(rng.random_range(2..=15));
            cluster.process(victim)?.kill9()?;
            cluster.node(victim)?.process = None;
            tokio::time::sleep(down).await;
            cluster.start(victim)?;
            format!("kill -9 {victim}, started again after {} s", down.as_secs())
        }
        Move::Pause => {
            let paused = Duration::from_secs(rng.random_range(1..=12));
            let pid = cluster.process(victim)?.pid();
            signal(pid, "STOP")?;
            tokio::time::sleep(paused).await;
            signal(pid, "CONT")?;
            format!("SIGSTOP {victim} for {} s", paused.as_secs())
        }
        Move::RollingRestart => {
            let members = cluster.running();
            for id in &members {
                let status = cluster.process(id)?.terminate(Duration::from_secs(60))?;
                ensure!(status.success(), "{id} exit after SIGTERM: {status}");
                cluster.start(id)?;
                let running: Vec<&str> = members.iter().map(String::as_str).collect();
                cluster.wait_complete(&running, SETTLE).await?;
            }
            format!("rolling restart of {}", members.join(", "))
        }
        Move::ScaleOut => {
            cluster.start(EXTRA_NODE)?;
            format!("scale-out: {EXTRA_NODE} joins")
        }
        Move::ScaleIn => {
            let grpc = cluster.node(EXTRA_NODE)?.grpc.clone();
            let mut admin = AdminClient::connect(format!("http://{grpc}")).await?;
            admin.drain(DrainRequest {}).await?;
            let status = cluster
                .process(EXTRA_NODE)?
                .wait_exit(Duration::from_secs(180))?;
            ensure!(
                status.success(),
                "{EXTRA_NODE} exit after its drain: {status}"
            );
            cluster.node(EXTRA_NODE)?.process = None;
            format!("scale-in: {EXTRA_NODE} drained")
        }
        Move::DamageCopy => {
            let pick = rng.random_range(0..usize::MAX);
            damage_copy(cluster, victim, pick).await?
        }
        Move::FullDisk => {
            let held = Duration::from_secs(rng.random_range(5..=20));
            full_disk(cluster, victim, held).await?.0
        }
    })
}

/// Fills `victim`'s small disk for `held`, then gives the space back. Returns what it did,
/// and how many copies failed meanwhile (`None`: the node has no small disk).
pub(super) async fn full_disk(
    cluster: &mut Cluster,
    victim: &str,
    held: Duration,
) -> Result<(String, Option<usize>)> {
    if !cluster.disks.contains_key(victim) {
        return Ok((
            format!("full disk of {victim}: skipped (no small disk)"),
            None,
        ));
    }
    let failures = |cluster: &mut Cluster| -> Result<usize> {
        Ok(cluster
            .process(victim)?
            .output()
            .lines()
            .filter(|line| line.contains("a copy failed"))
            .count())
    };
    let before = failures(cluster)?;
    let filled = cluster.disks[victim].fill()?;
    tokio::time::sleep(held).await;
    cluster.disks[victim].free()?;
    let failed = failures(cluster)? - before;
    let what = format!(
        "full disk of {victim} for {} s ({} MiB written to fill it; {failed} copy failures)",
        held.as_secs(),
        filled >> 20
    );
    Ok((what, Some(failed)))
}

/// Flips a byte in the largest SST file of one of `victim`'s open copies (the `pick`-th,
/// modulo how many there are; a backup first flushes the copies it is the backup source of,
/// so that there are SST files), and waits until the node's background check has failed
/// that copy. (A compaction that rewrites the file from blocks in the cache first heals the
/// damage instead; the report says so.)
pub(super) async fn damage_copy(
    cluster: &mut Cluster,
    victim: &str,
    pick: usize,
) -> Result<String> {
    let grpc = cluster.node(victim)?.grpc.clone();
    let mut admin = AdminClient::connect(format!("http://{grpc}")).await?;
    admin.create_backup(CreateBackupRequest::default()).await?;
    // Only copies the node has open: a directory kept after a copy was retired is checked
    // by nobody.
    let open: Vec<u32> = cluster
        .view()
        .await?
        .nodes
        .iter()
        .filter(|n| n.node_id == victim)
        .flat_map(|n| n.copies.iter())
        .filter(|c| kstore_core::cluster::serves_reads(c.role))
        .map(|c| c.partition)
        .collect();
    let stores = cluster.store_root(victim);
    let mut ssts: Vec<(u32, std::path::PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(&stores)?.flatten() {
        let Some(partition) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if !open.contains(&partition) {
            continue;
        }
        let largest = std::fs::read_dir(entry.path())?
            .flatten()
            .filter(|file| file.path().extension().is_some_and(|x| x == "sst"))
            .filter_map(|file| Some((file.metadata().ok()?.len(), file.path())))
            .max();
        if let Some((_, sst)) = largest {
            ssts.push((partition, sst));
        }
    }
    ssts.sort();
    if ssts.is_empty() {
        return Ok(format!(
            "damage a copy of {victim}: skipped (no SST file yet)"
        ));
    }
    let (partition, sst) = ssts[pick % ssts.len()].clone();
    let mut bytes = std::fs::read(&sst)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&sst, bytes)?;
    // The background check (every 5 s) finds it and fails the copy, which is rebuilt.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mine = format!("partition={partition} ");
    loop {
        let found = cluster.process(victim)?.output().lines().any(|line| {
            line.contains("a copy failed") && line.contains(&mine) && line.contains("damaged")
        });
        if found {
            break;
        }
        if Instant::now() > deadline {
            return Ok(format!(
                "damage a copy of {victim}: flipped a byte of partition {partition}, not found \
                 within 60 s (a compaction may have rewritten the file from cached blocks)"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(format!(
        "damage {victim}'s copy of partition {partition}: failed and rebuilt"
    ))
}
