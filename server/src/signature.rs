//! Signatures of the Anthropic API's `thinking` blocks.
//!
//! Anthropic's Messages API returns each `thinking` block with a `signature`, "a signature
//! verifying the thinking block", which clients send back unchanged with the block in later
//! turns (docs.claude.com, "Extended thinking": "Preserving thinking blocks"). Anthropic's is an
//! opaque encrypted value; dsv4's is an HMAC-SHA256 (RFC 2104, FIPS 180-4) of the block's
//! thinking text under the server's signing key ([`crate::AppState::signing_key`]: random per
//! start unless configured), written as 64 lowercase hex digits. It lets the server tell a
//! thinking block it produced from one a client wrote or edited; see `anthropic.rs` for what is
//! done with blocks that do not verify (they are still used).

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &[u8], text: &str) -> HmacSha256 {
    // HMAC takes keys of any length (longer ones are hashed first, RFC 2104 §2), so this never
    // fails; `new_from_slice` is the fallible constructor of the general `KeyInit` trait.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC-SHA256 accepts keys of any length"));
    mac.update(text.as_bytes());
    mac
}

/// The signature of `text` under `key`: HMAC-SHA256, 64 lowercase hex digits.
pub fn sign(key: &[u8], text: &str) -> String {
    let tag = mac(key, text).finalize().into_bytes();
    let mut out = String::with_capacity(2 * tag.len());
    for b in tag.iter() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Whether `sig` is [`sign`]`(key, text)`. Hex digits of either case are accepted; anything
/// else (wrong length, not hex, another key or text) is `false`. The tag comparison takes the
/// same time wherever the first difference is.
pub fn verify(key: &[u8], text: &str, sig: &str) -> bool {
    let Some(tag) = decode_hex(sig.trim()) else { return false };
    mac(key, text).verify_slice(&tag).is_ok()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.as_bytes().chunks(2).map(|p| Some(digit(p[0])? << 4 | digit(p[1])?)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_4231_test_case_2() {
        // RFC 4231, test case 2: key "Jefe", data "what do ya want for nothing?".
        assert_eq!(
            sign(b"Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn signatures_verify_and_tampering_fails() {
        let key = b"a server key";
        let text = "The user asks for 2 + 2. That is 4.";
        let sig = sign(key, text);
        assert_eq!(sig.len(), 64);
        assert!(verify(key, text, &sig));
        assert!(verify(key, text, &sig.to_uppercase()));
        // Another text, another key, a changed or cut signature: all fail.
        assert!(!verify(key, "The user asks for 2 + 2. That is 5.", &sig));
        assert!(!verify(key, &format!("{text} "), &sig));
        assert!(!verify(b"another key", text, &sig));
        let mut flipped = sig.clone().into_bytes();
        flipped[10] = if flipped[10] == b'0' { b'1' } else { b'0' };
        assert!(!verify(key, text, &String::from_utf8(flipped).unwrap()));
        assert!(!verify(key, text, &sig[..62]));
        assert!(!verify(key, text, ""));
        assert!(!verify(key, text, &"zz".repeat(32)));
        assert!(!verify(key, text, &"é".repeat(32)));
    }

    #[test]
    fn empty_keys_and_texts_are_fine() {
        let sig = sign(b"", "");
        assert!(verify(b"", "", &sig));
        assert!(!verify(b"k", "", &sig));
    }
}
