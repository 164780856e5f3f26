//! What to write: the entries that make a policy generation, or its part
//! of `LEARNED`, hold what is wanted, given what it may hold now. Pure
//! functions (no map is touched but through the callback of
//! [`write_each`]), unit-tested here.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use aya::maps::MapError;
use pcguard_common::{PortEntry, PortSlot};

use super::maps::is_not_found;
use crate::{dns::LearnedWrite, policy::PeerPrefix};

/// The `LEARNED` writes that make a generation holding `held` hold
/// `want`: entries to insert or update, then addresses to remove.
pub(super) fn learned_writes(held: &HashMap<IpAddr, u32>, want: &[(IpAddr, u32)]) -> (Vec<(IpAddr, u32)>, Vec<IpAddr>) {
    let wanted: HashMap<IpAddr, u32> = want.iter().copied().collect();
    let mut set: Vec<(IpAddr, u32)> =
        wanted.iter().filter(|(a, b)| held.get(a) != Some(b)).map(|(a, b)| (*a, *b)).collect();
    let mut remove: Vec<IpAddr> = held.keys().filter(|a| !wanted.contains_key(a)).copied().collect();
    set.sort();
    remove.sort();
    (set, remove)
}

/// The `SLOTS` writes (slot id, value) that make a generation whose every
/// slot holds its value in one of `held` hold `new`.
pub(super) fn slot_writes(held: &[&[PortSlot]], new: &[PortSlot]) -> Vec<(u32, PortSlot)> {
    let len = held.iter().map(|h| h.len()).chain([new.len()]).max().unwrap_or(0);
    (0..len)
        .filter_map(|i| {
            let want = new.get(i).copied().unwrap_or_default();
            let stale = held.iter().any(|h| h.get(i).copied().unwrap_or_default() != want);
            stale.then_some((i as u32, want))
        })
        .collect()
}

/// The port-table writes (index within the generation, value) that make a
/// generation whose every entry holds its value in one of `held` hold
/// `new` (entries not listed are `PortEntry::default()`).
pub(super) fn port_writes(held: &[&[(u32, PortEntry)]], new: &[(u32, PortEntry)]) -> Vec<(u32, PortEntry)> {
    let held: Vec<BTreeMap<u32, PortEntry>> = held.iter().map(|h| h.iter().copied().collect()).collect();
    let new: BTreeMap<u32, PortEntry> = new.iter().copied().collect();
    let indexes: BTreeSet<u32> = held.iter().flat_map(|h| h.keys().copied()).chain(new.keys().copied()).collect();
    indexes
        .into_iter()
        .filter_map(|idx| {
            let want = new.get(&idx).copied().unwrap_or_default();
            let stale = held.iter().any(|h| h.get(&idx).copied().unwrap_or_default() != want);
            stale.then_some((idx, want))
        })
        .collect()
}

/// Prefix writes that make a trie generation whose every prefix holds its
/// value (a mask, or absent) in one of `held` hold `new`: prefixes to
/// insert or update, then prefixes to remove.
#[allow(clippy::type_complexity)]
pub(super) fn prefix_writes<const N: usize>(
    held: &[&[PeerPrefix<N>]],
    new: &[PeerPrefix<N>],
) -> (Vec<PeerPrefix<N>>, Vec<([u8; N], u32)>) {
    let by_key = |ps: &[PeerPrefix<N>]| -> BTreeMap<([u8; N], u32), u32> {
        ps.iter().map(|p| ((p.addr, p.prefix_len), p.mask)).collect()
    };
    let held: Vec<_> = held.iter().map(|h| by_key(h)).collect();
    let new = by_key(new);
    let keys: BTreeSet<([u8; N], u32)> =
        held.iter().flat_map(|h| h.keys().copied()).chain(new.keys().copied()).collect();
    let (mut set, mut remove) = (Vec::new(), Vec::new());
    for key @ (addr, prefix_len) in keys {
        let want = new.get(&key).copied();
        if held.iter().all(|h| h.get(&key).copied() == want) {
            continue;
        }
        match want {
            Some(mask) => set.push(PeerPrefix { addr, prefix_len, mask }),
            None => remove.push(key),
        }
    }
    (set, remove)
}

/// Applies `writes` to one generation of `LEARNED` one by one through `op`
/// (an insert, or a delete for `bits: None`), keeping `held` — what the
/// generation holds — in step with what succeeded. A write `held` already
/// has is not repeated; a delete of an absent key is done. A failure is
/// returned with its address and does not stop the writes after it.
#[allow(clippy::type_complexity)]
pub(super) fn write_each(
    held: &mut HashMap<IpAddr, u32>,
    writes: &[LearnedWrite],
    mut op: impl FnMut(&LearnedWrite) -> Result<(), MapError>,
) -> (Vec<LearnedWrite>, Vec<(IpAddr, MapError)>) {
    let (mut done, mut failed) = (Vec::with_capacity(writes.len()), Vec::new());
    for w in writes {
        if held.get(&w.addr).copied() == w.bits {
            done.push(*w);
            continue;
        }
        match op(w) {
            Err(e) if !(w.bits.is_none() && is_not_found(&e)) => {
                failed.push((w.addr, e));
                continue;
            }
            _ => {}
        }
        match w.bits {
            Some(b) => held.insert(w.addr, b),
            None => held.remove(&w.addr),
        };
        done.push(*w);
    }
    (done, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(mask: u32) -> PortSlot {
        PortSlot { allowed_mask: mask, ..Default::default() }
    }

    fn entry(slot: u16) -> PortEntry {
        PortEntry { slot, port_idx: slot }
    }

    fn prefix(a: u8, prefix_len: u32, mask: u32) -> PeerPrefix<4> {
        PeerPrefix { addr: [10, 0, 0, a], prefix_len, mask }
    }
    #[test]
    fn a_generation_gets_the_difference_from_what_it_held() {
        let old = [(1, entry(1)), (2, entry(2)), (3, entry(3))];
        let new = [(2, entry(2)), (3, entry(1)), (4, entry(4))];
        assert_eq!(port_writes(&[&old], &new), [(1, PortEntry::default()), (3, entry(1)), (4, entry(4))]);
        assert_eq!(port_writes(&[&new], &new), []);
        assert_eq!(slot_writes(&[&[slot(0), slot(1), slot(2)]], &[slot(0), slot(3)]), [(1, slot(3)), (2, slot(0))]);
        let (set, remove) =
            prefix_writes(&[&[prefix(1, 32, 1), prefix(2, 32, 2)]], &[prefix(2, 32, 3), prefix(0, 8, 4)]);
        assert_eq!(set, [prefix(0, 8, 4), prefix(2, 32, 3)]);
        assert_eq!(remove, [([10, 0, 0, 1], 32)]);
    }

    #[test]
    fn after_a_failed_write_every_entry_either_policy_left_is_rewritten() {
        // Each entry holds its value in `a` or in `b`: only entries where
        // both agree with the new policy are skipped.
        let a = [(1, entry(1)), (2, entry(2))];
        let b = [(1, entry(1)), (2, entry(3)), (5, entry(5))];
        let new = [(1, entry(1)), (2, entry(2))];
        assert_eq!(port_writes(&[&a, &b], &new), [(2, entry(2)), (5, PortEntry::default())]);
        assert_eq!(
            slot_writes(&[&[slot(0), slot(1)], &[slot(0), slot(2), slot(3)]], &[slot(0), slot(1)]),
            [(1, slot(1)), (2, slot(0))]
        );
        let (set, remove) =
            prefix_writes(&[&[prefix(1, 32, 1)], &[prefix(1, 32, 2), prefix(2, 32, 2)]], &[prefix(1, 32, 1)]);
        assert_eq!((set, remove), (vec![prefix(1, 32, 1)], vec![([10, 0, 0, 2], 32)]));
    }

    #[test]
    fn a_generation_s_learned_entries_get_the_difference_from_what_it_holds() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let held: HashMap<IpAddr, u32> = [(ip("192.0.2.1"), 1), (ip("192.0.2.2"), 1), (ip("2001:db8::1"), 2)].into();
        let want = [(ip("192.0.2.2"), 3), (ip("2001:db8::1"), 2), (ip("192.0.2.9"), 1)];
        let (set, remove) = learned_writes(&held, &want);
        assert_eq!(set, [(ip("192.0.2.2"), 3), (ip("192.0.2.9"), 1)]);
        assert_eq!(remove, [ip("192.0.2.1")]);
        assert_eq!(learned_writes(&held, &[]).1.len(), 3);
        assert_eq!(learned_writes(&HashMap::new(), &want).0.len(), 3);
    }

    #[test]
    fn one_failed_learned_write_never_stops_the_batch_and_absent_keys_count_as_deleted() {
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let enoent = || {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_delete_elem",
                io_error: std::io::ErrorKind::NotFound.into(),
            })
        };
        let eperm = || {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_update_elem",
                io_error: std::io::ErrorKind::PermissionDenied.into(),
            })
        };
        let mut held: HashMap<IpAddr, u32> =
            [(ip("192.0.2.1"), 1), (ip("192.0.2.2"), 1), (ip("192.0.2.3"), 1), (ip("192.0.2.6"), 1)].into();
        let writes = [
            LearnedWrite { addr: ip("192.0.2.1"), bits: None }, // the map lost it already: ENOENT
            LearnedWrite { addr: ip("192.0.2.2"), bits: None }, // fails
            LearnedWrite { addr: ip("192.0.2.3"), bits: Some(1) }, // held already: no call
            LearnedWrite { addr: ip("192.0.2.4"), bits: Some(2) }, // fails
            LearnedWrite { addr: ip("192.0.2.5"), bits: Some(4) },
            LearnedWrite { addr: ip("192.0.2.6"), bits: None }, // the map lost it: KeyNotFound
            LearnedWrite { addr: ip("192.0.2.8"), bits: None }, // not held: no call
        ];
        let mut calls = Vec::new();
        let (done, failed) = write_each(&mut held, &writes, |w| {
            calls.push(w.addr);
            match w.addr.to_string().as_str() {
                "192.0.2.1" => Err(enoent()),
                "192.0.2.2" | "192.0.2.4" => Err(eperm()),
                "192.0.2.6" => Err(MapError::KeyNotFound),
                _ => Ok(()),
            }
        });
        assert_eq!(calls, ["192.0.2.1", "192.0.2.2", "192.0.2.4", "192.0.2.5", "192.0.2.6"].map(ip));
        assert_eq!(done, [writes[0], writes[2], writes[4], writes[5], writes[6]]);
        assert_eq!(failed.iter().map(|(a, _)| *a).collect::<Vec<_>>(), [ip("192.0.2.2"), ip("192.0.2.4")]);
        // `held` follows the map: what failed is as it was.
        let want: HashMap<IpAddr, u32> = [(ip("192.0.2.2"), 1), (ip("192.0.2.3"), 1), (ip("192.0.2.5"), 4)].into();
        assert_eq!(held, want);
        // An insert that reports "not found" is a failure, not a success.
        let (done, failed) =
            write_each(&mut held, &[LearnedWrite { addr: ip("192.0.2.7"), bits: Some(1) }], |_| Err(enoent()));
        assert_eq!((done.len(), failed.len()), (0, 1));
    }
}
