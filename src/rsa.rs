//! RS256/RS384/RS512 (RSASSA-PKCS1-v1_5) signature checks with the key's
//! Montgomery parameters computed once per key set, not once per token.
//!
//! ring recomputes them on every verification (its public API takes the raw
//! modulus each time), which is about a fifth of a check inside wasm. Here
//! the arithmetic is crypto-bigint's fixed-size Montgomery form, with 32-bit
//! limbs on wasm32, and the check is the one RFC 8017 §8.2.2 prescribes:
//! `s < n`, `m = s^e mod n`, then `EM` compared byte for byte with the
//! expected `EMSA-PKCS1-v1_5` encoding of the digest (nothing in `EM` is
//! parsed). The digest is ring's. PS256/384/512 stay with ring.
//!
//! Only e = 65537 is handled (16 squarings and one multiplication), which
//! is also the only exponent the key policy accepts; any other key is
//! refused by [`Modulus::new`] and left to ring.

use crypto_bigint::modular::{FixedMontyForm, FixedMontyParams};
use crypto_bigint::{Odd, Uint, U2048, U3072, U4096};
use ring::digest;

/// `DigestInfo` prefixes of RFC 8017 §9.2, note 1.
const SHA256_PREFIX: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];
const SHA384_PREFIX: [u8; 19] = [
    0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05,
    0x00, 0x04, 0x30,
];
const SHA512_PREFIX: [u8; 19] = [
    0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03, 0x05,
    0x00, 0x04, 0x40,
];

/// The digest of a PKCS#1 v1.5 signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

/// One modulus, ready for verifications: `k` is its length in bytes.
pub struct Modulus {
    k: usize,
    form: Form,
}

impl std::fmt::Debug for Modulus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Modulus({} bits)", self.k * 8)
    }
}

/// The smallest fixed width that holds the modulus.
enum Form {
    W2048(Box<Fixed<{ U2048::LIMBS }>>),
    W3072(Box<Fixed<{ U3072::LIMBS }>>),
    W4096(Box<Fixed<{ U4096::LIMBS }>>),
}

struct Fixed<const L: usize> {
    n: Uint<L>,
    params: FixedMontyParams<L>,
}

/// `bytes` (big-endian, at most `Uint::<L>::BYTES` long) as a `Uint<L>`.
fn uint<const L: usize>(bytes: &[u8]) -> Option<Uint<L>> {
    let mut buf = vec![0u8; Uint::<L>::BYTES];
    let start = buf.len().checked_sub(bytes.len())?;
    buf.get_mut(start..)?.copy_from_slice(bytes);
    // `buf` has exactly the width `from_be_slice` requires.
    Some(Uint::<L>::from_be_slice(&buf))
}

impl<const L: usize> Fixed<L> {
    fn new(n: &[u8]) -> Option<Self> {
        let n = uint::<L>(n)?;
        let odd = Odd::new(n).into_option()?;
        Some(Fixed {
            n,
            params: FixedMontyParams::new_vartime(odd),
        })
    }

    /// RSAVP1 with e = 65537: `s^e mod n` as `k` bytes, or `None` when
    /// `s >= n`.
    fn public_op(&self, signature: &[u8], k: usize) -> Option<Vec<u8>> {
        let s = uint::<L>(signature)?;
        if s >= self.n {
            return None;
        }
        let x = FixedMontyForm::new(&s, &self.params);
        let m = x.square_repeat_vartime(16).mul(&x).retrieve();
        let encoded = m.to_be_bytes();
        let bytes: &[u8] = encoded.as_ref();
        let start = bytes.len().checked_sub(k)?;
        let (high, low) = bytes.split_at_checked(start)?;
        // m < n < 2^(8k): the bytes above k are zero.
        if high.iter().any(|&b| b != 0) {
            return None;
        }
        Some(low.to_vec())
    }
}

impl Modulus {
    /// Prepares a modulus (big-endian, no leading zeros) of 2048 to 4096 bits
    /// with public exponent `e`; `None` for anything else.
    pub fn new(n: &[u8], e: &[u8]) -> Option<Modulus> {
        if e != [0x01, 0x00, 0x01] || n.first().is_none_or(|&b| b == 0) {
            return None;
        }
        let k = n.len();
        let form = match k {
            256 => Form::W2048(Box::new(Fixed::new(n)?)),
            257..=384 => Form::W3072(Box::new(Fixed::new(n)?)),
            385..=512 => Form::W4096(Box::new(Fixed::new(n)?)),
            _ => return None,
        };
        Some(Modulus { k, form })
    }

    /// Whether `signature` is a valid RSASSA-PKCS1-v1_5 signature of
    /// `message` with `hash`.
    pub fn verify(&self, hash: Hash, message: &[u8], signature: &[u8]) -> bool {
        // RFC 8017 §8.2.2 step 1: the signature is exactly k bytes.
        if signature.len() != self.k {
            return false;
        }
        let em = match &self.form {
            Form::W2048(f) => f.public_op(signature, self.k),
            Form::W3072(f) => f.public_op(signature, self.k),
            Form::W4096(f) => f.public_op(signature, self.k),
        };
        match (em, expected_encoding(hash, message, self.k)) {
            (Some(em), Some(expected)) => em == expected,
            _ => false,
        }
    }
}

/// `EMSA-PKCS1-v1_5-ENCODE(M, k)` (RFC 8017 §9.2):
/// `0x00 0x01 0xff.. 0x00 DigestInfo H`, with at least 8 bytes of `0xff`.
fn expected_encoding(hash: Hash, message: &[u8], k: usize) -> Option<Vec<u8>> {
    let (alg, prefix) = match hash {
        Hash::Sha256 => (&digest::SHA256, &SHA256_PREFIX),
        Hash::Sha384 => (&digest::SHA384, &SHA384_PREFIX),
        Hash::Sha512 => (&digest::SHA512, &SHA512_PREFIX),
    };
    let h = digest::digest(alg, message);
    let t_len = prefix.len() + h.as_ref().len();
    let ps_len = k.checked_sub(t_len + 3)?;
    if ps_len < 8 {
        return None;
    }
    let mut em = Vec::with_capacity(k);
    em.extend_from_slice(&[0x00, 0x01]);
    em.resize(2 + ps_len, 0xff);
    em.push(0x00);
    em.extend_from_slice(prefix);
    em.extend_from_slice(h.as_ref());
    Some(em)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::fixtures::{pkcs1_n_e, RSA_PEM};

    fn fixed() -> (Fixed<{ U2048::LIMBS }>, Vec<u8>) {
        let (n, _) = pkcs1_n_e(RSA_PEM);
        (Fixed::new(&n).unwrap(), n)
    }

    #[test]
    fn signature_representative_must_be_below_the_modulus() {
        let (f, n) = fixed();
        let k = n.len();
        assert_eq!(f.public_op(&n, k), None);
        assert_eq!(f.public_op(&[0xff; 256], k), None);
        let mut below = n.clone();
        below[k - 1] -= 1;
        let m = f.public_op(&below, k).unwrap();
        assert_eq!(m.len(), k);
        // (n - 1)^odd = -1 = n - 1 (mod n).
        assert_eq!(m, below);
        // 1^e = 1, 2^65537 mod n is not 2.
        let mut one = vec![0u8; k];
        one[k - 1] = 1;
        assert_eq!(f.public_op(&one, k).unwrap(), one);
        let mut two = vec![0u8; k];
        two[k - 1] = 2;
        assert_ne!(f.public_op(&two, k).unwrap(), two);
    }

    #[test]
    fn encoding_layout() {
        let em = expected_encoding(Hash::Sha256, b"abc", 256).unwrap();
        assert_eq!(em.len(), 256);
        assert_eq!(&em[..2], &[0x00, 0x01]);
        let t = 19 + 32;
        assert!(em[2..256 - t - 1].iter().all(|&b| b == 0xff));
        assert_eq!(em[256 - t - 1], 0x00);
        assert_eq!(&em[256 - t..256 - 32], &SHA256_PREFIX);
        assert_eq!(
            &em[256 - 32..],
            digest::digest(&digest::SHA256, b"abc").as_ref()
        );
        // Too short for 8 bytes of padding.
        assert!(expected_encoding(Hash::Sha512, b"abc", 19 + 64 + 10).is_none());
        assert!(expected_encoding(Hash::Sha512, b"abc", 19 + 64 + 11).is_some());
    }
}
