//! Which version of a store's processor folded which input of a partition: the module
//! switches, recorded in the partition's changelog so that every copy knows them.
//!
//! A WebAssembly module is identified by the SHA-256 of its bytes (what `sha256sum` prints).
//! When an active copy is about to fold its first record with a module that is not the
//! partition's current one, ingest writes a switch into the same transaction as that
//! record's fold: the partition's whole history, a line per version, `<first input offset>
//! <sha256>`, oldest first. Every copy applies it from the changelog (a standby, a restore,
//! a peer snapshot or a backup carries it in the store's metadata), so the switch happens at
//! one input offset for all of them, and a copy that turns active elsewhere knows which
//! module folds next.
//!
//! "Earlier" means earlier in this partition's history: a module the history does not hold
//! (one older than this record keeping, or trimmed past the newest `MAX_VERSIONS`) counts
//! as new and takes over.
//!
//! A node whose module is an *earlier* version of the partition's history (a node not yet
//! upgraded in a rolling restart, which takes over a partition an upgraded node folded)
//! does not fold: the partition's input waits while the node owns it, and its copy keeps
//! serving reads with an error naming both versions, until the node runs the current
//! module, or its store sets `rollback = true` to fold with the earlier module again from
//! the next record on (which is recorded as a switch too).

/// The most versions a history keeps: the oldest are dropped beyond it.
const MAX_VERSIONS: usize = 64;

/// One version of a partition's processor and the first input offset it folded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleVersion {
    /// The first input offset the version folded.
    pub from_offset: i64,
    /// The module's SHA-256, in lowercase hex.
    pub digest: String,
}

/// A partition's processor versions, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModuleHistory {
    versions: Vec<ModuleVersion>,
}

/// What ingest does before folding a partition's next record with its module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleCheck {
    /// The module is the partition's current one: fold.
    Current,
    /// The module takes over from the record about to fold: record this history in the
    /// changelog with the fold, then fold.
    Switch(ModuleHistory),
    /// The module is an earlier version of the partition's: do not fold (why, in words).
    Refuse(String),
}

/// A module history's bytes that do not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a module history line does not read `<offset> <sha256>`: {0:?}")]
pub struct BadHistory(pub String);

impl ModuleHistory {
    /// The versions, oldest first.
    pub fn versions(&self) -> &[ModuleVersion] {
        &self.versions
    }

    /// The version that folds now, if any did.
    pub fn current(&self) -> Option<&ModuleVersion> {
        self.versions.last()
    }

    /// The versions that folded some input before `input_next` (a copy that reflects the
    /// input before it may record a switch it has not folded from yet).
    pub fn folded_before(&self, input_next: i64) -> ModuleHistory {
        ModuleHistory {
            versions: self
                .versions
                .iter()
                .filter(|v| v.from_offset < input_next)
                .cloned()
                .collect(),
        }
    }

    /// The history as stored: `<offset> <sha256>\n` per version, oldest first.
    pub fn encode(&self) -> Vec<u8> {
        self.versions
            .iter()
            .map(|v| format!("{} {}\n", v.from_offset, v.digest))
            .collect::<String>()
            .into_bytes()
    }

    /// Parses what [`ModuleHistory::encode`] wrote (no bytes: no version).
    pub fn decode(bytes: &[u8]) -> Result<ModuleHistory, BadHistory> {
        let text = std::str::from_utf8(bytes).map_err(|_| BadHistory("not UTF-8".to_string()))?;
        let versions = text
            .lines()
            .map(|line| {
                let bad = || BadHistory(line.chars().take(100).collect());
                let (offset, digest) = line.split_once(' ').ok_or_else(bad)?;
                let from_offset = offset.parse::<i64>().map_err(|_| bad())?;
                if digest.is_empty() || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad());
                }
                Ok(ModuleVersion {
                    from_offset,
                    digest: digest.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ModuleHistory { versions })
    }

    /// Decides whether the module `digest` may fold the partition's record at input offset
    /// `offset`, given this history: the current module folds; a module the history does
    /// not hold (a new version), or an earlier one with `rollback`, takes over from
    /// `offset`; an earlier one without `rollback` is refused.
    pub fn check(&self, digest: &str, offset: i64, rollback: bool) -> ModuleCheck {
        let short = |digest: &str| digest.chars().take(12).collect::<String>();
        match self.current() {
            Some(current) if current.digest == digest => return ModuleCheck::Current,
            Some(current) if !rollback => {
                if let Some(earlier) = self.versions.iter().rev().find(|v| v.digest == digest) {
                    return ModuleCheck::Refuse(format!(
                        "this node's module {} is an earlier version of this partition's: \
                         it folded from input offset {}, and module {} took over from input \
                         offset {}; run the current module here, or set the store's \
                         processor.rollback = true to fold with this one again",
                        short(digest),
                        earlier.from_offset,
                        short(&current.digest),
                        current.from_offset,
                    ));
                }
            }
            _ => {}
        }
        let mut next = self.clone();
        next.versions.push(ModuleVersion {
            from_offset: offset,
            digest: digest.to_string(),
        });
        let excess = next.versions.len().saturating_sub(MAX_VERSIONS);
        next.versions.drain(..excess);
        ModuleCheck::Switch(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const V2: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn switched(check: ModuleCheck) -> ModuleHistory {
        match check {
            ModuleCheck::Switch(history) => history,
            other => panic!("not a switch: {other:?}"),
        }
    }

    #[test]
    fn a_first_module_a_new_one_and_a_rollback_switch_and_an_earlier_one_is_refused() {
        let empty = ModuleHistory::default();
        let first = switched(empty.check(V1, 0, false));
        assert_eq!(first.check(V1, 10, false), ModuleCheck::Current);
        let upgraded = switched(first.check(V2, 120, false));
        assert_eq!(
            upgraded.versions(),
            [
                ModuleVersion {
                    from_offset: 0,
                    digest: V1.into()
                },
                ModuleVersion {
                    from_offset: 120,
                    digest: V2.into()
                },
            ]
        );
        let ModuleCheck::Refuse(reason) = upgraded.check(V1, 130, false) else {
            panic!("an earlier module folded");
        };
        assert!(
            reason.contains("aaaaaaaaaaaa")
                && reason.contains("bbbbbbbbbbbb")
                && reason.contains("input offset 120")
                && reason.contains("rollback"),
            "{reason}"
        );
        let rolled_back = switched(upgraded.check(V1, 130, true));
        assert_eq!(rolled_back.current().map(|v| v.from_offset), Some(130));
        assert_eq!(rolled_back.check(V1, 131, false), ModuleCheck::Current);
        // The newer module is now the earlier version.
        assert!(matches!(
            rolled_back.check(V2, 140, false),
            ModuleCheck::Refuse(_)
        ));
    }

    #[test]
    fn a_history_round_trips_and_stays_bounded_and_bad_bytes_are_named() {
        let mut history = ModuleHistory::default();
        for i in 0..(MAX_VERSIONS as i64 + 5) {
            history = switched(history.check(&format!("{i:064x}"), i * 10, false));
        }
        assert_eq!(history.versions().len(), MAX_VERSIONS);
        assert_eq!(history.versions()[0].from_offset, 50);
        assert_eq!(
            ModuleHistory::decode(&history.encode()),
            Ok(history.clone())
        );
        assert_eq!(history.folded_before(60).versions().len(), 1);
        assert_eq!(history.folded_before(0), ModuleHistory::default());
        assert_eq!(ModuleHistory::decode(b""), Ok(ModuleHistory::default()));
        assert!(ModuleHistory::decode(b"12\n").is_err());
        assert!(ModuleHistory::decode(b"x abc\n").is_err());
        assert!(ModuleHistory::decode(b"1 not-hex\n").is_err());
        assert!(ModuleHistory::decode(&[0xff]).is_err());
    }
}
