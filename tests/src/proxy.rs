//! A small TCP proxy for failure tests: it listens on a free loopback port and
//! forwards each connection to a target, and on command cuts every current
//! connection, stalls forwarding (both ways or one way) until resumed, or
//! black-holes traffic (accepts and reads, but nothing gets through either
//! way). Plain std threads: one accepting, two per connection. It is bounded
//! (at most `CONNECTIONS_MAX` connections at once) and every thread ends when
//! the proxy is dropped. Nothing in it sleeps: waits are condition variables
//! and blocking socket calls, which a shutdown of the socket wakes.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// Connections open through the proxy at once; further ones are closed at once.
pub const CONNECTIONS_MAX: usize = 128;
/// Bytes one forwarding thread reads and writes at a time.
const CHUNK_BYTES: usize = 16 * 1024;
/// How long connecting to the target may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Which way of the connections a stall holds up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client to target and target to client.
    Both,
    /// Client to target: requests stop reaching the target.
    ToTarget,
    /// Target to client: the target still gets requests, answers are held.
    ToClient,
}

#[derive(Default)]
struct State {
    stopping: bool,
    stall_to_target: bool,
    stall_to_client: bool,
    black_hole: bool,
    connections: Vec<Connection>,
    threads: Vec<JoinHandle<()>>,
}

struct Connection {
    client: TcpStream,
    upstream: Option<TcpStream>,
    cut: Arc<AtomicBool>,
}

impl Connection {
    fn close(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let _ = self.client.shutdown(Shutdown::Both);
        if let Some(upstream) = &self.upstream {
            let _ = upstream.shutdown(Shutdown::Both);
        }
    }
}

struct Shared {
    target: SocketAddr,
    state: Mutex<State>,
    changed: Condvar,
    accepted: AtomicU64,
    to_target_bytes: AtomicU64,
    to_client_bytes: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A running proxy; dropping it closes every connection and joins its threads.
pub struct Proxy {
    address: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind the proxy's listener");
        let address = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            target,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            accepted: AtomicU64::new(0),
            to_target_bytes: AtomicU64::new(0),
            to_client_bytes: AtomicU64::new(0),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("proxy-accept".into())
                .spawn(move || accept_loop(&listener, &shared))
                .expect("start the proxy's accept thread")
        };
        Self {
            address,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// Where clients connect.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// Connections accepted so far (including cut and black-holed ones).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        let mut state = self.shared.lock();
        state
            .connections
            .retain(|connection| !connection.cut.load(Ordering::SeqCst));
        state.connections.len()
    }

    /// Bytes forwarded from clients to the target so far.
    pub fn bytes_to_target(&self) -> u64 {
        self.shared.to_target_bytes.load(Ordering::SeqCst)
    }

    /// Bytes forwarded from the target to clients so far.
    pub fn bytes_to_client(&self) -> u64 {
        self.shared.to_client_bytes.load(Ordering::SeqCst)
    }

    /// Closes every current connection (both sides); new ones are accepted.
    /// Returns how many were cut.
    pub fn cut_all(&self) -> usize {
        let mut state = self.shared.lock();
        let connections = std::mem::take(&mut state.connections);
        let mut cut = 0;
        for connection in &connections {
            if !connection.cut.load(Ordering::SeqCst) {
                cut += 1;
            }
            connection.close();
        }
        self.shared.changed.notify_all();
        cut
    }

    /// Stops forwarding in `direction` (bytes wait in the proxy and the
    /// sockets' buffers) until `resume`.
    pub fn stall(&self, direction: Direction) {
        let mut state = self.shared.lock();
        match direction {
            Direction::Both => {
                state.stall_to_target = true;
                state.stall_to_client = true;
            }
            Direction::ToTarget => state.stall_to_target = true,
            Direction::ToClient => state.stall_to_client = true,
        }
    }

    /// Forwards again what was stalled, both ways.
    pub fn resume(&self) {
        let mut state = self.shared.lock();
        state.stall_to_target = false;
        state.stall_to_client = false;
        self.shared.changed.notify_all();
    }

    /// While on, bytes of every connection, current or new, are read and
    /// dropped: nothing reaches the target and no answer comes back, but no
    /// connection is closed either (a network that silently loses packets).
    /// New connections are accepted and not connected to the target.
    pub fn black_hole(&self, on: bool) {
        let mut state = self.shared.lock();
        state.black_hole = on;
        self.shared.changed.notify_all();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let threads = {
            let mut state = self.shared.lock();
            state.stopping = true;
            for connection in &state.connections {
                connection.close();
            }
            state.connections.clear();
            self.shared.changed.notify_all();
            std::mem::take(&mut state.threads)
        };
        // Wake the blocking accept with a connection of our own; the loop
        // sees `stopping` and ends.
        let _ = TcpStream::connect_timeout(&self.address, CONNECT_TIMEOUT);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for thread in threads {
            let _ = thread.join();
        }
        // Threads the acceptor started after the first take.
        let threads = std::mem::take(&mut self.shared.lock().threads);
        for thread in threads {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    loop {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(error) if error.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                if shared.lock().stopping {
                    return;
                }
                continue;
            }
        };
        let black_hole = {
            let mut state = shared.lock();
            if state.stopping {
                return;
            }
            state.threads.retain(|thread| !thread.is_finished());
            state
                .connections
                .retain(|connection| !connection.cut.load(Ordering::SeqCst));
            if state.connections.len() >= CONNECTIONS_MAX {
                continue; // dropping `client` closes it
            }
            state.black_hole
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let _ = client.set_nodelay(true);
        let upstream = if black_hole {
            None
        } else {
            match TcpStream::connect_timeout(&shared.target, CONNECT_TIMEOUT) {
                Ok(upstream) => {
                    let _ = upstream.set_nodelay(true);
                    Some(upstream)
                }
                Err(_) => continue, // the target is down: close the client
            }
        };
        if let Err(error) = start_connection(shared, client, upstream) {
            // Out of threads or descriptors: this connection is closed.
            eprintln!("proxy: connection not started: {error}");
        }
    }
}

fn start_connection(
    shared: &Arc<Shared>,
    client: TcpStream,
    upstream: Option<TcpStream>,
) -> std::io::Result<()> {
    let cut = Arc::new(AtomicBool::new(false));
    let connection = Connection {
        client: client.try_clone()?,
        upstream: upstream.as_ref().map(TcpStream::try_clone).transpose()?,
        cut: Arc::clone(&cut),
    };
    let mut threads = Vec::new();
    match upstream {
        Some(upstream) => {
            let forward = Forward {
                shared: Arc::clone(shared),
                cut: Arc::clone(&cut),
                to_target: true,
                from: client.try_clone()?,
                to: Some(upstream.try_clone()?),
            };
            threads.push(spawn("proxy-up", forward)?);
            let backward = Forward {
                shared: Arc::clone(shared),
                cut: Arc::clone(&cut),
                to_target: false,
                from: upstream,
                to: Some(client),
            };
            threads.push(spawn("proxy-down", backward)?);
        }
        None => {
            let sink = Forward {
                shared: Arc::clone(shared),
                cut: Arc::clone(&cut),
                to_target: true,
                from: client,
                to: None,
            };
            threads.push(spawn("proxy-sink", sink)?);
        }
    }
    let mut state = shared.lock();
    if state.stopping {
        connection.close();
    } else {
        state.connections.push(connection);
    }
    state.threads.extend(threads);
    Ok(())
}

fn spawn(name: &str, forward: Forward) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || forward.run())
}

/// One direction of one connection.
struct Forward {
    shared: Arc<Shared>,
    cut: Arc<AtomicBool>,
    to_target: bool,
    from: TcpStream,
    /// None: a black-holed connection that was never connected to the target.
    to: Option<TcpStream>,
}

impl Forward {
    fn run(mut self) {
        let mut buffer = vec![0u8; CHUNK_BYTES];
        loop {
            let read = match self.from.read(&mut buffer) {
                Ok(0) => break,
                Ok(read) => read,
                Err(error) if error.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            // Hold the chunk while this direction is stalled.
            let drop_it = {
                let mut state = self.shared.lock();
                loop {
                    if state.stopping || self.cut.load(Ordering::SeqCst) {
                        break None;
                    }
                    let stalled = if self.to_target {
                        state.stall_to_target
                    } else {
                        state.stall_to_client
                    };
                    if !stalled || state.black_hole {
                        break Some(state.black_hole);
                    }
                    state = self
                        .shared
                        .changed
                        .wait(state)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                }
            };
            let Some(drop_it) = drop_it else { break };
            if drop_it {
                continue;
            }
            let Some(to) = self.to.as_mut() else { continue };
            if to.write_all(&buffer[..read]).is_err() {
                break;
            }
            let counter = if self.to_target {
                &self.shared.to_target_bytes
            } else {
                &self.shared.to_client_bytes
            };
            counter.fetch_add(read as u64, Ordering::SeqCst);
        }
        // Either side gone: close the whole connection, as a broken link would.
        self.cut.store(true, Ordering::SeqCst);
        let _ = self.from.shutdown(Shutdown::Both);
        if let Some(to) = &self.to {
            let _ = to.shutdown(Shutdown::Both);
        }
        self.shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    /// An echo server on a free port; its thread ends when the listener's
    /// last client goes and `stop` is set.
    fn echo_server() -> (SocketAddr, Arc<AtomicBool>, JoinHandle<()>) {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind");
        let address = listener.local_addr().expect("address");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut handlers = Vec::new();
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(mut stream) = stream else { continue };
                    handlers.push(std::thread::spawn(move || {
                        let mut buffer = [0u8; 1024];
                        while let Ok(read @ 1..) = stream.read(&mut buffer) {
                            if stream.write_all(&buffer[..read]).is_err() {
                                break;
                            }
                        }
                    }));
                }
                for handler in handlers {
                    let _ = handler.join();
                }
            })
        };
        (address, stop, thread)
    }

    fn stop_echo(address: SocketAddr, stop: &AtomicBool, thread: JoinHandle<()>) {
        stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(address);
        thread.join().expect("echo server");
    }

    fn line_through(stream: &mut TcpStream, line: &str) -> std::io::Result<String> {
        stream.write_all(format!("{line}\n").as_bytes())?;
        let mut reader = std::io::BufReader::new(stream.try_clone()?);
        let mut answer = String::new();
        reader.read_line(&mut answer)?;
        Ok(answer.trim_end().to_string())
    }

    fn client(proxy: &Proxy) -> TcpStream {
        let stream = TcpStream::connect(proxy.address()).expect("connect to the proxy");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        stream
    }

    #[test]
    fn forwards_cuts_stalls_and_black_holes() {
        let (echo, stop, echo_thread) = echo_server();
        {
            let proxy = Proxy::start(echo);
            let mut first = client(&proxy);
            assert_eq!(line_through(&mut first, "hello").expect("echo"), "hello");

            // Cut: the client sees its connection end; a new one works.
            assert_eq!(proxy.cut_all(), 1);
            let mut buffer = [0u8; 16];
            assert!(matches!(first.read(&mut buffer), Ok(0) | Err(_)));
            let mut second = client(&proxy);
            assert_eq!(line_through(&mut second, "again").expect("echo"), "again");

            // Stall answers: the target gets the bytes, the client nothing
            // until resume.
            proxy.stall(Direction::ToClient);
            let sent_before = proxy.bytes_to_target();
            second.write_all(b"held\n").expect("write");
            crate::wait_until("the request to pass", Duration::from_secs(10), || {
                proxy.bytes_to_target() >= sent_before + 5
            });
            second
                .set_read_timeout(Some(Duration::from_millis(200)))
                .expect("timeout");
            assert!(second.read(&mut buffer).is_err(), "nothing while stalled");
            proxy.resume();
            second
                .set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            let mut reader = std::io::BufReader::new(second.try_clone().expect("clone"));
            let mut answer = String::new();
            reader.read_line(&mut answer).expect("answer after resume");
            assert_eq!(answer, "held\n");

            // Black hole: accepted, nothing through, nothing back.
            proxy.black_hole(true);
            let mut third = client(&proxy);
            third.write_all(b"lost\n").expect("write");
            third
                .set_read_timeout(Some(Duration::from_millis(200)))
                .expect("timeout");
            assert!(third.read(&mut buffer).is_err(), "nothing back");
            proxy.black_hole(false);
            let mut fourth = client(&proxy);
            assert_eq!(line_through(&mut fourth, "back").expect("echo"), "back");
            assert_eq!(proxy.accepted(), 4);
            // Dropping the proxy with open and stalled connections ends.
            proxy.stall(Direction::Both);
        }
        stop_echo(echo, &stop, echo_thread);
    }
}
