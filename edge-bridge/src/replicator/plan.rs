//! What the replicator mirrors, where to, in which order and how fast.
//!
//! Everything here is a pure rule: topic selection by names and glob
//! patterns with excludes ([`TopicSelection`]), the destination topic name
//! ([`RenamePolicy`]), the destination partition of a record
//! ([`PartitionMap`]), per-topic priorities ([`Priorities`]) and the order in
//! which backlogged partitions are drained ([`DrainScheduler`]), the uplink's
//! bandwidth cap ([`TokenBucket`]) and retry delays ([`Backoff`], with
//! jitter from a seeded [`JitterRng`] the driver passes in). Time is always
//! a parameter in milliseconds; nothing reads a clock or the operating
//! system's randomness.

use rill_protocol::partitioner::partition_for_key;

/// Why a plan setting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("topic pattern is empty")]
    EmptyPattern,
    #[error("topic pattern {pattern:?} is longer than {pattern_bytes_max} bytes")]
    PatternTooLong {
        pattern: String,
        pattern_bytes_max: usize,
    },
    #[error(
        "edge id {edge_id:?} must be 1 to {EDGE_ID_BYTES_MAX} bytes of letters, digits, '.', '_' or '-'"
    )]
    InvalidEdgeId { edge_id: String },
    #[error("a token bucket needs a rate above zero and a burst of at least one byte")]
    InvalidBandwidthCap,
    #[error("backoff needs 0 < initial_ms <= max_ms and jitter_percent <= 100")]
    InvalidBackoff,
}

/// The longest topic pattern accepted: a pattern is matched against every
/// topic name, so its size bounds the matching work.
pub const PATTERN_BYTES_MAX: usize = 255;

/// The longest edge id: it is written into every mirrored record.
pub const EDGE_ID_BYTES_MAX: usize = 64;

/// Checks an edge id: it names this box in destination topic names and in
/// every provenance header, so it keeps to the characters Kafka allows in
/// topic names (no '/', which separates provenance fields).
pub fn validate_edge_id(edge_id: &str) -> Result<(), PlanError> {
    let valid = !edge_id.is_empty()
        && edge_id.len() <= EDGE_ID_BYTES_MAX
        && edge_id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(PlanError::InvalidEdgeId {
            edge_id: edge_id.to_owned(),
        })
    }
}

/// A topic name or a glob pattern: `*` matches any run of characters
/// (including none), `?` exactly one; everything else matches itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    pattern: Vec<char>,
}

impl TopicPattern {
    pub fn new(pattern: &str) -> Result<TopicPattern, PlanError> {
        if pattern.is_empty() {
            return Err(PlanError::EmptyPattern);
        }
        if pattern.len() > PATTERN_BYTES_MAX {
            return Err(PlanError::PatternTooLong {
                pattern: pattern.to_owned(),
                pattern_bytes_max: PATTERN_BYTES_MAX,
            });
        }
        Ok(TopicPattern {
            pattern: pattern.chars().collect(),
        })
    }

    /// Whether `topic` matches. Iterative with one backtrack point, so the
    /// work is at most pattern length times name length.
    pub fn matches(&self, topic: &str) -> bool {
        let name: Vec<char> = topic.chars().collect();
        let pattern = &self.pattern;
        let (mut p, mut n) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while n < name.len() {
            if p < pattern.len() && (pattern[p] == '?' || pattern[p] == name[n]) {
                p += 1;
                n += 1;
            } else if p < pattern.len() && pattern[p] == '*' {
                star = Some((p, n));
                p += 1;
            } else if let Some((star_p, star_n)) = star {
                p = star_p + 1;
                n = star_n + 1;
                star = Some((star_p, star_n + 1));
            } else {
                return false;
            }
        }
        pattern[p..].iter().all(|&c| c == '*')
    }
}

/// Which source topics are mirrored: those matching an include and no
/// exclude. Topics whose name starts with `__` (internal topics) are never
/// selected by a pattern, only by their exact name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSelection {
    include: Vec<TopicPattern>,
    exclude: Vec<TopicPattern>,
}

impl TopicSelection {
    pub fn new(include: &[&str], exclude: &[&str]) -> Result<TopicSelection, PlanError> {
        let parse = |patterns: &[&str]| -> Result<Vec<TopicPattern>, PlanError> {
            patterns.iter().map(|p| TopicPattern::new(p)).collect()
        };
        Ok(TopicSelection {
            include: parse(include)?,
            exclude: parse(exclude)?,
        })
    }

    pub fn selects(&self, topic: &str) -> bool {
        let internal = topic.starts_with("__");
        let included = self.include.iter().any(|pattern| {
            if internal {
                pattern.pattern.iter().collect::<String>() == topic
            } else {
                pattern.matches(topic)
            }
        });
        included && !self.exclude.iter().any(|pattern| pattern.matches(topic))
    }
}

/// How a source topic is named at the destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RenamePolicy {
    /// `EDGE_ID.TOPIC`: several edges mirror into one cluster without
    /// mixing their topics.
    #[default]
    EdgePrefix,
    /// The source name unchanged.
    Identity,
}

impl RenamePolicy {
    pub fn destination_topic(self, edge_id: &str, topic: &str) -> String {
        match self {
            RenamePolicy::EdgePrefix => format!("{edge_id}.{topic}"),
            RenamePolicy::Identity => topic.to_owned(),
        }
    }
}

/// Where a source partition's records land at the destination.
///
/// When the destination topic has at least as many partitions as the
/// source, record of partition N go to partition N, which keeps the source
/// order of every partition. Otherwise records are placed by key with
/// Kafka's default partitioner (murmur2), so one key keeps its order; a
/// record without a key goes to `source partition % destination
/// partitions`. Either way the choice depends only on the record and the
/// two partition counts, which is what reconciliation needs: the same
/// record always maps to the same destination partition while the counts
/// stay the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionMap {
    pub source_partitions: u32,
    pub destination_partitions: u32,
}

impl PartitionMap {
    pub fn new(source_partitions: u32, destination_partitions: u32) -> PartitionMap {
        assert!(
            source_partitions > 0 && destination_partitions > 0,
            "a topic has at least one partition"
        );
        PartitionMap {
            source_partitions,
            destination_partitions,
        }
    }

    /// Whether every source partition maps whole onto the same number.
    pub fn is_same_partition(&self) -> bool {
        self.destination_partitions >= self.source_partitions
    }

    pub fn destination_partition(&self, source_partition: u32, key: Option<&[u8]>) -> u32 {
        if self.is_same_partition() {
            return source_partition;
        }
        match key {
            Some(key) => partition_for_key(key, self.destination_partitions),
            None => source_partition % self.destination_partitions,
        }
    }
}

/// Per-topic priorities: the first rule whose pattern matches gives the
/// topic's priority; topics no rule matches get `default_priority`.
/// Higher numbers drain first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priorities {
    rules: Vec<(TopicPattern, u8)>,
    default_priority: u8,
}

impl Priorities {
    pub fn new(rules: &[(&str, u8)], default_priority: u8) -> Result<Priorities, PlanError> {
        let rules = rules
            .iter()
            .map(|&(pattern, priority)| Ok((TopicPattern::new(pattern)?, priority)))
            .collect::<Result<_, PlanError>>()?;
        Ok(Priorities {
            rules,
            default_priority,
        })
    }

    pub fn priority(&self, topic: &str) -> u8 {
        self.rules
            .iter()
            .find(|(pattern, _)| pattern.matches(topic))
            .map_or(self.default_priority, |&(_, priority)| priority)
    }
}

/// One source partition the scheduler may pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainCandidate {
    pub priority: u8,
    /// Records waiting to be mirrored; zero means nothing to send.
    pub backlog_records: u64,
    /// Whether the partition can take a batch now (its destination
    /// partition has room in flight and is not reconciling).
    pub ready: bool,
}

/// Picks which source partition to read next while a backlog drains:
/// always one of the highest priority among those with a backlog that are
/// ready, and among equals in turn, so one busy partition does not starve
/// its peers. A lower-priority partition gets a turn only when no
/// higher-priority one has a backlog it can send.
#[derive(Debug, Clone, Default)]
pub struct DrainScheduler {
    turn: u64,
}

impl DrainScheduler {
    pub fn new() -> DrainScheduler {
        DrainScheduler::default()
    }

    /// The index into `candidates` to serve next, if any can be served.
    pub fn next(&mut self, candidates: &[DrainCandidate]) -> Option<usize> {
        let eligible = |c: &DrainCandidate| c.ready && c.backlog_records > 0;
        let top = candidates
            .iter()
            .filter(|c| eligible(c))
            .map(|c| c.priority)
            .max()?;
        let peers: Vec<usize> = candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| eligible(c) && c.priority == top)
            .map(|(index, _)| index)
            .collect();
        let chosen = peers[(self.turn % peers.len() as u64) as usize];
        self.turn = self.turn.wrapping_add(1);
        Some(chosen)
    }
}

/// A bandwidth cap in bytes per second as a token bucket.
///
/// Tokens are kept in thousandths of a byte so that refilling at any rate
/// for any whole number of milliseconds is exact. A send may take the
/// bucket below zero (a batch larger than the burst still goes out, once
/// the bucket is full), and the debt is paid back before the next send, so
/// over a long run the bytes sent never exceed `rate × time + burst`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBucket {
    rate_bytes_per_s: u64,
    burst_bytes: u64,
    /// In thousandths of a byte; negative while in debt.
    tokens_millibytes: i128,
    last_refill_ms: u64,
}

impl TokenBucket {
    /// A full bucket at `now_ms`.
    pub fn new(rate_bytes_per_s: u64, burst_bytes: u64, now_ms: u64) -> Result<Self, PlanError> {
        if rate_bytes_per_s == 0 || burst_bytes == 0 {
            return Err(PlanError::InvalidBandwidthCap);
        }
        Ok(TokenBucket {
            rate_bytes_per_s,
            burst_bytes,
            tokens_millibytes: i128::from(burst_bytes) * 1000,
            last_refill_ms: now_ms,
        })
    }

    pub fn rate_bytes_per_s(&self) -> u64 {
        self.rate_bytes_per_s
    }

    fn refill(&mut self, now_ms: u64) {
        let elapsed_ms = now_ms.saturating_sub(self.last_refill_ms);
        self.last_refill_ms = self.last_refill_ms.max(now_ms);
        // rate bytes/s for elapsed ms is rate × elapsed thousandths of a byte.
        let gained = i128::from(self.rate_bytes_per_s) * i128::from(elapsed_ms);
        let cap = i128::from(self.burst_bytes) * 1000;
        self.tokens_millibytes = (self.tokens_millibytes + gained).min(cap);
    }

    /// Takes `bytes` if the bucket is not in debt at `now_ms`; otherwise
    /// returns the time at which it will be, when the caller should try
    /// again.
    pub fn try_take(&mut self, bytes: u64, now_ms: u64) -> Result<(), u64> {
        self.refill(now_ms);
        if self.tokens_millibytes < 0 {
            return Err(self.ready_at_ms(now_ms));
        }
        self.tokens_millibytes -= i128::from(bytes) * 1000;
        Ok(())
    }

    /// The earliest time a send is allowed.
    pub fn ready_at_ms(&self, now_ms: u64) -> u64 {
        if self.tokens_millibytes >= 0 {
            return now_ms.max(self.last_refill_ms);
        }
        let debt = -self.tokens_millibytes;
        let rate = i128::from(self.rate_bytes_per_s);
        let wait_ms = (debt + rate - 1) / rate;
        self.last_refill_ms
            .saturating_add(u64::try_from(wait_ms).unwrap_or(u64::MAX))
    }
}

/// A small seeded pseudo-random generator (SplitMix64) for jitter. The
/// driver seeds it from the operating system; tests seed it with a
/// constant and replay exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JitterRng {
    state: u64,
}

impl JitterRng {
    pub fn new(seed: u64) -> JitterRng {
        JitterRng { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..=bound`.
    pub fn up_to(&mut self, bound: u64) -> u64 {
        match bound.checked_add(1) {
            Some(range) => self.next_u64() % range,
            None => self.next_u64(),
        }
    }
}

/// Exponential retry delays with jitter, bounded by `max_ms`: attempt `n`
/// (from 0) waits between `(1 - jitter) × d` and `d`, where
/// `d = min(initial × 2ⁿ, max)`. Jitter spreads the reconnects of many
/// edges that lost the same uplink at once, so the central cluster does not
/// see them all in the same millisecond.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial_ms: u64,
    pub max_ms: u64,
    pub jitter_percent: u8,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            initial_ms: 100,
            max_ms: 30_000,
            jitter_percent: 50,
        }
    }
}

impl Backoff {
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.initial_ms == 0 || self.initial_ms > self.max_ms || self.jitter_percent > 100 {
            return Err(PlanError::InvalidBackoff);
        }
        Ok(())
    }

    /// The delay before retry number `attempt` (0 for the first retry).
    pub fn delay_ms(&self, attempt: u32, rng: &mut JitterRng) -> u64 {
        let doubled = self
            .initial_ms
            .saturating_mul(1u64.checked_shl(attempt.min(63)).unwrap_or(u64::MAX));
        let ceiling = doubled.min(self.max_ms);
        let spread = ceiling * u64::from(self.jitter_percent) / 100;
        ceiling - rng.up_to(spread)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_names_and_globs() {
        let cases = [
            ("sensors", "sensors", true),
            ("sensors", "sensors2", false),
            ("sensors.*", "sensors.temp", true),
            ("sensors.*", "sensors.", true),
            ("sensors.*", "alarms.temp", false),
            ("*.temp", "a.b.temp", true),
            ("s?nsors", "sensors", true),
            ("s?nsors", "snsors", false),
            ("*a*b*", "xxaxxbxx", true),
            ("*a*b*", "xxbxxaxx", false),
            ("*", "", true),
        ];
        for (pattern, name, expected) in cases {
            let matched = TopicPattern::new(pattern).map(|p| p.matches(name));
            assert_eq!(matched, Ok(expected), "{pattern} against {name}");
        }
        assert_eq!(TopicPattern::new(""), Err(PlanError::EmptyPattern));
    }

    #[test]
    fn selection_applies_excludes_and_hides_internal_topics() {
        let selection = TopicSelection::new(&["sensors.*", "alarms", "*"], &["sensors.debug*"])
            .expect("test input is valid");
        assert!(selection.selects("sensors.temp"));
        assert!(selection.selects("alarms"));
        assert!(selection.selects("other"));
        assert!(!selection.selects("sensors.debug.raw"));
        assert!(!selection.selects("__consumer_offsets"));
        let explicit = TopicSelection::new(&["__audit"], &[]).expect("test input is valid");
        assert!(explicit.selects("__audit"));
    }

    #[test]
    fn renaming_prefixes_the_edge_id_by_default() {
        assert_eq!(
            RenamePolicy::default().destination_topic("truck-17", "gps"),
            "truck-17.gps"
        );
        assert_eq!(
            RenamePolicy::Identity.destination_topic("truck-17", "gps"),
            "gps"
        );
        assert!(validate_edge_id("truck-17").is_ok());
        assert!(validate_edge_id("truck/17").is_err());
        assert!(validate_edge_id("").is_err());
    }

    #[test]
    fn partitions_map_by_number_or_by_key() {
        let same = PartitionMap::new(4, 8);
        assert!(same.is_same_partition());
        assert_eq!(same.destination_partition(3, Some(b"k")), 3);
        let fewer = PartitionMap::new(8, 3);
        assert!(!fewer.is_same_partition());
        // Kafka's partitioner: murmur2("foobar") = -790332482.
        let expected = ((-790_332_482i32 & 0x7fff_ffff) as u32) % 3;
        assert_eq!(fewer.destination_partition(5, Some(b"foobar")), expected);
        assert_eq!(fewer.destination_partition(7, Some(b"foobar")), expected);
        assert_eq!(fewer.destination_partition(7, None), 1);
    }

    #[test]
    fn higher_priority_drains_first_and_peers_take_turns() {
        let priorities =
            Priorities::new(&[("alarms*", 9), ("debug", 0)], 5).expect("test input is valid");
        assert_eq!(priorities.priority("alarms.fire"), 9);
        assert_eq!(priorities.priority("telemetry"), 5);
        assert_eq!(priorities.priority("debug"), 0);

        let candidate = |priority, backlog_records, ready| DrainCandidate {
            priority,
            backlog_records,
            ready,
        };
        let mut scheduler = DrainScheduler::new();
        let mut candidates = vec![
            candidate(5, 100, true),
            candidate(9, 10, true),
            candidate(9, 10, true),
            candidate(9, 10, false),
        ];
        let picks: Vec<_> = (0..4).map(|_| scheduler.next(&candidates)).collect();
        assert_eq!(picks, vec![Some(1), Some(2), Some(1), Some(2)]);
        // Alarms drained: telemetry gets its turn.
        candidates[1].backlog_records = 0;
        candidates[2].backlog_records = 0;
        assert_eq!(scheduler.next(&candidates), Some(0));
        candidates[0].ready = false;
        assert_eq!(scheduler.next(&candidates), None);
    }

    #[test]
    fn token_bucket_holds_the_long_run_rate_within_ten_percent() {
        let rate = 100_000u64;
        let mut bucket = TokenBucket::new(rate, 16_384, 0).expect("test input is valid");
        let mut rng = JitterRng::new(7);
        let mut now_ms = 0u64;
        let mut sent = 0u64;
        let end_ms = 120_000;
        while now_ms < end_ms {
            // Batches of uneven sizes, some larger than the burst.
            let batch = 1_000 + rng.up_to(40_000);
            match bucket.try_take(batch, now_ms) {
                Ok(()) => sent += batch,
                Err(at_ms) => {
                    assert!(at_ms > now_ms);
                    now_ms = at_ms;
                }
            }
        }
        let achieved = sent as f64 / (end_ms as f64 / 1000.0);
        let ratio = achieved / rate as f64;
        assert!((0.9..=1.1).contains(&ratio), "rate ratio {ratio}");
    }

    #[test]
    fn token_bucket_refills_only_up_to_the_burst() {
        let mut bucket = TokenBucket::new(1_000, 500, 0).expect("test input is valid");
        assert_eq!(bucket.try_take(500, 0), Ok(()));
        assert_eq!(bucket.try_take(1, 0), Ok(())); // empty, not in debt yet
        assert_eq!(bucket.try_take(1, 0), Err(1)); // 1 byte of debt: 1 ms
        assert_eq!(bucket.try_take(1, 1_000_000), Ok(()));
        // Idle for a long time: still only the burst is available.
        assert_eq!(bucket.try_take(500, 1_000_000), Ok(()));
        assert!(bucket.try_take(1, 1_000_000).is_err());
        assert!(TokenBucket::new(0, 1, 0).is_err());
    }

    #[test]
    fn backoff_grows_is_bounded_and_jittered_reproducibly() {
        let backoff = Backoff {
            initial_ms: 100,
            max_ms: 10_000,
            jitter_percent: 50,
        };
        assert!(backoff.validate().is_ok());
        let mut rng = JitterRng::new(42);
        for attempt in 0..100 {
            let ceiling = (100u64 << attempt.min(20)).min(10_000);
            let delay = backoff.delay_ms(attempt, &mut rng);
            assert!(
                delay <= ceiling && delay >= ceiling / 2,
                "{attempt}: {delay}"
            );
        }
        let delays = |seed| {
            let mut rng = JitterRng::new(seed);
            (0..8)
                .map(|attempt| backoff.delay_ms(attempt, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(delays(1), delays(1));
        assert_ne!(delays(1), delays(2));
        let no_jitter = Backoff {
            jitter_percent: 0,
            ..backoff
        };
        assert_eq!(no_jitter.delay_ms(3, &mut rng), 800);
        assert!(
            Backoff {
                initial_ms: 0,
                ..backoff
            }
            .validate()
            .is_err()
        );
    }
}
