//! Storage for the sends in flight: the memory the kernel reads for a send (headers, I/O
//! vector, message header) must stay put until the send completes, so each send takes a
//! slot and gives it back on its completion.
//!
//! The room for every slot is reserved at once and never moves, but a slot is only written
//! (and its memory only becomes resident) the first time it is needed: sends on packet
//! sockets complete as they are submitted, so a worker that may have thousands of sends in
//! flight usually has a handful, and pays memory for those.

pub struct Slots<T> {
    /// The slots made so far; never more than its capacity, so it never reallocates and a
    /// slot stays where the kernel was told it is.
    made: Vec<T>,
    /// Slots made and free again, the most recently freed on top.
    free: Vec<u32>,
    /// Makes a new slot.
    empty: fn() -> T,
}

impl<T> Slots<T> {
    /// Room for `capacity` slots, each `empty()` when first taken.
    pub fn new(capacity: usize, empty: fn() -> T) -> Self {
        Self {
            made: Vec::with_capacity(capacity),
            free: Vec::with_capacity(capacity),
            empty,
        }
    }

    /// A free slot and its index, or `None` when every slot is in use.
    pub fn take(&mut self) -> Option<(u32, &mut T)> {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None if self.made.len() < self.made.capacity() => {
                let slot = u32::try_from(self.made.len()).ok()?;
                self.made.push((self.empty)());
                slot
            }
            None => return None,
        };
        Some((slot, &mut self.made[slot as usize]))
    }

    /// Gives `slot` back; returns what it holds, which stays there until the slot is taken
    /// again. `None` for an index that is not a slot in use.
    pub fn give_back(&mut self, slot: u32) -> Option<&T> {
        let held = self.made.get(slot as usize)?;
        self.free.push(slot);
        Some(held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_handed_out_once_until_given_back() {
        let mut slots = Slots::new(2, || 0_u32);
        let (first, value) = slots.take().expect("a free slot");
        *value = 7;
        let (second, _) = slots.take().expect("a second free slot");
        assert_ne!(first, second);
        assert!(slots.take().is_none(), "both in use");
        assert_eq!(slots.give_back(first), Some(&7));
        assert_eq!(slots.take().map(|(slot, _)| slot), Some(first));
        assert_eq!(slots.give_back(9), None, "not a slot");
    }

    #[test]
    fn slots_are_made_when_first_needed_and_never_move() {
        let mut slots = Slots::new(1000, || [0_u64; 8]);
        let (first, _) = slots.take().expect("a free slot");
        let address = std::ptr::from_ref(&slots.made[first as usize]);
        assert_eq!(slots.made.len(), 1, "only the slot taken is made");
        for _ in 1..1000 {
            slots.take().expect("room for a thousand");
        }
        assert!(slots.take().is_none(), "no more than the capacity");
        assert_eq!(
            std::ptr::from_ref(&slots.made[first as usize]),
            address,
            "the first slot stayed where it was while the others were made"
        );
        // A slot given back is taken again before a new one is made.
        slots.give_back(first);
        assert_eq!(slots.take().map(|(slot, _)| slot), Some(first));
    }
}
