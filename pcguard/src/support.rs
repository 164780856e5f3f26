//! What the eBPF object needs from the kernel, and the first upstream
//! Linux version of each (docs/support.md).
//!
//! The tables cover what the built object uses: a test
//! (`pcguard/tests/support_matrix.rs`) lists the helpers, map types and
//! program types of the object and fails on anything missing here, and
//! checks that docs/support.md shows the matrix computed from them. Source
//! of the versions: the BCC project's "BPF Features by Linux Kernel
//! Version" (<https://github.com/iovisor/bcc/blob/master/docs/kernel-versions.md>),
//! which cites the commit of each.
//!
//! At start the daemon uses them to name what a kernel lacks when loading
//! fails ([`explain_load_error`]): vendor kernels (RHEL) backport features,
//! so the version number alone decides nothing; the kernel's verifier does.

/// A kernel version, (major, minor).
pub type Version = (u32, u32);

/// One requirement: its id (helper number, map type or program type as in
/// `include/uapi/linux/bpf.h`), name, first upstream version and commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Feature {
    pub id: u32,
    pub name: &'static str,
    pub since: Version,
    pub commit: &'static str,
}

const fn f(id: u32, name: &'static str, since: Version, commit: &'static str) -> Feature {
    Feature { id, name, since, commit }
}

/// BPF helpers (`BPF_FUNC_*` numbers).
pub const HELPERS: &[Feature] = &[
    f(1, "bpf_map_lookup_elem", (3, 19), "d0003ec01c66"),
    f(2, "bpf_map_update_elem", (3, 19), "d0003ec01c66"),
    f(3, "bpf_map_delete_elem", (3, 19), "d0003ec01c66"),
    f(5, "bpf_ktime_get_ns", (4, 1), "d9847d310ab4"),
    f(12, "bpf_tail_call", (4, 2), "04fd61ab36ec"),
    f(26, "bpf_skb_load_bytes", (4, 5), "05c74e5e53f6"),
    f(39, "bpf_skb_pull_data", (4, 9), "36bbef52c7eb"),
    f(131, "bpf_ringbuf_reserve", (5, 8), "457f44363a88"),
    f(132, "bpf_ringbuf_submit", (5, 8), "457f44363a88"),
    f(133, "bpf_ringbuf_discard", (5, 8), "457f44363a88"),
    f(160, "bpf_ktime_get_coarse_ns", (5, 11), "d05512618056"),
    f(189, "bpf_xdp_load_bytes", (5, 18), "3f364222d032"),
];

/// Map types (`BPF_MAP_TYPE_*`).
pub const MAP_TYPES: &[Feature] = &[
    f(1, "hash", (3, 19), "0f8e4bd8a1fc"),
    f(2, "array", (3, 19), "28fbcfa08d8e"),
    f(3, "prog_array", (4, 2), "04fd61ab36ec"),
    f(5, "percpu_hash", (4, 6), "824bd0ce6c7c"),
    f(6, "percpu_array", (4, 6), "a10423b87a7e"),
    f(9, "lru_hash", (4, 10), "29ba732acbee"),
    f(10, "lru_percpu_hash", (4, 10), "8f8449384ec3"),
    f(11, "lpm_trie", (4, 11), "b95a5c4db09b"),
    f(27, "ringbuf", (5, 8), "457f44363a88"),
];

/// Program types (`BPF_PROG_TYPE_*`).
pub const PROGRAM_TYPES: &[Feature] = &[f(3, "sched_cls", (4, 1), "96be4325f443"), f(6, "xdp", (4, 8), "6a773a15a1e8")];

/// Code features the object relies on (detected from its instructions).
pub const BPF_TO_BPF_CALLS: Feature = f(0, "bpf-to-bpf calls", (4, 16), "cc8b0b92a169");

/// How the daemon attaches (not in the object; aya 0.14 decides): the
/// first choice, then the fallback. (hook, mechanism, first version,
/// source).
pub const ATTACH: &[(&str, &str, Version, &str)] = &[
    ("TC ingress/egress", "tcx link", (6, 6), "aya src/programs/tc.rs: tcx from Linux 6.6"),
    ("TC ingress/egress, older kernels", "clsact qdisc + cls_bpf direct-action (netlink)", (4, 5), "1f211a1b929c"),
    ("XDP ingress", "XDP bpf_link, else netlink (aya src/programs/xdp.rs)", (4, 8), "6a773a15a1e8"),
];

/// The oldest upstream Linux the TC programs (egress, TC ingress) load on:
/// pcguard's minimum. Checked against the object by the support-matrix test.
pub const MINIMUM: Version = (5, 11);
/// The oldest upstream Linux the XDP ingress program loads on; older
/// kernels run ingress on the TC hook.
pub const MINIMUM_XDP: Version = (5, 18);

/// The helper with number `id`.
pub fn helper(id: u32) -> Option<&'static Feature> {
    HELPERS.iter().find(|h| h.id == id)
}

/// Formats a version as `5.18`.
pub fn version_str(v: Version) -> String {
    format!("{}.{}", v.0, v.1)
}

/// The running kernel's release (e.g. `6.1.0-18-amd64`) and its (major,
/// minor), from `/proc/sys/kernel/osrelease`.
pub fn running_kernel() -> Option<(String, Version)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?.trim().to_string();
    let v = parse_version(&release)?;
    Some((release, v))
}

/// `major.minor` at the start of a kernel release string.
pub fn parse_version(release: &str) -> Option<Version> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The helper a verifier log refuses, if that is why loading failed: the
/// kernel writes `unknown func bpf_xdp_load_bytes#189` (a helper it knows
/// but not for this program type) or `invalid func unknown#189` (a helper
/// newer than the kernel). Returns the helper number.
pub fn refused_helper(log: &str) -> Option<u32> {
    for marker in ["unknown func ", "invalid func "] {
        if let Some(at) = log.find(marker) {
            let rest = &log[at + marker.len()..];
            let hash = rest.find('#')?;
            let digits: String = rest[hash + 1..].chars().take_while(char::is_ascii_digit).collect();
            return digits.parse().ok();
        }
    }
    None
}

/// A load error, explained: the helper or map type this kernel lacks and
/// the first upstream kernel that has it, with the running kernel's
/// release. `None` when the error is not one of those.
pub fn explain_load_error(error: &str) -> Option<String> {
    let kernel = running_kernel().map(|(r, _)| r).unwrap_or_else(|| "unknown".to_string());
    if let Some(id) = refused_helper(error) {
        let what = match helper(id) {
            Some(h) => format!("the BPF helper {} (#{id}, Linux {})", h.name, version_str(h.since)),
            None => format!("BPF helper #{id}"),
        };
        return Some(format!("this kernel ({kernel}) lacks {what}"));
    }
    // Map creation: "failed to create map EVENTS ... Invalid argument" on a
    // kernel without the map's type.
    let ring = [pcguard_common::names::EVENTS, pcguard_common::names::DNS_MESSAGES];
    if error.contains("failed to create map") && ring.iter().any(|m| error.contains(&format!("`{m}`"))) {
        let rb = MAP_TYPES.iter().find(|m| m.name == "ringbuf")?;
        return Some(format!(
            "this kernel ({kernel}) could not create the event ring buffer (BPF_MAP_TYPE_RINGBUF, Linux {})",
            version_str(rb.since)
        ));
    }
    None
}

/// For a load error nothing else explains: the running kernel, when it is
/// older than [`MINIMUM`] (a vendor kernel may still have the features).
pub fn old_kernel_note() -> Option<String> {
    let (release, v) = running_kernel()?;
    (v < MINIMUM).then(|| {
        format!(
            "this kernel ({release}) is older than Linux {}, the oldest upstream kernel pcguard's programs load on",
            version_str(MINIMUM)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_refusals_name_the_helper() {
        // A kernel older than the helper (5.15 and bpf_xdp_load_bytes).
        assert_eq!(refused_helper("0: (85) call unknown#189\ninvalid func unknown#189\nprocessed 12"), Some(189));
        // A helper the kernel has, not for this program type.
        assert_eq!(
            refused_helper("; 12: (85) call bpf_xdp_load_bytes#189\nunknown func bpf_xdp_load_bytes#189"),
            Some(189)
        );
        assert_eq!(refused_helper("R1 invalid mem access 'scalar'"), None);
        let text = explain_load_error("verifying program pcguard_ingress: invalid func unknown#189").unwrap();
        assert!(text.contains("bpf_xdp_load_bytes (#189, Linux 5.18)"), "{text}");
        let text = explain_load_error("invalid func unknown#160").unwrap();
        assert!(text.contains("bpf_ktime_get_coarse_ns (#160, Linux 5.11)"), "{text}");
        assert_eq!(explain_load_error("permission denied"), None);
        let text = explain_load_error("loading the eBPF object: failed to create map `EVENTS`").unwrap();
        assert!(text.contains("BPF_MAP_TYPE_RINGBUF, Linux 5.8"), "{text}");
        assert_eq!(explain_load_error("failed to create map `CONNTRACK`"), None);
    }

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(parse_version("6.1.0-18-amd64"), Some((6, 1)));
        assert_eq!(parse_version("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(parse_version("4.18.0-513.el8.x86_64"), Some((4, 18)));
        assert_eq!(parse_version("garbage"), None);
    }
}
