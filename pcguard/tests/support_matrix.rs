//! The kernel support matrix, derived from the built eBPF object: every
//! helper, map type and program type the object uses must be in
//! `pcguard::support`'s tables (first upstream Linux version and commit,
//! from the BCC project's kernel-versions document), and docs/support.md
//! must show exactly the matrix computed here, so neither can drift from
//! the code. Parses the object only: unprivileged.
//!
//! After changing the datapath: `PCGUARD_BLESS=1 cargo test -p pcguard
//! --test support_matrix` rewrites the generated part of docs/support.md.

use std::collections::{BTreeMap, BTreeSet};

use aya_obj::{EbpfSectionKind, Object, ProgramSection};
use pcguard::support::{self, Feature, Version, version_str};

static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pcguard-ebpf"));

const BPF_JMP: u8 = 0x05;
const BPF_CALL: u8 = 0x80;
const BPF_PSEUDO_CALL: u8 = 1;

/// What one program needs: (kind, feature) pairs.
struct Needs {
    program: String,
    kind: &'static str,
    features: Vec<(&'static str, Feature)>,
}

impl Needs {
    fn minimum(&self) -> Version {
        self.features.iter().map(|(_, f)| f.since).max().unwrap_or((0, 0))
    }
}

fn analyse() -> (Vec<Needs>, Vec<String>) {
    let obj = Object::parse(OBJECT).expect("parsing the eBPF object");
    let mut missing = Vec::new();
    let entry_keys: BTreeSet<(usize, u64)> = obj.programs.values().map(|p| p.function_key()).collect();
    // Functions that are not a program's entry: subprograms any program
    // may call (.text). Counted for every program (an over-approximation).
    let shared: Vec<&aya_obj::Function> =
        obj.functions.iter().filter(|(k, _)| !entry_keys.contains(k)).map(|(_, f)| f).collect();
    let mut map_types: BTreeSet<u32> = BTreeSet::new();
    for m in obj.maps.values() {
        map_types.insert(m.map_type());
    }
    let mut out = Vec::new();
    let mut names: Vec<&String> = obj.programs.keys().collect();
    names.sort();
    for name in names {
        let prog = &obj.programs[name];
        let (kind, ptype) = match prog.section {
            ProgramSection::Xdp { .. } => ("xdp", 6),
            ProgramSection::SchedClassifier => ("sched_cls", 3),
            _ => {
                missing.push(format!("{name}: program section of a kind not in the table"));
                continue;
            }
        };
        let mut features = Vec::new();
        match support::PROGRAM_TYPES.iter().find(|t| t.id == ptype) {
            Some(t) => features.push(("program type", *t)),
            None => missing.push(format!("program type {kind}")),
        }
        let own = &obj.functions[&prog.function_key()];
        let mut helpers = BTreeSet::new();
        let mut pseudo_calls = false;
        for f in std::iter::once(own).chain(shared.iter().copied()) {
            for insn in &f.instructions {
                if insn.code == BPF_JMP | BPF_CALL {
                    if insn.src_reg() == BPF_PSEUDO_CALL {
                        pseudo_calls = true;
                    } else if insn.src_reg() == 0 {
                        helpers.insert(insn.imm as u32);
                    }
                }
            }
        }
        for id in helpers {
            match support::helper(id) {
                Some(h) => features.push(("helper", *h)),
                None => missing.push(format!("{name}: helper #{id} (BPF_FUNC_ number) is not in support::HELPERS")),
            }
        }
        for t in &map_types {
            match support::MAP_TYPES.iter().find(|m| m.id == *t) {
                Some(m) => features.push(("map type", *m)),
                None => missing.push(format!("map type {t} (BPF_MAP_TYPE_ number) is not in support::MAP_TYPES")),
            }
        }
        if pseudo_calls {
            features.push(("code", support::BPF_TO_BPF_CALLS));
        }
        out.push(Needs { program: name.clone(), kind, features });
    }
    assert!(obj.maps.values().any(|m| matches!(m.section_kind(), EbpfSectionKind::Maps | EbpfSectionKind::BtfMaps)));
    (out, missing)
}

fn commit_link(c: &str) -> String {
    if c.chars().all(|ch| ch.is_ascii_hexdigit()) {
        format!("[`{c}`](https://github.com/torvalds/linux/commit/{c})")
    } else {
        c.to_string()
    }
}

/// The generated part of docs/support.md.
fn matrix(needs: &[Needs]) -> String {
    let mut s = String::from("| program | type | minimum Linux | because of |\n| --- | --- | --- | --- |\n");
    for n in needs {
        let min = n.minimum();
        let why: Vec<&str> = n.features.iter().filter(|(_, f)| f.since == min).map(|(_, f)| f.name).collect();
        s.push_str(&format!("| `{}` | {} | {} | {} |\n", n.program, n.kind, version_str(min), why.join(", ")));
    }
    // Every feature once, with the programs that need it.
    let mut rows: BTreeMap<(Version, &str, &str), (Feature, BTreeSet<&str>)> = BTreeMap::new();
    for n in needs {
        for (kind, f) in &n.features {
            rows.entry((f.since, kind, f.name)).or_insert((*f, BTreeSet::new())).1.insert(n.program.as_str());
        }
    }
    s.push_str("\n| first Linux | kind | name | used by | commit |\n| --- | --- | --- | --- | --- |\n");
    for ((v, kind, name), (f, progs)) in rows.iter().rev() {
        let progs: Vec<String> = progs.iter().map(|p| format!("`{p}`")).collect();
        s.push_str(&format!(
            "| {} | {kind} | {name} | {} | {} |\n",
            version_str(*v),
            progs.join(", "),
            commit_link(f.commit)
        ));
    }
    s.push_str("\n| attachment | mechanism | first Linux | source |\n| --- | --- | --- | --- |\n");
    for (hook, how, v, src) in support::ATTACH {
        s.push_str(&format!("| {hook} | {how} | {} | {} |\n", version_str(*v), commit_link(src)));
    }
    s
}

const BEGIN: &str = "<!-- support-matrix:begin (generated by pcguard/tests/support_matrix.rs) -->\n";
const END: &str = "<!-- support-matrix:end -->";

#[test]
fn every_kernel_feature_of_the_object_has_a_first_version() {
    let (_, missing) = analyse();
    assert!(
        missing.is_empty(),
        "add these to pcguard/src/support.rs (from the BCC kernel-versions table):\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_ingress_xdp_program_alone_needs_bpf_xdp_load_bytes() {
    // The fallback the daemon takes on kernels without bpf_xdp_load_bytes
    // (the TC ingress program) must not need it too.
    let (needs, _) = analyse();
    let uses = |prog: &str, helper: &str| {
        needs.iter().find(|n| n.program == prog).expect(prog).features.iter().any(|(_, f)| f.name == helper)
    };
    assert!(uses("pcguard_ingress", "bpf_xdp_load_bytes"));
    assert!(!uses("pcguard_ingress_tc", "bpf_xdp_load_bytes"));
    assert!(!uses("pcguard_egress", "bpf_xdp_load_bytes"));
    let min = |prog: &str| needs.iter().find(|n| n.program == prog).unwrap().minimum();
    assert!(min("pcguard_ingress_tc") < min("pcguard_ingress"), "the TC fallback must run on older kernels");
    // The daemon's stated minimums are the object's.
    assert_eq!(support::MINIMUM, min("pcguard_ingress_tc").max(min("pcguard_egress")));
    assert_eq!(support::MINIMUM_XDP, min("pcguard_ingress"));
}

#[test]
fn docs_support_md_shows_the_matrix_of_the_built_object() {
    let (needs, _) = analyse();
    let generated = matrix(&needs);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/support.md");
    let doc = std::fs::read_to_string(&path).expect("docs/support.md");
    let (Some(b), Some(e)) = (doc.find(BEGIN), doc.find(END)) else {
        panic!("docs/support.md lacks the {BEGIN:?} ... {END:?} markers");
    };
    let current = &doc[b + BEGIN.len()..e];
    if current != generated {
        if std::env::var_os("PCGUARD_BLESS").is_some() {
            let new = format!("{}{BEGIN}{generated}{}", &doc[..b], &doc[e..]);
            std::fs::write(&path, new).expect("writing docs/support.md");
            return;
        }
        panic!("docs/support.md is out of date; run with PCGUARD_BLESS=1 to regenerate. Expected:\n{generated}");
    }
}
