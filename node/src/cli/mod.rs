//! The client-side `rill` commands (topics, produce, consume, groups, status, mirror status),
//! as plain async functions over a connected [`Client`](crate::client::Client).
//! `main.rs` parses the arguments, connects, and calls one of them; each
//! prints its result to stdout and its progress to stderr.
//!
//! Every command builds its output as a `String` in a `format_*` function
//! first and prints it after, so the formatting is tested without a terminal.

mod consume;
mod format;
mod group;
mod mirror;
mod mqtt;
mod produce;
mod status;
mod topic;

pub use consume::{
    ConsumeOptions, Output, StartAt, consume, consume_into, format_record_json, format_record_text,
    start_at, start_offset,
};
pub use format::{format_bytes, format_duration};
pub use group::{
    GroupOffset, ResetTo, format_group_list, format_group_offsets, format_reset, group_describe,
    group_list, group_reset_offsets,
};
pub use mirror::{fetch_mirror_status, format_mirror_status};
pub use mqtt::{PASSWD_ROUNDS_DEFAULT, passwd_line, read_password};
pub use produce::{
    ProduceOptions, ProduceReport, format_produce_progress, format_produce_summary, produce,
    produce_lines,
};
pub use status::{format_status, status};
pub use topic::{
    format_topic_describe, format_topic_list, topic_alter, topic_create, topic_delete,
    topic_describe, topic_list,
};
