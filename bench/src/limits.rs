//! The machine's own limits, measured in the same run as Rill's figures so
//! every figure can be shown as a ratio: raw sequential direct-write bandwidth
//! and fdatasync latency of the disk under the data directory.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::rc::Rc;
use std::time::Instant;

use compio::io::AsyncWriteAtExt;
use rill_core::storage::AlignedBuf;
use rill_core::storage::portable::allocate_std;

use crate::report::Latency;

const BLOCK_BYTES: usize = 1024 * 1024;
const QUEUE_DEPTH: usize = 16;

struct Block(AlignedBuf);

impl compio::buf::IoBuf for Block {
    fn as_init(&self) -> &[u8] {
        self.0.as_slice()
    }
}

fn block() -> AlignedBuf {
    let mut buffer = AlignedBuf::with_capacity(BLOCK_BYTES, 4096);
    let pattern: Vec<u8> = (0..BLOCK_BYTES)
        .map(|index| (index * 7 + 3) as u8)
        .collect();
    buffer.extend_from_slice(&pattern);
    buffer
}

/// Sequential O_DIRECT writes of 1 MiB blocks, 16 in flight, into a fresh
/// preallocated file, ending with one fdatasync. Bytes per second.
pub fn direct_write_bandwidth(directory: &Path, total_bytes: u64) -> io::Result<f64> {
    let path = directory.join("limit-direct-write.bin");
    let std_file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)?;
    allocate_std(&std_file, total_bytes)?;
    let runtime = compio::runtime::Runtime::new()?;
    let blocks = total_bytes / BLOCK_BYTES as u64;
    let elapsed = runtime.block_on(async {
        use std::os::fd::{FromRawFd, IntoRawFd};
        // SAFETY: ownership of the descriptor moves to compio.
        let file = Rc::new(unsafe { compio::fs::File::from_raw_fd(std_file.into_raw_fd()) });
        let started = Instant::now();
        let mut tasks = Vec::new();
        for lane in 0..QUEUE_DEPTH as u64 {
            let file = file.clone();
            tasks.push(compio::runtime::spawn(async move {
                let mut buffer = Block(block());
                let mut index = lane;
                while index < blocks {
                    let compio::BufResult(result, returned) = (&*file)
                        .write_all_at(buffer, index * BLOCK_BYTES as u64)
                        .await;
                    result?;
                    buffer = returned;
                    index += QUEUE_DEPTH as u64;
                }
                io::Result::Ok(())
            }));
        }
        for task in tasks {
            task.await
                .map_err(|_| io::Error::other("write task failed"))??;
        }
        file.sync_data().await?;
        io::Result::Ok(started.elapsed())
    })?;
    std::fs::remove_file(&path)?;
    Ok((blocks * BLOCK_BYTES as u64) as f64 / elapsed.as_secs_f64())
}

/// Buffered sequential writes followed by one fdatasync. Bytes per second.
pub fn buffered_write_bandwidth(directory: &Path, total_bytes: u64) -> io::Result<f64> {
    let path = directory.join("limit-buffered-write.bin");
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let buffer = block();
    let started = Instant::now();
    let mut written = 0u64;
    while written < total_bytes {
        file.write_all_at(buffer.as_slice(), written)?;
        written += BLOCK_BYTES as u64;
    }
    file.sync_data()?;
    let elapsed = started.elapsed();
    std::fs::remove_file(&path)?;
    Ok(written as f64 / elapsed.as_secs_f64())
}

/// fdatasync after each 4 KiB write at the end of a growing file, the way a
/// log syncs. Latency distribution of the sync alone.
pub fn fdatasync_latency(directory: &Path, iterations: usize) -> io::Result<Latency> {
    let path = directory.join("limit-fdatasync.bin");
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let page = vec![0x5au8; 4096];
    let mut samples = Vec::with_capacity(iterations);
    for index in 0..iterations {
        file.write_all_at(&page, index as u64 * 4096)?;
        let started = Instant::now();
        file.sync_data()?;
        samples.push(started.elapsed());
    }
    std::fs::remove_file(&path)?;
    Ok(Latency::from_samples(&mut samples))
}

/// Loopback TCP bandwidth, one stream, 1 MiB writes: the ceiling for any
/// figure that moves bytes through a socket on this machine.
pub fn loopback_tcp_bandwidth(total_bytes: u64) -> io::Result<f64> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> io::Result<u64> {
        let (mut stream, _) = listener.accept()?;
        let mut buffer = vec![0u8; BLOCK_BYTES];
        let mut received = 0u64;
        loop {
            let read = stream.read(&mut buffer)?;
            if read == 0 {
                return Ok(received);
            }
            received += read as u64;
        }
    });
    let mut stream = std::net::TcpStream::connect(address)?;
    let chunk = vec![0x42u8; BLOCK_BYTES];
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < total_bytes {
        stream.write_all(&chunk)?;
        sent += BLOCK_BYTES as u64;
    }
    drop(stream);
    let received = reader
        .join()
        .map_err(|_| io::Error::other("loopback reader panicked"))??;
    let elapsed = started.elapsed();
    Ok(received as f64 / elapsed.as_secs_f64())
}

/// Sequential buffered reads of 4 MiB, each advising the next two ahead (as
/// the broker does), from `streams` files written with O_DIRECT (so not in
/// the page cache) and read at once, one thread each; the page cache is
/// dropped first when allowed. What consumers of that many partitions of
/// data on disk can get at most: `total_bytes` in all, in bytes per second,
/// and whether the cache was really cold.
pub fn cold_read_bandwidth(
    directory: &Path,
    total_bytes: u64,
    streams: u64,
) -> io::Result<(f64, bool)> {
    let per_stream = (total_bytes / streams.max(1)).max(BLOCK_BYTES as u64);
    let paths: Vec<_> = (0..streams.max(1))
        .map(|stream| directory.join(format!("limit-cold-read-{stream}.bin")))
        .collect();
    let buffer = block();
    for path in &paths {
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)?;
        let mut written = 0u64;
        while written < per_stream {
            file.write_all_at(buffer.as_slice(), written)?;
            written += BLOCK_BYTES as u64;
        }
        file.sync_data()?;
    }
    let cold = crate::machine::drop_page_cache();
    let started = Instant::now();
    let read = std::thread::scope(|scope| {
        let readers: Vec<_> = paths
            .iter()
            .map(|path| scope.spawn(move || read_sequentially(path)))
            .collect();
        readers
            .into_iter()
            .map(|reader| {
                reader
                    .join()
                    .unwrap_or_else(|_| Err(io::Error::other("a reader thread panicked")))
            })
            .sum::<io::Result<u64>>()
    })?;
    let elapsed = started.elapsed();
    for path in &paths {
        std::fs::remove_file(path)?;
    }
    Ok((read as f64 / elapsed.as_secs_f64(), cold))
}

/// Reads a whole file in 4 MiB reads, advising the next two ahead.
fn read_sequentially(path: &Path) -> io::Result<u64> {
    let file = std::fs::File::open(path)?;
    let total_bytes = file.metadata()?.len();
    let mut buffer = vec![0u8; 4 * BLOCK_BYTES];
    let mut read = 0u64;
    while read < total_bytes {
        // Ask for the next two reads ahead, as the broker does for consumers.
        rill_core::storage::portable::advise_will_need(
            file.as_raw_fd(),
            read + buffer.len() as u64,
            2 * buffer.len() as u64,
        );
        let length = buffer.len().min((total_bytes - read) as usize);
        file.read_exact_at(&mut buffer[..length], read)?;
        read += length as u64;
    }
    Ok(read)
}
