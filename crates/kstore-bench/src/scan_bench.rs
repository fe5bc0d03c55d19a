//! `cargo xtask bench scan`: scans of a store of exactly `--keys` keys on one node that holds
//! all 12 partitions. It measures
//! - the first page of a whole-store scan through kstore-client (the partitions fetched and
//!   merged), from the first key and from random keys, at two page sizes;
//! - a whole-store scan through kstore-client to the end, in rows per second, checking that
//!   every key comes once and in order;
//! - the node alone: each partition paged through with raw tonic `Scan` calls, in rows per
//!   second.

use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use kstore_cli::generator::{GeneratorConfig, OrderGenerator};
use kstore_cli::produce::{ProduceOptions, produce};
use kstore_client::{Client, ReadOptions, Scan};
use kstore_proto::v1::ScanRequest;
use kstore_proto::v1::query_client::QueryClient;
use kstore_testkit::TestKafka;
use kstore_testkit::broker::{Broker, DEFAULT_PORT, Started};
use kstore_testkit::process::TestProcess;
use rand::{Rng, SeedableRng};

const PARTITIONS: u32 = 12;

/// What `bench scan` measures.
#[derive(Debug, Clone, clap::Args)]
pub struct ScanBench {
    /// Keys in the store (one event per customer).
    #[arg(long, default_value_t = 1_000_000)]
    pub keys: u32,
    /// First pages measured per page size and start.
    #[arg(long, default_value_t = 200)]
    pub first_pages: u32,
    /// The broker's port.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
}

pub fn scan(bench: &ScanBench) -> Result<()> {
    let binaries = crate::binaries::locate()?;
    let broker = Broker::on_port(bench.port);
    let (started, _lease) = broker.start_leased()?;
    let kafka = TestKafka::at(&broker.bootstrap());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let app = kafka.unique_name("bench-scan");
    let input = format!("{app}-orders");
    runtime.block_on(kafka.create_topic(&input, PARTITIONS))?;
    let generator = GeneratorConfig {
        customers: bench.keys,
        customers_in_turn: true,
        ..GeneratorConfig::default()
    };
    let fill = Instant::now();
    produce(&ProduceOptions {
        bootstrap: kafka.bootstrap().into(),
        topic: input.clone(),
        count: u64::from(bench.keys),
        skip: 0,
        rate: 0,
        generator,
        kafka: Vec::new(),
    })?;
    let dir = tempfile::tempdir()?;
    let mut node =
        crate::bench::start_bench_node(&binaries.node, &kafka, &app, &input, dir.path(), &[])?;
    let address = node.logged_address("serving gRPC", Duration::from_secs(120))?;
    let result = runtime.block_on(async {
        let ingested = wait_ingested(&kafka, &input, &address, &mut node).await?;
        println!(
            "filled {} keys in {:.1} s (produce and exactly-once ingest)",
            bench.keys,
            (ingested - fill).as_secs_f64()
        );
        measure(bench, &address).await
    });
    let _ = node.terminate(Duration::from_secs(60));
    kafka.delete_topics_with_prefix(&format!("{app}-"), Some(&app))?;
    if started == Started::New {
        broker.stop()?;
    }
    result
}

/// Waits until the node has folded every record of the input, and returns when.
async fn wait_ingested(
    kafka: &TestKafka,
    input: &str,
    address: &str,
    node: &mut TestProcess,
) -> Result<Instant> {
    let ends = kafka.end_offsets(input, PARTITIONS)?;
    let mut raw = QueryClient::connect(format!("http://{address}")).await?;
    let deadline = Instant::now() + Duration::from_secs(1_800);
    loop {
        if let Some(status) = node.try_exit()? {
            bail!("the node exited with {status}");
        }
        let mut behind = 0;
        for (partition, end) in ends.iter().enumerate() {
            let position = raw
                .scan(ScanRequest {
                    store: "features".into(),
                    partition: partition as u32,
                    limit: 1,
                    ..ScanRequest::default()
                })
                .await
                .ok()
                .and_then(|page| page.into_inner().read)
                .map_or(0, |read| read.input_offset);
            behind += (end - position).max(0);
        }
        if behind == 0 {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("the node is still {behind} records behind");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn measure(bench: &ScanBench, address: &str) -> Result<()> {
    let client = Client::builder()
        .seeds([address])
        .request_timeout(Duration::from_secs(10))
        .build()
        .await?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    println!();
    println!(
        "First page of a whole-store scan through kstore-client ({PARTITIONS} partitions \
         merged), {} pages each, node on this machine",
        bench.first_pages
    );
    println!("{:<34} {:>8} {:>8} {:>8}", "", "p50 ms", "p99 ms", "max ms");
    for limit in [100usize, 1_000] {
        for random_start in [false, true] {
            let mut latencies = hdrhistogram::Histogram::<u64>::new(3)?;
            for _ in 0..bench.first_pages + 10 {
                // The keys from the start on: customer ids sort as their numbers.
                let start = if random_start {
                    rng.random_range(0..bench.keys)
                } else {
                    0
                };
                let from = OrderGenerator::customer_id(start);
                let scan = Scan::range(from.into_bytes(), Vec::new());
                let started = Instant::now();
                let page = client.scan(&scan, limit).await?;
                let elapsed = started.elapsed();
                let expected = limit.min((bench.keys - start) as usize);
                ensure!(
                    page.entries.len() == expected,
                    "{} keys",
                    page.entries.len()
                );
                latencies.record(elapsed.as_micros() as u64)?;
            }
            let ms = |q: f64| latencies.value_at_quantile(q) as f64 / 1_000.0;
            let start = if random_start {
                "from a random key"
            } else {
                "from the first key"
            };
            println!(
                "{:<34} {:>8.2} {:>8.2} {:>8.2}",
                format!("{limit} keys, {start}"),
                ms(0.5),
                ms(0.99),
                latencies.max() as f64 / 1_000.0
            );
        }
    }

    // The whole store through the client, checked.
    let started = Instant::now();
    let mut page = client.scan(&Scan::all(), 1_000).await?;
    let mut count = 0u64;
    let mut last: Option<Vec<u8>> = None;
    loop {
        for entry in &page.entries {
            if let Some(last) = &last {
                ensure!(*last < entry.key, "keys out of order");
            }
            last = Some(entry.key.clone());
        }
        count += page.entries.len() as u64;
        let Some(token) = page.next else { break };
        page = client
            .scan_next(&token, 1_000, &ReadOptions::default())
            .await?;
    }
    let elapsed = started.elapsed();
    ensure!(
        count == u64::from(bench.keys),
        "the scan returned {count} keys, not {}",
        bench.keys
    );
    println!();
    println!(
        "whole store through kstore-client, pages of 1,000: {count} keys in order in {:.1} s, \
         {:.0} rows/s",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64()
    );

    // The node alone: each partition paged through with raw Scan calls.
    let mut raw = QueryClient::connect(format!("http://{address}")).await?;
    let started = Instant::now();
    let mut rows = 0u64;
    for partition in 0..PARTITIONS {
        let mut after = None;
        loop {
            let page = raw
                .scan(ScanRequest {
                    store: "features".into(),
                    partition,
                    limit: 1_000,
                    after: after.clone(),
                    ..ScanRequest::default()
                })
                .await?
                .into_inner();
            rows += page.entries.len() as u64;
            after = page.entries.last().map(|entry| entry.key.clone());
            if !page.more {
                break;
            }
        }
    }
    let elapsed = started.elapsed();
    ensure!(rows == u64::from(bench.keys), "{rows} rows");
    println!(
        "each partition through raw Scan calls, pages of 1,000: {rows} rows in {:.1} s, {:.0} \
         rows/s",
        elapsed.as_secs_f64(),
        rows as f64 / elapsed.as_secs_f64()
    );

    // The same, each partition streamed by one ScanStream call.
    let started = Instant::now();
    let mut rows = 0u64;
    for partition in 0..PARTITIONS {
        let mut stream = raw
            .scan_stream(ScanRequest {
                store: "features".into(),
                partition,
                page_size: 1_000,
                ..ScanRequest::default()
            })
            .await?
            .into_inner();
        let mut last: Option<Vec<u8>> = None;
        while let Some(page) = stream.message().await? {
            for entry in page.entries {
                ensure!(
                    last.as_ref().is_none_or(|last| *last < entry.key),
                    "partition {partition} streamed out of order"
                );
                last = Some(entry.key);
                rows += 1;
            }
        }
    }
    let elapsed = started.elapsed();
    ensure!(rows == u64::from(bench.keys), "{rows} rows streamed");
    println!(
        "each partition through one ScanStream call, pages of 1,000: {rows} rows in {:.1} s, \
         {:.0} rows/s",
        elapsed.as_secs_f64(),
        rows as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}
