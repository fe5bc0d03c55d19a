//! The order event that kstore's built-in fraud-features processor reads, as JSON on the
//! input topic, keyed by customer id.

use serde::{Deserialize, Serialize};

/// One order, as an upstream shop publishes it.
///
/// ```
/// let json = r#"{"order_id":"o-1","customer_id":"c-1","event_time_ms":1767225600000,
///   "amount_cents":1999,"delivery_address":"1 Main St","payment_instrument":"card-1",
///   "free_delivery":true}"#;
/// let event: kstore_core::orders::OrderEvent = serde_json::from_str(json).unwrap();
/// assert_eq!(event.amount_cents, 1999);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderEvent {
    /// The shop's order id.
    pub order_id: String,
    /// The customer, which is also the record key.
    pub customer_id: String,
    /// When the order was placed, in milliseconds since the Unix epoch.
    pub event_time_ms: i64,
    /// The order total in cents, so that sums are exact.
    pub amount_cents: i64,
    /// Where the order is delivered.
    pub delivery_address: String,
    /// The payment instrument (a token, never a card number).
    pub payment_instrument: String,
    /// Whether the order used a free-delivery subscription.
    pub free_delivery: bool,
}
