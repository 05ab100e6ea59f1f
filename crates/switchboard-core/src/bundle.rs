//! Several envelopes in one broker message, as pure functions over bytes.
//!
//! Each broker message costs the broker a parse and a dispatch, and each
//! delivery costs the receiving node a parse, whatever its size. So a
//! backplane's publisher packs the envelopes of a batch that go the same way
//! into one bundle: under load, one message carries up to a batch of
//! envelopes; under light traffic a bundle holds one, and nothing waits to
//! fill it.
//!
//! A bundle is a sequence of `length (u32 BE) + envelope`, after whatever
//! header the backplane puts in front.

use bytes::{BufMut, Bytes};

/// A bundle being filled.
#[derive(Debug)]
pub struct Bundle {
    buf: Vec<u8>,
    header: usize,
    max: usize,
    count: u64,
}

impl Bundle {
    /// An empty bundle whose first `header` bytes the caller fills in later,
    /// that stops growing at `max` bytes (header included).
    pub fn new(header: usize, max: usize) -> Self {
        // Room for one typical envelope too: when messages are sparse most
        // bundles carry one, and then it costs one allocation, not a
        // reallocation per envelope.
        let mut buf = Vec::with_capacity(header + 4 + 252);
        buf.resize(header, 0);
        Self {
            buf,
            header,
            max,
            count: 0,
        }
    }

    /// Whether `len` more bytes of envelope fit. An empty bundle takes any
    /// envelope, however large: envelopes are never split.
    pub fn fits(&self, len: usize) -> bool {
        self.count == 0 || self.buf.len() + 4 + len <= self.max
    }

    /// Appends an envelope.
    pub fn push(&mut self, envelope: &[u8]) {
        // Invariant: envelopes are bounded by the hub's frame limit, far below 4 GiB.
        let len = u32::try_from(envelope.len()).expect("envelope under 4 GiB");
        self.buf.put_u32(len);
        self.buf.extend_from_slice(envelope);
        self.count += 1;
    }

    /// Envelopes in the bundle.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The header, to fill in.
    pub fn header_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.header]
    }

    /// The bundle, header first.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

/// The envelopes of `body` (a bundle after its header), in order, each
/// sharing `body`'s buffer.
pub fn envelopes(body: Bytes) -> Envelopes {
    Envelopes { rest: body }
}

/// Iterator over a bundle's envelopes; yields `Err` once, at the first entry
/// that does not fit in what is left, and then stops.
#[derive(Debug)]
pub struct Envelopes {
    rest: Bytes,
}

/// A bundle whose lengths do not add up.
#[derive(Debug, PartialEq, Eq)]
pub struct Truncated;

impl Iterator for Envelopes {
    type Item = Result<Bytes, Truncated>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let entry = self
            .rest
            .get(..4)
            .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize)
            .filter(|&len| self.rest.len() - 4 >= len);
        match entry {
            Some(len) => {
                let envelope = self.rest.slice(4..4 + len);
                self.rest = self.rest.slice(4 + len..);
                Some(Ok(envelope))
            }
            None => {
                self.rest = Bytes::new();
                Some(Err(Truncated))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_BYTES: usize = 256 * 1024;

    fn bundle(envelopes: &[&[u8]]) -> Bytes {
        let mut b = Bundle::new(3, MAX_BYTES);
        for e in envelopes {
            assert!(b.fits(e.len()));
            b.push(e);
        }
        b.header_mut().copy_from_slice(b"hdr");
        Bytes::from(b.into_bytes())
    }

    #[test]
    fn envelopes_come_back_in_order_after_the_header() {
        let body = bundle(&[b"one", b"", b"three"]);
        assert_eq!(&body[..3], b"hdr");
        let got: Vec<_> = envelopes(body.slice(3..)).collect();
        assert_eq!(
            got,
            vec![
                Ok(Bytes::from_static(b"one")),
                Ok(Bytes::new()),
                Ok(Bytes::from_static(b"three"))
            ]
        );
    }

    #[test]
    fn a_truncated_bundle_yields_what_is_whole_then_one_error() {
        let body = bundle(&[b"one", b"three"]);
        let cut = body.slice(3..body.len() - 1);
        let got: Vec<_> = envelopes(cut).collect();
        assert_eq!(got, vec![Ok(Bytes::from_static(b"one")), Err(Truncated)]);
        let got: Vec<_> = envelopes(Bytes::from_static(&[0, 0])).collect();
        assert_eq!(got, vec![Err(Truncated)]);
    }

    #[test]
    fn a_bundle_stops_growing_at_its_limit_but_takes_one_large_envelope() {
        let big = vec![7u8; MAX_BYTES];
        let mut b = Bundle::new(0, MAX_BYTES);
        assert!(b.fits(big.len()), "an empty bundle takes anything");
        b.push(&big);
        assert!(!b.fits(1));
        let mut b = Bundle::new(17, MAX_BYTES);
        let half = vec![1u8; MAX_BYTES / 2];
        b.push(&half);
        assert!(!b.fits(half.len()));
        assert!(b.fits(MAX_BYTES / 2 - 17 - 8));
        assert_eq!(b.count(), 1);
    }

    #[test]
    fn a_bundle_counts_its_envelopes_and_fits_to_the_byte() {
        // Header 2 + (4 + 3) = 9 bytes used; room for 4 + 1 more at 14.
        let mut b = Bundle::new(2, 14);
        b.push(b"abc");
        assert!(b.fits(1), "9 + 4 + 1 = 14 fits");
        assert!(!b.fits(2), "9 + 4 + 2 = 15 does not");
        b.push(b"d");
        assert_eq!(b.count(), 2);
        assert_eq!(b.into_bytes().len(), 14);
    }
}
