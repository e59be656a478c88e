//! A thread's last few answers of a shared cache, kept where no other thread reads them: a hit
//! costs a comparison of keys, not the shared cache's hashing and bookkeeping (the verified-token
//! cache hashed a kilobyte of token per activity, twice the cost of the lookup's own work). Each
//! use declares its own `thread_local!` list; the shared cache stays the one that decides.

use std::sync::atomic::{AtomicU64, Ordering};

/// Answers kept per thread and cache: Teams sends each bot's traffic under one token and one
/// service URL per region at a time.
const SLOTS: usize = 4;

/// Whose entries they are in a thread's list: two caches of the same kind (an in-process test
/// runs several routers on one runtime) never read each other's answers.
#[derive(Debug)]
pub struct Owner(u64);

impl Owner {
    pub fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl Default for Owner {
    fn default() -> Self {
        Self::new()
    }
}

/// One thread's recent answers, the oldest replaced first.
pub struct Recent<V> {
    slots: Vec<(u64, Box<str>, V)>,
    next: usize,
}

impl<V: Clone> Recent<V> {
    pub const fn new() -> Self {
        Self {
            slots: Vec::new(),
            next: 0,
        }
    }

    pub fn get(&self, owner: &Owner, key: &str) -> Option<V> {
        self.find_map(owner, key, |value| Some(value.clone()))
    }

    /// The first answer `answer` makes of a value kept for `key` (several may be: one key's
    /// value may depend on more than the key), by reference: nothing is cloned that it does not
    /// clone.
    pub fn find_map<R>(
        &self,
        owner: &Owner,
        key: &str,
        mut answer: impl FnMut(&V) -> Option<R>,
    ) -> Option<R> {
        self.slots
            .iter()
            .filter(|(of, kept, _)| *of == owner.0 && **kept == *key)
            .find_map(|(_, _, value)| answer(value))
    }

    pub fn put(&mut self, owner: &Owner, key: &str, value: V) {
        let entry = (owner.0, Box::from(key), value);
        if self.slots.len() < SLOTS {
            self.slots.push(entry);
        } else {
            self.slots[self.next] = entry;
            self.next = (self.next + 1) % SLOTS;
        }
    }

    /// The shared cache dropped `key`: this thread must not answer it either.
    pub fn forget(&mut self, owner: &Owner, key: &str) {
        self.slots
            .retain(|(of, kept, _)| !(*of == owner.0 && **kept == *key));
        self.next = 0;
    }
}

impl<V: Clone> Default for Recent<V> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_only_its_owner_and_forgets_on_request() {
        let (one, two) = (Owner::new(), Owner::new());
        let mut recent = Recent::new();
        recent.put(&one, "token", 1);
        assert_eq!(recent.get(&one, "token"), Some(1));
        assert_eq!(recent.get(&two, "token"), None);
        assert_eq!(recent.get(&one, "other"), None);
        recent.forget(&one, "token");
        assert_eq!(recent.get(&one, "token"), None);
    }

    #[test]
    fn every_value_kept_for_a_key_is_looked_at() {
        let owner = Owner::new();
        let mut recent = Recent::new();
        recent.put(&owner, "app", 1);
        recent.put(&owner, "app", 2);
        assert_eq!(
            recent.find_map(&owner, "app", |v| (*v == 2).then_some(*v)),
            Some(2)
        );
    }

    #[test]
    fn keeps_the_latest_few() {
        let owner = Owner::new();
        let mut recent = Recent::new();
        for n in 0..SLOTS + 2 {
            recent.put(&owner, &n.to_string(), n);
        }
        assert_eq!(recent.get(&owner, "0"), None);
        assert_eq!(recent.get(&owner, "1"), None);
        for n in 2..SLOTS + 2 {
            assert_eq!(recent.get(&owner, &n.to_string()), Some(n));
        }
    }
}
