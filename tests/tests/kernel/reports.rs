//! Reports: one per (source, destination port, reason) per interval, with
//! the count of what it stands for; at most `event_rate` per second per
//! CPU; `REPORTED`'s sets of two keys.

use std::{cell::Cell, rc::Rc, time::Duration};

use anyhow::{Context as _, ensure};
use pcguard_common::{
    DIR_INGRESS, FAMILY_V4, IPPROTO_TCP, REASON_NO_RULE, ReportKey, STAT_EVENTS_RATE_LIMITED, VERDICT_DROP, report_set,
};
use pcguard_testkit::frame::{TCP_SYN, tcp4};
use pcguard_tests::kernel::SERVER;

use crate::{Check, DROP, XDP, case, check, run, setup};

#[test]
fn reports_and_budget() -> anyhow::Result<()> {
    let stranger = [172, 16, 0, 5];
    let mut t = Vec::new();
    // 100 source ports of one address to one denied port: one report.
    for i in 0..100u16 {
        let c = case("one source, many ports", XDP, tcp4(stranger, SERVER, 2000 + i, 9997, TCP_SYN), DROP);
        t.push(if i == 99 { c.then(Check::Events(1)) } else { c }.into());
    }
    // The config's report interval is whole seconds; 1 ns is written.
    t.push(setup("report_interval = 1 ns in the maps", |k| {
        k.update_settings(|s| s.report_interval_ns = 1)?;
        // The programs' clock is the coarse one (a tick is a few ms).
        std::thread::sleep(Duration::from_millis(20));
        Ok(())
    }));
    // Past the interval, the next report counts the 99 in between.
    t.push(
        case("after the interval", XDP, tcp4(stranger, SERVER, 3000, 9997, TCP_SYN), DROP)
            .check(|k| {
                k.drain_events()?;
                let last = k.events.last().context("no report after the interval")?;
                ensure!(
                    k.events.len() == 2 && last.repeats == 99,
                    "second report: {} in all, repeats {}",
                    k.events.len(),
                    last.repeats
                );
                Ok(())
            })
            .into(),
    );
    // A budget of 3 events: 10 new sources, 3 reports, 7 counted. The
    // config's budget is the machine's, divided between the CPUs by the
    // datapath: a per-CPU budget of 3 is written.
    let limited = Rc::new(Cell::new(0));
    let saved = Rc::new(Cell::new(None));
    let (before, keep) = (limited.clone(), saved.clone());
    t.push(setup("event_rate = event_burst = 3 in the maps", move |k| {
        keep.set(Some(k.settings()?));
        before.set(k.stat(STAT_EVENTS_RATE_LIMITED)?);
        k.update_settings(|s| {
            s.event_rate = 3;
            s.event_burst = 3;
        })
    }));
    for i in 0..10u8 {
        let c = case("ten sources, budget of three", XDP, tcp4([172, 16, 1, i], SERVER, 4000, 9996, TCP_SYN), DROP);
        let limited = limited.clone();
        t.push(
            if i == 9 {
                c.check(move |k| {
                    let sent = k.drain_events()?;
                    let limited = k.stat(STAT_EVENTS_RATE_LIMITED)? - limited.get();
                    ensure!((sent, limited) == (3, 7), "budget of 3: {sent} reports sent, {limited} rate-limited");
                    Ok(())
                })
            } else {
                c
            }
            .into(),
        );
    }
    t.push(setup("settings restored", move |k| {
        let s = saved.get().context("no saved settings")?;
        k.update_settings(|now| {
            now.event_rate = s.event_rate;
            now.event_burst = s.event_burst;
            now.report_interval_ns = s.report_interval_ns;
        })
    }));
    run(t)
}

/// `REPORTED` holds two keys per set: three sources whose keys share a
/// set, and the third evicts the older of the first two, which is then
/// reported again; the other stays suppressed.
#[test]
fn report_sets() -> anyhow::Result<()> {
    let port = 9995;
    let key = |addr: [u8; 4]| {
        let mut remote_addr = [0; 16];
        remote_addr[..4].copy_from_slice(&addr);
        ReportKey {
            family: FAMILY_V4,
            proto: IPPROTO_TCP,
            direction: DIR_INGRESS as u8,
            reason: REASON_NO_RULE,
            port,
            verdict: VERDICT_DROP as u8,
            _pad: 0,
            remote_addr,
        }
    };
    // Three addresses of 172.17.0.0/16 in one set (there are many).
    let mut by_set = std::collections::HashMap::<u32, Vec<[u8; 4]>>::new();
    let same = (0..=u16::MAX)
        .map(|i| [172, 17, (i >> 8) as u8, i as u8])
        .find_map(|a| {
            let v = by_set.entry(report_set(&key(a).words())).or_default();
            v.push(a);
            (v.len() == 3).then(|| v.clone())
        })
        .context("no three addresses share a set")?;
    let (a, b, c) = (same[0], same[1], same[2]);
    let step = |what: &str, src: [u8; 4], want: usize| {
        let c = case(what, XDP, tcp4(src, SERVER, 5000, port, TCP_SYN), DROP).then(Check::Events(want));
        if want == 1 {
            c.check(move |k| {
                let e = k.events.last().context("no event")?;
                ensure!(e.key.remote_addr[..4] == src, "report of {:?}", &e.key.remote_addr[..4]);
                Ok(())
            })
        } else {
            c
        }
        .into()
    };
    run(vec![
        check("no event yet", |k| {
            ensure!(k.drain_events()? == 0, "events before the first packet");
            Ok(())
        }),
        step("first key of a set", a, 1),
        step("second key of the set", b, 1),
        step("first key again (held)", a, 0),
        step("third key evicts the older", c, 1),
        step("second key still held", b, 0),
        step("evicted key is reported again", a, 1),
    ])
}
