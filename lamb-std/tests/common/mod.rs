//! Helpers shared by the checkpoint tests.

use lamb_std::Lamb;
use lamb_std::lamb_core::LambConfig;

/// Signs checkpoint bytes that another writer made or edited: zeroes the 16 digits of the
/// `lamb.checksum` entry, learns the sum from the library's own refusal (so the test uses
/// the library's definition of the checksum, not a copy of it) and writes it in. Bytes the
/// library refuses for another reason are returned with the digits zeroed.
pub fn sign(mut out: Vec<u8>) -> Vec<u8> {
    let key = b"\"lamb.checksum\"";
    let at = out
        .windows(key.len())
        .position(|w| w == key)
        .expect("no lamb.checksum entry");
    let at = at + out[at..].windows(6).position(|w| w == b"xxh64:").unwrap() + 6;
    out[at..at + 16].copy_from_slice(b"0000000000000000");
    let msg = Lamb::new(LambConfig::paper())
        .unwrap()
        .load_checkpoint_bytes(&out)
        .unwrap_err()
        .to_string();
    if let Some(sum) = msg.split("its contents hash to xxh64:").nth(1) {
        out[at..at + 16].copy_from_slice(&sum.as_bytes()[..16]);
    }
    out
}
