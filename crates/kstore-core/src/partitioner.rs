//! Kafka's default partitioner for keyed records, bit-identical to the Java client.
//!
//! kstore routes every read with this function, so a key must land here on the same
//! partition that a Java producer (or a librdkafka producer with
//! `partitioner=murmur2_random`) chose when it wrote the key.

/// Returns the partition that Kafka's Java producer picks for a record with this key.
///
/// This is `toPositive(murmur2(key)) % partitions` with Kafka's seed `0x9747b28c`, where
/// `toPositive(x) = x & 0x7fffffff`. `key` is the serialized key exactly as the producer
/// sent it.
///
/// ```
/// use kstore_core::partitioner::partition_for_key;
/// assert_eq!(partition_for_key(b"customer-42", 12), partition_for_key(b"customer-42", 12));
/// assert!(partition_for_key(b"customer-42", 12) < 12);
/// ```
///
/// # Panics
///
/// Panics if `partitions` is zero: a Kafka topic always has at least one partition, so a
/// zero here is a bug in the caller.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    assert!(partitions > 0, "a topic has at least one partition");
    (murmur2::murmur2(key, murmur2::KAFKA_SEED) & 0x7fff_ffff) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A line-by-line port of Java's `org.apache.kafka.common.utils.Utils.murmur2`, kept
    /// in Java's signed 32-bit arithmetic so that the property test compares against the
    /// reference algorithm rather than against the crate's own reasoning.
    fn java_utils_murmur2(data: &[u8]) -> i32 {
        let length = data.len() as i32;
        let seed: i32 = 0x9747_b28c_u32 as i32;
        let m: i32 = 0x5bd1_e995;
        let r = 24;
        let unsigned_shift_right = |x: i32, n: u32| ((x as u32) >> n) as i32;
        // Java's `data[i] & 0xff`: a Rust u8 widens without sign extension.
        let byte = |i: i32| i32::from(data[i as usize]);

        let mut h: i32 = seed ^ length;
        let length4 = length / 4;
        for i in 0..length4 {
            let i4 = i * 4;
            let mut k: i32 = byte(i4)
                .wrapping_add(byte(i4 + 1) << 8)
                .wrapping_add(byte(i4 + 2) << 16)
                .wrapping_add(byte(i4 + 3) << 24);
            k = k.wrapping_mul(m);
            k ^= unsigned_shift_right(k, r);
            k = k.wrapping_mul(m);
            h = h.wrapping_mul(m);
            h ^= k;
        }
        // Java's `switch (length % 4)` with fall-through from case 3 to case 1.
        let tail = length % 4;
        if tail >= 3 {
            h ^= byte((length & !3) + 2) << 16;
        }
        if tail >= 2 {
            h ^= byte((length & !3) + 1) << 8;
        }
        if tail >= 1 {
            h ^= byte(length & !3);
            h = h.wrapping_mul(m);
        }
        h ^= unsigned_shift_right(h, 13);
        h = h.wrapping_mul(m);
        h ^= unsigned_shift_right(h, 15);
        h
    }

    fn kstore_murmur2(key: &[u8]) -> i32 {
        murmur2::murmur2(key, murmur2::KAFKA_SEED) as i32
    }

    /// The vectors of Apache Kafka's `UtilsTest.testMurmur2` (signed Java ints).
    const KAFKA_UTILS_TEST_VECTORS: &[(&[u8], i32)] = &[
        (b"21", -973_932_308),
        (b"foobar", -790_332_482),
        (b"a-little-bit-long-string", -985_981_536),
        (b"a-little-bit-longer-string", -1_486_304_829),
        (
            b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58_897_971,
        ),
        (b"abc", 479_470_107),
    ];

    /// The Java-compatible vectors of librdkafka's `unittest_murmur2` (raw hashes).
    const LIBRDKAFKA_VECTORS: &[(&[u8], u32)] = &[
        (b"kafka", 0xd067_cf64),
        (b"giberish123456789", 0x8f55_2b0c),
        (b"1234", 0x9fc9_7b14),
        (b"234", 0xe7c0_09ca),
        (b"34", 0x8739_30da),
        (b"4", 0x5a4b_5ca1),
        (b"PreAmbleWillBeRemoved,ThePrePartThatIs", 0x7842_4f1c),
        (b"reAmbleWillBeRemoved,ThePrePartThatIs", 0x4a62_b377),
        (b"eAmbleWillBeRemoved,ThePrePartThatIs", 0xe0e4_e09e),
        (b"AmbleWillBeRemoved,ThePrePartThatIs", 0x62b8_b43f),
        (b"", 0x106e_08d9),
    ];

    /// librdkafka's older unit test, which checks the hash after `toPositive`.
    const LIBRDKAFKA_POSITIVE_VECTORS: &[(&[u8], u32)] = &[
        (b"kafka", 1_348_980_580),
        (b"amqp", 767_747_138),
        (b"giberish123456789", 257_239_820),
    ];

    #[test]
    fn murmur2_matches_kafka_utils_test_vectors() {
        for &(key, expected) in KAFKA_UTILS_TEST_VECTORS {
            assert_eq!(
                kstore_murmur2(key),
                expected,
                "key {:?}",
                String::from_utf8_lossy(key)
            );
            assert_eq!(java_utils_murmur2(key), expected, "java port, key {key:?}");
        }
    }

    #[test]
    fn murmur2_matches_librdkafka_vectors() {
        for &(key, expected) in LIBRDKAFKA_VECTORS {
            assert_eq!(
                kstore_murmur2(key) as u32,
                expected,
                "key {:?}",
                String::from_utf8_lossy(key)
            );
            assert_eq!(
                java_utils_murmur2(key) as u32,
                expected,
                "java port, key {key:?}"
            );
        }
        for &(key, expected) in LIBRDKAFKA_POSITIVE_VECTORS {
            assert_eq!(kstore_murmur2(key) as u32 & 0x7fff_ffff, expected);
        }
    }

    #[test]
    fn partition_is_positive_hash_modulo_partition_count() {
        // "21" hashes to a negative Java int: toPositive must clear the sign bit rather
        // than take the absolute value.
        let positive = (-973_932_308_i32 & 0x7fff_ffff) as u32;
        assert_eq!(partition_for_key(b"21", 12), positive % 12);
        assert_ne!(positive, 973_932_308, "masking differs from abs()");
        for &(key, expected) in KAFKA_UTILS_TEST_VECTORS {
            for partitions in [1, 2, 3, 12, 100, 1024] {
                let expected = (expected & 0x7fff_ffff) as u32 % partitions;
                assert_eq!(partition_for_key(key, partitions), expected);
            }
        }
    }

    #[test]
    fn every_length_up_to_64_with_high_bytes_matches_java() {
        // Bytes ≥ 0x80 are negative in Java; the `& 0xff` in Utils.murmur2 is what keeps
        // them from sign-extending. Cover every tail length with such bytes.
        for length in 0..64_usize {
            let key: Vec<u8> = (0..length)
                .map(|i| 0x80 | (i as u8).wrapping_mul(37))
                .collect();
            assert_eq!(
                kstore_murmur2(&key),
                java_utils_murmur2(&key),
                "length {length}"
            );
        }
    }

    #[test]
    #[should_panic(expected = "at least one partition")]
    fn zero_partitions_is_a_caller_bug() {
        partition_for_key(b"k", 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn murmur2_matches_java_port(key in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert_eq!(kstore_murmur2(&key), java_utils_murmur2(&key));
        }

        #[test]
        fn murmur2_matches_java_port_on_high_bytes(
            key in proptest::collection::vec(0x80u8..=0xff, 0..64)
        ) {
            prop_assert_eq!(kstore_murmur2(&key), java_utils_murmur2(&key));
        }

        #[test]
        fn partition_matches_java_formula(
            key in proptest::collection::vec(any::<u8>(), 0..64),
            partitions in 1u32..10_000,
        ) {
            let expected = (java_utils_murmur2(&key) & 0x7fff_ffff) as u32 % partitions;
            prop_assert_eq!(partition_for_key(&key, partitions), expected);
        }
    }
}
