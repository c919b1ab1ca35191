//! The per-VM cache of answers about tokens ([`TokenCache`]), keyed by a
//! keyed hash of the token ([`TokenHasher`], [`CacheKey`]): what `auth`
//! decided for a token (JWT verification or a provider's answer) is reused
//! until its expiry, so a token is verified or called out about once.

use crate::claims::Identity;
use crate::response::Denial;
use std::collections::HashMap;
use std::rc::Rc;

/// What the cache remembers for a token: the identity the token stands for,
/// or the denial it earned. The last stage of a provider's answer (see
/// [`crate::provider`]): `CalloutReply` → `Reply` → `Answer` → `Verdict`.
pub type Verdict = Result<Rc<Identity>, Denial>;

/// Answers about tokens, keyed by a keyed hash ([`TokenHasher`]) of the token
/// (for the custom provider, of token and path), bounded, each with its own expiry (seconds).
/// Denials are kept only briefly (see [`NEGATIVE_TTL`]).
#[derive(Debug, Default)]
pub struct TokenCache {
    map: HashMap<CacheKey, (Verdict, u64), KeyedHash>,
    generation: u64,
    pub hits: u64,
    pub misses: u64,
}

/// The cache key of a token: a keyed 128-bit hash (see [`TokenHasher`]).
pub type CacheKey = u128;

/// Hashes tokens for the caches: SipHash-1-3 with 128-bit output and a random
/// per-VM key, one pass over the token (the hot path's largest piece of wasm
/// work; SHA-256 cost several times more), and without the key nobody can aim
/// a collision at a cached token.
#[derive(Debug)]
pub struct TokenHasher {
    k0: u64,
    k1: u64,
}

impl Default for TokenHasher {
    /// A fresh random key: two outputs of std's randomly keyed SipHash (its
    /// keys come from the host's random source, WASI `random_get`).
    fn default() -> Self {
        use std::hash::BuildHasher;
        let random = std::collections::hash_map::RandomState::new();
        TokenHasher {
            k0: random.hash_one(0u8),
            k1: random.hash_one(1u8),
        }
    }
}

impl TokenHasher {
    /// The key of `parts` (a token, and for the custom provider the path).
    pub fn key(&self, parts: &[&[u8]]) -> CacheKey {
        use siphasher::sip128::{Hasher128, SipHasher13};
        use std::hash::Hasher;
        let mut h = SipHasher13::new_with_keys(self.k0, self.k1);
        for p in parts {
            h.write(p);
            // Length-delimited, so ("ab", "c") and ("a", "bc") differ.
            h.write_usize(p.len());
        }
        h.finish128().as_u128()
    }
}

/// The caches' map hasher: a [`CacheKey`] is already a keyed hash, uniform to
/// anyone without the VM's key, so its low 64 bits place it in the table (no
/// second SipHash per lookup).
#[derive(Debug, Default, Clone, Copy)]
pub struct KeyedHash;

impl std::hash::BuildHasher for KeyedHash {
    type Hasher = KeyedHasher;
    fn build_hasher(&self) -> KeyedHasher {
        KeyedHasher(0)
    }
}

/// See [`KeyedHash`].
#[derive(Debug, Default)]
pub struct KeyedHasher(u64);

impl std::hash::Hasher for KeyedHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write_u128(&mut self, key: u128) {
        // Truncation intended: the low half of a keyed 128-bit hash.
        self.0 ^= key as u64;
    }
    fn write(&mut self, bytes: &[u8]) {
        // Not used for `CacheKey`s (they go through `write_u128`); kept total.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
}

/// Most answers a worker remembers.
pub const TOKEN_CACHE_CAPACITY: usize = 10_000;
/// Seconds a negative provider answer ("Token not active") is remembered.
pub const NEGATIVE_TTL: u64 = 5;

impl TokenCache {
    pub(crate) fn get(&mut self, key: &CacheKey, generation: u64, now_s: u64) -> Option<Verdict> {
        if generation != self.generation {
            self.map.clear();
            self.generation = generation;
        }
        match self.map.get(key) {
            Some((answer, until)) if now_s <= *until => {
                self.hits += 1;
                Some(answer.clone())
            }
            Some(_) => {
                self.map.remove(key);
                self.misses += 1;
                None
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    pub(crate) fn put(&mut self, key: CacheKey, answer: Verdict, valid_until: u64, now_s: u64) {
        if self.map.len() >= TOKEN_CACHE_CAPACITY {
            self.map.retain(|_, (_, until)| *until >= now_s);
            if self.map.len() >= TOKEN_CACHE_CAPACITY {
                // Still full of live entries: drop an arbitrary eighth.
                let drop: Vec<CacheKey> = self
                    .map
                    .keys()
                    .take(TOKEN_CACHE_CAPACITY / 8)
                    .copied()
                    .collect();
                for k in drop {
                    self.map.remove(&k);
                }
            }
        }
        self.map.insert(key, (answer, valid_until));
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::ProviderError;

    #[test]
    fn token_keys_are_keyed_and_delimited() {
        let h = TokenHasher::default();
        assert_eq!(h.key(&[b"abc"]), h.key(&[b"abc"]));
        assert_ne!(h.key(&[b"abc"]), h.key(&[b"abd"]));
        assert_ne!(h.key(&[b"ab", b"c"]), h.key(&[b"a", b"bc"]));
        let other = TokenHasher::default();
        assert_ne!(h.key(&[b"abc"]), other.key(&[b"abc"]), "per-VM keys");
        // Both halves carry a hash (128 bits; 0 has odds of 2^-64).
        let k = h.key(&[b"abc"]);
        assert!(k >> 64 != 0 && k & u128::from(u64::MAX) != 0);
    }

    fn denial(n: u64) -> Verdict {
        Err(Denial::Provider(ProviderError::AuthFailed(
            u16::try_from(400 + n % 100).unwrap(),
        )))
    }

    #[test]
    fn token_cache_expiry_generation_and_counts() {
        let mut c = TokenCache::default();
        assert!(c.is_empty());
        c.put(1, denial(1), 100, 50);
        assert_eq!((c.len(), c.is_empty()), (1, false));
        // Valid to the second: `until` itself still hits.
        assert_eq!(c.get(&1, 0, 100), Some(denial(1)));
        assert_eq!(c.get(&1, 0, 99), Some(denial(1)));
        assert_eq!((c.hits, c.misses), (2, 0));
        assert_eq!(c.get(&1, 0, 101), None);
        assert_eq!((c.hits, c.misses, c.len()), (2, 1, 0), "expired: dropped");
        assert_eq!(c.get(&2, 0, 50), None);
        assert_eq!((c.hits, c.misses), (2, 2));
        // A new key-set generation empties the cache.
        c.put(3, denial(3), 100, 50);
        assert_eq!(c.get(&3, 1, 50), None);
        assert!(c.is_empty());
        c.put(3, denial(3), 100, 50);
        assert_eq!(c.get(&3, 1, 50), Some(denial(3)));
    }

    #[test]
    fn token_cache_stays_bounded() {
        let cap = u128::try_from(TOKEN_CACHE_CAPACITY).unwrap();
        let mut c = TokenCache::default();
        // Full of entries that expired by now = 20: they make room.
        for k in 0..cap {
            c.put(k, denial(0), 10, 5);
        }
        assert_eq!(c.len(), TOKEN_CACHE_CAPACITY);
        c.put(cap, denial(1), 1_000, 20);
        assert_eq!(c.len(), 1);
        // Full of live entries: an eighth goes, the new one stays.
        for k in 0..cap - 1 {
            c.put(k, denial(0), 1_000, 20);
        }
        assert_eq!(c.len(), TOKEN_CACHE_CAPACITY);
        c.put(cap + 1, denial(2), 1_000, 20);
        assert_eq!(c.len(), TOKEN_CACHE_CAPACITY - TOKEN_CACHE_CAPACITY / 8 + 1);
        assert_eq!(c.get(&(cap + 1), 0, 20), Some(denial(2)));
    }
}
