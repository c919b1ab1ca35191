//! The host's shared data (proxy-wasm `get_shared_data`/`set_shared_data`),
//! as the sans-IO core sees it: the [`SharedStore`] trait the glue implements
//! (`filter`'s `HostStore`), its errors, the CAS that creates a missing key
//! ([`CREATE_CAS`]), and [`fake::FakeStore`], the one in-memory store with
//! Envoy's semantics that unit tests, the fuzz targets and the profiling
//! example use.
//!
//! Users: `quota` (the counters) and `jwks_cache` (the shared fetch record
//! and lease).

/// A shared-data operation's failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// The key's CAS is not the one given.
    CasMismatch,
    /// Anything else.
    Other,
}

/// The host's shared data, as proxy-wasm exposes it.
///
/// `get` of a missing key returns `(None, None)`; an existing key returns its
/// non-zero CAS. `set` with `cas` `None` is unconditional; with `Some(c)` it
/// fails with [`StoreError::CasMismatch`] when the key exists with another
/// CAS, and creates the key when it is missing.
pub trait SharedStore {
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError>;
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError>;
}

/// The CAS used to create a key that was missing when read.
///
/// Envoy accepts a non-zero CAS on a missing key (and creates it), but refuses
/// it with a CAS mismatch when the key exists with another CAS. So creating
/// with this sentinel succeeds only if nobody created the key since we read it
/// (or, astronomically unlikely, its CAS is exactly this value). A CAS of 0
/// (`None`) would be an unconditional write, which could lose an increment
/// when two workers create the same key at once.
pub const CREATE_CAS: u32 = u32::MAX;

/// A shared-data store with Envoy's semantics, in memory: for unit tests, the
/// fuzz targets and the profiling example (never used by the filter).
pub mod fake {
    use super::{SharedStore, StoreError};
    use std::collections::HashMap;
    use std::sync::{Mutex, MutexGuard, PoisonError};

    /// Runs inside a `set`, before it applies: another worker's work between
    /// our `get` and our `set`.
    pub type Hook = Box<dyn FnMut(&FakeStore) + Send>;

    #[derive(Default)]
    struct State {
        map: HashMap<String, (Vec<u8>, u32)>,
        /// The next CAS Envoy hands out; starts at 1 and skips 0.
        next_cas: u32,
        /// How many coming `set`s fail with a CAS mismatch regardless.
        inject_mismatches: u32,
        /// Whether `get` fails with `Other`.
        fail_get: bool,
        /// Whether `set` fails with `Other`.
        fail_set: bool,
        gets: u32,
        sets: u32,
        unconditional_sets: u32,
    }

    /// Envoy's shared data (proxy-wasm-cpp-host), as measured on Envoy 1.40:
    /// a global CAS counter starting at 1 that skips 0; `get` of a missing
    /// key is `(None, None)`; `set` with CAS 0 is unconditional; a non-zero
    /// CAS on a missing key creates it; a CAS different from an existing
    /// key's is a mismatch.
    pub struct FakeStore {
        state: Mutex<State>,
        /// Run (once, then dropped) at the start of the next `set`.
        before_next_set: Mutex<Option<Hook>>,
        /// Run at the start of every `set` (not while it runs itself).
        before_every_set: Mutex<Option<Hook>>,
    }

    /// A lock that a panicking hook (in a test) cannot poison for the rest.
    fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(PoisonError::into_inner)
    }

    impl Default for FakeStore {
        fn default() -> Self {
            Self::new()
        }
    }

    impl FakeStore {
        pub fn new() -> Self {
            FakeStore {
                state: Mutex::new(State {
                    next_cas: 1,
                    ..State::default()
                }),
                before_next_set: Mutex::new(None),
                before_every_set: Mutex::new(None),
            }
        }

        /// Starts the CAS counter at `cas` (to test its wrap-around).
        pub fn with_next_cas(cas: u32) -> Self {
            let s = Self::new();
            lock(&s.state).next_cas = cas;
            s
        }

        /// The next `n` writes fail with a CAS mismatch.
        pub fn inject_mismatches(&self, n: u32) {
            lock(&self.state).inject_mismatches = n;
        }

        pub fn fail_get(&self, fail: bool) {
            lock(&self.state).fail_get = fail;
        }

        pub fn fail_set(&self, fail: bool) {
            lock(&self.state).fail_set = fail;
        }

        /// Runs `hook` once, at the start of the next `set`.
        pub fn before_next_set(&self, hook: impl FnMut(&FakeStore) + Send + 'static) {
            *lock(&self.before_next_set) = Some(Box::new(hook));
        }

        /// Runs `hook` at the start of every `set`, except the ones it makes.
        pub fn before_every_set(&self, hook: impl FnMut(&FakeStore) + Send + 'static) {
            *lock(&self.before_every_set) = Some(Box::new(hook));
        }

        /// Writes a raw value as the host would (unconditionally, new CAS).
        pub fn put_raw(&self, key: &str, value: &[u8]) {
            let mut s = lock(&self.state);
            let cas = Self::next_cas(&mut s);
            s.map.insert(key.to_string(), (value.to_vec(), cas));
        }

        /// The stored value, as a string.
        pub fn value(&self, key: &str) -> Option<String> {
            let s = lock(&self.state);
            s.map
                .get(key)
                .map(|(v, _)| String::from_utf8_lossy(v).into_owned())
        }

        /// The stored CAS.
        pub fn cas(&self, key: &str) -> Option<u32> {
            lock(&self.state).map.get(key).map(|(_, c)| *c)
        }

        pub fn entries(&self) -> usize {
            lock(&self.state).map.len()
        }

        pub fn gets(&self) -> u32 {
            lock(&self.state).gets
        }

        pub fn sets(&self) -> u32 {
            lock(&self.state).sets
        }

        pub fn unconditional_sets(&self) -> u32 {
            lock(&self.state).unconditional_sets
        }

        fn next_cas(s: &mut State) -> u32 {
            let cas = s.next_cas;
            s.next_cas = s.next_cas.wrapping_add(1);
            if s.next_cas == 0 {
                s.next_cas = 1;
            }
            cas
        }

        fn run_hooks(&self) {
            let once = lock(&self.before_next_set).take();
            if let Some(mut hook) = once {
                hook(self);
            }
            // Taken out while it runs, so that its own writes do not re-enter.
            let every = lock(&self.before_every_set).take();
            if let Some(mut hook) = every {
                hook(self);
                let mut slot = lock(&self.before_every_set);
                if slot.is_none() {
                    *slot = Some(hook);
                }
            }
        }
    }

    impl SharedStore for FakeStore {
        fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
            let mut s = lock(&self.state);
            s.gets = s.gets.saturating_add(1);
            if s.fail_get {
                return Err(StoreError::Other);
            }
            Ok(match s.map.get(key) {
                None => (None, None),
                // The SDK reports an empty value as no bytes.
                Some((v, cas)) if v.is_empty() => (None, Some(*cas)),
                Some((v, cas)) => (Some(v.clone()), Some(*cas)),
            })
        }

        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            self.run_hooks();
            let mut s = lock(&self.state);
            s.sets = s.sets.saturating_add(1);
            if s.fail_set {
                return Err(StoreError::Other);
            }
            if s.inject_mismatches > 0 {
                s.inject_mismatches -= 1;
                return Err(StoreError::CasMismatch);
            }
            let cas = cas.unwrap_or(0);
            if cas == 0 {
                s.unconditional_sets = s.unconditional_sets.saturating_add(1);
            }
            if let Some((_, current)) = s.map.get(key) {
                if cas != 0 && cas != *current {
                    return Err(StoreError::CasMismatch);
                }
            }
            let new_cas = Self::next_cas(&mut s);
            s.map.insert(key.to_string(), (value.to_vec(), new_cas));
            Ok(())
        }
    }
}
