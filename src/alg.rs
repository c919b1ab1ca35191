//! The JWS signature algorithms tollgate accepts ([`Alg`], RFC 7518 names)
//! and the `algorithms` allow-list ([`AlgSet`]). Read by `config` (the
//! allow-list), `key_set` (which key fits which algorithm) and `jwt` (a
//! token's `alg`).

/// Signature algorithms tollgate accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(clippy::upper_case_acronyms)]
pub enum Alg {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}

impl Alg {
    /// Parses an `alg` value, exactly as registered (case-sensitive).
    pub fn parse(s: &str) -> Option<Alg> {
        Some(match s {
            "RS256" => Alg::RS256,
            "RS384" => Alg::RS384,
            "RS512" => Alg::RS512,
            "PS256" => Alg::PS256,
            "PS384" => Alg::PS384,
            "PS512" => Alg::PS512,
            "ES256" => Alg::ES256,
            "ES384" => Alg::ES384,
            "EdDSA" => Alg::EdDSA,
            _ => return None,
        })
    }
}

impl Alg {
    /// Every supported `alg`, in the order of [`Alg::parse`].
    pub const NAMES: [&'static str; 9] = [
        "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
    ];

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// A set of algorithms: the `algorithms` allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlgSet(u16);

impl AlgSet {
    pub const NONE: AlgSet = AlgSet(0);
    pub const ALL: AlgSet = AlgSet((1 << Alg::NAMES.len()) - 1);

    /// This set and `alg`.
    pub fn with(self, alg: Alg) -> AlgSet {
        AlgSet(self.0 | alg.bit())
    }

    pub fn contains(self, alg: Alg) -> bool {
        self.0 & alg.bit() != 0
    }
}
