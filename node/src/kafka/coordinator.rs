//! The classic Kafka consumer-group protocol (JoinGroup, SyncGroup, Heartbeat,
//! LeaveGroup, DescribeGroups, ListGroups, DeleteGroups) as a state machine.
//!
//! Pure logic: no I/O, no wire types, time passed in. The broker keeps one
//! [`GroupCoordinator`] behind a mutex, calls the request methods from the
//! Kafka handlers and [`GroupCoordinator::tick`] every 100 ms. A JoinGroup or
//! SyncGroup that has to wait for the rest of the group gets a
//! `oneshot::Receiver`; the coordinator keeps the sender and always answers it
//! (a receiver dropped by a departed client is simply ignored).
//!
//! Semantics follow Apache Kafka's classic `GroupCoordinator`:
//!
//! * States: `Empty` → `PreparingRebalance` (join phase) → `CompletingRebalance`
//!   (waiting for the leader's SyncGroup) → `Stable`, and back to
//!   `PreparingRebalance` on any membership or metadata change. Groups that
//!   are deleted disappear; an unknown group describes itself as `Dead`.
//! * The join phase ends when every member has rejoined (and no id handed out
//!   with `MEMBER_ID_REQUIRED` is still outstanding), or when the largest
//!   rebalance timeout of the members runs out; members that did not rejoin
//!   are dropped. A group that starts from `Empty` first waits
//!   `initial_rebalance_delay_ms`, extended while new members keep arriving,
//!   at most until the rebalance timeout.
//! * After the join phase the leader must send the assignment within the
//!   rebalance timeout, and every member must send SyncGroup within it;
//!   members that did not are removed and the group rebalances.
//! * A member's session runs from its last join, sync or heartbeat. Members
//!   parked in a JoinGroup or SyncGroup are not expired while they wait.
//! * Static membership (`group.instance.id`) is recorded and reported but
//!   treated like dynamic membership.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::time::{Duration, Instant};

use futures_channel::oneshot;

/// No error.
pub const NONE: i16 = 0;
/// The coordinator cannot take the request now; the client retries.
pub const COORDINATOR_NOT_AVAILABLE: i16 = 15;
/// The request's generation is not the group's current one.
pub const ILLEGAL_GENERATION: i16 = 22;
/// Protocol type or protocols incompatible with the group.
pub const INCONSISTENT_GROUP_PROTOCOL: i16 = 23;
/// The group id is empty.
pub const INVALID_GROUP_ID: i16 = 24;
/// The member id is not (or no longer) in the group.
pub const UNKNOWN_MEMBER_ID: i16 = 25;
/// The session timeout is outside the configured bounds.
pub const INVALID_SESSION_TIMEOUT: i16 = 26;
/// The group is rebalancing; the member must rejoin.
pub const REBALANCE_IN_PROGRESS: i16 = 27;
/// DeleteGroups on a group that still has members.
pub const NON_EMPTY_GROUP: i16 = 68;
/// DeleteGroups on an unknown group.
pub const GROUP_ID_NOT_FOUND: i16 = 69;
/// JoinGroup v4+ without a member id: rejoin with the id in the answer.
pub const MEMBER_ID_REQUIRED: i16 = 79;
/// The group already has `group_members_max` members.
pub const GROUP_MAX_SIZE_REACHED: i16 = 81;

/// The generation id sent with errors (Kafka's `UNKNOWN_GENERATION_ID`).
pub const UNKNOWN_GENERATION: i32 = -1;

/// The state of a group, spelled as Kafka spells it in DescribeGroups and
/// ListGroups ([`GroupState::as_str`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
    Dead,
}

impl GroupState {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::CompletingRebalance => "CompletingRebalance",
            GroupState::Stable => "Stable",
            GroupState::Dead => "Dead",
        }
    }
}

impl fmt::Display for GroupState {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// Coordinator limits and timings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoordinatorConfig {
    /// Smallest session timeout a member may ask for (Kafka's
    /// `group.min.session.timeout.ms`).
    pub session_timeout_min_ms: i32,
    /// Largest session timeout a member may ask for (Kafka's
    /// `group.max.session.timeout.ms`).
    pub session_timeout_max_ms: i32,
    /// How long a group starting from `Empty` waits for more members before
    /// its first generation (Kafka's `group.initial.rebalance.delay.ms`).
    pub initial_rebalance_delay_ms: i32,
    /// Most members (plus outstanding `MEMBER_ID_REQUIRED` ids) per group.
    pub group_members_max: usize,
    /// Most groups kept. When full, an `Empty` group is forgotten to make
    /// room; when none is, new groups get `COORDINATOR_NOT_AVAILABLE`.
    pub groups_max: usize,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            session_timeout_min_ms: 6_000,
            session_timeout_max_ms: 1_800_000,
            initial_rebalance_delay_ms: 3_000,
            group_members_max: 1_000,
            groups_max: 10_000,
        }
    }
}

/// A JoinGroup request, any version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JoinRequest {
    /// Empty on a member's first join.
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: i32,
    /// Negative (JoinGroup v0 has no such field) means "the session timeout".
    pub rebalance_timeout_ms: i32,
    pub protocol_type: String,
    /// (protocol name, metadata), in the member's order of preference.
    pub protocols: Vec<(String, Vec<u8>)>,
    /// JoinGroup v4+: answer a first join with `MEMBER_ID_REQUIRED`.
    pub require_known_member_id: bool,
    pub reason: Option<String>,
}

/// One member in the leader's JoinGroup answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinMember {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    /// The member's metadata for the chosen protocol.
    pub metadata: Vec<u8>,
}

/// A JoinGroup answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinResponse {
    pub error_code: i16,
    pub generation_id: i32,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    /// Empty with errors.
    pub leader: String,
    pub member_id: String,
    /// Every member for the leader; empty for the others.
    pub members: Vec<JoinMember>,
}

impl JoinResponse {
    fn error(member_id: String, error_code: i16) -> Self {
        JoinResponse {
            error_code,
            generation_id: UNKNOWN_GENERATION,
            protocol_type: None,
            protocol_name: None,
            leader: String::new(),
            member_id,
            members: Vec::new(),
        }
    }
}

/// A JoinGroup answered now, or one to await.
#[derive(Debug)]
pub enum JoinOutcome {
    Ready(JoinResponse),
    Waiting(oneshot::Receiver<JoinResponse>),
}

/// A SyncGroup request, any version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncRequest {
    pub member_id: String,
    pub generation_id: i32,
    /// SyncGroup v5+: checked against the group's when present.
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    /// (member id, assignment); only the leader's are used.
    pub assignments: Vec<(String, Vec<u8>)>,
}

/// A SyncGroup answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncResponse {
    pub error_code: i16,
    pub protocol_type: Option<String>,
    pub protocol_name: Option<String>,
    pub assignment: Vec<u8>,
}

impl SyncResponse {
    fn error(error_code: i16) -> Self {
        SyncResponse {
            error_code,
            protocol_type: None,
            protocol_name: None,
            assignment: Vec::new(),
        }
    }
}

/// A SyncGroup answered now, or one to await.
#[derive(Debug)]
pub enum SyncOutcome {
    Ready(SyncResponse),
    Waiting(oneshot::Receiver<SyncResponse>),
}

/// One member in a DescribeGroups answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberDescription {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    /// Metadata for the chosen protocol; empty unless the group is `Stable`.
    pub metadata: Vec<u8>,
    /// Empty unless the group is `Stable`.
    pub assignment: Vec<u8>,
}

/// A DescribeGroups answer for one group (unknown groups are `Dead`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupDescription {
    pub group_id: String,
    pub state: GroupState,
    /// Empty when unknown.
    pub protocol_type: String,
    /// The chosen protocol; empty unless the group is `Stable`.
    pub protocol: String,
    pub members: Vec<MemberDescription>,
}

/// One group in a ListGroups answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupListing {
    pub group_id: String,
    pub protocol_type: String,
    pub state: GroupState,
}

fn millis(ms: i32) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// `now + duration`, saturating far in the future instead of panicking.
fn after(now: Instant, duration: Duration) -> Instant {
    now.checked_add(duration)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(now)
}

/// Sends an answer to a parked request; a receiver that is gone is fine.
fn answer<T>(waiter: oneshot::Sender<T>, response: T) {
    let _ = waiter.send(response);
}

#[derive(Debug)]
struct Member {
    id: String,
    group_instance_id: Option<String>,
    client_id: String,
    client_host: String,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    protocols: Vec<(String, Vec<u8>)>,
    assignment: Vec<u8>,
    /// Expired after this unless parked in a join or sync.
    session_deadline: Instant,
    /// A parked JoinGroup: the member has rejoined in this join phase.
    join_waiter: Option<oneshot::Sender<JoinResponse>>,
    /// A parked SyncGroup (only in `CompletingRebalance`).
    sync_waiter: Option<oneshot::Sender<SyncResponse>>,
    /// Sent SyncGroup since the last generation started.
    synced: bool,
}

impl Member {
    fn supports(&self, protocol: &str) -> bool {
        self.protocols.iter().any(|(name, _)| name == protocol)
    }

    fn metadata(&self, protocol: &str) -> Vec<u8> {
        self.protocols
            .iter()
            .find(|(name, _)| name == protocol)
            .map(|(_, metadata)| metadata.clone())
            .unwrap_or_default()
    }

    /// Answers whatever the member has parked, before it leaves the group.
    fn dismiss(&mut self) {
        if let Some(waiter) = self.join_waiter.take() {
            answer(
                waiter,
                JoinResponse::error(self.id.clone(), UNKNOWN_MEMBER_ID),
            );
        }
        if let Some(waiter) = self.sync_waiter.take() {
            answer(waiter, SyncResponse::error(UNKNOWN_MEMBER_ID));
        }
    }

    /// Updates protocols and timeouts from a rejoin and parks its answer.
    fn rejoin(
        &mut self,
        request: JoinRequest,
        waiter: oneshot::Sender<JoinResponse>,
        now: Instant,
    ) {
        self.session_timeout = millis(request.session_timeout_ms);
        self.rebalance_timeout = rebalance_timeout(&request);
        self.protocols = request.protocols;
        self.session_deadline = after(now, self.session_timeout);
        if let Some(previous) = self.join_waiter.replace(waiter) {
            // A retried join replaces the earlier one, which the client has
            // given up on; tell it to rejoin should it still listen.
            answer(
                previous,
                JoinResponse::error(self.id.clone(), REBALANCE_IN_PROGRESS),
            );
        }
    }
}

fn rebalance_timeout(request: &JoinRequest) -> Duration {
    if request.rebalance_timeout_ms < 0 {
        millis(request.session_timeout_ms)
    } else {
        millis(request.rebalance_timeout_ms)
    }
}

/// The initial-delay join phase of a group that started from `Empty`.
#[derive(Debug)]
struct InitialDelay {
    /// Rebalance timeout left for further extensions.
    remaining: Duration,
    /// A member arrived during the current delay.
    new_member_added: bool,
}

#[derive(Debug)]
struct Group {
    /// The group id, for logs.
    id: String,
    state: GroupState,
    generation: i32,
    protocol_type: Option<String>,
    protocol_name: Option<String>,
    leader: Option<String>,
    /// In join order.
    members: Vec<Member>,
    /// Ids handed out with `MEMBER_ID_REQUIRED`, until when they are valid.
    pending: Vec<(String, Instant)>,
    /// `PreparingRebalance`: when the join phase ends regardless.
    join_deadline: Option<Instant>,
    initial_delay: Option<InitialDelay>,
    /// `CompletingRebalance`/`Stable`: when members that have not sent
    /// SyncGroup for this generation are removed.
    sync_deadline: Option<Instant>,
}

impl Group {
    fn new(id: String) -> Self {
        Group {
            id,
            state: GroupState::Empty,
            generation: 0,
            protocol_type: None,
            protocol_name: None,
            leader: None,
            members: Vec::new(),
            pending: Vec::new(),
            join_deadline: None,
            initial_delay: None,
            sync_deadline: None,
        }
    }

    fn find(&self, member_id: &str) -> Option<usize> {
        self.members
            .iter()
            .position(|member| member.id == member_id)
    }

    fn pending_position(&self, member_id: &str) -> Option<usize> {
        self.pending.iter().position(|(id, _)| id == member_id)
    }

    fn knows(&self, member_id: &str) -> bool {
        self.find(member_id).is_some() || self.pending_position(member_id).is_some()
    }

    fn is_leader(&self, member_id: &str) -> bool {
        self.leader.as_deref() == Some(member_id)
    }

    /// Nothing worth remembering: never had a generation, nobody in it.
    fn is_unused(&self) -> bool {
        self.state == GroupState::Empty
            && self.generation == 0
            && self.members.is_empty()
            && self.pending.is_empty()
    }

    /// Can a member with these protocols be in the group? The first member
    /// sets the protocol type; later ones must match it and share at least
    /// one protocol that every current member supports.
    fn supports_protocols(&self, protocol_type: &str, protocols: &[(String, Vec<u8>)]) -> bool {
        if self.members.is_empty() {
            return !protocol_type.is_empty() && !protocols.is_empty();
        }
        self.protocol_type.as_deref() == Some(protocol_type)
            && protocols
                .iter()
                .any(|(name, _)| self.members.iter().all(|member| member.supports(name)))
    }

    fn rebalance_timeout(&self) -> Duration {
        self.members
            .iter()
            .map(|member| member.rebalance_timeout)
            .max()
            .unwrap_or_default()
    }

    /// The protocol every member supports with the most first-preference
    /// votes among those; ties go to the earliest in the first member's (the
    /// leader's) order.
    fn select_protocol(&self) -> String {
        let Some(first) = self.members.first() else {
            return String::new();
        };
        let mut candidates: Vec<(&str, usize)> = first
            .protocols
            .iter()
            .map(|(name, _)| name.as_str())
            .filter(|name| self.members.iter().all(|member| member.supports(name)))
            .map(|name| (name, 0))
            .collect();
        for member in &self.members {
            let vote = member.protocols.iter().find_map(|(name, _)| {
                candidates
                    .iter()
                    .position(|(candidate, _)| candidate == name)
            });
            if let Some(index) = vote {
                candidates[index].1 += 1;
            }
        }
        let mut best: Option<(&str, usize)> = None;
        for (name, votes) in candidates {
            if best.is_none_or(|(_, most)| votes > most) {
                best = Some((name, votes));
            }
        }
        match best {
            Some((name, _)) => name.to_owned(),
            // Unreachable while `supports_protocols` guards every join.
            None => first
                .protocols
                .first()
                .map(|(name, _)| name.clone())
                .unwrap_or_default(),
        }
    }

    fn join_response(&self, member: &Member, members: Vec<JoinMember>) -> JoinResponse {
        JoinResponse {
            error_code: NONE,
            generation_id: self.generation,
            protocol_type: self.protocol_type.clone(),
            protocol_name: self.protocol_name.clone(),
            leader: self.leader.clone().unwrap_or_default(),
            member_id: member.id.clone(),
            members,
        }
    }

    /// The leader's view of the members, with the chosen protocol's metadata.
    fn join_members(&self) -> Vec<JoinMember> {
        let protocol = self.protocol_name.as_deref().unwrap_or_default();
        self.members
            .iter()
            .map(|member| JoinMember {
                member_id: member.id.clone(),
                group_instance_id: member.group_instance_id.clone(),
                metadata: member.metadata(protocol),
            })
            .collect()
    }

    fn sync_response(&self, assignment: Vec<u8>) -> SyncResponse {
        SyncResponse {
            error_code: NONE,
            protocol_type: self.protocol_type.clone(),
            protocol_name: self.protocol_name.clone(),
            assignment,
        }
    }

    /// Adds a member that has just joined (with its parked answer) and
    /// starts a rebalance if none is under way.
    fn add_member(
        &mut self,
        id: String,
        request: JoinRequest,
        waiter: oneshot::Sender<JoinResponse>,
        config: &CoordinatorConfig,
        now: Instant,
    ) {
        if self.members.is_empty() {
            self.protocol_type = Some(request.protocol_type.clone());
        }
        if self.leader.is_none() {
            self.leader = Some(id.clone());
        }
        if self.state == GroupState::PreparingRebalance
            && let Some(delay) = self.initial_delay.as_mut()
        {
            delay.new_member_added = true;
        }
        let session_timeout = millis(request.session_timeout_ms);
        self.members.push(Member {
            id,
            rebalance_timeout: rebalance_timeout(&request),
            group_instance_id: request.group_instance_id,
            client_id: request.client_id,
            client_host: request.client_host,
            session_timeout,
            protocols: request.protocols,
            assignment: Vec::new(),
            session_deadline: after(now, session_timeout),
            join_waiter: Some(waiter),
            sync_waiter: None,
            synced: false,
        });
        self.maybe_prepare_rebalance(config, now);
        self.maybe_complete_join(config, now);
    }

    fn maybe_prepare_rebalance(&mut self, config: &CoordinatorConfig, now: Instant) {
        if matches!(
            self.state,
            GroupState::Empty | GroupState::Stable | GroupState::CompletingRebalance
        ) {
            self.prepare_rebalance(config, now);
        }
    }

    /// Enters the join phase: parked syncs are told to rejoin, assignments
    /// are dropped, and the phase gets its deadline.
    fn prepare_rebalance(&mut self, config: &CoordinatorConfig, now: Instant) {
        for member in &mut self.members {
            if let Some(waiter) = member.sync_waiter.take() {
                answer(waiter, SyncResponse::error(REBALANCE_IN_PROGRESS));
                // It waited in good standing; its session restarts now.
                member.session_deadline = after(now, member.session_timeout);
            }
            member.assignment = Vec::new();
        }
        self.sync_deadline = None;
        let rebalance_timeout = self.rebalance_timeout();
        if self.state == GroupState::Empty {
            let delay = millis(config.initial_rebalance_delay_ms);
            self.join_deadline = Some(after(now, delay));
            self.initial_delay = Some(InitialDelay {
                remaining: rebalance_timeout.saturating_sub(delay),
                new_member_added: false,
            });
        } else {
            self.join_deadline = Some(after(now, rebalance_timeout));
            self.initial_delay = None;
        }
        self.state = GroupState::PreparingRebalance;
        self.maybe_complete_join(config, now);
    }

    /// Ends the join phase if everyone has rejoined or time is up.
    fn maybe_complete_join(&mut self, config: &CoordinatorConfig, now: Instant) {
        if self.state != GroupState::PreparingRebalance {
            return;
        }
        let deadline_passed = self.join_deadline.is_none_or(|deadline| now >= deadline);
        if let Some(delay) = self.initial_delay.as_mut() {
            // The initial delay never ends early; it is extended while
            // members keep arriving, within the rebalance timeout.
            if !deadline_passed {
                return;
            }
            if delay.new_member_added && !delay.remaining.is_zero() {
                let extension = millis(config.initial_rebalance_delay_ms).min(delay.remaining);
                if !extension.is_zero() {
                    delay.remaining -= extension;
                    delay.new_member_added = false;
                    self.join_deadline = Some(after(now, extension));
                    return;
                }
            }
        } else {
            let all_joined = self.pending.is_empty()
                && self
                    .members
                    .iter()
                    .all(|member| member.join_waiter.is_some());
            if !all_joined && !deadline_passed {
                return;
            }
        }
        self.complete_join(now);
    }

    /// Starts the next generation with the members that rejoined and answers
    /// their parked joins.
    fn complete_join(&mut self, now: Instant) {
        let (joined, gone): (Vec<Member>, Vec<Member>) = std::mem::take(&mut self.members)
            .into_iter()
            .partition(|member| member.join_waiter.is_some());
        for mut member in gone {
            tracing::info!(group = %self.id, member = %member.id, "group member did not rejoin in time; removed");
            member.dismiss();
        }
        self.members = joined;
        if self
            .leader
            .as_deref()
            .is_none_or(|leader| self.find(leader).is_none())
        {
            self.leader = self.members.first().map(|member| member.id.clone());
        }
        self.generation = self.generation.checked_add(1).unwrap_or(1);
        self.join_deadline = None;
        self.initial_delay = None;
        if self.members.is_empty() {
            self.state = GroupState::Empty;
            self.protocol_name = None;
            self.leader = None;
            self.sync_deadline = None;
            tracing::info!(group = %self.id, generation = self.generation, "group is now empty");
            return;
        }
        self.protocol_name = Some(self.select_protocol());
        self.state = GroupState::CompletingRebalance;
        self.sync_deadline = Some(after(now, self.rebalance_timeout()));
        tracing::info!(
            group = %self.id,
            generation = self.generation,
            members = self.members.len(),
            protocol = self.protocol_name.as_deref().unwrap_or_default(),
            leader = self.leader.as_deref().unwrap_or_default(),
            "group rebalanced"
        );
        let mut leader_members = Some(self.join_members());
        for index in 0..self.members.len() {
            let member = &self.members[index];
            let members = if self.is_leader(&member.id) {
                leader_members.take().unwrap_or_default()
            } else {
                Vec::new()
            };
            let response = self.join_response(member, members);
            let member = &mut self.members[index];
            member.synced = false;
            member.session_deadline = after(now, member.session_timeout);
            if let Some(waiter) = member.join_waiter.take() {
                answer(waiter, response);
            }
        }
    }

    /// Removes the members matching `remove`, then rebalances (or finishes
    /// the join phase if one is open). Returns how many left.
    fn remove_where(
        &mut self,
        remove: impl Fn(&Member) -> bool,
        config: &CoordinatorConfig,
        now: Instant,
    ) -> usize {
        let (mut gone, stay): (Vec<Member>, Vec<Member>) = std::mem::take(&mut self.members)
            .into_iter()
            .partition(|member| remove(member));
        self.members = stay;
        if gone.is_empty() {
            return 0;
        }
        for member in &mut gone {
            member.dismiss();
        }
        if self
            .leader
            .as_deref()
            .is_some_and(|leader| self.find(leader).is_none())
        {
            self.leader = self.members.first().map(|member| member.id.clone());
        }
        match self.state {
            GroupState::Stable | GroupState::CompletingRebalance => {
                self.prepare_rebalance(config, now);
            }
            GroupState::PreparingRebalance => self.maybe_complete_join(config, now),
            GroupState::Empty | GroupState::Dead => {}
        }
        gone.len()
    }

    /// Stores the leader's assignments (members it left out get an empty
    /// one; ids that are not members are ignored).
    fn assign(&mut self, assignments: Vec<(String, Vec<u8>)>) {
        let mut by_member: HashMap<String, Vec<u8>> = assignments.into_iter().collect();
        for member in &mut self.members {
            member.assignment = by_member.remove(&member.id).unwrap_or_default();
        }
    }

    /// Periodic work for one group; see [`GroupCoordinator::tick`].
    fn tick(&mut self, config: &CoordinatorConfig, now: Instant) {
        let pending = self.pending.len();
        self.pending.retain(|(_, deadline)| now < *deadline);
        if self.pending.len() != pending {
            self.maybe_complete_join(config, now);
        }

        let expired = |member: &Member| {
            member.join_waiter.is_none()
                && member.sync_waiter.is_none()
                && now >= member.session_deadline
        };
        if self.members.iter().any(expired) {
            for member in self.members.iter().filter(|member| expired(member)) {
                tracing::info!(group = %self.id, member = %member.id, "group member session expired; removed");
            }
            self.remove_where(expired, config, now);
        }

        if matches!(
            self.state,
            GroupState::CompletingRebalance | GroupState::Stable
        ) && self.sync_deadline.is_some_and(|deadline| now >= deadline)
        {
            self.sync_deadline = None;
            if self.members.iter().any(|member| !member.synced) {
                tracing::info!(
                    group = %self.id,
                    generation = self.generation,
                    "group members did not send SyncGroup in time; removed"
                );
                self.remove_where(|member| !member.synced, config, now);
            }
        }

        self.maybe_complete_join(config, now);

        if self.state != GroupState::CompletingRebalance {
            // Parked syncs only belong to `CompletingRebalance`; should one
            // outlive it, tell it to rejoin.
            for member in &mut self.members {
                if let Some(waiter) = member.sync_waiter.take() {
                    answer(waiter, SyncResponse::error(REBALANCE_IN_PROGRESS));
                    member.session_deadline = after(now, member.session_timeout);
                }
            }
        }
    }
}

/// Hands out member ids: `{client id}-{uuid-like random suffix}`.
struct MemberIds {
    keys: RandomState,
    counter: u64,
}

impl MemberIds {
    fn new() -> Self {
        MemberIds {
            keys: RandomState::new(),
            counter: 0,
        }
    }

    fn next(&mut self, prefix: &str) -> String {
        self.counter += 1;
        let mut hasher = self.keys.build_hasher();
        hasher.write_u64(self.counter);
        let high = hasher.finish();
        hasher.write_u64(high);
        let low = hasher.finish();
        let bits = (u128::from(high) << 64) | u128::from(low);
        // Shaped like a version 4 UUID.
        let bits = (bits & !(0xf << 76) & !(0x3 << 62)) | (0x4 << 76) | (0x2 << 62);
        format!(
            "{prefix}-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            (bits >> 96) as u32,
            (bits >> 80) as u16,
            (bits >> 64) as u16,
            (bits >> 48) as u16,
            bits & 0xffff_ffff_ffff,
        )
    }
}

impl fmt::Debug for MemberIds {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("MemberIds")
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

/// Every consumer group of the broker. Not thread-safe on its own: the
/// broker wraps it in a `Mutex`. Every method is O(members of the group)
/// except [`GroupCoordinator::tick`] and [`GroupCoordinator::list`], which
/// visit every group.
#[derive(Debug)]
pub struct GroupCoordinator {
    config: CoordinatorConfig,
    groups: HashMap<String, Group>,
    ids: MemberIds,
}

impl GroupCoordinator {
    pub fn new(config: CoordinatorConfig) -> Self {
        GroupCoordinator {
            config,
            groups: HashMap::new(),
            ids: MemberIds::new(),
        }
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    /// How many groups are kept (including `Empty` ones).
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    /// JoinGroup. `Waiting` answers arrive when the join phase ends (on a
    /// later `join`, `leave`, `heartbeat` expiry or `tick`).
    pub fn join(&mut self, group_id: &str, request: JoinRequest, now: Instant) -> JoinOutcome {
        let outcome = self.join_inner(group_id, request, now);
        if self.groups.get(group_id).is_some_and(Group::is_unused) {
            self.groups.remove(group_id);
        }
        outcome
    }

    fn join_inner(&mut self, group_id: &str, request: JoinRequest, now: Instant) -> JoinOutcome {
        let ready = |member_id: String, error_code| {
            JoinOutcome::Ready(JoinResponse::error(member_id, error_code))
        };
        if group_id.is_empty() {
            return ready(request.member_id, INVALID_GROUP_ID);
        }
        if request.session_timeout_ms < self.config.session_timeout_min_ms
            || request.session_timeout_ms > self.config.session_timeout_max_ms
        {
            return ready(request.member_id, INVALID_SESSION_TIMEOUT);
        }
        let new_member = request.member_id.is_empty();
        if !self.groups.contains_key(group_id) {
            if !new_member {
                return ready(request.member_id, UNKNOWN_MEMBER_ID);
            }
            if !self.make_room() {
                return ready(request.member_id, COORDINATOR_NOT_AVAILABLE);
            }
            self.groups
                .insert(group_id.to_owned(), Group::new(group_id.to_owned()));
        }
        let Self {
            config,
            groups,
            ids,
        } = self;
        let Some(group) = groups.get_mut(group_id) else {
            return ready(request.member_id, COORDINATOR_NOT_AVAILABLE);
        };

        if new_member && group.members.len() + group.pending.len() >= config.group_members_max {
            return ready(String::new(), GROUP_MAX_SIZE_REACHED);
        }
        if !group.supports_protocols(&request.protocol_type, &request.protocols) {
            return ready(request.member_id, INCONSISTENT_GROUP_PROTOCOL);
        }
        tracing::debug!(
            group = %group_id,
            member = %request.member_id,
            client = %request.client_id,
            state = %group.state,
            reason = request.reason.as_deref().unwrap_or_default(),
            "join group"
        );

        if new_member {
            let prefix = request
                .group_instance_id
                .as_deref()
                .unwrap_or(&request.client_id);
            let mut member_id = ids.next(prefix);
            while group.knows(&member_id) {
                member_id = ids.next(prefix);
            }
            if request.require_known_member_id {
                let deadline = after(now, millis(request.session_timeout_ms));
                group.pending.push((member_id.clone(), deadline));
                return ready(member_id, MEMBER_ID_REQUIRED);
            }
            let (waiter, receiver) = oneshot::channel();
            group.add_member(member_id, request, waiter, config, now);
            return resolve(receiver);
        }

        if let Some(position) = group.pending_position(&request.member_id) {
            group.pending.remove(position);
            let (waiter, receiver) = oneshot::channel();
            let member_id = request.member_id.clone();
            group.add_member(member_id, request, waiter, config, now);
            return resolve(receiver);
        }

        let Some(index) = group.find(&request.member_id) else {
            return ready(request.member_id, UNKNOWN_MEMBER_ID);
        };
        let unchanged = group.members[index].protocols == request.protocols;
        let answer_now = match group.state {
            GroupState::PreparingRebalance => false,
            // Same metadata: the member probably missed the answer; repeat it.
            GroupState::CompletingRebalance => unchanged,
            // The leader rejoining forces a rebalance (that is how it reacts
            // to topic changes); so does changed metadata.
            GroupState::Stable => unchanged && !group.is_leader(&request.member_id),
            GroupState::Empty | GroupState::Dead => {
                return ready(request.member_id, UNKNOWN_MEMBER_ID);
            }
        };
        if answer_now {
            let member = &group.members[index];
            let members = if group.is_leader(&member.id) {
                group.join_members()
            } else {
                Vec::new()
            };
            let response = group.join_response(member, members);
            let member = &mut group.members[index];
            member.session_deadline = after(now, member.session_timeout);
            return JoinOutcome::Ready(response);
        }
        let (waiter, receiver) = oneshot::channel();
        group.members[index].rejoin(request, waiter, now);
        group.maybe_prepare_rebalance(config, now);
        group.maybe_complete_join(config, now);
        resolve(receiver)
    }

    /// Makes room for one more group, forgetting an `Empty` one if needed.
    fn make_room(&mut self) -> bool {
        if self.groups.len() < self.config.groups_max {
            return true;
        }
        let victim = self
            .groups
            .iter()
            .find(|(_, group)| group.state == GroupState::Empty && group.pending.is_empty())
            .map(|(id, _)| id.clone());
        match victim {
            Some(id) => {
                self.groups.remove(&id);
                true
            }
            None => false,
        }
    }

    /// SyncGroup. Followers that sync before the leader wait for it.
    pub fn sync(&mut self, group_id: &str, request: SyncRequest, now: Instant) -> SyncOutcome {
        let ready = |error_code| SyncOutcome::Ready(SyncResponse::error(error_code));
        if group_id.is_empty() {
            return ready(INVALID_GROUP_ID);
        }
        let Some(group) = self.groups.get_mut(group_id) else {
            return ready(UNKNOWN_MEMBER_ID);
        };
        let Some(index) = group.find(&request.member_id) else {
            return ready(UNKNOWN_MEMBER_ID);
        };
        if request.generation_id != group.generation {
            return ready(ILLEGAL_GENERATION);
        }
        if request
            .protocol_type
            .is_some_and(|protocol_type| group.protocol_type.as_ref() != Some(&protocol_type))
            || request
                .protocol_name
                .is_some_and(|protocol_name| group.protocol_name.as_ref() != Some(&protocol_name))
        {
            return ready(INCONSISTENT_GROUP_PROTOCOL);
        }
        match group.state {
            GroupState::Empty | GroupState::Dead => ready(UNKNOWN_MEMBER_ID),
            GroupState::PreparingRebalance => ready(REBALANCE_IN_PROGRESS),
            GroupState::Stable => {
                let member = &mut group.members[index];
                member.synced = true;
                member.session_deadline = after(now, member.session_timeout);
                let assignment = member.assignment.clone();
                SyncOutcome::Ready(group.sync_response(assignment))
            }
            GroupState::CompletingRebalance => {
                let member = &mut group.members[index];
                member.synced = true;
                member.session_deadline = after(now, member.session_timeout);
                if !group.is_leader(&request.member_id) {
                    let (waiter, receiver) = oneshot::channel();
                    if let Some(previous) = group.members[index].sync_waiter.replace(waiter) {
                        answer(previous, SyncResponse::error(REBALANCE_IN_PROGRESS));
                    }
                    return SyncOutcome::Waiting(receiver);
                }
                group.assign(request.assignments);
                group.state = GroupState::Stable;
                for position in 0..group.members.len() {
                    let Some(waiter) = group.members[position].sync_waiter.take() else {
                        continue;
                    };
                    let response = group.sync_response(group.members[position].assignment.clone());
                    answer(waiter, response);
                    // It waited in good standing; its session restarts now.
                    let member = &mut group.members[position];
                    member.session_deadline = after(now, member.session_timeout);
                }
                let assignment = group.members[index].assignment.clone();
                SyncOutcome::Ready(group.sync_response(assignment))
            }
        }
    }

    /// Heartbeat: `NONE`, or the error that tells the member what to do.
    pub fn heartbeat(
        &mut self,
        group_id: &str,
        member_id: &str,
        generation: i32,
        now: Instant,
    ) -> i16 {
        if group_id.is_empty() {
            return INVALID_GROUP_ID;
        }
        let Some(group) = self.groups.get_mut(group_id) else {
            return UNKNOWN_MEMBER_ID;
        };
        let Some(index) = group.find(member_id) else {
            return UNKNOWN_MEMBER_ID;
        };
        if generation != group.generation {
            return ILLEGAL_GENERATION;
        }
        let member = &mut group.members[index];
        match group.state {
            GroupState::Empty | GroupState::Dead => UNKNOWN_MEMBER_ID,
            GroupState::PreparingRebalance => {
                member.session_deadline = after(now, member.session_timeout);
                REBALANCE_IN_PROGRESS
            }
            GroupState::CompletingRebalance | GroupState::Stable => {
                member.session_deadline = after(now, member.session_timeout);
                NONE
            }
        }
    }

    /// LeaveGroup: one error code per member id, in order. Each departure
    /// rebalances the group (which ends `Empty` when nobody is left).
    pub fn leave(
        &mut self,
        group_id: &str,
        member_ids: Vec<String>,
        now: Instant,
    ) -> Vec<(String, i16)> {
        let Some(group) = self.groups.get_mut(group_id) else {
            let code = if group_id.is_empty() {
                INVALID_GROUP_ID
            } else {
                UNKNOWN_MEMBER_ID
            };
            return member_ids.into_iter().map(|id| (id, code)).collect();
        };
        let config = &self.config;
        let results = member_ids
            .into_iter()
            .map(|member_id| {
                if let Some(position) = group.pending_position(&member_id) {
                    group.pending.remove(position);
                    group.maybe_complete_join(config, now);
                    return (member_id, NONE);
                }
                let removed = group.remove_where(|member| member.id == member_id, config, now);
                let code = if removed > 0 { NONE } else { UNKNOWN_MEMBER_ID };
                (member_id, code)
            })
            .collect();
        if group.is_unused() {
            self.groups.remove(group_id);
        }
        results
    }

    /// Expires sessions, `MEMBER_ID_REQUIRED` ids and members that did not
    /// sync in time; ends join phases whose delay or timeout elapsed; answers
    /// syncs parked in a group that moved on. Call it every 100 ms or so.
    pub fn tick(&mut self, now: Instant) {
        let config = &self.config;
        for group in self.groups.values_mut() {
            group.tick(config, now);
        }
        self.groups.retain(|_, group| !group.is_unused());
    }

    /// DescribeGroups for one group; unknown groups are reported `Dead`.
    pub fn describe(&self, group_id: &str) -> GroupDescription {
        let Some(group) = self.groups.get(group_id) else {
            return GroupDescription {
                group_id: group_id.to_owned(),
                state: GroupState::Dead,
                protocol_type: String::new(),
                protocol: String::new(),
                members: Vec::new(),
            };
        };
        let stable = group.state == GroupState::Stable;
        let protocol = if stable {
            group.protocol_name.clone().unwrap_or_default()
        } else {
            String::new()
        };
        let members = group
            .members
            .iter()
            .map(|member| MemberDescription {
                member_id: member.id.clone(),
                group_instance_id: member.group_instance_id.clone(),
                client_id: member.client_id.clone(),
                client_host: member.client_host.clone(),
                metadata: if stable {
                    member.metadata(&protocol)
                } else {
                    Vec::new()
                },
                assignment: if stable {
                    member.assignment.clone()
                } else {
                    Vec::new()
                },
            })
            .collect();
        GroupDescription {
            group_id: group_id.to_owned(),
            state: group.state,
            protocol_type: group.protocol_type.clone().unwrap_or_default(),
            protocol,
            members,
        }
    }

    /// ListGroups: every group kept, sorted by id.
    pub fn list(&self) -> Vec<GroupListing> {
        let mut listings: Vec<GroupListing> = self
            .groups
            .iter()
            .map(|(id, group)| GroupListing {
                group_id: id.clone(),
                protocol_type: group.protocol_type.clone().unwrap_or_default(),
                state: group.state,
            })
            .collect();
        listings.sort_by(|a, b| a.group_id.cmp(&b.group_id));
        listings
    }

    /// DeleteGroups for one group: `NONE`, `NON_EMPTY_GROUP` or
    /// `GROUP_ID_NOT_FOUND`. (Committed offsets are the caller's to delete.)
    pub fn delete(&mut self, group_id: &str) -> i16 {
        match self.groups.get(group_id) {
            None => GROUP_ID_NOT_FOUND,
            Some(group) if group.state != GroupState::Empty => NON_EMPTY_GROUP,
            Some(_) => {
                self.groups.remove(group_id);
                NONE
            }
        }
    }

    /// May this (member, generation) commit offsets? As Kafka's OffsetCommit:
    /// a negative generation with no member id is a client managing its own
    /// partitions, allowed while the group is `Empty` (or unknown); anyone
    /// else must be a current member of the current generation. Commits are
    /// accepted during `PreparingRebalance` (members commit before they
    /// rejoin) but not during `CompletingRebalance` (`REBALANCE_IN_PROGRESS`).
    pub fn generation_check(
        &self,
        group_id: &str,
        member_id: &str,
        generation: i32,
    ) -> Result<(), i16> {
        let Some(group) = self.groups.get(group_id) else {
            return if generation >= 0 {
                Err(ILLEGAL_GENERATION)
            } else if !member_id.is_empty() {
                Err(UNKNOWN_MEMBER_ID)
            } else {
                Ok(())
            };
        };
        if generation >= 0 || !member_id.is_empty() {
            if group.find(member_id).is_none() {
                return Err(UNKNOWN_MEMBER_ID);
            }
            if generation != group.generation {
                return Err(ILLEGAL_GENERATION);
            }
        } else if group.state != GroupState::Empty {
            return Err(UNKNOWN_MEMBER_ID);
        }
        match group.state {
            GroupState::CompletingRebalance => Err(REBALANCE_IN_PROGRESS),
            GroupState::Dead => Err(COORDINATOR_NOT_AVAILABLE),
            GroupState::Empty | GroupState::PreparingRebalance | GroupState::Stable => Ok(()),
        }
    }
}

/// A parked answer that may already have been given.
fn resolve(mut receiver: oneshot::Receiver<JoinResponse>) -> JoinOutcome {
    match receiver.try_recv() {
        Ok(Some(response)) => JoinOutcome::Ready(response),
        _ => JoinOutcome::Waiting(receiver),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    const GROUP: &str = "group";
    const SESSION_MS: i32 = 10_000;
    const REBALANCE_MS: i32 = 30_000;

    fn coordinator() -> GroupCoordinator {
        GroupCoordinator::new(CoordinatorConfig {
            initial_rebalance_delay_ms: 0,
            ..CoordinatorConfig::default()
        })
    }

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    fn protocols(names: &[&str]) -> Vec<(String, Vec<u8>)> {
        names
            .iter()
            .map(|name| (name.to_string(), format!("{name}-meta").into_bytes()))
            .collect()
    }

    fn request(member_id: &str, client_id: &str) -> JoinRequest {
        JoinRequest {
            member_id: member_id.into(),
            client_id: client_id.into(),
            client_host: "/127.0.0.1".into(),
            session_timeout_ms: SESSION_MS,
            rebalance_timeout_ms: REBALANCE_MS,
            protocol_type: "consumer".into(),
            protocols: protocols(&["range", "roundrobin"]),
            ..JoinRequest::default()
        }
    }

    fn v4_request(member_id: &str, client_id: &str) -> JoinRequest {
        JoinRequest {
            require_known_member_id: true,
            ..request(member_id, client_id)
        }
    }

    fn sync_request(
        member_id: &str,
        generation_id: i32,
        assignments: &[(&str, &[u8])],
    ) -> SyncRequest {
        SyncRequest {
            member_id: member_id.into(),
            generation_id,
            assignments: assignments
                .iter()
                .map(|(id, assignment)| (id.to_string(), assignment.to_vec()))
                .collect(),
            ..SyncRequest::default()
        }
    }

    fn ready(outcome: JoinOutcome) -> JoinResponse {
        match outcome {
            JoinOutcome::Ready(response) => response,
            JoinOutcome::Waiting(_) => panic!("expected an immediate JoinGroup answer"),
        }
    }

    fn waiting(outcome: JoinOutcome) -> oneshot::Receiver<JoinResponse> {
        match outcome {
            JoinOutcome::Ready(response) => panic!("expected JoinGroup to wait, got {response:?}"),
            JoinOutcome::Waiting(receiver) => receiver,
        }
    }

    fn sync_ready(outcome: SyncOutcome) -> SyncResponse {
        match outcome {
            SyncOutcome::Ready(response) => response,
            SyncOutcome::Waiting(_) => panic!("expected an immediate SyncGroup answer"),
        }
    }

    fn sync_waiting(outcome: SyncOutcome) -> oneshot::Receiver<SyncResponse> {
        match outcome {
            SyncOutcome::Ready(response) => panic!("expected SyncGroup to wait, got {response:?}"),
            SyncOutcome::Waiting(receiver) => receiver,
        }
    }

    /// The answer to a parked request, if given yet.
    fn answered<T>(receiver: &mut oneshot::Receiver<T>) -> Option<T> {
        receiver
            .try_recv()
            .expect("the coordinator answers every request it parks")
    }

    /// A join's answer, immediate or parked (which must have been given).
    fn settle(outcome: JoinOutcome) -> JoinResponse {
        match outcome {
            JoinOutcome::Ready(response) => response,
            JoinOutcome::Waiting(mut receiver) => {
                answered(&mut receiver).expect("the join phase has ended")
            }
        }
    }

    fn state(coordinator: &GroupCoordinator) -> GroupState {
        coordinator.describe(GROUP).state
    }

    fn member_ids(coordinator: &GroupCoordinator) -> Vec<String> {
        coordinator
            .describe(GROUP)
            .members
            .into_iter()
            .map(|member| member.member_id)
            .collect()
    }

    /// Brings `count` members into a `Stable` group one after another (v3
    /// joins, everything at `now`). Returns their ids in join order (the
    /// first is the leader) and the generation.
    fn stable_group(
        coordinator: &mut GroupCoordinator,
        count: usize,
        now: Instant,
    ) -> (Vec<String>, i32) {
        let mut ids: Vec<String> = Vec::new();
        let mut generation = 0;
        for n in 0..count {
            let mut outcomes =
                vec![coordinator.join(GROUP, request("", &format!("client-{n}")), now)];
            for id in &ids {
                outcomes.push(coordinator.join(GROUP, request(id, "client"), now));
            }
            let responses: Vec<JoinResponse> = outcomes.into_iter().map(settle).collect();
            for response in &responses {
                assert_eq!(response.error_code, NONE);
                assert_eq!(response.generation_id, responses[0].generation_id);
            }
            ids.push(responses[0].member_id.clone());
            generation = responses[0].generation_id;
        }
        let assignments: Vec<(String, Vec<u8>)> = ids
            .iter()
            .map(|id| (id.clone(), format!("assignment-{id}").into_bytes()))
            .collect();
        for id in &ids {
            let request = SyncRequest {
                member_id: id.clone(),
                generation_id: generation,
                assignments: assignments.clone(),
                ..SyncRequest::default()
            };
            let response = sync_ready(coordinator.sync(GROUP, request, now));
            assert_eq!(response.error_code, NONE);
            assert_eq!(response.assignment, format!("assignment-{id}").into_bytes());
        }
        assert_eq!(state(coordinator), GroupState::Stable);
        (ids, generation)
    }

    #[test]
    fn three_members_joining_one_after_another_converge_on_one_generation() {
        let mut coordinator = coordinator();
        let t0 = Instant::now();

        // The group was Empty and the initial delay is 0: the first
        // generation forms at once around the first member.
        let a = ready(coordinator.join(GROUP, request("", "client-a"), t0));
        assert_eq!(a.error_code, NONE);
        assert_eq!(a.generation_id, 1);
        assert!(a.member_id.starts_with("client-a-"));
        assert_eq!(a.leader, a.member_id);
        assert_eq!(a.protocol_type.as_deref(), Some("consumer"));
        assert_eq!(a.protocol_name.as_deref(), Some("range"));
        assert_eq!(a.members.len(), 1);
        let a_id = a.member_id;
        let synced =
            sync_ready(coordinator.sync(GROUP, sync_request(&a_id, 1, &[(&a_id, b"all")]), t0));
        assert_eq!(synced.assignment, b"all");
        assert_eq!(state(&coordinator), GroupState::Stable);

        // A second member starts a rebalance; it waits for A to rejoin.
        let mut b_join = waiting(coordinator.join(GROUP, request("", "client-b"), t0 + ms(100)));
        assert_eq!(state(&coordinator), GroupState::PreparingRebalance);
        assert_eq!(
            coordinator.heartbeat(GROUP, &a_id, 1, t0 + ms(200)),
            REBALANCE_IN_PROGRESS
        );
        // A third arrives during the same join phase.
        let mut c_join = waiting(coordinator.join(GROUP, request("", "client-c"), t0 + ms(300)));
        coordinator.tick(t0 + ms(350));
        assert!(answered(&mut b_join).is_none());
        assert!(answered(&mut c_join).is_none());

        // A rejoins: everybody is in, the phase ends on the spot.
        let a2 = ready(coordinator.join(GROUP, request(&a_id, "client-a"), t0 + ms(400)));
        let b2 = answered(&mut b_join).expect("B answered");
        let c2 = answered(&mut c_join).expect("C answered");
        for response in [&a2, &b2, &c2] {
            assert_eq!(response.error_code, NONE);
            assert_eq!(response.generation_id, 2);
            assert_eq!(response.leader, a_id);
            assert_eq!(response.protocol_name.as_deref(), Some("range"));
        }
        let (b_id, c_id) = (b2.member_id.clone(), c2.member_id.clone());
        assert!(b_id.starts_with("client-b-") && c_id.starts_with("client-c-"));
        assert_eq!(a2.member_id, a_id);
        let listed: Vec<&str> = a2
            .members
            .iter()
            .map(|member| member.member_id.as_str())
            .collect();
        assert_eq!(listed, [a_id.as_str(), b_id.as_str(), c_id.as_str()]);
        assert!(
            a2.members
                .iter()
                .all(|member| member.metadata == b"range-meta")
        );
        assert!(b2.members.is_empty() && c2.members.is_empty());
        assert_eq!(state(&coordinator), GroupState::CompletingRebalance);

        // Followers sync first and wait; the leader's assignment frees them.
        let mut b_sync =
            sync_waiting(coordinator.sync(GROUP, sync_request(&b_id, 2, &[]), t0 + ms(500)));
        let mut c_sync =
            sync_waiting(coordinator.sync(GROUP, sync_request(&c_id, 2, &[]), t0 + ms(500)));
        let plan: [(&str, &[u8]); 3] = [(&a_id, b"p0"), (&b_id, b"p1"), (&c_id, b"p2")];
        let leader =
            sync_ready(coordinator.sync(GROUP, sync_request(&a_id, 2, &plan), t0 + ms(600)));
        assert_eq!(leader.assignment, b"p0");
        assert_eq!(answered(&mut b_sync).expect("B synced").assignment, b"p1");
        assert_eq!(answered(&mut c_sync).expect("C synced").assignment, b"p2");
        assert_eq!(state(&coordinator), GroupState::Stable);
        let description = coordinator.describe(GROUP);
        assert_eq!(description.protocol, "range");
        let assignments: Vec<&[u8]> = description
            .members
            .iter()
            .map(|member| member.assignment.as_slice())
            .collect();
        assert_eq!(assignments, [b"p0", b"p1", b"p2"]);
    }

    #[test]
    fn initial_delay_waits_for_more_members() {
        let mut coordinator = GroupCoordinator::new(CoordinatorConfig {
            initial_rebalance_delay_ms: 3_000,
            ..CoordinatorConfig::default()
        });
        let t0 = Instant::now();
        let mut a = waiting(coordinator.join(GROUP, request("", "client-a"), t0));
        coordinator.tick(t0 + ms(2_000));
        assert!(answered(&mut a).is_none());
        let mut b = waiting(coordinator.join(GROUP, request("", "client-b"), t0 + ms(2_000)));
        // Everyone has joined, but the delay never ends early, and B's
        // arrival extends it by another delay.
        coordinator.tick(t0 + ms(3_000));
        coordinator.tick(t0 + ms(5_900));
        assert!(answered(&mut a).is_none() && answered(&mut b).is_none());
        coordinator.tick(t0 + ms(6_000));
        let a = answered(&mut a).expect("A answered");
        let b = answered(&mut b).expect("B answered");
        assert_eq!((a.generation_id, b.generation_id), (1, 1));
        assert_eq!(a.leader, a.member_id);
        assert_eq!(b.leader, a.member_id);
        assert_eq!(a.members.len(), 2);
    }

    #[test]
    fn initial_delay_extensions_stop_at_the_rebalance_timeout() {
        let mut coordinator = GroupCoordinator::new(CoordinatorConfig {
            initial_rebalance_delay_ms: 3_000,
            ..CoordinatorConfig::default()
        });
        let t0 = Instant::now();
        let short = |client: &str| JoinRequest {
            rebalance_timeout_ms: 4_000,
            ..request("", client)
        };
        let mut a = waiting(coordinator.join(GROUP, short("client-a"), t0));
        let _b = waiting(coordinator.join(GROUP, short("client-b"), t0 + ms(1_000)));
        coordinator.tick(t0 + ms(3_000)); // extended by what is left: 1 s
        let _c = waiting(coordinator.join(GROUP, short("client-c"), t0 + ms(3_500)));
        coordinator.tick(t0 + ms(3_900));
        assert!(answered(&mut a).is_none());
        coordinator.tick(t0 + ms(4_000)); // no time left to extend again
        let a = answered(&mut a).expect("A answered");
        assert_eq!(a.generation_id, 1);
        assert_eq!(a.members.len(), 3);
    }

    #[test]
    fn expired_session_removes_the_member_and_rebalances() {
        let mut coordinator = coordinator();
        let t0 = Instant::now();
        let (ids, generation) = stable_group(&mut coordinator, 2, t0);
        let (leader, follower) = (&ids[0], &ids[1]);

        // Only the leader keeps heartbeating.
        assert_eq!(
            coordinator.heartbeat(GROUP, leader, generation, t0 + ms(5_000)),
            NONE
        );
        coordinator.tick(t0 + ms(9_900));
        assert_eq!(state(&coordinator), GroupState::Stable);
        assert_eq!(member_ids(&coordinator).len(), 2);
        coordinator.tick(t0 + ms(10_000));
        assert_eq!(state(&coordinator), GroupState::PreparingRebalance);
        assert_eq!(member_ids(&coordinator), std::slice::from_ref(leader));
        assert_eq!(
            coordinator.heartbeat(GROUP, follower, generation, t0 + ms(10_000)),
            UNKNOWN_MEMBER_ID
        );
        assert_eq!(
            coordinator.heartbeat(GROUP, leader, generation, t0 + ms(10_100)),
            REBALANCE_IN_PROGRESS
        );

        let again = ready(coordinator.join(GROUP, request(leader, "client-0"), t0 + ms(10_200)));
        assert_eq!(again.error_code, NONE);
        assert_eq!(again.generation_id, generation + 1);
        assert_eq!(again.leader, *leader);
        assert_eq!(again.members.len(), 1);
    }

    #[test]
    fn member_that_does_not_rejoin_in_time_is_dropped_from_the_new_generation() {
        let mut coordinator = coordinator();
        let t0 = Instant::now();
        let (ids, generation) = stable_group(&mut coordinator, 2, t0);
        let (a, b) = (&ids[0], &ids[1]);

        // The join phase opens at 1 s and lasts the rebalance timeout (30 s).
        let mut newcomer =
            waiting(coordinator.join(GROUP, request("", "client-new"), t0 + ms(1_000)));
        let mut a_join = waiting(coordinator.join(GROUP, request(a, "client-0"), t0 + ms(2_000)));
        // B keeps its session alive but never rejoins; A waits in its join
        // far longer than its session timeout without being expired.
        for second in (5..=30).step_by(5) {
            let now = t0 + ms(second * 1_000);
            assert_eq!(
                coordinator.heartbeat(GROUP, b, generation, now),
                REBALANCE_IN_PROGRESS
            );
            coordinator.tick(now);
        }
        coordinator.tick(t0 + ms(30_900));
        assert!(answered(&mut a_join).is_none() && answered(&mut newcomer).is_none());
        assert_eq!(member_ids(&coordinator).len(), 3);

        coordinator.tick(t0 + ms(31_000));
        let a2 = answered(&mut a_join).expect("A answered");
        let newcomer = answered(&mut newcomer).expect("newcomer answered");
        assert_eq!(a2.generation_id, generation + 1);
        assert_eq!(newcomer.generation_id, generation + 1);
        assert_eq!(a2.leader, *a);
        let listed: Vec<&str> = a2
            .members
            .iter()
            .map(|member| member.member_id.as_str())
            .collect();
        assert_eq!(listed, [a.as_str(), newcomer.member_id.as_str()]);
        assert_eq!(
            coordinator.heartbeat(GROUP, b, generation + 1, t0 + ms(31_000)),
            UNKNOWN_MEMBER_ID
        );
        assert_eq!(state(&coordinator), GroupState::CompletingRebalance);
    }

    /// Two members in `CompletingRebalance` at `now`: (leader, follower, generation).
    fn completing_group(coordinator: &mut GroupCoordinator, now: Instant) -> (String, String, i32) {
        let (ids, _) = stable_group(coordinator, 1, now);
        let mut follower = waiting(coordinator.join(GROUP, request("", "client-b"), now));
        let leader = ready(coordinator.join(GROUP, request(&ids[0], "client-0"), now));
        let follower = answered(&mut follower).expect("follower answered");
        assert_eq!(state(coordinator), GroupState::CompletingRebalance);
        (leader.member_id, follower.member_id, leader.generation_id)
    }

    #[test]
    fn follower_sync_waits_for_the_leader() {
        let mut coordinator = coordinator();
        let t0 = Instant::now();
        let (a, b, generation) = completing_group(&mut coordinator, t0);

        let mut b_sync =
            sync_waiting(coordinator.sync(GROUP, sync_request(&b, generation, &[]), t0 + ms(100)));
        coordinator.tick(t0 + ms(200));
        assert!(answered(&mut b_sync).is_none());
        let error = |outcome| sync_ready(outcome).error_code;
        assert_eq!(
            error(coordinator.sync(GROUP, sync_request(&b, generation - 1, &[]), t0)),
            ILLEGAL_GENERATION
        );
        assert_eq!(
            error(coordinator.sync(GROUP, sync_request("stranger", generation, &[]), t0)),
            UNKNOWN_MEMBER_ID
        );
        assert_eq!(
            error(coordinator.sync("elsewhere", sync_request(&b, generation, &[]), t0)),
            UNKNOWN_MEMBER_ID
        );
        let wrong_protocol = SyncRequest {
            protocol_name: Some("roundrobin".into()),
            ..sync_request(&b, generation, &[])
        };
        assert_eq!(
            error(coordinator.sync(GROUP, wrong_protocol, t0)),
            INCONSISTENT_GROUP_PROTOCOL
        );
        assert!(answered(&mut b_sync).is_none());

        let plan: [(&str, &[u8]); 3] = [(&a, b"pa"), (&b, b"pb"), ("stranger", b"x")];
        let leader = SyncRequest {
            protocol_type: Some("consumer".into()),
            protocol_name: Some("range".into()),
            ..sync_request(&a, generation, &plan)
        };
        let leader = sync_ready(coordinator.sync(GROUP, leader, t0 + ms(300)));
        assert_eq!(leader.error_code, NONE);
        assert_eq!(leader.assignment, b"pa");
        assert_eq!(leader.protocol_type.as_deref(), Some("consumer"));
        assert_eq!(leader.protocol_name.as_deref(), Some("range"));
        let follower = answered(&mut b_sync).expect("follower answered");
        assert_eq!(follower.error_code, NONE);
        assert_eq!(follower.assignment, b"pb");
        assert_eq!(state(&coordinator), GroupState::Stable);

        // In Stable a sync is answered at once from the stored assignment.
        let again =
            sync_ready(coordinator.sync(GROUP, sync_request(&b, generation, &[]), t0 + ms(400)));
        assert_eq!(again.assignment, b"pb");
    }

    #[test]
    fn parked_sync_is_told_to_rejoin_when_the_group_rebalances() {
        let mut coordinator = coordinator();
        let t0 = Instant::now();
        let (_, b, generation) = completing_group(&mut coordinator, t0);
        let mut b_sync =
            sync_waiting(coordinator.sync(GROUP, sync_request(&b, generation, &[]), t0));
        let _newcomer = waiting(coordinator.join(GROUP, request("", "client-c"), t0 + ms(100)));
        let answer = answered(&mut b_sync).expect("parked sync answered");
        assert_eq!(answer.error_code, REBALANCE_IN_PROGRESS);
        assert!(answer.assignment.is_empty());
        assert_eq!(
            sync_ready(coordinator.sync(GROUP, sync_request(&b, generation, &[]), t0)).error_code,
            REBALANCE_IN_PROGRESS
        );
    }

    #[test]
    fn parked_sync_outlives_its_session_and_restarts_it_when_answered() {
        let mut coordinator = coordinator();
        let t0 = Instant::now();
        let (a, b, generation) = completing_group(&mut coordinator, t0);
        let mut b_sync = sync_waiting(coordinator.sync(
            GROUP,
            sync_request(&b, generation, &[]),
            t0 + ms(1_000),
        ));
        // The leader heartbeats (fine while completing) but takes 20 s.
        for second in [5, 12, 19] {
            let now = t0 + ms(second * 1_000);
            assert_eq!(coordinator.heartbeat(GROUP, &a, generation, now), NONE);
            coordinator.tick(now);
        }
        assert_eq!(member_ids(&coordinator).len(), 2);
        let plan: [(&str, &[u8]); 2] = [(&a, b"pa"), (&b, b"pb")];
        sync_ready(coordinator.sync(GROUP, sync_request(&a, generation, &plan), t0 + ms(20_000)));
        assert_eq!(answered(&mut b_sync).expect("answered").assignment, b"pb");
        coordinator.tick(t0 + ms(29_900));
        assert_eq!(state(&coordinator), GroupState::Stable);
        assert_eq!(member_ids(&coordinator).len(), 2);
    }

    #[test]
    fn members_that_never_sync_are_removed_after_the_rebalance_timeout() {
        let mut coordinator = coordinator();
        let t0 = Instant::now();
        let (a, b, generation) = completing_group(&mut coordinator, t0);
        let plan: [(&str, &[u8]); 2] = [(&a, b"pa"), (&b, b"pb")];
        sync_ready(coordinator.sync(GROUP, sync_request(&a, generation, &plan), t0 + ms(1_000)));
        for second in (5..30).step_by(5) {
            let now = t0 + ms(second * 1_000);
            assert_eq!(coordinator.heartbeat(GROUP, &a, generation, now), NONE);
            assert_eq!(coordinator.heartbeat(GROUP, &b, generation, now), NONE);
            coordinator.tick(now);
        }
        coordinator.tick(t0 + ms(29_900));
        assert_eq!(state(&coordinator), GroupState::Stable);
        coordinator.tick(t0 + ms(30_000));
        assert_eq!(state(&coordinator), GroupState::PreparingRebalance);
        assert_eq!(member_ids(&coordinator), [a]);
    }

    #[test]
    fn heartbeat_answers_rebalance_in_progress_during_a_rebalance() {
        let mut coordinator = coordinator();
        let t0 = Instant::now();
        let (ids, generation) = stable_group(&mut coordinator, 2, t0);
        let (a, b) = (&ids[0], &ids[1]);
        assert_eq!(coordinator.heartbeat(GROUP, a, generation, t0), NONE);
        assert_eq!(
            coordinator.heartbeat(GROUP, a, generation - 1, t0),
            ILLEGAL_GENERATION
        );
        assert_eq!(
            coordinator.heartbeat(GROUP, a, generation + 1, t0),
            ILLEGAL_GENERATION
        );
        assert_eq!(
            coordinator.heartbeat(GROUP, "stranger", generation, t0),
            UNKNOWN_MEMBER_ID
        );
        assert_eq!(
            coordinator.heartbeat("elsewhere", a, generation, t0),
            UNKNOWN_MEMBER_ID
        );
        assert_eq!(
            coordinator.heartbeat("", a, generation, t0),
            INVALID_GROUP_ID
        );

        let mut newcomer = waiting(coordinator.join(GROUP, request("", "client-new"), t0));
        assert_eq!(
            coordinator.heartbeat(GROUP, a, generation, t0),
            REBALANCE_IN_PROGRESS
        );
        assert_eq!(
            coordinator.heartbeat(GROUP, b, generation, t0),
            REBALANCE_IN_PROGRESS
        );
        let _a = waiting(coordinator.join(GROUP, request(a, "client-0"), t0));
        assert_eq!(
            coordinator.heartbeat(GROUP, a, generation, t0),
            REBALANCE_IN_PROGRESS
        );
        let b2 = ready(coordinator.join(GROUP, request(b, "client-1"), t0));
        assert_eq!(b2.generation_id, generation + 1);
        assert!(answered(&mut newcomer).is_some());
        assert_eq!(state(&coordinator), GroupState::CompletingRebalance);
        assert_eq!(coordinator.heartbeat(GROUP, b, generation + 1, t0), NONE);
        assert_eq!(
            coordinator.heartbeat(GROUP, b, generation, t0),
            ILLEGAL_GENERATION
        );
    }

    #[test]
    fn leave_rebalances_and_the_last_departure_empties_the_group() {
        let mut coordinator = coordinator();
        let t0 = Instant::now();
        let (ids, generation) = stable_group(&mut coordinator, 2, t0);
        let (a, b) = (&ids[0], &ids[1]);

        let results = coordinator.leave(GROUP, vec![b.clone(), "stranger".into()], t0);
        assert_eq!(
            results,
            [
                (b.clone(), NONE),
                ("stranger".to_string(), UNKNOWN_MEMBER_ID)
            ]
        );
        assert_eq!(state(&coordinator), GroupState::PreparingRebalance);
        assert_eq!(
            coordinator.heartbeat(GROUP, a, generation, t0),
            REBALANCE_IN_PROGRESS
        );
        let a2 = ready(coordinator.join(GROUP, request(a, "client-0"), t0));
        assert_eq!(a2.generation_id, generation + 1);
        assert_eq!(a2.leader, *a);
        assert_eq!(a2.members.len(), 1);
        sync_ready(coordinator.sync(GROUP, sync_request(a, generation + 1, &[]), t0));

        assert_eq!(
            coordinator.leave(GROUP, vec![a.clone()], t0),
            [(a.clone(), NONE)]
        );
        assert_eq!(state(&coordinator), GroupState::Empty);
        assert!(member_ids(&coordinator).is_empty());
        assert_eq!(
            coordinator.list(),
            [GroupListing {
                group_id: GROUP.into(),
                protocol_type: "consumer".into(),
                state: GroupState::Empty,
            }]
        );
        assert_eq!(coordinator.list()[0].state.as_str(), "Empty");
        assert_eq!(
            coordinator.leave("elsewhere", vec![a.clone()], t0),
            [(a.clone(), UNKNOWN_MEMBER_ID)]
        );
        // Emptying took a generation of its own, as in Kafka.
        let next = ready(coordinator.join(GROUP, request("", "client-z"), t0));
        assert_eq!(next.generation_id, generation + 3);
    }

    #[test]
    fn member_id_required_flow() {
        let mut coordinator = coordinator();
        let t0 = Instant::now();
        let first = ready(coordinator.join(GROUP, v4_request("", "client-a"), t0));
        assert_eq!(first.error_code, MEMBER_ID_REQUIRED);
        assert_eq!(first.generation_id, UNKNOWN_GENERATION);
        assert!(first.member_id.starts_with("client-a-"));
        assert_eq!(first.member_id.len(), "client-a-".len() + 36);
        assert_eq!(state(&coordinator), GroupState::Empty);

        let joined = ready(coordinator.join(
            GROUP,
            v4_request(&first.member_id, "client-a"),
            t0 + ms(100),
        ));
        assert_eq!(joined.error_code, NONE);
        assert_eq!(joined.member_id, first.member_id);
        assert_eq!(joined.generation_id, 1);
        assert_eq!(joined.leader, first.member_id);

        // Ids the coordinator did not hand out are refused.
        let made_up = ready(coordinator.join(GROUP, v4_request("made-up", "client-z"), t0));
        assert_eq!(made_up.error_code, UNKNOWN_MEMBER_ID);
        let elsewhere = ready(coordinator.join("elsewhere", v4_request("made-up", "client-z"), t0));
        assert_eq!(elsewhere.error_code, UNKNOWN_MEMBER_ID);
        assert_eq!(coordinator.describe("elsewhere").state, GroupState::Dead);
    }

    #[test]
    fn member_id_handed_out_but_never_used_expires() {
        let mut coordinator = coordinator();
        let t0 = Instant::now();
        let first = ready(coordinator.join(GROUP, v4_request("", "client-a"), t0));
        assert_eq!(first.error_code, MEMBER_ID_REQUIRED);
        coordinator.tick(t0 + ms(9_900));
        assert_eq!(state(&coordinator), GroupState::Empty);
        coordinator.tick(t0 + ms(10_000));
        // Nothing is left of the group: no member, no generation, no id.
        assert_eq!(state(&coordinator), GroupState::Dead);
        assert!(coordinator.list().is_empty());
        let late = ready(coordinator.join(
            GROUP,
            v4_request(&first.member_id, "client-a"),
            t0 + ms(10_100),
        ));
        assert_eq!(late.error_code, UNKNOWN_MEMBER_ID);
        assert_eq!(coordinator.group_count(), 0);
    }

    #[test]
    fn outstanding_member_id_holds_the_join_phase_open() {
        let mut coordinator = coordinator();
        let t0 = Instant::now();
        let (ids, generation) = stable_group(&mut coordinator, 1, t0);
        let mut c = waiting(coordinator.join(GROUP, request("", "client-c"), t0 + ms(100)));
        let pending = ready(coordinator.join(GROUP, v4_request("", "client-b"), t0 + ms(200)));
        assert_eq!(pending.error_code, MEMBER_ID_REQUIRED);
        // Every member has rejoined, but the id just handed out is awaited.
        let mut a = waiting(coordinator.join(GROUP, request(&ids[0], "client-0"), t0 + ms(300)));
        coordinator.tick(t0 + ms(350));
        assert!(answered(&mut a).is_none() && answered(&mut c).is_none());

        let b = ready(coordinator.join(
            GROUP,
            v4_request(&pending.member_id, "client-b"),
            t0 + ms(400),
        ));
        assert_eq!(b.error_code, NONE);
        assert_eq!(b.generation_id, generation + 1);
        let a = answered(&mut a).expect("A answered");
        assert_eq!(a.members.len(), 3);
        assert_eq!(
            answered(&mut c).expect("C answered").generation_id,
            generation + 1
        );
    }

    #[test]
    fn inconsistent_protocols_are_refused() {
        let mut coordinator = coordinator();
        let t0 = Instant::now();
        let join =
            |coordinator: &mut GroupCoordinator, request| coordinator.join(GROUP, request, t0);

        let no_type = JoinRequest {
            protocol_type: String::new(),
            ..request("", "x")
        };
        assert_eq!(
            ready(join(&mut coordinator, no_type)).error_code,
            INCONSISTENT_GROUP_PROTOCOL
        );
        let no_protocols = JoinRequest {
            protocols: Vec::new(),
            ..request("", "x")
        };
        assert_eq!(
            ready(join(&mut coordinator, no_protocols)).error_code,
            INCONSISTENT_GROUP_PROTOCOL
        );
        assert_eq!(state(&coordinator), GroupState::Dead);

        let a = JoinRequest {
            protocols: protocols(&["range"]),
            ..request("", "client-a")
        };
        let a = ready(join(&mut coordinator, a));
        assert_eq!(a.error_code, NONE);

        let other_type = JoinRequest {
            protocol_type: "connect".into(),
            ..request("", "client-b")
        };
        assert_eq!(
            ready(join(&mut coordinator, other_type)).error_code,
            INCONSISTENT_GROUP_PROTOCOL
        );
        let disjoint = JoinRequest {
            protocols: protocols(&["sticky"]),
            ..request("", "client-b")
        };
        assert_eq!(
            ready(join(&mut coordinator, disjoint)).error_code,
            INCONSISTENT_GROUP_PROTOCOL
        );
        assert_eq!(state(&coordinator), GroupState::CompletingRebalance);

        let overlapping = JoinRequest {
            protocols: protocols(&["sticky", "range"]),
            ..request("", "client-b")
        };
        let mut b = waiting(join(&mut coordinator, overlapping));
        // An existing member may not move to protocols the others lack.
        let switch = JoinRequest {
            protocols: protocols(&["sticky"]),
            ..request(&a.member_id, "client-a")
        };
        assert_eq!(
            ready(join(&mut coordinator, switch)).error_code,
            INCONSISTENT_GROUP_PROTOCOL
        );
        let a_again = JoinRequest {
            protocols: protocols(&["range"]),
            ..request(&a.member_id, "client-a")
        };
        let a2 = ready(join(&mut coordinator, a_again));
        assert_eq!(a2.protocol_name.as_deref(), Some("range"));
        assert_eq!(
            answered(&mut b)
                .expect("B answered")
                .protocol_name
                .as_deref(),
            Some("range")
        );
    }

    #[test]
    fn protocol_with_most_votes_among_common_ones_wins() {
        let mut coordinator = GroupCoordinator::new(CoordinatorConfig {
            initial_rebalance_delay_ms: 3_000,
            ..CoordinatorConfig::default()
        });
        let t0 = Instant::now();
        let join = |names: &[&str], client: &str| JoinRequest {
            protocols: protocols(names),
            ..request("", client)
        };
        let mut a = waiting(coordinator.join(GROUP, join(&["range", "roundrobin"], "a"), t0));
        let _b = waiting(coordinator.join(GROUP, join(&["roundrobin", "range"], "b"), t0));
        let _c =
            waiting(coordinator.join(GROUP, join(&["sticky", "roundrobin", "range"], "c"), t0));
        coordinator.tick(t0 + ms(3_000));
        coordinator.tick(t0 + ms(6_000));
        let a = answered(&mut a).expect("A answered");
        assert_eq!(a.protocol_name.as_deref(), Some("roundrobin"));
        assert!(
            a.members
                .iter()
                .all(|member| member.metadata == b"roundrobin-meta")
        );
    }

    #[test]
    fn delete_refuses_a_group_with_members() {
        let mut coordinator = coordinator();
        let t0 = Instant::now();
        let (ids, _) = stable_group(&mut coordinator, 1, t0);
        assert_eq!(coordinator.delete(GROUP), NON_EMPTY_GROUP);
        assert_eq!(state(&coordinator), GroupState::Stable);
        assert_eq!(coordinator.delete("elsewhere"), GROUP_ID_NOT_FOUND);

        coordinator.leave(GROUP, ids, t0);
        assert_eq!(state(&coordinator), GroupState::Empty);
        assert_eq!(coordinator.delete(GROUP), NONE);
        assert_eq!(state(&coordinator), GroupState::Dead);
        assert_eq!(coordinator.delete(GROUP), GROUP_ID_NOT_FOUND);
    }

    #[test]
    fn offset_commit_generation_checks() {
        let mut coordinator = coordinator();
        let t0 = Instant::now();
        // No group: a client managing its own partitions may commit.
        assert_eq!(coordinator.generation_check(GROUP, "", -1), Ok(()));
        assert_eq!(
            coordinator.generation_check(GROUP, "", 3),
            Err(ILLEGAL_GENERATION)
        );
        assert_eq!(
            coordinator.generation_check(GROUP, "someone", -1),
            Err(UNKNOWN_MEMBER_ID)
        );

        let (ids, generation) = stable_group(&mut coordinator, 2, t0);
        let (a, b) = (&ids[0], &ids[1]);
        assert_eq!(coordinator.generation_check(GROUP, a, generation), Ok(()));
        assert_eq!(coordinator.generation_check(GROUP, b, generation), Ok(()));
        assert_eq!(
            coordinator.generation_check(GROUP, a, generation - 1),
            Err(ILLEGAL_GENERATION)
        );
        assert_eq!(
            coordinator.generation_check(GROUP, a, -1),
            Err(ILLEGAL_GENERATION)
        );
        assert_eq!(
            coordinator.generation_check(GROUP, "stranger", generation),
            Err(UNKNOWN_MEMBER_ID)
        );
        // Not while the group has members.
        assert_eq!(
            coordinator.generation_check(GROUP, "", -1),
            Err(UNKNOWN_MEMBER_ID)
        );

        // During the join phase members still commit (before rejoining).
        let mut newcomer = waiting(coordinator.join(GROUP, request("", "client-new"), t0));
        assert_eq!(state(&coordinator), GroupState::PreparingRebalance);
        assert_eq!(coordinator.generation_check(GROUP, a, generation), Ok(()));
        // Awaiting the assignment they may not.
        let _a = waiting(coordinator.join(GROUP, request(a, "client-0"), t0));
        ready(coordinator.join(GROUP, request(b, "client-1"), t0));
        let newcomer = answered(&mut newcomer)
            .expect("newcomer answered")
            .member_id;
        assert_eq!(state(&coordinator), GroupState::CompletingRebalance);
        assert_eq!(
            coordinator.generation_check(GROUP, a, generation + 1),
            Err(REBALANCE_IN_PROGRESS)
        );
        assert_eq!(
            coordinator.generation_check(GROUP, a, generation),
            Err(ILLEGAL_GENERATION)
        );

        // Everyone gone: simple commits are fine again, members' are not.
        coordinator.leave(GROUP, vec![a.clone(), b.clone(), newcomer], t0);
        assert_eq!(state(&coordinator), GroupState::Empty);
        assert_eq!(coordinator.generation_check(GROUP, "", -1), Ok(()));
        assert_eq!(
            coordinator.generation_check(GROUP, a, generation + 2),
            Err(UNKNOWN_MEMBER_ID)
        );
    }

    #[test]
    fn join_validates_group_id_session_timeout_and_member_id() {
        let mut coordinator = coordinator();
        let t0 = Instant::now();
        let code = |coordinator: &mut GroupCoordinator, group: &str, request| {
            ready(coordinator.join(group, request, t0)).error_code
        };
        let too_short = JoinRequest {
            session_timeout_ms: 5_999,
            ..request("", "x")
        };
        assert_eq!(
            code(&mut coordinator, GROUP, too_short),
            INVALID_SESSION_TIMEOUT
        );
        let too_long = JoinRequest {
            session_timeout_ms: 1_800_001,
            ..request("", "x")
        };
        assert_eq!(
            code(&mut coordinator, GROUP, too_long),
            INVALID_SESSION_TIMEOUT
        );
        assert_eq!(
            code(&mut coordinator, "", request("", "x")),
            INVALID_GROUP_ID
        );
        assert_eq!(
            code(&mut coordinator, GROUP, request("x-1", "x")),
            UNKNOWN_MEMBER_ID
        );
        assert_eq!(coordinator.group_count(), 0);
    }

    #[test]
    fn group_size_is_bounded() {
        let mut coordinator = GroupCoordinator::new(CoordinatorConfig {
            initial_rebalance_delay_ms: 0,
            group_members_max: 2,
            ..CoordinatorConfig::default()
        });
        let t0 = Instant::now();
        let a = ready(coordinator.join(GROUP, request("", "a"), t0));
        let pending = ready(coordinator.join(GROUP, v4_request("", "b"), t0));
        assert_eq!(pending.error_code, MEMBER_ID_REQUIRED);
        // The handed-out id holds the second place.
        let c = ready(coordinator.join(GROUP, request("", "c"), t0));
        assert_eq!(c.error_code, GROUP_MAX_SIZE_REACHED);
        assert_eq!(
            ready(coordinator.join(GROUP, v4_request("", "c"), t0)).error_code,
            GROUP_MAX_SIZE_REACHED
        );
        // Known members and handed-out ids still get in.
        let _b = waiting(coordinator.join(GROUP, v4_request(&pending.member_id, "b"), t0));
        let a2 = ready(coordinator.join(GROUP, request(&a.member_id, "a"), t0));
        assert_eq!(a2.error_code, NONE);
        assert_eq!(a2.members.len(), 2);
    }

    #[test]
    fn leader_rejoin_forces_a_rebalance_but_an_unchanged_follower_does_not() {
        let mut coordinator = coordinator();
        let t0 = Instant::now();
        let (ids, generation) = stable_group(&mut coordinator, 2, t0);
        let (a, b) = (&ids[0], &ids[1]);

        let follower = ready(coordinator.join(GROUP, request(b, "client-1"), t0));
        assert_eq!(follower.error_code, NONE);
        assert_eq!(follower.generation_id, generation);
        assert_eq!(follower.leader, *a);
        assert!(follower.members.is_empty());
        assert_eq!(state(&coordinator), GroupState::Stable);

        let mut leader = waiting(coordinator.join(GROUP, request(a, "client-0"), t0));
        assert_eq!(state(&coordinator), GroupState::PreparingRebalance);
        let _ = ready(coordinator.join(GROUP, request(b, "client-1"), t0));
        assert_eq!(
            answered(&mut leader).expect("answered").generation_id,
            generation + 1
        );

        // While completing, a repeated join gets the same answer again.
        let leader = ready(coordinator.join(GROUP, request(a, "client-0"), t0));
        assert_eq!(leader.generation_id, generation + 1);
        assert_eq!(leader.members.len(), 2);
        let follower = ready(coordinator.join(GROUP, request(b, "client-1"), t0));
        assert_eq!(follower.generation_id, generation + 1);
        assert!(follower.members.is_empty());
        assert_eq!(state(&coordinator), GroupState::CompletingRebalance);

        // Changed metadata while completing starts over.
        let changed = JoinRequest {
            protocols: protocols(&["roundrobin", "range"]),
            ..request(b, "client-1")
        };
        drop(waiting(coordinator.join(GROUP, changed, t0)));
        assert_eq!(state(&coordinator), GroupState::PreparingRebalance);
    }

    #[test]
    fn a_retried_join_replaces_the_parked_one() {
        let mut coordinator = coordinator();
        let t0 = Instant::now();
        let (ids, generation) = stable_group(&mut coordinator, 2, t0);
        let mut first = waiting(coordinator.join(GROUP, request(&ids[0], "client-0"), t0));
        let mut second = waiting(coordinator.join(GROUP, request(&ids[0], "client-0"), t0));
        let earlier = answered(&mut first).expect("earlier join answered");
        assert_eq!(earlier.error_code, REBALANCE_IN_PROGRESS);
        assert!(answered(&mut second).is_none());
        ready(coordinator.join(GROUP, request(&ids[1], "client-1"), t0));
        assert_eq!(
            answered(&mut second).expect("answered").generation_id,
            generation + 1
        );
    }

    #[test]
    fn dropped_receivers_are_harmless() {
        let mut coordinator = coordinator();
        let t0 = Instant::now();
        let (ids, _) = stable_group(&mut coordinator, 1, t0);
        // B's client goes away while its join is parked.
        drop(waiting(coordinator.join(
            GROUP,
            request("", "client-b"),
            t0,
        )));
        let a = ready(coordinator.join(GROUP, request(&ids[0], "client-0"), t0));
        assert_eq!(a.members.len(), 2);
        let b = a.members[1].member_id.clone();
        // And again with a parked sync.
        drop(sync_waiting(coordinator.sync(
            GROUP,
            sync_request(&b, a.generation_id, &[]),
            t0,
        )));
        let plan: [(&str, &[u8]); 2] = [(&ids[0], b"pa"), (&b, b"pb")];
        let leader =
            sync_ready(coordinator.sync(GROUP, sync_request(&ids[0], a.generation_id, &plan), t0));
        assert_eq!(leader.error_code, NONE);
        assert_eq!(state(&coordinator), GroupState::Stable);
        // B never heartbeats: it goes, and the group rebalances without it.
        assert_eq!(
            coordinator.heartbeat(GROUP, &ids[0], a.generation_id, t0 + ms(9_000)),
            NONE
        );
        coordinator.tick(t0 + ms(10_000));
        assert_eq!(member_ids(&coordinator), [ids[0].clone()]);
    }

    #[test]
    fn full_coordinator_forgets_an_empty_group_for_a_new_one() {
        let mut coordinator = GroupCoordinator::new(CoordinatorConfig {
            initial_rebalance_delay_ms: 0,
            groups_max: 2,
            ..CoordinatorConfig::default()
        });
        let t0 = Instant::now();
        let a = ready(coordinator.join("one", request("", "a"), t0));
        coordinator.leave("one", vec![a.member_id], t0);
        assert_eq!(coordinator.describe("one").state, GroupState::Empty);
        assert_eq!(
            ready(coordinator.join("two", request("", "b"), t0)).error_code,
            NONE
        );
        assert_eq!(
            ready(coordinator.join("three", request("", "c"), t0)).error_code,
            NONE
        );
        assert_eq!(coordinator.describe("one").state, GroupState::Dead);
        let four = ready(coordinator.join("four", request("", "d"), t0));
        assert_eq!(four.error_code, COORDINATOR_NOT_AVAILABLE);
        assert_eq!(coordinator.group_count(), 2);
    }

    #[test]
    fn describe_and_list() {
        let mut coordinator = coordinator();
        let t0 = Instant::now();
        let (ids, _) = stable_group(&mut coordinator, 2, t0);
        let description = coordinator.describe(GROUP);
        assert_eq!(description.group_id, GROUP);
        assert_eq!(description.state, GroupState::Stable);
        assert_eq!(description.protocol_type, "consumer");
        assert_eq!(description.protocol, "range");
        let first = &description.members[0];
        assert_eq!(first.member_id, ids[0]);
        assert_eq!(first.client_id, "client-0");
        assert_eq!(first.client_host, "/127.0.0.1");
        assert_eq!(first.metadata, b"range-meta");
        assert_eq!(
            first.assignment,
            format!("assignment-{}", ids[0]).into_bytes()
        );

        drop(waiting(coordinator.join(
            GROUP,
            request("", "client-new"),
            t0,
        )));
        let description = coordinator.describe(GROUP);
        assert_eq!(description.state.to_string(), "PreparingRebalance");
        assert_eq!(description.protocol, "");
        assert_eq!(description.members.len(), 3);
        assert!(
            description
                .members
                .iter()
                .all(|member| member.metadata.is_empty() && member.assignment.is_empty())
        );

        let unknown = coordinator.describe("elsewhere");
        assert_eq!(unknown.state.as_str(), "Dead");
        assert!(unknown.members.is_empty() && unknown.protocol_type.is_empty());

        ready(coordinator.join("another", request("", "x"), t0));
        let listed: Vec<(String, &str)> = coordinator
            .list()
            .into_iter()
            .map(|listing| (listing.group_id, listing.state.as_str()))
            .collect();
        assert_eq!(
            listed,
            [
                ("another".to_string(), "CompletingRebalance"),
                (GROUP.to_string(), "PreparingRebalance"),
            ]
        );
        assert_eq!(GroupState::Stable.as_str(), "Stable");
    }

    #[test]
    fn member_ids_are_unique_and_prefixed() {
        let mut ids = MemberIds::new();
        let generated: HashSet<String> = (0..1_000).map(|_| ids.next("client")).collect();
        assert_eq!(generated.len(), 1_000);
        for id in &generated {
            let suffix = id.strip_prefix("client-").expect("prefixed");
            let groups: Vec<usize> = suffix.split('-').map(str::len).collect();
            assert_eq!(groups, [8, 4, 4, 4, 12]);
            assert!(suffix.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
        }
    }

    #[test]
    fn coordinator_can_live_behind_a_mutex_shared_by_threads() {
        fn assert_send<T: Send>() {}
        assert_send::<GroupCoordinator>();
        assert_send::<JoinOutcome>();
        assert_send::<SyncOutcome>();
    }
}
