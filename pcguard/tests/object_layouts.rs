//! The built eBPF object against the contract: every map the object
//! defines has the key size, value size and `max_entries` that
//! `pcguard_common::MAP_LAYOUTS` says, and the two list the same maps.
//! Parses the object only (nothing is loaded): unprivileged.

use std::collections::BTreeSet;

use aya_obj::{EbpfSectionKind, Object};
use pcguard_common::MAP_LAYOUTS;

/// The object the daemon embeds (`pcguard::datapath`), built by build.rs.
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pcguard-ebpf"));

/// The maps the object defines: `maps` section entries, not the sections
/// of global data (`.bss`, `.data`, `.rodata`) aya also loads as maps.
fn object_maps(obj: &Object) -> Vec<(&str, &aya_obj::Map)> {
    obj.maps
        .iter()
        .filter(|(_, m)| matches!(m.section_kind(), EbpfSectionKind::Maps | EbpfSectionKind::BtfMaps))
        .map(|(name, m)| (name.as_str(), m))
        .collect()
}

#[test]
fn every_map_of_the_object_has_its_contract_layout() {
    let obj = Object::parse(OBJECT).expect("parsing the eBPF object");
    let maps = object_maps(&obj);
    assert!(
        maps.len() >= 10,
        "only {} maps found in the object: {:?}",
        maps.len(),
        obj.maps.keys().collect::<Vec<_>>()
    );
    let mut wrong = Vec::new();
    for (name, m) in &maps {
        let Some(want) = pcguard_common::map_layout(name) else {
            wrong.push(format!("{name}: in the object, not in MAP_LAYOUTS"));
            continue;
        };
        let got = (m.key_size(), m.value_size(), m.max_entries());
        let expected = (want.key_size, want.value_size, want.max_entries);
        if got != expected {
            wrong.push(format!("{name}: the object has (key, value, max_entries) {got:?}, MAP_LAYOUTS {expected:?}"));
        }
    }
    let in_object: BTreeSet<&str> = maps.iter().map(|(n, _)| *n).collect();
    for l in MAP_LAYOUTS {
        if !in_object.contains(l.name) {
            wrong.push(format!("{}: in MAP_LAYOUTS, not in the object", l.name));
        }
    }
    assert!(wrong.is_empty(), "the object and pcguard_common::MAP_LAYOUTS disagree:\n{}", wrong.join("\n"));
    assert_eq!(in_object.len(), MAP_LAYOUTS.len());
}

#[test]
fn every_program_of_the_contract_is_in_the_object() {
    let obj = Object::parse(OBJECT).expect("parsing the eBPF object");
    for name in
        [pcguard_common::names::XDP_PROG, pcguard_common::names::TC_PROG, pcguard_common::names::TC_INGRESS_PROG]
    {
        assert!(
            obj.programs.contains_key(name),
            "program {name} missing: {:?}",
            obj.programs.keys().collect::<Vec<_>>()
        );
    }
}
