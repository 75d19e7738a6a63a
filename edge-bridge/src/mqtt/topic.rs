//! Topic names and topic filters (section 4.7 of both specifications, 4.8.2
//! of 5.0 for shared subscriptions): validation with limits the caller
//! chooses, matching a filter against a name, and `$share/GROUP/filter`.
//!
//! A topic is a `/`-separated list of levels; levels may be empty. Filters
//! add two wildcards that must fill a whole level: `+` matches exactly one
//! level, `#` matches any number of levels (the parent level too) and must
//! be the last level. Topics that start with `$` (`$SYS/...`) are not
//! matched by a filter that starts with a wildcard.

use std::fmt;

/// How long a topic may be and how deep, set by the broker's profile. The
/// codec itself only applies [`TopicLimits::PROTOCOL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLimits {
    /// Bytes of the whole string (at most 65 535 on the wire).
    pub topic_bytes_max: usize,
    /// Levels: `a/b/c` has three. For a shared subscription, levels of the
    /// filter after `$share/GROUP/`.
    pub topic_levels_max: usize,
}

impl TopicLimits {
    /// What the protocol itself allows.
    pub const PROTOCOL: TopicLimits = TopicLimits {
        topic_bytes_max: u16::MAX as usize,
        topic_levels_max: usize::MAX,
    };
}

/// Why a topic name or filter is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicError {
    Empty,
    TooLong {
        bytes: usize,
        bytes_max: usize,
    },
    TooManyLevels {
        levels_max: usize,
    },
    NullCharacter,
    /// `+` or `#` in a topic name (only filters have wildcards).
    WildcardInName,
    /// `+` or `#` sharing a level with other characters (`a+`, `#b`).
    WildcardInsideLevel,
    /// `#` before the last level (`a/#/b`).
    MultiLevelWildcardNotLast,
    /// `$share/` with an empty group name or one holding `+` or `#`.
    InvalidShareName,
    /// `$share/GROUP` with no `/filter` after the group.
    SharedWithoutFilter,
}

impl fmt::Display for TopicError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopicError::Empty => write!(formatter, "it is empty"),
            TopicError::TooLong { bytes, bytes_max } => {
                write!(
                    formatter,
                    "it has {bytes} bytes, over the limit of {bytes_max}"
                )
            }
            TopicError::TooManyLevels { levels_max } => {
                write!(formatter, "it has more than {levels_max} levels")
            }
            TopicError::NullCharacter => write!(formatter, "it contains U+0000"),
            TopicError::WildcardInName => write!(formatter, "it has a wildcard"),
            TopicError::WildcardInsideLevel => {
                write!(
                    formatter,
                    "a wildcard shares its level with other characters"
                )
            }
            TopicError::MultiLevelWildcardNotLast => write!(formatter, "'#' is not the last level"),
            TopicError::InvalidShareName => {
                write!(formatter, "the share name is empty or holds a wildcard")
            }
            TopicError::SharedWithoutFilter => {
                write!(
                    formatter,
                    "the shared subscription has no filter after its share name"
                )
            }
        }
    }
}

impl std::error::Error for TopicError {}

/// Checks a topic name (PUBLISH, will, response topic): non-empty, no
/// wildcards, no U+0000, within `limits`.
pub fn validate_topic_name(name: &str, limits: &TopicLimits) -> Result<(), TopicError> {
    check_string(name, limits)?;
    if name.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    check_levels(name, limits)
}

/// Checks a topic filter (SUBSCRIBE, UNSUBSCRIBE): non-empty, wildcards
/// filling whole levels, `#` last, and for `$share/GROUP/filter` a valid
/// group and filter.
pub fn validate_topic_filter(filter: &str, limits: &TopicLimits) -> Result<(), TopicError> {
    check_string(filter, limits)?;
    let matched = match parse_shared(filter)? {
        Some(shared) => shared.filter,
        None => filter,
    };
    let mut levels = matched.split('/').peekable();
    while let Some(level) = levels.next() {
        match level {
            "#" if levels.peek().is_some() => return Err(TopicError::MultiLevelWildcardNotLast),
            "#" | "+" => {}
            _ if level.contains(['+', '#']) => return Err(TopicError::WildcardInsideLevel),
            _ => {}
        }
    }
    check_levels(matched, limits)
}

fn check_string(topic: &str, limits: &TopicLimits) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > limits.topic_bytes_max {
        return Err(TopicError::TooLong {
            bytes: topic.len(),
            bytes_max: limits.topic_bytes_max,
        });
    }
    if topic.contains('\0') {
        return Err(TopicError::NullCharacter);
    }
    Ok(())
}

fn check_levels(topic: &str, limits: &TopicLimits) -> Result<(), TopicError> {
    // Counting separators stops at the limit instead of walking the rest.
    let separators_max = limits.topic_levels_max.saturating_sub(1);
    if limits.topic_levels_max == 0
        || topic
            .bytes()
            .filter(|&byte| byte == b'/')
            .nth(separators_max)
            .is_some()
    {
        return Err(TopicError::TooManyLevels {
            levels_max: limits.topic_levels_max,
        });
    }
    Ok(())
}

/// Whether `filter` matches the topic name `topic`. Both are taken as
/// valid; a shared subscription passes its inner filter
/// ([`SharedFilter::filter`]). A topic starting with `$` is not matched by
/// a filter whose first level is a wildcard.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            // `#` also matches the parent: `a/#` matches `a`.
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(filter_level), Some(topic_level)) if filter_level == topic_level => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A shared subscription's parts: `$share/GROUP/filter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedFilter<'a> {
    pub group: &'a str,
    pub filter: &'a str,
}

/// The prefix that makes a filter a shared subscription.
pub const SHARE_PREFIX: &str = "$share/";

/// Splits a `$share/GROUP/filter` into group and filter: `Ok(None)` for an
/// ordinary filter, an error for a malformed shared one. The inner filter's
/// own syntax is [`validate_topic_filter`]'s business.
pub fn parse_shared(filter: &str) -> Result<Option<SharedFilter<'_>>, TopicError> {
    let Some(rest) = filter.strip_prefix(SHARE_PREFIX) else {
        return Ok(None);
    };
    let Some((group, inner)) = rest.split_once('/') else {
        return Err(if rest.is_empty() || rest.contains(['+', '#']) {
            TopicError::InvalidShareName
        } else {
            TopicError::SharedWithoutFilter
        });
    };
    if group.is_empty() || group.contains(['+', '#']) {
        return Err(TopicError::InvalidShareName);
    }
    if inner.is_empty() {
        return Err(TopicError::SharedWithoutFilter);
    }
    Ok(Some(SharedFilter {
        group,
        filter: inner,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_table() {
        // (filter, topic, matches)
        let table = [
            ("sport/tennis/player1/#", "sport/tennis/player1", true),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/ranking",
                true,
            ),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/score/wimbledon",
                true,
            ),
            ("sport/#", "sport", true),
            ("sport/tennis/#", "sport/tennis", true),
            ("sport/tennis/#", "sport/tenniss", false),
            ("#", "sport/tennis", true),
            ("#", "/", true),
            ("sport/tennis/+", "sport/tennis/player1", true),
            ("sport/tennis/+", "sport/tennis/player1/ranking", false),
            ("sport/+", "sport", false),
            ("sport/+", "sport/", true),
            ("+/+", "/finance", true),
            ("/+", "/finance", true),
            ("+", "/finance", false),
            ("+/tennis/#", "sport/tennis", true),
            ("a/+/c", "a//c", true),
            ("a//c", "a//c", true),
            ("a/b", "a/b/", false),
            ("a/b/", "a/b", false),
            ("a/b", "A/b", false),
            ("#", "$SYS/broker/uptime", false),
            ("+/broker/uptime", "$SYS/broker/uptime", false),
            ("$SYS/#", "$SYS/broker/uptime", true),
            ("$SYS/+/uptime", "$SYS/broker/uptime", true),
            ("$SYS/#", "$SYS", true),
            ("a/#", "$a/b", false),
        ];
        for (filter, topic, expected) in table {
            assert_eq!(
                validate_topic_filter(filter, &TopicLimits::PROTOCOL),
                Ok(()),
                "{filter}"
            );
            assert_eq!(
                validate_topic_name(topic, &TopicLimits::PROTOCOL),
                Ok(()),
                "{topic}"
            );
            assert_eq!(matches(filter, topic), expected, "{filter} against {topic}");
        }
    }

    #[test]
    fn filter_validation_table() {
        let limits = TopicLimits::PROTOCOL;
        let table: [(&str, Result<(), TopicError>); 17] = [
            ("a/b", Ok(())),
            ("+", Ok(())),
            ("#", Ok(())),
            ("/", Ok(())),
            ("+/+/#", Ok(())),
            ("a/#/b", Err(TopicError::MultiLevelWildcardNotLast)),
            ("a#", Err(TopicError::WildcardInsideLevel)),
            ("a/b+", Err(TopicError::WildcardInsideLevel)),
            ("##", Err(TopicError::WildcardInsideLevel)),
            ("", Err(TopicError::Empty)),
            ("a\0b", Err(TopicError::NullCharacter)),
            ("$share/group/a/+", Ok(())),
            ("$share/group/#", Ok(())),
            ("$share//a", Err(TopicError::InvalidShareName)),
            ("$share/g+/a", Err(TopicError::InvalidShareName)),
            ("$share/group", Err(TopicError::SharedWithoutFilter)),
            (
                "$share/group/a/#/b",
                Err(TopicError::MultiLevelWildcardNotLast),
            ),
        ];
        for (filter, expected) in table {
            assert_eq!(
                validate_topic_filter(filter, &limits),
                expected,
                "{filter:?}"
            );
        }
        // `$share` without its slash is an ordinary filter.
        assert_eq!(validate_topic_filter("$share", &limits), Ok(()));
        assert_eq!(parse_shared("$share"), Ok(None));
        assert_eq!(parse_shared("$share/"), Err(TopicError::InvalidShareName));
    }

    #[test]
    fn names_have_no_wildcards() {
        let limits = TopicLimits::PROTOCOL;
        assert_eq!(validate_topic_name("a/b/c", &limits), Ok(()));
        assert_eq!(validate_topic_name("/", &limits), Ok(()));
        assert_eq!(
            validate_topic_name("a/+", &limits),
            Err(TopicError::WildcardInName)
        );
        assert_eq!(
            validate_topic_name("#", &limits),
            Err(TopicError::WildcardInName)
        );
        assert_eq!(validate_topic_name("", &limits), Err(TopicError::Empty));
    }

    #[test]
    fn limits_apply() {
        let limits = TopicLimits {
            topic_bytes_max: 8,
            topic_levels_max: 3,
        };
        assert_eq!(validate_topic_name("a/b/c", &limits), Ok(()));
        assert_eq!(
            validate_topic_name("a/b/c/d", &limits),
            Err(TopicError::TooManyLevels { levels_max: 3 })
        );
        assert_eq!(
            validate_topic_name("abcdefghi", &limits),
            Err(TopicError::TooLong {
                bytes: 9,
                bytes_max: 8
            })
        );
        // Shared subscriptions count the levels of their inner filter.
        let limits = TopicLimits {
            topic_bytes_max: 100,
            topic_levels_max: 2,
        };
        assert_eq!(validate_topic_filter("$share/g/a/#", &limits), Ok(()));
        assert_eq!(
            validate_topic_filter("$share/g/a/b/c", &limits),
            Err(TopicError::TooManyLevels { levels_max: 2 })
        );
        let none = TopicLimits {
            topic_bytes_max: 100,
            topic_levels_max: 0,
        };
        assert_eq!(
            validate_topic_name("a", &none),
            Err(TopicError::TooManyLevels { levels_max: 0 })
        );
    }

    #[test]
    fn shared_filters_split() {
        assert_eq!(
            parse_shared("$share/consumers/sensors/+/temperature"),
            Ok(Some(SharedFilter {
                group: "consumers",
                filter: "sensors/+/temperature"
            }))
        );
        assert_eq!(parse_shared("sensors/#"), Ok(None));
        assert_eq!(parse_shared("$SHARE/g/a"), Ok(None));
    }
}
