//! The policy's tables as the kernel reads them: DNS-learned addresses per
//! generation, and the switch between generations.

use anyhow::ensure;
use pcguard::dns::LearnedWrite;
use pcguard_common::{DIR_INGRESS, names, rule_counter_index};
use pcguard_testkit::frame::{TCP_SYN, icmp4_echo, tcp4};
use pcguard_tests::kernel::{
    CLIENT_PORT, CLOUD_HOST, HTTPS_PORT, LDAP_SERVER, OTHER_PORT, POLICY, SERVER, STRANGER, Verdict, WEB_PORT,
    WORKSTATION, v4_key,
};

use crate::{DROP, PASS, REPEAT, TC, XDP, case, check, rig::K, run, setup};

/// DNS-learned addresses (`LEARNED`, per generation): one lookup only when
/// a rule for the port allows a learnable class.
#[test]
fn learned_addresses() -> anyhow::Result<()> {
    let port = CLIENT_PORT + 40;
    let syn = |p: u16| tcp4(SERVER, CLOUD_HOST, p, HTTPS_PORT, TCP_SYN);
    let learn = |bits: Option<u32>| LearnedWrite { addr: CLOUD_HOST.into(), bits };
    let learned_flow = v4_key(SERVER, CLOUD_HOST, port + 2, HTTPS_PORT);
    run(vec![
        case("SYN to 443 of an unlearned address", TC, syn(port), DROP).into(),
        // The daemon writes a learned address into the active generation,
        // or into both around a reload: never into the inactive one alone.
        setup("learned in the inactive generation only (in the maps)", |k| {
            let other = k.active_generation()? ^ 1;
            let cloud = k.target.class("cloud");
            k.learned(other, CLOUD_HOST, Some(cloud))
        }),
        case("learned in the other generation only", TC, syn(port + 1), DROP).into(),
        // Static miss + LEARNED miss.
        case("dropped outbound SYN, learned lookup miss", TC, syn(port + 1), DROP).repeat(REPEAT).into(),
        // The learner's path: `Datapath::write_learned`.
        setup("learned in the active generation", move |k| {
            let cloud = k.target.class("cloud");
            let done = k.target.dp().write_learned(&[learn(Some(cloud))]);
            ensure!(done == [learn(Some(cloud))], "the learned address was not written: {done:?}");
            Ok(())
        }),
        case("SYN to 443 of a learned address", TC, syn(port + 2), PASS)
            .check(move |k| {
                let rule = k.ct_get(&learned_flow)?.0.rule;
                let ges = k.target.rule("ges");
                ensure!(rule == ges, "learned flow has rule {rule}, not ges's {ges}");
                Ok(())
            })
            .into(),
        setup("the address forgotten", move |k| {
            let done = k.target.dp().write_learned(&[learn(None)]);
            ensure!(done == [learn(None)], "the learned address was not removed: {done:?}");
            let other = k.active_generation()? ^ 1;
            k.learned(other, CLOUD_HOST, None)
        }),
        case("SYN to 443 after the address is forgotten", TC, syn(port + 3), DROP).into(),
    ])
}

/// The other policy of `generations`: it differs from `POLICY` in every
/// table. Port 9191 allows anyone (`SLOTS`); TCP 9999 opens to the
/// workstations (`PORTS`); workstations are 172.16.0.0/12 and 10.1.0.0/16,
/// not 10.0.0.0/8 (`PEERS_V4`); ICMP is not allowed (`SETTINGS`).
const OTHER_POLICY: &str = r#"
role = "primary"
interfaces = ["ktest0"]
mode = "enforce"
allow_icmp = false

[peers]
workstations = ["172.16.0.0/12", "10.1.0.0/16"]

[features]
web = false
device_rpc = false

[[rule]]
name = "site-web"
direction = "inbound"
protocol = "tcp"
ports = [9191]
peers = ["any"]

[[rule]]
name = "legacy-9999"
direction = "inbound"
protocol = "tcp"
ports = [9999]
peers = ["workstations"]

[conntrack]
tcp_timeout = "2h"
tcp_closing_timeout = 10
udp_timeout = 60
new_entries = 1024

[audit]
report_interval = 60
max_records_per_second = 1000
"#;

/// The switch between policy generations, by `Datapath::apply` and
/// `Datapath::switch_back`: a generation never written lets everything
/// pass; a policy written into the inactive generation changes nothing
/// until `ACTIVE` points at it, then every table (`PORTS`, `SLOTS`,
/// `PEERS_V4`, `SETTINGS`) answers from it, and switching back restores
/// the old verdicts.
#[test]
fn generations() -> anyhow::Result<()> {
    let port = CLIENT_PORT + 10;
    let packets = [
        ("workstation SYN to 9999", tcp4(WORKSTATION, SERVER, port, OTHER_PORT, TCP_SYN)),
        ("stranger SYN to 9191", tcp4(STRANGER, SERVER, port, WEB_PORT, TCP_SYN)),
        ("stranger SYN to 9999", tcp4(STRANGER, SERVER, port, OTHER_PORT, TCP_SYN)),
        ("10.9.9.9 SYN to 9999", tcp4(LDAP_SERVER, SERVER, port, OTHER_PORT, TCP_SYN)),
        ("ICMP echo", icmp4_echo(STRANGER, SERVER)),
    ];
    let keys = [
        v4_key(SERVER, WORKSTATION, OTHER_PORT, port),
        v4_key(SERVER, STRANGER, WEB_PORT, port),
        v4_key(SERVER, STRANGER, OTHER_PORT, port),
        v4_key(SERVER, LDAP_SERVER, OTHER_PORT, port),
    ];
    // Each packet opens a new flow: forget what an earlier run tracked.
    let all = |gen_name: &str, want: [Verdict; 5]| {
        let mut t = vec![setup(format!("forget the flows ({gen_name})"), move |k: &mut K| {
            keys.iter().try_for_each(|key| k.forget(key))
        })];
        for ((case_name, data), want) in packets.iter().zip(want) {
            t.push(case(format!("{case_name}, {gen_name}"), XDP, data.clone(), want).into());
        }
        t
    };
    let old = [DROP, DROP, DROP, DROP, PASS];
    let mut t = Vec::new();
    // A generation never written (`ready == 0`), like generation 0 before
    // the daemon's first switch: everything passes (bypass). The one the
    // apply switched away from is such a generation.
    t.push(setup("switch back to the generation never written", |k| k.target.dp().switch_back()));
    t.extend(all("generation not written", [PASS; 5]));
    t.push(setup("apply the policy again (its generation holds it)", |k| k.target.apply(POLICY)));
    t.extend(all("old policy", old));
    t.push(setup("the other policy written, not active", |k| {
        k.target.apply(OTHER_POLICY)?;
        k.target.dp().switch_back()
    }));
    t.extend(all("new policy written, not active", old));
    t.push(setup("the other policy active", |k| k.target.apply(OTHER_POLICY)));
    // 9999: the new `PORTS`; stranger to 9191: the new slot; 10.9.9.9 is
    // no workstation in the new `PEERS_V4` (it is in the old); ICMP: the
    // new `SETTINGS`.
    t.extend(all("new policy active", [PASS, PASS, PASS, DROP, DROP]));
    t.push(check("the new policy's rule counters", |k| {
        let rule = k.target.rule("legacy-9999");
        let n = k.allowed(names::RULE_COUNTERS, rule_counter_index(DIR_INGRESS, rule))?;
        ensure!(n == 2, "new policy's rule {rule} counted {n} allowed packets, expected 2");
        Ok(())
    }));
    t.push(setup("switch back", |k| k.target.dp().switch_back()));
    t.extend(all("switched back", old));
    t.push(setup("forget the flows", move |k| keys.iter().try_for_each(|key| k.forget(key))));
    run(t)
}
