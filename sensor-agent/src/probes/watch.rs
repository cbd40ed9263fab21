//! Watched places for the file probes: path prefixes (an LPM trie in the kernel) and a few
//! suffixes for names that can be anywhere, each with the operations it wants reported,
//! derived from the loaded rules (`detect::places`).

use sensor_common::{MAX_WATCH_SUFFIXES, WATCH_KEY_BYTES, WatchSuffix, file_op};

use crate::detect::{
    places,
    rules::{self, RuleSet},
};

/// One watched prefix and the `file_op` bits wanted under it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchRule {
    pub prefix: String,
    pub ops: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WatchError {
    #[error("watched path {0:?} is not absolute")]
    NotAbsolute(String),
    #[error(
        "watched path {path:?} is {len} bytes; prefixes are matched on their first {max} bytes"
    )]
    TooLong {
        path: String,
        len: usize,
        max: usize,
    },
    #[error("watched suffix {0:?} must be 1 to 16 bytes")]
    BadSuffix(String),
    #[error("at most {MAX_WATCH_SUFFIXES} watched suffixes")]
    TooManySuffixes,
}

/// Opens for writing only: /proc/PID/mem (the decoder keeps nothing else under /proc).
const OPEN_ONLY: u32 = file_op::bit(file_op::OPEN_WRITE)
    | file_op::bit(file_op::CREATE)
    | file_op::bit(file_op::TRUNCATE);

/// What the probes watch: the places the loaded rules need, the operator's `--watch`
/// prefixes, and `/proc/` for writes into another process's memory (B15, which the
/// decoder turns into proc_mem_write events).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchList {
    pub prefixes: Vec<WatchRule>,
    pub suffixes: Vec<(String, u32)>,
    /// Rules and places the probes cannot serve (see `detect::places`).
    pub warnings: Vec<String>,
}

impl WatchList {
    pub fn for_rules(set: &RuleSet, extra: &[String]) -> Result<WatchList, WatchError> {
        let places = places::derive(set);
        let mut prefixes = vec![WatchRule {
            prefix: "/proc/".into(),
            ops: OPEN_ONLY,
        }];
        prefixes.extend(
            places
                .prefixes
                .into_iter()
                .map(|(prefix, ops)| WatchRule { prefix, ops }),
        );
        for prefix in extra {
            prefixes.push(rule_for(prefix)?);
        }
        for rule in &prefixes {
            validate(rule)?;
        }
        let suffixes: Vec<(String, u32)> = places.suffixes.into_iter().collect();
        suffix_slots(&suffixes)?;
        Ok(WatchList {
            prefixes,
            suffixes,
            warnings: places.warnings,
        })
    }

    /// The watch list of the embedded EPMM pack alone.
    pub fn embedded() -> WatchList {
        rules::load(&[], true)
            .ok()
            .and_then(|set| WatchList::for_rules(&set, &[]).ok())
            .unwrap_or_default()
    }
}

/// A rule from the command line: every operation under `prefix`.
pub fn rule_for(prefix: &str) -> Result<WatchRule, WatchError> {
    let rule = WatchRule {
        prefix: prefix.into(),
        ops: file_op::ALL,
    };
    validate(&rule)?;
    Ok(rule)
}

pub fn validate(rule: &WatchRule) -> Result<(), WatchError> {
    if !rule.prefix.starts_with('/') {
        return Err(WatchError::NotAbsolute(rule.prefix.clone()));
    }
    if rule.prefix.len() > WATCH_KEY_BYTES {
        return Err(WatchError::TooLong {
            path: rule.prefix.clone(),
            len: rule.prefix.len(),
            max: WATCH_KEY_BYTES,
        });
    }
    Ok(())
}

/// What each distinct prefix wants, as the kernel's LPM trie must hold it: the trie
/// answers with the longest matching prefix only, so a prefix also carries everything its
/// shorter covering prefixes want (a rule never hides what a broader one reports).
pub fn effective(rules: &[WatchRule]) -> Vec<(String, u32)> {
    let mut prefixes: Vec<&str> = rules.iter().map(|r| r.prefix.as_str()).collect();
    prefixes.sort_unstable();
    prefixes.dedup();
    prefixes
        .into_iter()
        .map(|prefix| {
            let ops = rules
                .iter()
                .filter(|r| prefix.starts_with(r.prefix.as_str()))
                .fold(0, |ops, r| ops | r.ops);
            (prefix.to_owned(), ops)
        })
        .collect()
}

/// The LPM key of a prefix: (bit length, bytes).
pub fn lpm_key(prefix: &str) -> (u32, [u8; WATCH_KEY_BYTES]) {
    let mut data = [0u8; WATCH_KEY_BYTES];
    data[..prefix.len()].copy_from_slice(prefix.as_bytes());
    ((prefix.len() * 8) as u32, data)
}

/// The suffix slots the probes read.
pub fn suffix_slots(
    suffixes: &[(String, u32)],
) -> Result<[WatchSuffix; MAX_WATCH_SUFFIXES], WatchError> {
    if suffixes.len() > MAX_WATCH_SUFFIXES {
        return Err(WatchError::TooManySuffixes);
    }
    let mut slots = [WatchSuffix::default(); MAX_WATCH_SUFFIXES];
    for (slot, (suffix, ops)) in slots.iter_mut().zip(suffixes) {
        let bytes = suffix.as_bytes();
        if bytes.is_empty() || bytes.len() > 16 {
            return Err(WatchError::BadSuffix(suffix.clone()));
        }
        let at = 16 - bytes.len();
        slot.len = bytes.len() as u32;
        slot.ops = *ops;
        slot.bytes[at..].copy_from_slice(bytes);
        slot.mask[at..].fill(0xff);
    }
    Ok(slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_pack_gives_a_valid_watch_list() {
        let list = WatchList::embedded();
        assert!(list.prefixes.iter().any(|r| r.prefix == "/proc/"));
        assert!(list.prefixes.iter().any(|r| r.prefix == "/etc/cron"));
        assert!(list.suffixes.iter().any(|(s, _)| s == "/authorized_keys"));
        assert!(list.warnings.is_empty(), "{:?}", list.warnings);
    }

    #[test]
    fn an_extra_prefix_is_watched_for_everything_and_a_bad_one_refused() {
        let set = rules::load(&[], true).unwrap();
        let list = WatchList::for_rules(&set, &["/srv/www/".into()]).unwrap();
        assert!(
            list.prefixes
                .iter()
                .any(|r| r.prefix == "/srv/www/" && r.ops == file_op::ALL)
        );
        assert_eq!(
            WatchList::for_rules(&set, &["srv".into()]).unwrap_err(),
            WatchError::NotAbsolute("srv".into())
        );
    }

    #[test]
    fn bad_rules_are_named() {
        assert_eq!(
            rule_for("relative/dir").unwrap_err().to_string(),
            "watched path \"relative/dir\" is not absolute"
        );
        let long = format!("/{}", "x".repeat(300));
        assert!(matches!(
            rule_for(&long),
            Err(WatchError::TooLong { len: 301, .. })
        ));
        assert_eq!(
            suffix_slots(&[("x".repeat(17), 1)]).unwrap_err(),
            WatchError::BadSuffix("x".repeat(17))
        );
    }

    #[test]
    fn suffix_is_right_aligned_with_its_mask() {
        let slots = suffix_slots(&[("/mem".into(), 3)]).unwrap();
        assert_eq!(&slots[0].bytes[12..], b"/mem");
        assert_eq!(slots[0].bytes[..12], [0; 12]);
        assert_eq!(slots[0].mask[..12], [0; 12]);
        assert_eq!(slots[0].mask[12..], [0xff; 4]);
        assert_eq!(slots[1].len, 0);
    }

    #[test]
    fn longer_prefixes_carry_what_shorter_ones_want() {
        let rules = [
            WatchRule {
                prefix: "/tmp/".into(),
                ops: 1,
            },
            WatchRule {
                prefix: "/tmp/x/".into(),
                ops: 2,
            },
            WatchRule {
                prefix: "/tmp/x/".into(),
                ops: 4,
            },
            WatchRule {
                prefix: "/var/".into(),
                ops: 8,
            },
        ];
        assert_eq!(
            effective(&rules),
            [
                ("/tmp/".into(), 1),
                ("/tmp/x/".into(), 7),
                ("/var/".into(), 8)
            ]
        );
    }

    #[test]
    fn lpm_key_is_bits_and_bytes() {
        let (bits, data) = lpm_key("/tmp/");
        assert_eq!(bits, 40);
        assert_eq!(&data[..5], b"/tmp/");
    }
}
