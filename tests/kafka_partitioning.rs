//! Proves the routing chain against a real broker: a record that the testkit producer
//! writes with a key lands on exactly the partition that `partition_for_key` computes, so
//! a read routed by kstore finds the key where Kafka put it.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result};
use kstore_core::partitioner::partition_for_key;
use rdkafka::Message;
use rdkafka::consumer::Consumer;
use rdkafka::producer::FutureRecord;

const PARTITIONS: u32 = 12;
const RECORDS: usize = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_records_land_on_partition_for_key() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(120), produce_and_check()).await?
}

async fn produce_and_check() -> Result<()> {
    let kafka = kstore_testkit::kafka();
    let topic = kafka.unique_name("partitioning");
    kafka.create_topic(&topic, PARTITIONS).await?;

    // Keys of every length 0..64 and bytes ≥ 0x80, next to ordinary customer ids.
    let keys: Vec<Vec<u8>> = (0..RECORDS)
        .map(|i| match i % 3 {
            0 => format!("customer-{i}").into_bytes(),
            1 => (0..(i % 64))
                .map(|j| (i * 31 + j * 7) as u8 | 0x80)
                .collect(),
            _ => (0..(i % 64)).map(|j| (i + j) as u8).collect(),
        })
        .collect();

    let producer = kafka.producer()?;
    let payloads: Vec<String> = (0..RECORDS).map(|i| i.to_string()).collect();
    let deliveries: Vec<_> = keys
        .iter()
        .zip(&payloads)
        .map(|(key, payload)| {
            let record = FutureRecord::to(&topic)
                .key(key.as_slice())
                .payload(payload);
            producer.send(record, Duration::from_secs(30))
        })
        .collect();
    for delivery in deliveries {
        delivery
            .await
            .map_err(|(error, _)| error)
            .context("producing")?;
    }

    let group = kafka.unique_name("partitioning-group");
    let consumer = kafka.consumer(&group)?;
    consumer.subscribe(&[&topic])?;
    let mut seen: HashMap<usize, i32> = HashMap::new();
    while seen.len() < RECORDS {
        let message = consumer.recv().await?;
        let index: usize = std::str::from_utf8(message.payload().context("payload")?)?.parse()?;
        let key = message.key().unwrap_or_default();
        assert_eq!(
            key,
            keys[index].as_slice(),
            "record {index} came back with another key"
        );
        assert!(
            seen.insert(index, message.partition()).is_none(),
            "record {index} twice"
        );
    }

    for (index, partition) in seen {
        let expected = partition_for_key(&keys[index], PARTITIONS);
        assert_eq!(
            partition as u32, expected,
            "record {index} (key {:02x?}) landed on partition {partition}, not {expected}",
            keys[index]
        );
    }
    drop(consumer);
    kafka.delete_topics_with_prefix(&topic, Some(&group))?;
    Ok(())
}
