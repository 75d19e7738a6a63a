//! `[mqtt.bridge]`: the upstream MQTT bridge, Rill as a client of another
//! broker (docs/mqtt.md, "The upstream bridge").
//!
//! ```toml
//! [mqtt.bridge]
//! enabled = true
//! address = "127.0.0.1:1883"
//! client_id = "rill-bridge"
//! filters = ["sensors/#", "alarms/#"]
//! ```
//!
//! The password is read from a file (`password_file`), never written in
//! the configuration. What arrives goes through `mqtt.rules` like a
//! PUBLISH to the listener. Checked with the rest of the configuration:
//! the address, the filters, the ranges, that the password file can be
//! read, and that the bridge does not point at Rill's own listener.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use bytes::Bytes;
use rill_edge_bridge::mqtt::ProtocolVersion;
use rill_edge_bridge::mqtt::bridge::BridgeConfig;
use rill_edge_bridge::mqtt::topic::{TopicLimits, validate_topic_filter};
use serde::{Deserialize, Serialize};

use super::values::named_choice;

named_choice! {
    /// The MQTT version the bridge speaks upstream.
    BridgeProtocolSetting {
        /// MQTT 5.0: Receive Maximum, Maximum Packet Size and session expiry
        /// are sent; reason codes come back.
        #[default]
        V5 => "5.0",
        /// MQTT 3.1.1, for brokers without 5.0.
        V311 => "3.1.1",
    }
}

/// `[mqtt.bridge]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttBridgeSection {
    pub enabled: bool,
    /// `host:port` of the upstream broker.
    pub address: String,
    pub protocol_version: BridgeProtocolSetting,
    pub client_id: String,
    /// Empty: none.
    pub username: String,
    /// Empty: none.
    pub password_file: String,
    pub filters: Vec<String>,
    /// Whole seconds; 0: no keep alive.
    pub keep_alive_ms: u64,
    /// Whole seconds; MQTT 5.0 only.
    pub session_expiry_ms: u64,
    pub connect_timeout_ms: u64,
    pub inflight_max: u16,
    pub reconnect_backoff_ms_min: u64,
    pub reconnect_backoff_ms_max: u64,
}

impl Default for MqttBridgeSection {
    fn default() -> Self {
        Self {
            enabled: false,
            address: "127.0.0.1:1883".into(),
            protocol_version: BridgeProtocolSetting::V5,
            client_id: "rill-bridge".into(),
            username: String::new(),
            password_file: String::new(),
            filters: Vec::new(),
            keep_alive_ms: 30_000,
            session_expiry_ms: 7 * 86_400_000,
            connect_timeout_ms: 10_000,
            inflight_max: 64,
            reconnect_backoff_ms_min: 500,
            reconnect_backoff_ms_max: 30_000,
        }
    }
}

impl MqttBridgeSection {
    /// The state machine's settings; `password` is the password file's
    /// content, `packet_bytes_max` the MQTT listener's limit in force.
    pub fn bridge_config(&self, password: Option<Bytes>, packet_bytes_max: u32) -> BridgeConfig {
        BridgeConfig {
            address: self.address.clone(),
            protocol_version: match self.protocol_version {
                BridgeProtocolSetting::V5 => ProtocolVersion::V5,
                BridgeProtocolSetting::V311 => ProtocolVersion::V311,
            },
            client_id: self.client_id.clone(),
            username: (!self.username.is_empty()).then(|| self.username.clone()),
            password,
            filters: self.filters.clone(),
            keep_alive_s: u16::try_from(self.keep_alive_ms / 1000).unwrap_or(u16::MAX),
            session_expiry_s: u32::try_from(self.session_expiry_ms / 1000).unwrap_or(u32::MAX),
            connect_timeout_ms: self.connect_timeout_ms,
            inflight_max: self.inflight_max.max(1),
            packet_bytes_max,
            backoff_min_ms: self.reconnect_backoff_ms_min,
            backoff_max_ms: self.reconnect_backoff_ms_max,
        }
    }

    /// The password file's content without its final line break; `None`
    /// when no file is set.
    pub fn read_password(&self) -> std::io::Result<Option<Bytes>> {
        if self.password_file.is_empty() {
            return Ok(None);
        }
        let mut bytes = std::fs::read(&self.password_file)?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        Ok(Some(Bytes::from(bytes)))
    }
}

/// `host:port` split, with the port checked.
fn host_and_port(address: &str) -> Result<(&str, u16), String> {
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(format!(
            "{address:?} has no port; write host:port, such as \"127.0.0.1:1883\""
        ));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{address:?} has no host"));
    }
    match port.parse::<u16>() {
        Ok(port) if port > 0 => Ok((host, port)),
        _ => Err(format!("{address:?}: {port:?} is not a port (1 to 65535)")),
    }
}

/// Whether `host:port` is the socket Rill's own MQTT listener binds.
fn is_own_listener(host: &str, port: u16, listener: SocketAddr) -> bool {
    let ip = match host {
        "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
        other => match other.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => return false,
        },
    };
    port == listener.port()
        && (ip == listener.ip() || (listener.ip().is_unspecified() && ip.is_loopback()))
}

/// Shape and ranges always; what a running bridge needs when enabled.
pub(crate) fn validate(
    config: &super::Config,
    fail: &dyn Fn(&str, String) -> Result<(), super::ConfigError>,
) -> Result<(), super::ConfigError> {
    let bridge = &config.mqtt.bridge;
    let (host, port) = match host_and_port(&bridge.address) {
        Ok(parts) => parts,
        Err(problem) => return fail("mqtt.bridge.address", problem),
    };
    for (index, filter) in bridge.filters.iter().enumerate() {
        if let Err(error) = validate_topic_filter(filter, &TopicLimits::PROTOCOL) {
            return fail(
                "mqtt.bridge.filters",
                format!(
                    "filter {} ({filter:?}) is not a valid MQTT topic filter: {error}",
                    index + 1
                ),
            );
        }
    }
    if bridge.keep_alive_ms / 1000 > u64::from(u16::MAX) {
        return fail(
            "mqtt.bridge.keep_alive_ms",
            format!(
                "{} is out of range: at most {} (MQTT's longest keep alive, in seconds)",
                bridge.keep_alive_ms,
                u64::from(u16::MAX) * 1000
            ),
        );
    }
    if bridge.session_expiry_ms / 1000 > u64::from(u32::MAX) {
        return fail(
            "mqtt.bridge.session_expiry_ms",
            format!(
                "{} is out of range: at most {} (MQTT's longest expiry, in seconds)",
                bridge.session_expiry_ms,
                u64::from(u32::MAX) * 1000
            ),
        );
    }
    for (key, value) in [
        ("mqtt.bridge.inflight_max", u64::from(bridge.inflight_max)),
        ("mqtt.bridge.connect_timeout_ms", bridge.connect_timeout_ms),
        (
            "mqtt.bridge.reconnect_backoff_ms_min",
            bridge.reconnect_backoff_ms_min,
        ),
    ] {
        if value == 0 {
            return fail(key, "0 is out of range: at least 1".into());
        }
    }
    if bridge.reconnect_backoff_ms_max < bridge.reconnect_backoff_ms_min {
        return fail(
            "mqtt.bridge.reconnect_backoff_ms_max",
            format!(
                "{} is less than mqtt.bridge.reconnect_backoff_ms_min ({})",
                bridge.reconnect_backoff_ms_max, bridge.reconnect_backoff_ms_min
            ),
        );
    }
    if !bridge.enabled {
        return Ok(());
    }
    if bridge.filters.is_empty() {
        return fail(
            "mqtt.bridge.enabled",
            "the bridge has no mqtt.bridge.filters to subscribe to; add at least one, such as \
             filters = [\"sensors/#\"]"
                .into(),
        );
    }
    if bridge.client_id.is_empty() || bridge.client_id.contains('\0') {
        return fail(
            "mqtt.bridge.client_id",
            "must be a non-empty identifier without U+0000: the upstream session is kept under it"
                .into(),
        );
    }
    if bridge.client_id.len() > usize::from(u16::MAX) {
        return fail(
            "mqtt.bridge.client_id",
            format!("{} bytes is over MQTT's 65535", bridge.client_id.len()),
        );
    }
    if bridge.protocol_version == BridgeProtocolSetting::V5 && bridge.session_expiry_ms < 1000 {
        return fail(
            "mqtt.bridge.session_expiry_ms",
            format!(
                "{} is out of range: at least 1000 (1 s); a session that ends with its \
                 connection loses what the upstream broker would keep for the bridge",
                bridge.session_expiry_ms
            ),
        );
    }
    if !bridge.password_file.is_empty() {
        if let Err(error) = std::fs::metadata(&bridge.password_file)
            .and_then(|_| std::fs::File::open(&bridge.password_file))
        {
            return fail(
                "mqtt.bridge.password_file",
                format!("cannot read {}: {error}", bridge.password_file),
            );
        }
        if bridge.username.is_empty() && bridge.protocol_version == BridgeProtocolSetting::V311 {
            return fail(
                "mqtt.bridge.password_file",
                "MQTT 3.1.1 sends no password without a user name; set mqtt.bridge.username".into(),
            );
        }
    }
    if is_own_listener(host, port, config.listeners.mqtt) {
        return fail(
            "mqtt.bridge.address",
            format!(
                "{} is Rill's own MQTT listener (listeners.mqtt = {}); the bridge would feed \
                 Rill to itself. Point it at the upstream broker, or move listeners.mqtt off \
                 the upstream broker's port",
                bridge.address, config.listeners.mqtt
            ),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::check_file;
    use super::*;

    fn check(text: &str) -> Result<super::super::Config, String> {
        let directory = tempfile::tempdir().map_err(|error| error.to_string())?;
        check_in(directory.path(), text)
    }

    /// Checks `text` as a file in `directory`, where `DIR/password` holds
    /// a password.
    fn check_in(directory: &Path, text: &str) -> Result<super::super::Config, String> {
        let path = directory.join("rill.toml");
        let text = text.replace("DIR", &directory.display().to_string());
        std::fs::write(directory.join("password"), "s3cret\n")
            .map_err(|error| error.to_string())?;
        std::fs::write(&path, text).map_err(|error| error.to_string())?;
        check_file(Path::new(&path)).map_err(|error| error.to_string())
    }

    const VALID: &str = "[listeners]\nmqtt = \"127.0.0.1:1884\"\n\n[mqtt.bridge]\nenabled = true\naddress = \"127.0.0.1:1883\"\nprotocol_version = \"3.1.1\"\nusername = \"rill\"\npassword_file = \"DIR/password\"\nfilters = [\"sensors/#\", \"alarms/+\"]\nkeep_alive_ms = 15000\n";

    #[test]
    fn a_bridge_section_loads_and_becomes_the_machines_settings() -> Result<(), String> {
        let directory = tempfile::tempdir().map_err(|error| error.to_string())?;
        let config = check_in(directory.path(), VALID)?;
        let bridge = &config.mqtt.bridge;
        assert!(bridge.enabled);
        assert_eq!(bridge.filters, ["sensors/#", "alarms/+"]);
        let password = bridge.read_password().map_err(|error| error.to_string())?;
        assert_eq!(
            password.as_deref(),
            Some(&b"s3cret"[..]),
            "line break dropped"
        );
        let machine = bridge.bridge_config(password, 4096);
        assert_eq!(machine.protocol_version, ProtocolVersion::V311);
        assert_eq!(machine.keep_alive_s, 15);
        assert_eq!(machine.username.as_deref(), Some("rill"));
        assert_eq!(machine.client_id, "rill-bridge");
        assert_eq!(machine.session_expiry_s, 7 * 86_400);
        assert_eq!(machine.packet_bytes_max, 4096);
        // Disabled by default, and the defaults are valid.
        assert!(!MqttBridgeSection::default().enabled);
        check("")?;
        Ok(())
    }

    #[test]
    fn bad_bridge_settings_name_their_key() {
        let error = |text: &str| check(text).err().unwrap_or_default();
        let cases = [
            (
                VALID.replace("127.0.0.1:1883", "mosquitto"),
                "mqtt.bridge.address",
                "no port",
            ),
            (
                VALID.replace("\"alarms/+\"", "\"alarms/#/x\""),
                "mqtt.bridge.filters",
                "filter 2",
            ),
            (
                VALID.replace("filters = [\"sensors/#\", \"alarms/+\"]", "filters = []"),
                "mqtt.bridge.enabled",
                "no mqtt.bridge.filters",
            ),
            (
                VALID.replace("DIR/password", "DIR/missing"),
                "mqtt.bridge.password_file",
                "cannot read",
            ),
            (
                VALID.replace("username = \"rill\"\n", ""),
                "mqtt.bridge.password_file",
                "user name",
            ),
            (
                VALID.replace("1884", "1883"),
                "mqtt.bridge.address",
                "Rill's own MQTT listener",
            ),
            (
                format!("{VALID}reconnect_backoff_ms_min = 100\nreconnect_backoff_ms_max = 10\n"),
                "mqtt.bridge.reconnect_backoff_ms_max",
                "less than",
            ),
            (
                VALID.replace("protocol_version = \"3.1.1\"", "protocol_version = \"3.1\""),
                "mqtt.bridge.protocol_version",
                "5.0 or 3.1.1",
            ),
        ];
        for (text, key, words) in cases {
            let message = error(&text);
            assert!(
                message.contains(key) && message.contains(words),
                "{key}: {message}"
            );
        }
    }

    #[test]
    fn the_own_listener_is_recognised_through_wildcards_and_localhost() {
        let any = SocketAddr::from(([0, 0, 0, 0], 1883));
        assert!(is_own_listener("localhost", 1883, any));
        assert!(is_own_listener("127.0.0.1", 1883, any));
        assert!(!is_own_listener("127.0.0.1", 1884, any));
        assert!(!is_own_listener("mosquitto.local", 1883, any));
        let loopback = SocketAddr::from(([127, 0, 0, 1], 1883));
        assert!(!is_own_listener("10.0.0.2", 1883, loopback));
        assert_eq!(host_and_port("[::1]:1883"), Ok(("::1", 1883)));
        assert!(host_and_port(":1883").is_err());
        assert!(host_and_port("host:0").is_err());
    }
}
