//! `cargo xtask bench client`: what the smart client adds to a read. One node holds every
//! partition; the bench alternates a raw tonic Get to it (the right node, computed by hand)
//! with the same Get through `kstore-client`, one at a time, and compares the latencies.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use kstore_cli::generator::{GeneratorConfig, OrderGenerator};
use kstore_cli::produce::{ProduceOptions, produce};
use kstore_client::Client;
use kstore_proto::v1::GetRequest;
use kstore_proto::v1::query_client::QueryClient;
use kstore_testkit::TestKafka;
use kstore_testkit::broker::{Broker, DEFAULT_PORT, Started};
use kstore_testkit::process::TestProcess;

/// What `bench client` measures.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientBench {
    /// Reads per client kind.
    #[arg(long, default_value_t = 20_000)]
    pub reads: u32,
    /// Customers (keys) in the store.
    #[arg(long, default_value_t = 10_000)]
    pub customers: u32,
    /// The broker's port.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
}

pub fn client(bench: &ClientBench) -> Result<()> {
    let binaries = crate::binaries::locate()?;
    let broker = Broker::on_port(bench.port);
    let (started, _lease) = broker.start_leased()?;
    let kafka = TestKafka::at(&broker.bootstrap());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let app = kafka.unique_name("bench-client");
    let input = format!("{app}-orders");
    runtime.block_on(kafka.create_topic(&input, 12))?;
    let generator = GeneratorConfig {
        customers: bench.customers,
        ..GeneratorConfig::default()
    };
    produce(&ProduceOptions {
        bootstrap: kafka.bootstrap().into(),
        topic: input.clone(),
        count: u64::from(bench.customers) * 2,
        skip: 0,
        rate: 0,
        generator,
        kafka: Vec::new(),
    })?;
    let dir = tempfile::tempdir()?;
    let mut node =
        crate::bench::start_bench_node(&binaries.node, &kafka, &app, &input, dir.path(), &[])?;
    let address = node.logged_address("serving gRPC", Duration::from_secs(120))?;
    let result = runtime.block_on(measure(bench, &address, &mut node));
    let _ = node.terminate(Duration::from_secs(60));
    kafka.delete_topics_with_prefix(&format!("{app}-"), Some(&app))?;
    if started == Started::New {
        broker.stop()?;
    }
    let (raw, sdk) = result?;
    let us = |h: &hdrhistogram::Histogram<u64>, q: f64| h.value_at_quantile(q);
    println!();
    println!(
        "Get latency, one at a time on a one-worker runtime, {} reads each, node on this machine",
        bench.reads
    );
    println!(
        "{:<22} {:>8} {:>8} {:>8}",
        "", "p50 µs", "p99 µs", "p99.9 µs"
    );
    for (name, h) in [("raw tonic, right node", &raw), ("kstore-client", &sdk)] {
        println!(
            "{name:<22} {:>8} {:>8} {:>8}",
            us(h, 0.5),
            us(h, 0.99),
            us(h, 0.999)
        );
    }
    println!(
        "added by the client at p50: {} µs",
        us(&sdk, 0.5) as i64 - us(&raw, 0.5) as i64
    );
    Ok(())
}

async fn measure(
    bench: &ClientBench,
    address: &str,
    node: &mut TestProcess,
) -> Result<(hdrhistogram::Histogram<u64>, hdrhistogram::Histogram<u64>)> {
    let client = Client::builder().seeds([address]).build().await?;
    // Wait until the node has ingested and is in its own view as the holder of everything.
    let deadline = Instant::now() + Duration::from_secs(300);
    while client
        .view()
        .nodes
        .iter()
        .map(|n| n.copies.len())
        .sum::<usize>()
        < 12
    {
        if let Some(status) = node.try_exit()? {
            bail!("the node exited with {status}");
        }
        if Instant::now() > deadline {
            bail!("the node did not come up");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut raw_client = QueryClient::connect(format!("http://{address}")).await?;
    let mut raw = hdrhistogram::Histogram::<u64>::new(3)?;
    let mut sdk = hdrhistogram::Histogram::<u64>::new(3)?;
    for i in 0..bench.reads + 2_000 {
        let key = OrderGenerator::customer_id(i % bench.customers);
        let started = Instant::now();
        raw_client
            .get(GetRequest {
                store: "features".into(),
                key: key.clone().into_bytes(),
                partition: None,
                options: None,
            })
            .await?;
        let raw_time = started.elapsed();
        let started = Instant::now();
        client.get(key.as_bytes()).await?;
        let sdk_time = started.elapsed();
        // The first 2,000 of each warm up connections and caches.
        if i >= 2_000 {
            raw.record(raw_time.as_micros() as u64)?;
            sdk.record(sdk_time.as_micros() as u64)?;
        }
    }
    Ok((raw, sdk))
}
