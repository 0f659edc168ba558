//! XXH64 (seed 0), the checksum of lamb checkpoints: Yann Collet's xxHash, 64-bit variant,
//! as specified in `doc/xxhash_spec.md` of github.com/Cyan4973/xxHash. Written out here
//! (60 lines) rather than taken as a dependency; the tests check it against the reference
//! implementation's outputs (Python `xxhash` 3.x, `xxhash.xxh64(data).intdigest()`).
//!
//! Why XXH64 and not FNV-1a: FNV-1a is one multiply per byte in a serial chain (well under
//! 1 GB/s), XXH64 runs four independent lanes over 32-byte stripes (several GB/s), and a
//! checkpoint is the optimizer's whole state, gigabytes for a large model.

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

#[inline(always)]
fn round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

#[inline(always)]
fn merge(acc: u64, v: u64) -> u64 {
    (acc ^ round(0, v)).wrapping_mul(P1).wrapping_add(P4)
}

#[inline(always)]
fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(a)
}

/// A streaming XXH64 with seed 0.
#[derive(Clone, Debug)]
pub(crate) struct Xxh64 {
    v: [u64; 4],
    total: u64,
    buf: [u8; 32],
    buffered: usize,
}

impl Xxh64 {
    pub(crate) fn new() -> Xxh64 {
        Xxh64 {
            v: [P1.wrapping_add(P2), P2, 0, 0u64.wrapping_sub(P1)],
            total: 0,
            buf: [0; 32],
            buffered: 0,
        }
    }

    fn stripe(v: &mut [u64; 4], s: &[u8]) {
        for (k, lane) in v.iter_mut().enumerate() {
            *lane = round(*lane, u64_at(s, 8 * k));
        }
    }

    pub(crate) fn update(&mut self, mut data: &[u8]) {
        self.total = self.total.wrapping_add(data.len() as u64);
        if self.buffered > 0 {
            let take = (32 - self.buffered).min(data.len());
            self.buf[self.buffered..self.buffered + take].copy_from_slice(&data[..take]);
            self.buffered += take;
            data = &data[take..];
            if self.buffered < 32 {
                return;
            }
            let buf = self.buf;
            Self::stripe(&mut self.v, &buf);
            self.buffered = 0;
        }
        let mut stripes = data.chunks_exact(32);
        for s in &mut stripes {
            Self::stripe(&mut self.v, s);
        }
        let rest = stripes.remainder();
        self.buf[..rest.len()].copy_from_slice(rest);
        self.buffered = rest.len();
    }

    pub(crate) fn digest(&self) -> u64 {
        let [v1, v2, v3, v4] = self.v;
        let mut h = if self.total >= 32 {
            let h = v1
                .rotate_left(1)
                .wrapping_add(v2.rotate_left(7))
                .wrapping_add(v3.rotate_left(12))
                .wrapping_add(v4.rotate_left(18));
            [v1, v2, v3, v4].into_iter().fold(h, merge)
        } else {
            P5 // seed 0 + P5
        };
        h = h.wrapping_add(self.total);
        let mut rest = &self.buf[..self.buffered];
        while rest.len() >= 8 {
            h ^= round(0, u64_at(rest, 0));
            h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
            rest = &rest[8..];
        }
        if rest.len() >= 4 {
            let w = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as u64;
            h ^= w.wrapping_mul(P1);
            h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
            rest = &rest[4..];
        }
        for &b in rest {
            h ^= (b as u64).wrapping_mul(P5);
            h = h.rotate_left(11).wrapping_mul(P1);
        }
        h ^= h >> 33;
        h = h.wrapping_mul(P2);
        h ^= h >> 29;
        h = h.wrapping_mul(P3);
        h ^ (h >> 32)
    }
}

#[cfg(test)]
mod tests {
    use super::Xxh64;

    fn once(data: &[u8]) -> u64 {
        let mut h = Xxh64::new();
        h.update(data);
        h.digest()
    }

    /// `xxhash.xxh64(data[:n]).intdigest()` from Python's `xxhash` 3.x, with
    /// `data = bytes((i*7+3) & 0xff for i in range(300))`.
    #[test]
    fn matches_the_reference_implementation() {
        let data: Vec<u8> = (0..300u32).map(|i| ((i * 7 + 3) & 0xff) as u8).collect();
        let expected: [(usize, u64); 16] = [
            (0, 0xef46db3751d8e999),
            (1, 0x1f25c8d0bc1f4bb6),
            (3, 0x31d2363f52e564c9),
            (4, 0x9bb64b7d66ee9fda),
            (7, 0x9a7b149959ce60d8),
            (8, 0xdab99d95c6f90092),
            (15, 0x1b47cb8243cc8e32),
            (16, 0x434850232b787be2),
            (31, 0xa2aa5f33cc4a6119),
            (32, 0x23c3c17ef790fd97),
            (33, 0x50a7cfc7ba588784),
            (63, 0x5e3e54b431c7493c),
            (64, 0x0eb64b3ef6eeb01f),
            (100, 0xa61f8d4c170fe531),
            (255, 0x39ae55a29989206f),
            (300, 0x240004dbee0ba6dc),
        ];
        for (n, h) in expected {
            assert_eq!(once(&data[..n]), h, "length {n}");
        }
        assert_eq!(once(b"abc"), 0x44bc2cf5ad770999);
    }

    #[test]
    fn streaming_in_any_pieces_equals_one_shot() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 31 % 251) as u8).collect();
        for n in [0usize, 5, 31, 32, 33, 64, 65, 200, 300] {
            let want = once(&data[..n]);
            for cut in [1usize, 3, 7, 13, 32, 33] {
                let mut h = Xxh64::new();
                for piece in data[..n].chunks(cut) {
                    h.update(piece);
                }
                assert_eq!(h.digest(), want, "length {n} in pieces of {cut}");
            }
        }
    }
}
