//! SUBSCRIBE and UNSUBSCRIBE. A SUBSCRIBE is answered in two steps: the
//! session checks each filter (topic limits, its own `subscriptions_max`,
//! No Local on a shared subscription is a protocol error), asks the node
//! to add the rest to the broker-wide index, and sends SUBACK once the
//! index has answered, with Quota exceeded for the entries it could not
//! hold. Retained messages follow the SUBACK for new ordinary
//! subscriptions as retain handling says: 0 always, 1 only when the
//! subscription did not exist, 2 never; shared subscriptions get none.

use super::super::packet::{Packet, RetainHandling, SubAck, Subscribe, UnsubAck, Unsubscribe};
use super::super::properties::Properties;
use super::super::reason;
use super::super::subscriptions::{Entry, IndexFull};
use super::super::topic::{parse_shared, validate_topic_filter};
use super::{Action, Connection, PendingSubscribe, Phase, StoredSubscription};

impl Connection {
    pub(super) fn handle_subscribe(&mut self, subscribe: Subscribe, now_ms: u64) -> Vec<Action> {
        let identifier = subscribe
            .properties
            .subscription_identifiers
            .first()
            .copied();
        let mut codes = Vec::with_capacity(subscribe.subscriptions.len());
        let mut entries: Vec<(StoredSubscription, bool)> = Vec::new();
        for subscription in subscribe.subscriptions {
            let shared = matches!(parse_shared(&subscription.filter), Ok(Some(_)));
            if shared && subscription.options.no_local {
                // MQTT 5.0 section 3.8.3.1.
                return self.close(now_ms, reason::PROTOCOL_ERROR, true);
            }
            if validate_topic_filter(&subscription.filter, &self.config().topic_limits).is_err() {
                codes.push(Some(reason::TOPIC_FILTER_INVALID));
                continue;
            }
            let existing = self.subscriptions.contains_key(&subscription.filter);
            let new_count = entries
                .iter()
                .filter(|(entry, _)| !self.subscriptions.contains_key(&entry.filter))
                .count();
            if !existing && self.subscriptions.len() + new_count >= self.config().subscriptions_max
            {
                codes.push(Some(reason::QUOTA_EXCEEDED));
                continue;
            }
            let send_retained = !shared
                && match subscription.options.retain_handling {
                    RetainHandling::SendAtSubscribe => true,
                    RetainHandling::SendAtSubscribeIfNew => !existing,
                    RetainHandling::DoNotSend => false,
                };
            codes.push(None);
            entries.push((
                StoredSubscription {
                    filter: subscription.filter,
                    options: subscription.options,
                    identifier,
                },
                send_retained,
            ));
        }
        let pending = PendingSubscribe { codes, entries };
        if pending.entries.is_empty() {
            return self.finish_subscribe(subscribe.packet_id, pending, Vec::new(), now_ms);
        }
        let request = pending
            .entries
            .iter()
            .map(|(subscription, _)| {
                (
                    subscription.filter.clone(),
                    Entry {
                        options: subscription.options,
                        identifier: subscription.identifier,
                    },
                )
            })
            .collect();
        self.pending_subscribes
            .push_back((Some(subscribe.packet_id), pending));
        vec![Action::Subscribe {
            packet_id: Some(subscribe.packet_id),
            subscriptions: request,
        }]
    }

    /// The index's answer to [`Action::Subscribe`], one result per entry in
    /// order. For restored subscriptions (`packet_id` `None`) the ones the
    /// index refused leave the session.
    pub fn handle_subscribe_result(
        &mut self,
        packet_id: Option<u16>,
        results: Vec<Result<(), IndexFull>>,
        now_ms: u64,
    ) -> Vec<Action> {
        if self.phase != Phase::Connected {
            return Vec::new();
        }
        if packet_id.is_none() {
            let filters: Vec<String> = self.subscriptions.keys().cloned().collect();
            let mut dropped = false;
            for (filter, result) in filters.iter().zip(&results) {
                if result.is_err() {
                    self.subscriptions.remove(filter);
                    dropped = true;
                }
            }
            if dropped && self.is_persistent() {
                return vec![self.persist(now_ms)];
            }
            return Vec::new();
        }
        let Some(index) = self
            .pending_subscribes
            .iter()
            .position(|(pending_id, _)| *pending_id == packet_id)
        else {
            return Vec::new();
        };
        let Some((_, pending)) = self.pending_subscribes.remove(index) else {
            return Vec::new();
        };
        let Some(packet_id) = packet_id else {
            return Vec::new();
        };
        self.finish_subscribe(packet_id, pending, results, now_ms)
    }

    fn finish_subscribe(
        &mut self,
        packet_id: u16,
        pending: PendingSubscribe,
        results: Vec<Result<(), IndexFull>>,
        now_ms: u64,
    ) -> Vec<Action> {
        let mut results = results.into_iter();
        let mut entries = pending.entries.into_iter();
        let mut reason_codes = Vec::with_capacity(pending.codes.len());
        let mut retained = Vec::new();
        let mut changed = false;
        for code in pending.codes {
            if let Some(code) = code {
                reason_codes.push(code);
                continue;
            }
            let Some((subscription, send_retained)) = entries.next() else {
                reason_codes.push(reason::UNSPECIFIED_ERROR);
                continue;
            };
            // A missing result counts as a refusal.
            if !matches!(results.next(), Some(Ok(()))) {
                reason_codes.push(reason::QUOTA_EXCEEDED);
                continue;
            }
            reason_codes.push(subscription.options.qos as u8);
            if send_retained {
                retained.push(Action::SendRetained {
                    filter: subscription.filter.clone(),
                    qos: subscription.options.qos,
                    subscription_identifier: subscription.identifier,
                });
            }
            self.subscriptions
                .insert(subscription.filter.clone(), subscription);
            changed = true;
        }
        let mut actions = Vec::new();
        // Stored before SUBACK: an acknowledged subscription survives a crash.
        if changed && self.is_persistent() {
            actions.push(self.persist(now_ms));
        }
        actions.push(Action::Send(Packet::SubAck(SubAck {
            packet_id,
            reason_codes,
            properties: Properties::default(),
        })));
        actions.extend(retained);
        actions
    }

    pub(super) fn handle_unsubscribe(
        &mut self,
        unsubscribe: Unsubscribe,
        now_ms: u64,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut reason_codes = Vec::with_capacity(unsubscribe.filters.len());
        for filter in unsubscribe.filters {
            if self.subscriptions.remove(&filter).is_some() {
                actions.push(Action::Unsubscribe { filter });
                reason_codes.push(reason::SUCCESS);
            } else {
                reason_codes.push(reason::NO_SUBSCRIPTION_EXISTED);
            }
        }
        if !actions.is_empty() && self.is_persistent() {
            actions.push(self.persist(now_ms));
        }
        actions.push(Action::Send(Packet::UnsubAck(UnsubAck {
            packet_id: unsubscribe.packet_id,
            reason_codes,
            properties: Properties::default(),
        })));
        actions
    }
}
