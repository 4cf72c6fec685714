//! WireGuard key material: a 32-byte key that never shows itself in logs or
//! debug output and is wiped from memory when dropped.
//!
//! This module owns key bytes and key generation. It must never format a key
//! anywhere except where the user explicitly asked for it (`keygen`).

use base64::Engine;
use zeroize::Zeroize;

/// A WireGuard key (private, public or preshared).
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; 32]);

impl Key {
    pub fn from_bytes(bytes: [u8; 32]) -> Key {
        Key(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key in WireGuard's base64 form. Only for public keys and for the
    /// key file that `keygen` writes.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    /// A new random private key.
    pub fn generate_private() -> Key {
        let secret = x25519_dalek::StaticSecret::random_from_rng(rand_core::OsRng);
        Key(secret.to_bytes())
    }

    /// The public key that belongs to this private key.
    pub fn public_key(&self) -> Key {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        Key(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_key() {
        let key = Key::generate_private();
        let shown = format!("{key:?}");
        assert!(!shown.contains(&key.to_base64()));
        assert_eq!(shown, "Key(<redacted>)");
    }

    #[test]
    fn public_key_matches_wireguard() {
        // Vector from `wg pubkey`: echo yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk= | wg pubkey
        let private =
            crate::profile::decode_key("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=").expect("key");
        assert_eq!(
            private.public_key().to_base64(),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        );
    }
}
