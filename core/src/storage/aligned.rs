//! A byte buffer whose start is aligned, as direct I/O requires.
//!
//! Built on a `Vec<u8>` with slack at the front, so no unsafe code is needed: the
//! first aligned address inside the allocation is where the buffer starts. The
//! `Vec` is never grown in place, which keeps that address fixed.

/// A growable buffer whose first byte sits at a multiple of `alignment`.
#[derive(Debug)]
pub struct AlignedBuf {
    allocation: Vec<u8>,
    start: usize,
    length: usize,
    alignment: usize,
}

impl AlignedBuf {
    /// A buffer able to hold `capacity` bytes without reallocating.
    /// `alignment` is a power of two; 1 means no constraint.
    pub fn with_capacity(capacity: usize, alignment: usize) -> Self {
        assert!(
            alignment.is_power_of_two(),
            "alignment must be a power of two"
        );
        let allocation = vec![0u8; capacity + alignment];
        let address = allocation.as_ptr() as usize;
        let start = address.next_multiple_of(alignment) - address;
        Self {
            allocation,
            start,
            length: 0,
            alignment,
        }
    }

    pub fn alignment(&self) -> usize {
        self.alignment
    }

    pub fn len(&self) -> usize {
        self.length
    }

    pub fn is_empty(&self) -> bool {
        self.length == 0
    }

    pub fn capacity(&self) -> usize {
        self.allocation.len() - self.start
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.allocation[self.start..self.start + self.length]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.allocation[self.start..self.start + self.length]
    }

    /// The whole capacity, for drivers that read into the buffer.
    pub fn spare_capacity(&mut self) -> &mut [u8] {
        &mut self.allocation[self.start..]
    }

    /// Sets the length after a driver filled the buffer. Bytes up to the capacity
    /// are always initialised (zeroed at allocation), so any length is sound.
    pub fn set_len(&mut self, length: usize) {
        assert!(length <= self.capacity(), "length beyond capacity");
        self.length = length;
    }

    pub fn clear(&mut self) {
        self.length = 0;
    }

    /// Makes room for `additional` more bytes, reallocating (aligned) if needed.
    pub fn reserve(&mut self, additional: usize) {
        let needed = self.length + additional;
        if needed <= self.capacity() {
            return;
        }
        let mut grown = Self::with_capacity(needed.max(self.capacity() * 2), self.alignment);
        grown.extend_from_slice(self.as_slice());
        *self = grown;
    }

    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.reserve(bytes.len());
        let at = self.start + self.length;
        self.allocation[at..at + bytes.len()].copy_from_slice(bytes);
        self.length += bytes.len();
    }

    /// Zero-fills up to the next multiple of the alignment.
    pub fn pad_to_alignment(&mut self) {
        let padded = self.length.next_multiple_of(self.alignment);
        self.reserve(padded - self.length);
        let at = self.start + self.length;
        self.allocation[at..self.start + padded].fill(0);
        self.length = padded;
    }

    /// Keeps only the bytes in `range_start..range_start + keep`, moved to the front.
    pub fn keep_range(&mut self, range_start: usize, keep: usize) {
        assert!(range_start + keep <= self.length, "range beyond length");
        let from = self.start + range_start;
        self.allocation.copy_within(from..from + keep, self.start);
        self.length = keep;
    }

    /// Pointer to the first byte, for drivers that hand the buffer to the kernel.
    pub fn as_ptr(&self) -> *const u8 {
        self.as_slice().as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.allocation[self.start..].as_mut_ptr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_is_aligned_and_survives_growth() {
        let mut buffer = AlignedBuf::with_capacity(10, 4096);
        assert_eq!(buffer.as_ptr() as usize % 4096, 0);
        buffer.extend_from_slice(&[7u8; 5000]);
        assert_eq!(buffer.as_ptr() as usize % 4096, 0);
        assert_eq!(buffer.len(), 5000);
        buffer.pad_to_alignment();
        assert_eq!(buffer.len(), 8192);
        assert_eq!(buffer.as_slice()[4999], 7);
        assert_eq!(buffer.as_slice()[5000], 0);
        buffer.keep_range(4096, 904);
        assert_eq!(buffer.len(), 904);
        assert!(buffer.as_slice().iter().all(|&byte| byte == 7));
    }
}
