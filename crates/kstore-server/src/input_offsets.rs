//! Where a partition's input stands, per input topic, for a store that reads several
//! co-partitioned topics: partition `p` of the store folds partition `p` of each.
//!
//! A store's *input position* (`Position::input_next`, what reads report, what lag and
//! `min_input_offset` compare) is one number: the sum of the next offsets of its input
//! topics' partitions. It only grows as records are folded, and for a store over one topic
//! it is that topic's next offset, as it always was. The per-topic offsets behind it are
//! kept next to it: in the store's meta column family, in backup catalog entries, and in a
//! changelog header of every record of a partition that has read more than one topic (a
//! topic dropped from the config keeps its offset, so that the position never goes back).
//! Ingest guards each topic by them, and a point-in-time restore rewinds each topic to them.

use std::collections::BTreeMap;

/// The next input offset per input topic of one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InputOffsets(BTreeMap<String, i64>);

impl InputOffsets {
    /// One topic's next offset.
    pub fn single(topic: &str, next: i64) -> Self {
        InputOffsets(BTreeMap::from([(topic.to_owned(), next)]))
    }

    /// From a catalog's or a header's map.
    pub fn from_map(offsets: BTreeMap<String, i64>) -> Self {
        InputOffsets(offsets)
    }

    /// The next offset of `topic` (none if nothing of it was folded or known).
    pub fn get(&self, topic: &str) -> Option<i64> {
        self.0.get(topic).copied()
    }

    /// Sets the next offset of `topic`.
    pub fn set(&mut self, topic: &str, next: i64) {
        match self.0.get_mut(topic) {
            Some(stored) => *stored = next,
            None => {
                self.0.insert(topic.to_owned(), next);
            }
        }
    }

    /// Takes every offset `other` holds that is beyond this one's for its topic.
    pub fn advance_to(&mut self, other: &InputOffsets) {
        for (topic, next) in &other.0 {
            if self.get(topic).is_none_or(|mine| mine < *next) {
                self.set(topic, *next);
            }
        }
    }

    /// The topic it holds an offset for, if it holds exactly one.
    pub fn only_topic(&self) -> Option<&str> {
        match self.0.len() {
            1 => self.0.keys().next().map(String::as_str),
            _ => None,
        }
    }

    /// How many topics it holds an offset for.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it holds no offset.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Takes every offset `other` holds.
    pub fn update(&mut self, other: &InputOffsets) {
        for (topic, next) in &other.0 {
            self.set(topic, *next);
        }
    }

    /// The input position: the sum of the next offsets. A topic that leaves the store's
    /// config keeps its offset here, so that the position never goes back.
    pub fn position(&self) -> i64 {
        self.0
            .values()
            .fold(0i64, |sum, next| sum.saturating_add(*next))
    }

    /// The input position of the record at `offset` of `topic`: the position the record
    /// moves the partition past (its offset, plus every other topic's next offset).
    pub fn position_of(&self, topic: &str, offset: i64) -> i64 {
        self.0
            .iter()
            .filter(|(other, _)| other.as_str() != topic)
            .fold(offset, |sum, (_, next)| sum.saturating_add(*next))
    }

    /// Each topic with its next offset, by topic name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, i64)> {
        self.0.iter().map(|(topic, next)| (topic.as_str(), *next))
    }

    /// The map, for a backup catalog entry.
    pub fn to_map(&self) -> BTreeMap<String, i64> {
        self.0.clone()
    }

    /// `topic=next,topic=next`, by topic name (Kafka topic names hold neither `=` nor `,`).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        for (topic, next) in &self.0 {
            if !text.is_empty() {
                text.push(',');
            }
            text.push_str(topic);
            text.push('=');
            text.push_str(&next.to_string());
        }
        text
    }

    /// Parses [`InputOffsets::encode`]'s text.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_owned())?;
        let mut offsets = BTreeMap::new();
        for entry in text.split(',').filter(|entry| !entry.is_empty()) {
            let parsed = entry.split_once('=').and_then(|(topic, next)| {
                let next = next.parse::<i64>().ok().filter(|next| *next >= 0)?;
                (!topic.is_empty()).then(|| (topic.to_owned(), next))
            });
            let Some((topic, next)) = parsed else {
                return Err(format!("{entry:?} is not topic=offset"));
            };
            if offsets.insert(topic, next).is_some() {
                return Err(format!("{entry:?} names its topic twice"));
            }
        }
        Ok(InputOffsets(offsets))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_position_is_the_sum_of_the_next_offsets_and_a_records_counts_the_others() {
        let mut offsets = InputOffsets::single("orders", 10);
        assert_eq!(offsets.position(), 10);
        assert_eq!(offsets.position_of("orders", 10), 10);
        offsets.set("refunds", 4);
        assert_eq!(offsets.position(), 14);
        // The record at offset 4 of refunds: after it, refunds' next is 5 and the position 15.
        assert_eq!(offsets.position_of("refunds", 4), 14);
        offsets.set("refunds", 5);
        assert_eq!(offsets.position(), 15);
        assert_eq!(offsets.get("refunds"), Some(5));
        assert_eq!(offsets.get("payments"), None);
    }

    #[test]
    fn an_update_takes_the_others_offsets_and_keeps_the_rest() {
        let mut committed = InputOffsets::single("a", 3);
        committed.set("b", 7);
        committed.update(&InputOffsets::single("b", 9));
        assert_eq!(committed.iter().collect::<Vec<_>>(), [("a", 3), ("b", 9)]);
    }

    #[test]
    fn advancing_keeps_the_further_offset_of_each_topic() {
        let mut stored = InputOffsets::single("a", 10);
        stored.set("b", 4);
        let mut replayed = InputOffsets::single("a", 7);
        replayed.set("c", 2);
        stored.advance_to(&replayed);
        assert_eq!(
            stored.iter().collect::<Vec<_>>(),
            [("a", 10), ("b", 4), ("c", 2)]
        );
        assert_eq!(stored.len(), 3);
    }

    #[test]
    fn offsets_round_trip_and_bad_text_is_refused() {
        let mut offsets = InputOffsets::single("orders.v1", 12_345);
        offsets.set("refunds_eu-2", 0);
        let text = offsets.encode();
        assert_eq!(text, "orders.v1=12345,refunds_eu-2=0");
        assert_eq!(InputOffsets::decode(text.as_bytes()), Ok(offsets));
        assert_eq!(InputOffsets::decode(b""), Ok(InputOffsets::default()));
        for bad in [
            &b"orders"[..],
            b"orders=x",
            b"orders=-1",
            b"=4",
            b"a=1,a=2",
            b"\xff=1",
        ] {
            assert!(InputOffsets::decode(bad).is_err(), "{bad:?}");
        }
    }
}
