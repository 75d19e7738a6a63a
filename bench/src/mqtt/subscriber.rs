//! A subscriber on its own thread, taking everything on `bench/#` at QoS 0
//! through a blocking socket, and counting what it gets.

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rill_edge_bridge::mqtt::{
    Packet, Properties, ProtocolVersion, QoS, Subscribe, Subscription, SubscriptionOptions, decode,
    encode,
};

use super::{
    CONNECT_DEADLINE, PACKET_BYTES_MAX, READ_CHUNK_BYTES, SUBSCRIBER_FILTER, connect_packet,
    disconnect_packet,
};

/// A subscriber on its own thread, taking everything on `bench/#` at QoS 0
/// through a blocking socket.
pub(super) struct Subscriber {
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl Subscriber {
    /// Connects and subscribes; returns once the SUBACK is in.
    pub(super) fn start(address: &str) -> anyhow::Result<Self> {
        let mut stream = std::net::TcpStream::connect(address)
            .with_context(|| format!("subscriber: connecting to {address}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_millis(100)))?;
        stream.write_all(&connect_packet("bench-subscriber")?)?;
        let mut subscribe = Vec::new();
        encode(
            &Packet::Subscribe(Subscribe {
                packet_id: 1,
                subscriptions: vec![Subscription {
                    filter: SUBSCRIBER_FILTER.into(),
                    options: SubscriptionOptions::with_qos(QoS::AtMostOnce),
                }],
                properties: Properties::default(),
            }),
            ProtocolVersion::V311,
            &mut subscribe,
        )?;
        stream.write_all(&subscribe)?;
        let mut buffer = Vec::new();
        let mut chunk = vec![0u8; READ_CHUNK_BYTES];
        let deadline = Instant::now() + CONNECT_DEADLINE;
        let mut subscribed = false;
        while !subscribed {
            anyhow::ensure!(
                Instant::now() < deadline,
                "subscriber: no SUBACK within {CONNECT_DEADLINE:?}"
            );
            match stream.read(&mut chunk) {
                Ok(0) => anyhow::bail!("subscriber: the broker closed the connection"),
                Ok(read) => buffer.extend_from_slice(&chunk[..read]),
                Err(error) if is_timeout(&error) => continue,
                Err(error) => return Err(error).context("subscriber: reading"),
            }
            let mut used = 0;
            while let Some((packet, bytes)) =
                decode(&buffer[used..], ProtocolVersion::V311, PACKET_BYTES_MAX)?
            {
                used += bytes;
                match packet {
                    Packet::ConnAck(connack) => anyhow::ensure!(
                        connack.reason_code == 0,
                        "subscriber: CONNACK refused with code {:#04x}",
                        connack.reason_code
                    ),
                    Packet::SubAck(suback) => {
                        anyhow::ensure!(
                            suback.reason_codes.iter().all(|&code| code < 0x80),
                            "subscriber: SUBSCRIBE refused: {:?}",
                            suback.reason_codes
                        );
                        subscribed = true;
                    }
                    other => anyhow::bail!(
                        "subscriber: expected CONNACK or SUBACK, got {}",
                        other.packet_type()
                    ),
                }
            }
            buffer.drain(..used);
        }
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let received = received.clone();
            let stop = stop.clone();
            move || -> anyhow::Result<()> {
                while !stop.load(Ordering::Relaxed) {
                    match stream.read(&mut chunk) {
                        Ok(0) => anyhow::bail!("subscriber: the broker closed the connection"),
                        Ok(read) => buffer.extend_from_slice(&chunk[..read]),
                        Err(error) if is_timeout(&error) => continue,
                        Err(error) => return Err(error).context("subscriber: reading"),
                    }
                    let mut used = 0;
                    let mut publishes = 0;
                    while let Some((packet, bytes)) =
                        decode(&buffer[used..], ProtocolVersion::V311, PACKET_BYTES_MAX)?
                    {
                        used += bytes;
                        match packet {
                            Packet::Publish(_) => publishes += 1,
                            other => anyhow::bail!(
                                "subscriber: expected PUBLISH, got {}",
                                other.packet_type()
                            ),
                        }
                    }
                    buffer.drain(..used);
                    received.fetch_add(publishes, Ordering::Relaxed);
                }
                let _ = stream.write_all(&disconnect_packet()?);
                Ok(())
            }
        });
        Ok(Self {
            received,
            stop,
            thread,
        })
    }

    /// Waits until `expected` messages are in, or nothing came for `quiet`,
    /// or `deadline`; then stops and says how many came.
    pub(super) fn finish(
        self,
        expected: u64,
        quiet: Duration,
        deadline: Duration,
    ) -> anyhow::Result<u64> {
        let started = Instant::now();
        let mut last = self.received.load(Ordering::Relaxed);
        let mut last_change = Instant::now();
        while last < expected
            && last_change.elapsed() < quiet
            && started.elapsed() < deadline
            && !self.thread.is_finished()
        {
            std::thread::sleep(Duration::from_millis(20));
            let now = self.received.load(Ordering::Relaxed);
            if now != last {
                last = now;
                last_change = Instant::now();
            }
        }
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the subscriber thread panicked"))??;
        Ok(self.received.load(Ordering::Relaxed))
    }
}

fn is_timeout(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}
