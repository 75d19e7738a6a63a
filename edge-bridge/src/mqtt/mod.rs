//! MQTT 3.1.1 (protocol level 4) and 5.0: for now the topic rules; the
//! packet codec follows.

pub mod topic;
