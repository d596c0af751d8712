//! Data verification: every written block carries a stamp (magic, LBA,
//! generation, CRC32C of the block); reads check it. A generation map per
//! I/O slot knows which generation each slot must hold after a completed
//! write, so a stale or misplaced block is caught, not just a corrupt one.

/// Marks a block written by `--verify`.
pub const MAGIC: &[u8; 8] = b"IBVERIFY";
const HEADER: usize = 28;

/// Fills one block with its stamp. `block` must be at least 32 bytes.
pub fn stamp_block(block: &mut [u8], lba: u64, generation: u64) {
    block[0..8].copy_from_slice(MAGIC);
    block[8..16].copy_from_slice(&lba.to_le_bytes());
    block[16..24].copy_from_slice(&generation.to_le_bytes());
    // Cheap deterministic fill (xorshift64*) so every block differs.
    let mut x = lba.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ generation ^ 0x2545_f491_4f6c_dd1d;
    for chunk in block[HEADER..].chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    let crc = block_crc(block);
    block[24..28].copy_from_slice(&crc.to_le_bytes());
}

fn block_crc(block: &[u8]) -> u32 {
    let c = crc32c::crc32c(&block[..24]);
    crc32c::crc32c_append(c, &block[HEADER..])
}

/// What is wrong with a block read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// No stamp at all where one was written.
    NotStamped,
    /// Stamp for another LBA (misdirected write or read).
    WrongLba { found: u64 },
    /// Stamp's CRC does not match the contents (corruption).
    BadCrc,
    /// An older or newer generation than the last acknowledged write (lost write).
    WrongGeneration { expected: u64, found: u64 },
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mismatch::NotStamped => write!(f, "block has no verify stamp (data lost)"),
            Mismatch::WrongLba { found } => write!(f, "block carries LBA {found} (misplaced data)"),
            Mismatch::BadCrc => write!(f, "CRC32C mismatch (corrupted data)"),
            Mismatch::WrongGeneration { expected, found } => {
                write!(
                    f,
                    "generation {found}, expected {expected} (lost or stale write)"
                )
            }
        }
    }
}

/// Checks one block. `expected_generation` = 0 means the block was not
/// written in this run: a stamp is then checked only if present.
pub fn check_block(block: &[u8], lba: u64, expected_generation: u64) -> Result<(), Mismatch> {
    if block.len() < 32 || &block[0..8] != MAGIC {
        return if expected_generation == 0 {
            Ok(())
        } else {
            Err(Mismatch::NotStamped)
        };
    }
    let found_lba = u64::from_le_bytes(block[8..16].try_into().unwrap_or([0; 8]));
    let generation = u64::from_le_bytes(block[16..24].try_into().unwrap_or([0; 8]));
    let crc = u32::from_le_bytes(block[24..28].try_into().unwrap_or([0; 4]));
    if crc != block_crc(block) {
        return Err(Mismatch::BadCrc);
    }
    if found_lba != lba {
        return Err(Mismatch::WrongLba { found: found_lba });
    }
    if expected_generation != 0 && generation != expected_generation {
        return Err(Mismatch::WrongGeneration {
            expected: expected_generation,
            found: generation,
        });
    }
    Ok(())
}

/// Last acknowledged generation per I/O slot of one job's region, and the
/// newest write to it that failed since. A failed write leaves its blocks
/// indeterminate (SBC: it may or may not have reached the medium), so a
/// read may find the acknowledged generation or any failed one after it;
/// never an older one.
#[derive(Debug)]
pub struct GenerationMap {
    generations: Vec<(u64, u64)>,
}

impl GenerationMap {
    pub fn new(slots: usize) -> GenerationMap {
        GenerationMap {
            generations: vec![(0, 0); slots],
        }
    }
    /// The last acknowledged generation (0: none in this run).
    pub fn get(&self, slot: usize) -> u64 {
        self.generations.get(slot).map_or(0, |g| g.0)
    }
    /// A write of `generation` was acknowledged.
    pub fn set(&mut self, slot: usize, generation: u64) {
        if let Some(g) = self.generations.get_mut(slot) {
            *g = (generation, 0);
        }
    }
    /// A write of `generation` failed: the slot may now hold it.
    pub fn write_failed(&mut self, slot: usize, generation: u64) {
        if let Some(g) = self.generations.get_mut(slot) {
            g.1 = g.1.max(generation);
        }
    }
    /// Checks one block of `slot` read back.
    pub fn check(&self, slot: usize, block: &[u8], lba: u64) -> Result<(), Mismatch> {
        let (acked, failed) = self.generations.get(slot).copied().unwrap_or((0, 0));
        match check_block(block, lba, acked) {
            Err(Mismatch::WrongGeneration { found, .. }) if found > acked && found <= failed => {
                Ok(())
            }
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_and_check() {
        let mut b = vec![0u8; 512];
        stamp_block(&mut b, 77, 3);
        assert_eq!(check_block(&b, 77, 3), Ok(()));
        assert_eq!(check_block(&b, 77, 0), Ok(()));
        assert_eq!(
            check_block(&b, 78, 3),
            Err(Mismatch::WrongLba { found: 77 })
        );
        assert_eq!(
            check_block(&b, 77, 4),
            Err(Mismatch::WrongGeneration {
                expected: 4,
                found: 3
            })
        );
        b[300] ^= 1;
        assert_eq!(check_block(&b, 77, 3), Err(Mismatch::BadCrc));
        assert_eq!(check_block(&[0u8; 512], 1, 0), Ok(()));
        assert_eq!(check_block(&[0u8; 512], 1, 2), Err(Mismatch::NotStamped));
    }

    #[test]
    fn a_failed_write_may_have_landed_but_nothing_older_may_show() {
        let mut map = GenerationMap::new(1);
        let block = |generation| {
            let mut b = vec![0u8; 512];
            stamp_block(&mut b, 9, generation);
            b
        };
        map.set(0, 5);
        map.write_failed(0, 7);
        assert_eq!(map.check(0, &block(5), 9), Ok(()));
        assert_eq!(
            map.check(0, &block(7), 9),
            Ok(()),
            "the failed write landed"
        );
        assert!(
            map.check(0, &block(4), 9).is_err(),
            "older than acknowledged"
        );
        assert!(map.check(0, &block(8), 9).is_err(), "never written");
        // An acknowledged write settles it again.
        map.set(0, 9);
        assert!(map.check(0, &block(7), 9).is_err());
        assert_eq!(map.check(0, &block(9), 9), Ok(()));
    }
}
