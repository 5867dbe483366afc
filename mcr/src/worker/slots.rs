//! Fixed storage for the sends in flight: the memory the kernel reads for a send (headers,
//! I/O vector, message header) must stay put until the send completes, so each send takes a
//! slot, allocated once, and gives it back on its completion.

pub struct Slots<T> {
    slots: Box<[T]>,
    /// Free slots, the lowest on top.
    free: Vec<u32>,
}

impl<T> Slots<T> {
    /// `capacity` slots, each `empty()` to start with.
    pub fn new(capacity: usize, empty: impl Fn() -> T) -> Self {
        let slots: Box<[T]> = (0..capacity).map(|_| empty()).collect();
        let free = (0..u32::try_from(capacity).unwrap_or(u32::MAX))
            .rev()
            .collect();
        Self { slots, free }
    }

    /// A free slot and its index, or `None` when every slot is in use.
    pub fn take(&mut self) -> Option<(u32, &mut T)> {
        let slot = self.free.pop()?;
        Some((slot, &mut self.slots[slot as usize]))
    }

    /// Gives `slot` back; returns what it holds, which stays there until the slot is taken
    /// again. `None` for an index that is not a slot.
    pub fn give_back(&mut self, slot: u32) -> Option<&T> {
        let held = self.slots.get(slot as usize)?;
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
}
