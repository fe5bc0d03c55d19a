//! A deterministic generator of order events: the same seed and settings give the same
//! events in the same order, so a test can recompute every customer's state.
//!
//! Most customers order from one or two addresses and cards, sometimes with free delivery.
//! Every `abuser_every`-th customer abuses the subscription: nearly always free delivery,
//! to up to eight addresses. Event times advance by `step_ms` per event with up to five
//! minutes of jitter (so some arrive out of order), and one event in a thousand arrives
//! eight days late.

use kstore_core::orders::OrderEvent;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// 2026-01-01T00:00:00Z, where generated time starts.
pub const DEFAULT_START_MS: i64 = 1_767_225_600_000;

const JITTER_MS: i64 = 5 * 60_000;
const LATE_MS: i64 = 8 * 24 * 3_600_000;

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratorConfig {
    /// The random seed.
    pub seed: u64,
    /// How many customers the events spread over.
    pub customers: u32,
    /// Every this-many-th customer abuses the free-delivery subscription (0: nobody).
    pub abuser_every: u32,
    /// Event time of the first event.
    pub start_ms: i64,
    /// Event time advance per event.
    pub step_ms: i64,
    /// Customers take turns (0, 1, 2, …, then 0 again) instead of being drawn at random,
    /// so that `customers` events give every customer exactly one: a store of exactly that
    /// many keys.
    pub customers_in_turn: bool,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            seed: 42,
            customers: 5_000,
            abuser_every: 50,
            start_ms: DEFAULT_START_MS,
            step_ms: 3_000,
            customers_in_turn: false,
        }
    }
}

/// An endless, deterministic stream of order events.
#[derive(Debug, Clone)]
pub struct OrderGenerator {
    config: GeneratorConfig,
    rng: ChaCha8Rng,
    next: u64,
}

impl OrderGenerator {
    /// Returns the generator for `config`.
    ///
    /// # Panics
    ///
    /// Panics if `config.customers` is zero.
    pub fn new(config: GeneratorConfig) -> Self {
        assert!(config.customers > 0, "at least one customer");
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        OrderGenerator {
            config,
            rng,
            next: 0,
        }
    }

    /// Returns the id of customer `n`, which is also its record key.
    pub fn customer_id(n: u32) -> String {
        format!("customer-{n:06}")
    }
}

impl Iterator for OrderGenerator {
    type Item = OrderEvent;

    fn next(&mut self) -> Option<OrderEvent> {
        let n = self.next;
        self.next += 1;
        let rng = &mut self.rng;
        let customer = if self.config.customers_in_turn {
            (n % u64::from(self.config.customers)) as u32
        } else {
            rng.random_range(0..self.config.customers)
        };
        let abuser = self.config.abuser_every > 0 && customer % self.config.abuser_every == 0;
        let mut event_time_ms = self.config.start_ms
            + n as i64 * self.config.step_ms
            + rng.random_range(-JITTER_MS..=JITTER_MS);
        if rng.random_ratio(1, 1000) {
            event_time_ms -= LATE_MS;
        }
        let (addresses, instruments, free_delivery) = if abuser {
            (8, 3, rng.random_bool(0.9))
        } else {
            (2, 2, rng.random_bool(0.2))
        };
        Some(OrderEvent {
            order_id: format!("order-{}-{n}", self.config.seed),
            customer_id: Self::customer_id(customer),
            event_time_ms,
            amount_cents: rng.random_range(100..50_000),
            delivery_address: format!(
                "{customer} Main Street, flat {}",
                rng.random_range(0..addresses)
            ),
            payment_instrument: format!("card-{customer}-{}", rng.random_range(0..instruments)),
            free_delivery,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_events() {
        let a: Vec<_> = OrderGenerator::new(GeneratorConfig::default())
            .take(1000)
            .collect();
        let b: Vec<_> = OrderGenerator::new(GeneratorConfig::default())
            .take(1000)
            .collect();
        assert_eq!(a, b);
        let other = GeneratorConfig {
            seed: 7,
            ..GeneratorConfig::default()
        };
        let c: Vec<_> = OrderGenerator::new(other).take(1000).collect();
        assert_ne!(a, c);
    }

    #[test]
    fn abusers_use_free_delivery_to_many_addresses() {
        let config = GeneratorConfig {
            customers: 10,
            abuser_every: 5,
            ..GeneratorConfig::default()
        };
        let events: Vec<_> = OrderGenerator::new(config).take(5_000).collect();
        let addresses = |customer: &str, free: bool| {
            let mut set: Vec<_> = events
                .iter()
                .filter(|e| e.customer_id == customer && (!free || e.free_delivery))
                .map(|e| e.delivery_address.clone())
                .collect();
            set.sort();
            set.dedup();
            set.len()
        };
        assert_eq!(addresses(&OrderGenerator::customer_id(5), true), 8);
        assert_eq!(addresses(&OrderGenerator::customer_id(6), false), 2);
    }
}
