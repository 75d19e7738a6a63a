//! The Kafka APIs Rill serves and the versions of each: the ApiVersions
//! answer, and the gate every request passes before it is decoded.

use kafka_protocol::messages::ApiKey;
use kafka_protocol::messages::api_versions_response::{ApiVersion, ApiVersionsResponse};

/// Each served API with its lowest and highest version. The ranges cover
/// what current librdkafka, Java, Python and Go clients send, including the
/// v0 group APIs older librdkafka builds use. Upper bounds stop before
/// versions that need topic ids (Fetch 13, Metadata 13, DeleteTopics 6) or
/// batched groups (OffsetFetch 8, FindCoordinator 4): clients then use the
/// highest version both sides know, as the protocol intends.
pub const SERVED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 10),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 6),
    (ApiKey::Metadata, 0, 12),
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 7),
    (ApiKey::FindCoordinator, 0, 3),
    (ApiKey::JoinGroup, 0, 7),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 4),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::ListGroups, 0, 4),
    (ApiKey::ApiVersions, 0, 3),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 5),
    (ApiKey::DeleteRecords, 0, 2),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::OffsetForLeaderEpoch, 2, 4),
    (ApiKey::DescribeConfigs, 1, 4),
    (ApiKey::CreatePartitions, 0, 3),
    (ApiKey::DeleteGroups, 0, 2),
    // Version 0 would carry the exchange in raw frames; every current
    // client uses 1 with SaslAuthenticate.
    (ApiKey::SaslHandshake, 1, 1),
    (ApiKey::SaslAuthenticate, 0, 2),
];

/// Versions older than the `kafka-protocol` codecs decode (Kafka 4.0
/// dropped them), decoded by `codec::legacy`: OffsetCommit v0 and v1, which
/// clients that never ask ApiVersions still send (sarama before 1.24, the
/// one Debian 12 ships). Their answers are laid out as the lowest codec
/// version's.
pub const LEGACY: &[(ApiKey, i16, i16)] = &[(ApiKey::OffsetCommit, 0, 1)];

/// The version range served for `api`, if it is served at all (legacy
/// versions included).
pub fn served(api: ApiKey) -> Option<(i16, i16)> {
    let (min, max) = SERVED
        .iter()
        .find(|(key, _, _)| *key == api)
        .map(|&(_, min, max)| (min, max))?;
    let legacy_min = LEGACY
        .iter()
        .find(|(key, _, _)| *key == api)
        .map_or(min, |&(_, legacy_min, _)| legacy_min);
    Some((min.min(legacy_min), max))
}

/// Whether `version` of `api` is served.
pub fn serves(api: ApiKey, version: i16) -> bool {
    served(api).is_some_and(|(min, max)| (min..=max).contains(&version))
}

/// The ApiVersions answer; `error_code` 35 (UNSUPPORTED_VERSION) tells a
/// client that asked with too new a version to retry with one listed here.
pub fn api_versions(error_code: i16) -> ApiVersionsResponse {
    ApiVersionsResponse::default()
        .with_error_code(error_code)
        .with_api_keys(
            SERVED
                .iter()
                .filter_map(|&(key, _, _)| served(key).map(|(min, max)| (key, min, max)))
                .map(|(key, min, max)| {
                    ApiVersion::default()
                        .with_api_key(key as i16)
                        .with_min_version(min)
                        .with_max_version(max)
                })
                .collect(),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_ranges_are_within_what_the_codecs_decode() {
        for &(key, min, max) in SERVED {
            let codec = key.valid_versions();
            assert!(
                min <= max && codec.min <= min && max <= codec.max,
                "{key:?} {min}..={max} is outside the codec's {}..={}",
                codec.min,
                codec.max
            );
        }
    }

    #[test]
    fn every_api_the_issue_names_is_served() {
        for key in [
            ApiKey::Metadata,
            ApiKey::Produce,
            ApiKey::Fetch,
            ApiKey::ListOffsets,
            ApiKey::CreateTopics,
            ApiKey::DeleteTopics,
            ApiKey::CreatePartitions,
            ApiKey::DescribeConfigs,
            ApiKey::DeleteRecords,
            ApiKey::OffsetForLeaderEpoch,
            ApiKey::FindCoordinator,
            ApiKey::JoinGroup,
            ApiKey::SyncGroup,
            ApiKey::Heartbeat,
            ApiKey::LeaveGroup,
            ApiKey::OffsetCommit,
            ApiKey::OffsetFetch,
            ApiKey::ListGroups,
            ApiKey::DescribeGroups,
            ApiKey::DeleteGroups,
            ApiKey::InitProducerId,
            ApiKey::ApiVersions,
        ] {
            assert!(served(key).is_some(), "{key:?} is not served");
        }
        assert!(serves(ApiKey::JoinGroup, 0));
        assert!(!serves(ApiKey::Fetch, 13));
        assert!(served(ApiKey::EndTxn).is_none());
    }
}
