//! One conversation's redelivery window: the latest activity ids it took, each marked once its
//! turn is answered. The request path looks an id up before queueing it (a redelivery of an
//! activity taken in the last `capacity` is refused at the door, answered or not); the
//! conversation actor looks it up before running a turn and writes the answered ones into the
//! conversation's snapshot, so a redelivery after a passivation, a restart or on another
//! instance is caught too. An unanswered id is never written: a crash must let it run again.
//!
//! Ids are kept as 64-bit FNV-1a digests: a lookup is one hash probe, a full window of 256 is
//! 6 KiB in memory and 2 KiB in a snapshot, with no string escaping. Activity ids are assigned
//! by the Bot Connector, not chosen by senders, and a collision inside one conversation's window
//! of 256 has odds of about 2^-48.

use std::collections::{HashMap, VecDeque};

/// An activity id's digest; stable across processes and versions (snapshots hold it).
pub fn digest(activity_id: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;
    activity_id.bytes().fold(OFFSET, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

/// Digests are already uniform: the map uses them as they are.
#[derive(Default, Clone, Copy)]
pub struct IdentityHasher(u64);

impl std::hash::Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 << 8) | u64::from(*byte);
        }
    }
    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

type DigestMap = HashMap<u64, bool, std::hash::BuildHasherDefault<IdentityHasher>>;

pub struct DedupWindow {
    /// Digests, oldest first, each with whether its turn was answered (a snapshot reads them in
    /// order, without a lookup each).
    order: VecDeque<(u64, bool)>,
    /// Each digest in `order`, and whether its turn was answered.
    answered: DigestMap,
    capacity: usize,
}

impl DedupWindow {
    pub fn new(capacity: usize) -> Self {
        Self {
            order: VecDeque::new(),
            answered: DigestMap::default(),
            capacity: capacity.max(1),
        }
    }

    /// Taken (answered or not) within the window.
    pub fn contains(&self, activity_id: &str) -> bool {
        self.answered.contains_key(&digest(activity_id))
    }

    /// Answered within the window.
    pub fn is_answered(&self, activity_id: &str) -> bool {
        self.answered.get(&digest(activity_id)) == Some(&true)
    }

    /// Records an activity taken for a turn.
    pub fn take(&mut self, activity_id: &str) {
        self.push(digest(activity_id), false);
    }

    /// Forgets an activity taken and not answered (its turn was not run here and will be
    /// offered again): a second offer must not look like a redelivery.
    pub fn forget(&mut self, activity_id: &str) {
        let digest = digest(activity_id);
        if self.answered.get(&digest) == Some(&false) {
            self.answered.remove(&digest);
            self.order.retain(|(d, _)| *d != digest);
        }
    }

    /// Records an activity's turn as answered (taken before, or replayed without the door).
    pub fn mark_answered(&mut self, activity_id: &str) {
        self.push(digest(activity_id), true);
    }

    fn push(&mut self, digest: u64, answered: bool) {
        if let Some(was) = self.answered.get_mut(&digest) {
            if answered && !*was {
                *was = true;
                self.mark_in_order(digest);
            }
            return;
        }
        if self.order.len() == self.capacity
            && let Some((oldest, _)) = self.order.pop_front()
        {
            self.answered.remove(&oldest);
        }
        self.answered.insert(digest, answered);
        self.order.push_back((digest, answered));
    }

    /// Marks a digest answered in `order`: from the newest, where the turn just answered is.
    fn mark_in_order(&mut self, digest: u64) {
        if let Some((_, answered)) = self.order.iter_mut().rev().find(|(d, _)| *d == digest) {
            *answered = true;
        }
    }

    /// Adds the answered digests of a snapshot (oldest first). They are older than what this
    /// window took since, so they go before it, and only while there is room.
    pub fn merge_answered(&mut self, stored: &[u64]) {
        for &digest in stored.iter().rev() {
            if let Some(was) = self.answered.get_mut(&digest) {
                if !*was {
                    *was = true;
                    self.mark_in_order(digest);
                }
            } else if self.order.len() < self.capacity {
                self.answered.insert(digest, true);
                self.order.push_front((digest, true));
            }
        }
    }

    /// The answered digests, oldest first: what a snapshot keeps.
    pub fn answered(&self) -> impl Iterator<Item = u64> + Clone + '_ {
        self.order
            .iter()
            .filter(|(_, answered)| *answered)
            .map(|(digest, _)| *digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_keeps_the_latest_ids_and_marks_answered_ones() {
        let mut window = DedupWindow::new(2);
        window.take("a");
        window.take("b");
        assert!(window.contains("a") && !window.is_answered("a"));
        window.mark_answered("a");
        assert!(window.is_answered("a"));
        window.take("a");
        assert!(window.is_answered("a"), "taking again keeps it answered");
        window.take("c");
        assert!(!window.contains("a"), "the oldest left");
        assert!(window.contains("b") && window.contains("c"));
        window.mark_answered("c");
        assert_eq!(window.answered().collect::<Vec<_>>(), vec![digest("c")]);
    }

    #[test]
    fn stored_ids_go_before_newer_ones_and_never_push_them_out() {
        let mut window = DedupWindow::new(3);
        window.take("new");
        window.merge_answered(&[digest("old-1"), digest("old-2"), digest("old-3")]);
        assert!(window.contains("new"));
        assert!(window.is_answered("old-2") && window.is_answered("old-3"));
        assert!(!window.contains("old-1"), "no room for the oldest");
        window.merge_answered(&[digest("new")]);
        assert!(window.is_answered("new"), "answered elsewhere");
        assert_eq!(
            window.answered().collect::<Vec<_>>(),
            vec![digest("old-2"), digest("old-3"), digest("new")]
        );
        window.forget("new");
        assert!(
            window.is_answered("new"),
            "an answered one is not forgotten"
        );
        window.take("later");
        window.mark_answered("later");
        assert_eq!(window.answered().last(), Some(digest("later")));
    }

    #[test]
    fn digests_are_stable() {
        // Snapshots keep them: a change here makes every stored window unreadable.
        assert_eq!(digest(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(digest("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
