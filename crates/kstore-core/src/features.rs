//! kstore's built-in fold: fraud features per customer, from JSON order events. The node's
//! native processor (`kstore_server::processor::features`) and the WebAssembly module built
//! from `kstore-guest`'s `features` example both call [`process`], so that they store the
//! same bytes and dead-letter the same records with the same reasons.
//!
//! The fold is a pure function of the customer's event sequence (see `CustomerFeatures` in
//! `proto/kstore/v1/features.proto` for what each field means), so tests can recompute every
//! value from the events they sent. Memory per customer is bounded: at most 60 minute
//! buckets, 168 hour buckets and 64 remembered values per distinct set.

use kstore_proto::v1::{Bucket, CustomerFeatures, FeatureWindows, SeenValue, WindowTotals};
use prost::Message;
use serde::Serialize;

use crate::orders::OrderEvent;

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

/// Minute buckets that make up the 1-hour window.
const MINUTES_IN_1H: i64 = 60;
/// Hour buckets that make up the 24-hour window.
const HOURS_IN_24H: i64 = 24;
/// Hour buckets that make up the 7-day window.
const HOURS_IN_7D: i64 = 7 * 24;
/// How long a delivery address or payment instrument is remembered.
const DISTINCT_HORIZON_MS: i64 = 30 * DAY_MS;
/// The most values a distinct set keeps; a count at this cap means "this many or more".
pub const DISTINCT_SET_CAP: usize = 64;
/// The subscription-abuse rule fires above this many distinct free-delivery addresses in 24 h.
pub const ABUSE_DISTINCT_ADDRESSES: u32 = 3;

/// The name of the rule in alert records.
pub const ABUSE_RULE: &str = "free-delivery-address-spread";

/// What folding one event gives: the customer's new features, encoded, and the alert to
/// emit when the customer starts to match the subscription-abuse rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folded {
    /// The encoded [`CustomerFeatures`].
    pub state: Vec<u8>,
    /// The alert record's JSON value, keyed by the customer.
    pub alert: Option<Vec<u8>>,
}

/// Why an event is refused; the record goes to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeaturesError {
    /// The record is not an order event of its key.
    #[error("malformed record: {0}")]
    Malformed(String),
    /// The stored value cannot be decoded, or the alert cannot be encoded.
    #[error("processing failed: {0}")]
    Failed(String),
}

/// The alert record's JSON value.
#[derive(Debug, Serialize)]
struct AbuseAlert<'a> {
    customer_id: &'a str,
    rule: &'a str,
    order_id: &'a str,
    event_time_ms: i64,
    free_delivery_addresses_24h: u32,
}

/// Folds the order event `value` of customer `key` into the customer's `current` features.
///
/// ```
/// let event = br#"{"order_id":"o-1","customer_id":"c-1","event_time_ms":1767225600000,
///   "amount_cents":1999,"delivery_address":"1 Main St","payment_instrument":"card-1",
///   "free_delivery":true}"#;
/// let folded = kstore_core::features::process(b"c-1", Some(event), None).unwrap();
/// assert!(folded.alert.is_none());
/// let error = kstore_core::features::process(b"c-2", Some(event), None).unwrap_err();
/// assert!(error.to_string().starts_with("malformed record: customer_id"));
/// ```
pub fn process(
    key: &[u8],
    value: Option<&[u8]>,
    current: Option<&[u8]>,
) -> Result<Folded, FeaturesError> {
    let value = value.ok_or_else(|| FeaturesError::Malformed("no value".into()))?;
    let event: OrderEvent = serde_json::from_slice(value)
        .map_err(|error| FeaturesError::Malformed(format!("not an order event: {error}")))?;
    if event.customer_id.as_bytes() != key {
        return Err(FeaturesError::Malformed(format!(
            "customer_id {:?} differs from the record key",
            event.customer_id
        )));
    }
    let mut features = match current {
        Some(bytes) => CustomerFeatures::decode(bytes)
            .map_err(|error| FeaturesError::Failed(format!("stored value: {error}")))?,
        None => CustomerFeatures::default(),
    };
    let was_abusing = features.subscription_abuse;
    fold(&mut features, &event);

    let alert = if features.subscription_abuse && !was_abusing {
        let alert = AbuseAlert {
            customer_id: &event.customer_id,
            rule: ABUSE_RULE,
            order_id: &event.order_id,
            event_time_ms: event.event_time_ms,
            free_delivery_addresses_24h: features.free_delivery_addresses_24h,
        };
        Some(serde_json::to_vec(&alert).map_err(|error| FeaturesError::Failed(error.to_string()))?)
    } else {
        None
    };
    Ok(Folded {
        state: features.encode_to_vec(),
        alert,
    })
}

/// Folds one event into a customer's features.
pub fn fold(features: &mut CustomerFeatures, event: &OrderEvent) {
    let t = event.event_time_ms;
    if features.orders_total == 0 {
        features.customer_id = event.customer_id.clone();
        features.first_seen_ms = t;
        features.last_seen_ms = t;
    } else {
        features.first_seen_ms = features.first_seen_ms.min(t);
        features.last_seen_ms = features.last_seen_ms.max(t);
    }
    features.orders_total = features.orders_total.wrapping_add(1);
    features.amount_total_cents = features.amount_total_cents.wrapping_add(event.amount_cents);
    let now = features.last_seen_ms;

    let windows = features.windows.get_or_insert_with(FeatureWindows::default);
    let free = u64::from(event.free_delivery);
    if bucket(t, HOUR_MS) > bucket(now, HOUR_MS).wrapping_sub(HOURS_IN_7D) {
        add_to_bucket(
            &mut windows.hour_buckets,
            bucket(t, HOUR_MS),
            event.amount_cents,
            free,
        );
        if bucket(t, MINUTE_MS) > bucket(now, MINUTE_MS).wrapping_sub(MINUTES_IN_1H) {
            add_to_bucket(
                &mut windows.minute_buckets,
                bucket(t, MINUTE_MS),
                event.amount_cents,
                free,
            );
        }
    } else {
        features.late_events = features.late_events.wrapping_add(1);
    }
    windows
        .minute_buckets
        .retain(|b| b.index > bucket(now, MINUTE_MS).wrapping_sub(MINUTES_IN_1H));
    windows
        .hour_buckets
        .retain(|b| b.index > bucket(now, HOUR_MS).wrapping_sub(HOURS_IN_7D));

    let horizon = now.wrapping_sub(DISTINCT_HORIZON_MS);
    remember(&mut windows.addresses, &event.delivery_address, t, horizon);
    remember(
        &mut windows.instruments,
        &event.payment_instrument,
        t,
        horizon,
    );
    let free_horizon = now.wrapping_sub(DAY_MS);
    if event.free_delivery {
        remember(
            &mut windows.free_delivery_addresses,
            &event.delivery_address,
            t,
            free_horizon,
        );
    } else {
        forget_before(&mut windows.free_delivery_addresses, free_horizon);
    }

    let hours_24h = |b: &&Bucket| b.index > bucket(now, HOUR_MS).wrapping_sub(HOURS_IN_24H);
    features.last_1h = Some(totals(windows.minute_buckets.iter()));
    features.last_24h = Some(totals(windows.hour_buckets.iter().filter(hours_24h)));
    features.last_7d = Some(totals(windows.hour_buckets.iter()));
    features.free_delivery_orders_24h = windows
        .hour_buckets
        .iter()
        .filter(hours_24h)
        .fold(0u64, |sum, b| sum.wrapping_add(b.free_delivery_orders));
    features.distinct_addresses_24h = seen_after(&windows.addresses, now.wrapping_sub(DAY_MS));
    features.distinct_addresses_30d = seen_after(&windows.addresses, horizon);
    features.distinct_instruments_24h = seen_after(&windows.instruments, now.wrapping_sub(DAY_MS));
    features.distinct_instruments_30d = seen_after(&windows.instruments, horizon);
    features.free_delivery_addresses_24h =
        seen_after(&windows.free_delivery_addresses, free_horizon);
    features.subscription_abuse = features.free_delivery_addresses_24h > ABUSE_DISTINCT_ADDRESSES;
}

/// Returns the index of the bucket of size `size_ms` that holds `time_ms`.
fn bucket(time_ms: i64, size_ms: i64) -> i64 {
    time_ms.div_euclid(size_ms)
}

fn add_to_bucket(buckets: &mut Vec<Bucket>, index: i64, amount_cents: i64, free: u64) {
    let position = match buckets.binary_search_by_key(&index, |b| b.index) {
        Ok(position) => position,
        Err(position) => {
            buckets.insert(
                position,
                Bucket {
                    index,
                    ..Bucket::default()
                },
            );
            position
        }
    };
    let bucket = &mut buckets[position];
    bucket.orders = bucket.orders.wrapping_add(1);
    bucket.amount_cents = bucket.amount_cents.wrapping_add(amount_cents);
    bucket.free_delivery_orders = bucket.free_delivery_orders.wrapping_add(free);
}

fn totals<'a>(buckets: impl Iterator<Item = &'a Bucket>) -> WindowTotals {
    buckets.fold(WindowTotals::default(), |mut totals, b| {
        totals.orders = totals.orders.wrapping_add(b.orders);
        totals.amount_cents = totals.amount_cents.wrapping_add(b.amount_cents);
        totals
    })
}

/// Records that `value` was seen at `t` in a set kept sorted by hash, drops values last
/// seen at or before `horizon`, and evicts the least recently seen beyond the cap.
fn remember(set: &mut Vec<SeenValue>, value: &str, t: i64, horizon: i64) {
    if t > horizon {
        let hash = xxhash_rust::xxh3::xxh3_64(value.as_bytes());
        match set.binary_search_by_key(&hash, |v| v.hash) {
            Ok(position) => set[position].last_seen_ms = set[position].last_seen_ms.max(t),
            Err(position) => set.insert(
                position,
                SeenValue {
                    hash,
                    last_seen_ms: t,
                },
            ),
        }
    }
    forget_before(set, horizon);
    while set.len() > DISTINCT_SET_CAP {
        let oldest = set
            .iter()
            .enumerate()
            .min_by_key(|(_, v)| (v.last_seen_ms, v.hash))
            .map(|(position, _)| position)
            .unwrap_or_default();
        set.remove(oldest);
    }
}

fn forget_before(set: &mut Vec<SeenValue>, horizon: i64) {
    set.retain(|v| v.last_seen_ms > horizon);
}

fn seen_after(set: &[SeenValue], horizon: i64) -> u32 {
    set.iter().filter(|v| v.last_seen_ms > horizon).count() as u32
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const T0: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

    fn order(n: u32, t: i64, amount_cents: i64, address: &str, free: bool) -> OrderEvent {
        OrderEvent {
            order_id: format!("o-{n}"),
            customer_id: "c-1".into(),
            event_time_ms: t,
            amount_cents,
            delivery_address: address.into(),
            payment_instrument: format!("card-{}", n % 2),
            free_delivery: free,
        }
    }

    fn fold_all(events: &[OrderEvent]) -> CustomerFeatures {
        let mut features = CustomerFeatures::default();
        for event in events {
            fold(&mut features, event);
        }
        features
    }

    #[test]
    fn windows_count_by_bucket_ending_at_latest_event() {
        let events = [
            order(1, T0, 100, "a", false),
            order(2, T0 + 30 * MINUTE_MS, 200, "a", false),
            order(3, T0 + 2 * HOUR_MS, 400, "b", false),
            order(4, T0 + 2 * DAY_MS, 800, "c", false),
        ];
        let f = fold_all(&events);
        assert_eq!(f.orders_total, 4);
        assert_eq!(f.amount_total_cents, 1500);
        assert_eq!(f.first_seen_ms, T0);
        assert_eq!(f.last_seen_ms, T0 + 2 * DAY_MS);
        assert_eq!(
            f.last_1h,
            Some(WindowTotals {
                orders: 1,
                amount_cents: 800
            })
        );
        assert_eq!(
            f.last_24h,
            Some(WindowTotals {
                orders: 1,
                amount_cents: 800
            })
        );
        assert_eq!(
            f.last_7d,
            Some(WindowTotals {
                orders: 4,
                amount_cents: 1500
            })
        );
        assert_eq!(f.distinct_addresses_24h, 1);
        assert_eq!(f.distinct_addresses_30d, 3);
        assert_eq!(f.distinct_instruments_30d, 2);
    }

    #[test]
    fn out_of_order_and_late_events() {
        let events = [
            order(1, T0 + 10 * DAY_MS, 100, "a", false),
            order(2, T0 + 10 * DAY_MS - 5 * MINUTE_MS, 200, "a", false),
            order(3, T0, 400, "b", false), // older than 7 days at arrival
        ];
        let f = fold_all(&events);
        assert_eq!(f.first_seen_ms, T0);
        assert_eq!(f.late_events, 1);
        assert_eq!(
            f.last_1h,
            Some(WindowTotals {
                orders: 2,
                amount_cents: 300
            })
        );
        assert_eq!(
            f.last_7d,
            Some(WindowTotals {
                orders: 2,
                amount_cents: 300
            })
        );
        assert_eq!(f.amount_total_cents, 700);
        // Within 30 days, so the late order's address still counts.
        assert_eq!(f.distinct_addresses_30d, 2);
    }

    #[test]
    fn abuse_rule_fires_on_the_fourth_free_delivery_address_once() {
        let mut value: Option<Vec<u8>> = None;
        let mut alerts = Vec::new();
        for n in 0..6 {
            let event = order(
                n,
                T0 + i64::from(n) * HOUR_MS,
                100,
                &format!("addr-{}", n.min(4)),
                true,
            );
            let json = serde_json::to_vec(&event).unwrap();
            let folded = process(b"c-1", Some(&json), value.as_deref()).unwrap();
            value = Some(folded.state);
            alerts.extend(folded.alert.into_iter().map(|alert| (n, alert)));
        }
        assert_eq!(alerts.len(), 1, "one alert when the rule starts to hold");
        assert_eq!(alerts[0].0, 3, "the fourth distinct address triggers it");
        let f = CustomerFeatures::decode(value.unwrap().as_slice()).unwrap();
        assert!(f.subscription_abuse);
        assert_eq!(f.free_delivery_addresses_24h, 5);
        assert_eq!(f.free_delivery_orders_24h, 6);
    }

    #[test]
    fn distinct_sets_stay_bounded() {
        let events: Vec<_> = (0..500)
            .map(|n| order(n, T0 + i64::from(n) * MINUTE_MS, 1, &format!("a{n}"), true))
            .collect();
        let f = fold_all(&events);
        let windows = f.windows.unwrap();
        assert_eq!(windows.addresses.len(), DISTINCT_SET_CAP);
        assert_eq!(f.distinct_addresses_30d, DISTINCT_SET_CAP as u32);
        assert!(windows.minute_buckets.len() <= MINUTES_IN_1H as usize);
    }

    #[test]
    fn bad_events_are_malformed_errors() {
        assert!(matches!(
            process(b"c-1", Some(b"{not json"), None),
            Err(FeaturesError::Malformed(_))
        ));
        assert_eq!(
            process(b"c-1", None, None),
            Err(FeaturesError::Malformed("no value".into()))
        );
        let other = br#"{"order_id":"o","customer_id":"c-2","event_time_ms":1,"amount_cents":1,"delivery_address":"a","payment_instrument":"p","free_delivery":false}"#;
        assert!(matches!(
            process(b"c-1", Some(other), None),
            Err(FeaturesError::Malformed(_))
        ));
        let good = br#"{"order_id":"o","customer_id":"c-1","event_time_ms":1,"amount_cents":1,"delivery_address":"a","payment_instrument":"p","free_delivery":false}"#;
        assert!(matches!(
            process(b"c-1", Some(good), Some(b"\xff\xff")),
            Err(FeaturesError::Failed(_))
        ));
    }

    #[test]
    fn extreme_amounts_and_times_wrap_instead_of_stopping_the_partition() {
        // Any i64 decodes from JSON; a panic here would stop the partition on every retry.
        let f = fold_all(&[
            order(1, i64::MIN, i64::MAX, "a", false),
            order(2, i64::MIN + 1, i64::MAX, "b", true),
            order(3, i64::MAX, i64::MIN, "c", false),
            order(4, i64::MAX, -1, "d", true),
        ]);
        assert_eq!(f.orders_total, 4);
        assert_eq!(
            f.amount_total_cents,
            i64::MAX
                .wrapping_add(i64::MAX)
                .wrapping_add(i64::MIN)
                .wrapping_add(-1)
        );
        assert_eq!(f.last_seen_ms, i64::MAX);
    }

    fn any_bucket() -> impl Strategy<Value = Bucket> {
        (
            prop_oneof![any::<i64>(), 490_000i64..491_000],
            any::<u64>(),
            any::<i64>(),
            any::<u64>(),
        )
            .prop_map(
                |(index, orders, amount_cents, free_delivery_orders)| Bucket {
                    index,
                    orders,
                    amount_cents,
                    free_delivery_orders,
                },
            )
    }

    fn any_seen() -> impl Strategy<Value = Vec<SeenValue>> {
        proptest::collection::vec(
            (any::<u64>(), any::<i64>())
                .prop_map(|(hash, last_seen_ms)| SeenValue { hash, last_seen_ms }),
            0..80,
        )
    }

    /// Stored features as a damaged or foreign store might hold them: any numbers, buckets
    /// and sets unsorted, duplicated, longer than the fold keeps.
    fn any_features() -> impl Strategy<Value = CustomerFeatures> {
        (
            (any::<u64>(), any::<i64>(), any::<i64>(), any::<i64>()),
            proptest::collection::vec(any_bucket(), 0..80),
            proptest::collection::vec(any_bucket(), 0..200),
            (any_seen(), any_seen(), any_seen()),
        )
            .prop_map(
                |((orders_total, first, last, amount), minutes, hours, seen)| CustomerFeatures {
                    customer_id: "c-1".into(),
                    first_seen_ms: first,
                    last_seen_ms: last,
                    orders_total,
                    amount_total_cents: amount,
                    windows: Some(FeatureWindows {
                        minute_buckets: minutes,
                        hour_buckets: hours,
                        addresses: seen.0,
                        instruments: seen.1,
                        free_delivery_addresses: seen.2,
                    }),
                    ..CustomerFeatures::default()
                },
            )
    }

    proptest! {
        #[test]
        fn any_stored_value_and_any_event_never_panic_the_fold(
            stored in prop_oneof![
                any_features().prop_map(|f| f.encode_to_vec()),
                proptest::collection::vec(any::<u8>(), 0..256),
            ],
            t in prop_oneof![any::<i64>(), Just(T0)],
            amount in any::<i64>(),
            free in any::<bool>(),
        ) {
            let event = OrderEvent {
                event_time_ms: t,
                amount_cents: amount,
                free_delivery: free,
                ..order(1, t, amount, "a", free)
            };
            let value = serde_json::to_vec(&event).unwrap();
            // Ok, or an error for this one record: never a panic.
            let _ = process(b"c-1", Some(&value), Some(&stored));
        }

        #[test]
        fn stored_features_round_trip(features in any_features()) {
            let decoded = CustomerFeatures::decode(features.encode_to_vec().as_slice()).unwrap();
            prop_assert_eq!(decoded, features);
        }
    }
}
