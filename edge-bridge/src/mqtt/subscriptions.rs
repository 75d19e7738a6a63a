//! The broker-wide subscription index: for a message on an MQTT topic,
//! which sessions receive it, at which QoS, with which subscription
//! identifiers and options. Sessions are named by client identifier.
//!
//! Filters live in a trie by level, so a lookup walks the topic's levels
//! and the `+` and `#` branches instead of every subscription. A session's
//! ordinary subscriptions that match one topic are folded into one
//! [`Recipient`] (the highest QoS, every identifier), so it gets the
//! message once, as MQTT 5.0 allows (section 3.3.4). Each shared
//! subscription (`$share/GROUP/filter`) that matches gives one
//! [`SharedRecipients`], its members in round-robin order: the node offers
//! the message to the first and moves on to the next when one cannot take
//! it. The index holds at most `subscriptions_max` entries in all.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::packet::{QoS, SubscriptionOptions};
use super::topic::parse_shared;

/// How many subscriptions the whole broker keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionLimits {
    /// Entries over all sessions (a shared subscription counts once per
    /// member).
    pub subscriptions_max: usize,
}

/// One session's subscription as the index keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub options: SubscriptionOptions,
    pub identifier: Option<u32>,
}

/// The index is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the broker holds its maximum of {subscriptions_max} subscriptions")]
pub struct IndexFull {
    pub subscriptions_max: usize,
}

/// One session that receives a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    pub client_id: String,
    /// The highest maximum QoS of its matching subscriptions.
    pub qos: QoS,
    /// Identifiers of its matching subscriptions, in filter order.
    pub subscription_identifiers: Vec<u32>,
    /// Whether any matching subscription keeps the published retain flag.
    pub retain_as_published: bool,
}

/// The members of one matching shared subscription, starting with the one
/// whose turn it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedRecipients {
    pub group: String,
    /// The filter after `$share/GROUP/`.
    pub filter: String,
    pub candidates: Vec<Recipient>,
}

/// Who receives one message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    /// Ordinary subscribers, one per session, by client identifier.
    pub recipients: Vec<Recipient>,
    /// One entry per matching shared subscription.
    pub shared: Vec<SharedRecipients>,
}

#[derive(Debug, Default)]
struct SharedGroup {
    members: BTreeMap<String, Entry>,
    /// Whose turn it is, as an index into `members` (taken modulo). A
    /// `Cell` so that a lookup walks the trie by shared reference.
    turn: Cell<usize>,
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<String, Node>,
    subscribers: BTreeMap<String, Entry>,
    groups: BTreeMap<String, SharedGroup>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty() && self.groups.is_empty()
    }
}

/// Every session's subscriptions, by filter.
#[derive(Debug)]
pub struct SubscriptionIndex {
    limits: SubscriptionLimits,
    root: Node,
    /// Each client's filters as subscribed (with `$share/` prefixes).
    by_client: HashMap<String, BTreeSet<String>>,
    entries: usize,
}

/// The group (for a shared subscription) and the filter levels.
fn split(filter: &str) -> (Option<&str>, &str) {
    match parse_shared(filter) {
        Ok(Some(shared)) => (Some(shared.group), shared.filter),
        _ => (None, filter),
    }
}

impl SubscriptionIndex {
    pub fn new(limits: SubscriptionLimits) -> SubscriptionIndex {
        SubscriptionIndex {
            limits,
            root: Node::default(),
            by_client: HashMap::new(),
            entries: 0,
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Adds or replaces `client_id`'s subscription to `filter` (a valid
    /// filter, `$share/GROUP/filter` for a shared one). `Ok(true)` when it
    /// replaced one.
    pub fn subscribe(
        &mut self,
        client_id: &str,
        filter: &str,
        entry: Entry,
    ) -> Result<bool, IndexFull> {
        let existing = self
            .by_client
            .get(client_id)
            .is_some_and(|filters| filters.contains(filter));
        if !existing && self.entries >= self.limits.subscriptions_max {
            return Err(IndexFull {
                subscriptions_max: self.limits.subscriptions_max,
            });
        }
        let (group, levels) = split(filter);
        let mut node = &mut self.root;
        for level in levels.split('/') {
            node = node.children.entry(level.to_owned()).or_default();
        }
        match group {
            None => {
                node.subscribers.insert(client_id.to_owned(), entry);
            }
            Some(group) => {
                node.groups
                    .entry(group.to_owned())
                    .or_default()
                    .members
                    .insert(client_id.to_owned(), entry);
            }
        }
        if !existing {
            self.entries += 1;
            self.by_client
                .entry(client_id.to_owned())
                .or_default()
                .insert(filter.to_owned());
        }
        Ok(existing)
    }

    /// Removes `client_id`'s subscription to `filter`; `false` when there
    /// was none.
    pub fn unsubscribe(&mut self, client_id: &str, filter: &str) -> bool {
        let Some(filters) = self.by_client.get_mut(client_id) else {
            return false;
        };
        if !filters.remove(filter) {
            return false;
        }
        if filters.is_empty() {
            self.by_client.remove(client_id);
        }
        self.entries -= 1;
        let (group, levels) = split(filter);
        let levels: Vec<&str> = levels.split('/').collect();
        remove(&mut self.root, &levels, group, client_id);
        true
    }

    /// Removes every subscription of `client_id` (its session ended or
    /// went offline) and returns how many there were.
    pub fn remove_client(&mut self, client_id: &str) -> usize {
        let filters = self.by_client.get(client_id).cloned().unwrap_or_default();
        for filter in &filters {
            self.unsubscribe(client_id, filter);
        }
        filters.len()
    }

    /// The filters `client_id` holds, as subscribed.
    pub fn filters_of(&self, client_id: &str) -> Vec<&str> {
        self.by_client
            .get(client_id)
            .map(|filters| filters.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }

    /// How many sessions share `$share/group/filter` (`filter` is the part
    /// after the group).
    pub fn shared_members(&self, group: &str, filter: &str) -> usize {
        let mut node = &self.root;
        for level in filter.split('/') {
            match node.children.get(level) {
                Some(child) => node = child,
                None => return 0,
            }
        }
        node.groups
            .get(group)
            .map_or(0, |members| members.members.len())
    }

    /// Who receives a message on `topic` (a valid topic name) published by
    /// `publisher` (its client identifier, or `None` when it did not come
    /// over MQTT). Subscriptions with No Local do not match their own
    /// client's messages. Each matching shared subscription's turn moves on
    /// by one.
    pub fn route(&mut self, topic: &str, publisher: Option<&str>) -> Routes {
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        let mut matched: Vec<(&Node, String)> = Vec::new();
        collect(&self.root, &levels, 0, dollar, "", &mut matched);
        let mut by_client: BTreeMap<String, Recipient> = BTreeMap::new();
        let mut shared = Vec::new();
        for (node, filter) in matched {
            for (client_id, entry) in &node.subscribers {
                if entry.options.no_local && publisher == Some(client_id.as_str()) {
                    continue;
                }
                let recipient = by_client
                    .entry(client_id.clone())
                    .or_insert_with(|| Recipient {
                        client_id: client_id.clone(),
                        qos: QoS::AtMostOnce,
                        subscription_identifiers: Vec::new(),
                        retain_as_published: false,
                    });
                recipient.qos = recipient.qos.max(entry.options.qos);
                recipient.subscription_identifiers.extend(entry.identifier);
                recipient.retain_as_published |= entry.options.retain_as_published;
            }
            for (group, members) in &node.groups {
                let count = members.members.len();
                if count == 0 {
                    continue;
                }
                let turn = members.turn.get() % count;
                members.turn.set(turn + 1);
                let candidates = members
                    .members
                    .iter()
                    .cycle()
                    .skip(turn)
                    .take(count)
                    .map(|(client_id, entry)| Recipient {
                        client_id: client_id.clone(),
                        qos: entry.options.qos,
                        subscription_identifiers: entry.identifier.into_iter().collect(),
                        retain_as_published: entry.options.retain_as_published,
                    })
                    .collect();
                shared.push(SharedRecipients {
                    group: group.clone(),
                    filter: filter.clone(),
                    candidates,
                });
            }
        }
        Routes {
            recipients: by_client.into_values().collect(),
            shared,
        }
    }
}

/// Gathers the trie nodes whose filter matches `levels[depth..]`, with
/// their filters.
fn collect<'a>(
    node: &'a Node,
    levels: &[&str],
    depth: usize,
    dollar: bool,
    path: &str,
    out: &mut Vec<(&'a Node, String)>,
) {
    let join = |level: &str| {
        if depth == 0 {
            level.to_owned()
        } else {
            format!("{path}/{level}")
        }
    };
    // A `$` topic is not matched by a wildcard in the first level.
    let wildcards = !(dollar && depth == 0);
    if wildcards && let Some(child) = node.children.get("#") {
        // `a/#` matches `a` and everything below it.
        out.push((child, join("#")));
    }
    let Some(&level) = levels.get(depth) else {
        out.push((node, path.to_owned()));
        return;
    };
    if wildcards && let Some(child) = node.children.get("+") {
        collect(child, levels, depth + 1, dollar, &join("+"), out);
    }
    if let Some(child) = node.children.get(level) {
        collect(child, levels, depth + 1, dollar, &join(level), out);
    }
}

/// Removes one entry on the path `levels` and prunes nodes left empty.
fn remove(node: &mut Node, levels: &[&str], group: Option<&str>, client_id: &str) {
    let Some((first, rest)) = levels.split_first() else {
        match group {
            None => {
                node.subscribers.remove(client_id);
            }
            Some(group) => {
                if let Some(members) = node.groups.get_mut(group) {
                    members.members.remove(client_id);
                    if members.members.is_empty() {
                        node.groups.remove(group);
                    }
                }
            }
        }
        return;
    };
    if let Some(child) = node.children.get_mut(*first) {
        remove(child, rest, group, client_id);
        if child.is_empty() {
            node.children.remove(*first);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(qos: QoS, identifier: Option<u32>) -> Entry {
        Entry {
            options: SubscriptionOptions::with_qos(qos),
            identifier,
        }
    }

    fn index() -> SubscriptionIndex {
        SubscriptionIndex::new(SubscriptionLimits {
            subscriptions_max: 100,
        })
    }

    fn clients(routes: &Routes) -> Vec<&str> {
        routes
            .recipients
            .iter()
            .map(|recipient| recipient.client_id.as_str())
            .collect()
    }

    #[test]
    fn shared_members_count_each_group_of_a_filter() {
        let mut index = index();
        for (client, filter) in [
            ("c1", "$share/g/a/+"),
            ("c2", "$share/g/a/+"),
            ("c3", "$share/h/a/+"),
            ("c4", "a/+"),
        ] {
            assert!(
                index
                    .subscribe(client, filter, entry(QoS::AtMostOnce, None))
                    .is_ok()
            );
        }
        assert_eq!(index.shared_members("g", "a/+"), 2);
        assert_eq!(index.shared_members("h", "a/+"), 1);
        assert_eq!(index.shared_members("g", "a/#"), 0);
        index.remove_client("c1");
        assert_eq!(index.shared_members("g", "a/+"), 1);
    }

    #[test]
    fn wildcards_and_the_dollar_rule() {
        let mut index = index();
        let table = [
            ("c1", "a/b"),
            ("c2", "a/+"),
            ("c3", "a/#"),
            ("c4", "#"),
            ("c5", "+/b"),
            ("c6", "$SYS/#"),
            ("c7", "a/b/c"),
        ];
        for (client, filter) in table {
            assert_eq!(
                index.subscribe(client, filter, entry(QoS::AtMostOnce, None)),
                Ok(false)
            );
        }
        let expected: [(&str, &[&str]); 5] = [
            ("a/b", &["c1", "c2", "c3", "c4", "c5"]),
            ("a", &["c3", "c4"]),
            ("a/b/c", &["c3", "c4", "c7"]),
            ("$SYS/x", &["c6"]),
            ("b", &["c4"]),
        ];
        for (topic, expected) in expected {
            assert_eq!(clients(&index.route(topic, None)), expected, "{topic}");
        }
    }

    #[test]
    fn overlapping_subscriptions_fold_into_one_recipient() {
        let mut index = index();
        assert!(
            index
                .subscribe("c", "a/+", entry(QoS::AtMostOnce, Some(1)))
                .is_ok()
        );
        assert!(
            index
                .subscribe("c", "a/b", entry(QoS::ExactlyOnce, Some(2)))
                .is_ok()
        );
        let mut keep = entry(QoS::AtLeastOnce, None);
        keep.options.retain_as_published = true;
        assert!(index.subscribe("c", "#", keep).is_ok());
        let routes = index.route("a/b", None);
        assert_eq!(
            routes.recipients,
            [Recipient {
                client_id: "c".into(),
                qos: QoS::ExactlyOnce,
                subscription_identifiers: vec![1, 2],
                retain_as_published: true,
            }]
        );
        // Subscribing again replaces, and counts once.
        assert_eq!(
            index.subscribe("c", "a/b", entry(QoS::AtMostOnce, None)),
            Ok(true)
        );
        assert_eq!(index.len(), 3);
        assert_eq!(index.route("a/b", None).recipients[0].qos, QoS::AtLeastOnce);
    }

    #[test]
    fn no_local_skips_the_publisher() {
        let mut index = index();
        let mut own = entry(QoS::AtLeastOnce, None);
        own.options.no_local = true;
        assert!(index.subscribe("me", "t", own).is_ok());
        assert!(
            index
                .subscribe("other", "t", entry(QoS::AtLeastOnce, None))
                .is_ok()
        );
        assert_eq!(clients(&index.route("t", Some("me"))), ["other"]);
        assert_eq!(clients(&index.route("t", Some("other"))), ["me", "other"]);
        assert_eq!(clients(&index.route("t", None)), ["me", "other"]);
    }

    #[test]
    fn shared_subscriptions_take_turns() {
        let mut index = index();
        for client in ["m1", "m2", "m3"] {
            assert!(
                index
                    .subscribe(client, "$share/g/s/+", entry(QoS::AtLeastOnce, None))
                    .is_ok()
            );
        }
        assert!(
            index
                .subscribe("x", "$share/h/s/#", entry(QoS::AtMostOnce, None))
                .is_ok()
        );
        assert!(
            index
                .subscribe("plain", "s/1", entry(QoS::AtMostOnce, None))
                .is_ok()
        );
        let firsts: Vec<Vec<String>> = (0..4)
            .map(|_| {
                let routes = index.route("s/1", None);
                assert_eq!(clients(&routes), ["plain"]);
                assert_eq!(routes.shared.len(), 2);
                let group = routes
                    .shared
                    .iter()
                    .find(|shared| shared.group == "g")
                    .expect("group g matches");
                assert_eq!(group.filter, "s/+");
                group
                    .candidates
                    .iter()
                    .map(|candidate| candidate.client_id.clone())
                    .collect()
            })
            .collect();
        assert_eq!(
            firsts,
            [
                ["m1", "m2", "m3"],
                ["m2", "m3", "m1"],
                ["m3", "m1", "m2"],
                ["m1", "m2", "m3"]
            ]
        );
        // A member that leaves is skipped from then on.
        assert!(index.unsubscribe("m2", "$share/g/s/+"));
        let routes = index.route("s/1", None);
        let group = routes.shared.iter().find(|shared| shared.group == "g");
        assert_eq!(group.map(|group| group.candidates.len()), Some(2));
    }

    #[test]
    fn bounded_and_pruned() {
        let mut index = SubscriptionIndex::new(SubscriptionLimits {
            subscriptions_max: 2,
        });
        assert!(
            index
                .subscribe("a", "x/y", entry(QoS::AtMostOnce, None))
                .is_ok()
        );
        assert!(
            index
                .subscribe("b", "$share/g/x/y", entry(QoS::AtMostOnce, None))
                .is_ok()
        );
        assert_eq!(
            index.subscribe("c", "z", entry(QoS::AtMostOnce, None)),
            Err(IndexFull {
                subscriptions_max: 2
            })
        );
        // Replacing an existing subscription needs no room.
        assert_eq!(
            index.subscribe("a", "x/y", entry(QoS::AtLeastOnce, None)),
            Ok(true)
        );
        assert!(!index.unsubscribe("a", "nothing"));
        assert_eq!(index.filters_of("b"), ["$share/g/x/y"]);
        assert_eq!(index.remove_client("a"), 1);
        assert_eq!(index.remove_client("b"), 1);
        assert!(index.is_empty());
        assert!(index.root.is_empty(), "empty branches are pruned");
        assert_eq!(index.route("x/y", None), Routes::default());
    }
}
