//! Fuzzing the DNS reader and the answer matching (docs/fuzzing.md, "DNS
//! reader"): random messages, valid answers with bytes flipped, inserted,
//! deleted or overwritten with compression pointers, pointer loops and
//! chains, names over the limits. Every message must come back within a
//! time bound, without a panic, and whatever is accepted must satisfy the
//! reader's rules. Deterministic: a fixed seed (`PCGUARD_FUZZ_SEED` to
//! change it) and `PCGUARD_FUZZ_ITERS` iterations (20,000 by default).

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use pcguard_common::{DNS_KIND_ANSWER, DNS_KIND_QUERY};

use super::{
    queries::{QueryTable, Refused, Seen},
    wire::{self, HEADER_LEN, MAX_CNAMES, MAX_LABEL, MAX_NAME_WIRE, TYPE_A, TYPE_AAAA, TYPE_CNAME, WireError, build},
};

/// No message may take longer than this (a debug build on a busy 2-core
/// machine reads one in microseconds).
const PER_MESSAGE: Duration = Duration::from_millis(250);
/// The fuzzer is stuck if it makes no progress for this long.
const STALL: Duration = Duration::from_secs(20);

/// SplitMix64: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Valid answers to start from: chains, compression, both families.
fn seeds() -> Vec<Vec<u8>> {
    use build::*;
    vec![
        response(0x1111, "mf.cloud.papercut.com", TYPE_A, &[("@", TYPE_A, 300, a("203.0.113.7"))]),
        response(
            0x2222,
            "scan.papercut.com",
            TYPE_A,
            &[
                ("@", TYPE_CNAME, 60, [vec![4], b"edge".to_vec(), vec![0xc0, 12]].concat()),
                ("edge.scan.papercut.com", TYPE_A, 30, a("198.51.100.4")),
                ("edge.scan.papercut.com", TYPE_A, 0x8000_0001, a("198.51.100.5")),
            ],
        ),
        response(
            0x3333,
            "graph.microsoft.com",
            TYPE_AAAA,
            &[
                ("@", TYPE_CNAME, 300, name("graph.b.example.net")),
                ("graph.b.example.net", TYPE_CNAME, 300, name("c.example.net")),
                ("c.example.net", TYPE_AAAA, 300, aaaa("2001:db8::7")),
                ("c.example.net", TYPE_AAAA, 300, aaaa("2001:db8::8")),
            ],
        ),
        response(0x4444, "storage.googleapis.com", TYPE_A, &[]),
        build::query(0x5555, "mf.cloud.papercut.com", TYPE_A),
    ]
}

/// One mutation of `m`.
fn mutate(rng: &mut Rng, m: &mut Vec<u8>) {
    let pos = |rng: &mut Rng, m: &Vec<u8>| rng.below(m.len() + 1);
    match rng.below(9) {
        0 => {
            for _ in 0..1 + rng.below(4) {
                if !m.is_empty() {
                    let i = rng.below(m.len());
                    m[i] ^= 1 << rng.below(8);
                }
            }
        }
        1 => {
            let at = pos(rng, m);
            let n = 1 + rng.below(8);
            let bytes: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
            m.splice(at..at, bytes);
        }
        2 => {
            let at = pos(rng, m);
            let end = (at + 1 + rng.below(8)).min(m.len());
            m.drain(at..end);
        }
        3 => {
            // A compression pointer somewhere, to anywhere near.
            if m.len() >= 2 {
                let at = rng.below(m.len() - 1);
                let target = rng.below(m.len() + 16);
                m[at] = 0xc0 | ((target >> 8) as u8 & 0x3f);
                m[at + 1] = target as u8;
            }
        }
        4 => {
            // Counts: questions or answers.
            if m.len() >= HEADER_LEN {
                let i = 4 + 2 * rng.below(4);
                m[i] = if rng.chance(2) { 0 } else { rng.byte() };
                m[i + 1] = rng.byte() % 8;
            }
        }
        5 => {
            // A copy of one part of the message elsewhere.
            if !m.is_empty() {
                let from = rng.below(m.len());
                let to = (from + 1 + rng.below(32)).min(m.len());
                let part = m[from..to].to_vec();
                let at = pos(rng, m);
                m.splice(at..at, part);
            }
        }
        6 => m.truncate(rng.below(m.len() + 1)),
        7 => {
            // Flags: QR, opcode, TC, RCODE.
            if m.len() >= 4 {
                m[2] = rng.byte();
                m[3] = if rng.chance(2) { 0x80 } else { rng.byte() };
            }
        }
        _ => {
            // A length byte: a label longer or shorter than what follows.
            if !m.is_empty() {
                let i = HEADER_LEN.min(m.len() - 1) + rng.below(m.len().saturating_sub(HEADER_LEN).max(1));
                let i = i.min(m.len() - 1);
                m[i] = [0, 1, 63, 64, 0x80, 0xc0, rng.byte()][rng.below(7)];
            }
        }
    }
}

/// A header with one question and `an` answers, then `body`.
fn with_header(id: u16, an: u16, body: &[u8]) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend([0x81, 0x80, 0, 1]);
    m.extend(an.to_be_bytes());
    m.extend([0, 0, 0, 0]);
    m.extend(body);
    m
}

/// Hostile shapes that random mutation rarely builds.
fn crafted(rng: &mut Rng) -> Vec<u8> {
    let id = rng.next() as u16;
    match rng.below(5) {
        0 => {
            // A name that is a pointer to itself, or to the pointer after it.
            let target = HEADER_LEN + rng.below(3);
            with_header(id, 1, &[0xc0, target as u8, 0xc0, HEADER_LEN as u8, 0, 1, 0, 1])
        }
        1 => {
            // Two names pointing at each other, as question and answer owner.
            let mut body = vec![1, b'a', 0xc0, (HEADER_LEN + 8) as u8, 0, 1, 0, 1];
            body.extend([0xc0, HEADER_LEN as u8, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 1]);
            with_header(id, 1, &body)
        }
        2 => {
            // A CNAME whose target is the last of a chain of pointers, each
            // to the one before it, hidden in the data of a TXT record:
            // y -> (n + 1 jumps) -> x.
            let n = 1 + rng.below(200);
            let txt_data = HEADER_LEN + 7 + 10 + 2;
            let mut chain = vec![1, b'x', 0];
            for k in 0..n {
                let prev = if k == 0 { txt_data } else { txt_data + 3 + 2 * (k - 1) };
                chain.extend([0xc0 | (prev >> 8) as u8, prev as u8]);
            }
            let last = txt_data + 3 + 2 * (n - 1);
            let mut body = vec![1, b'y', 0, 0, 1, 0, 1];
            body.extend([0xc0, HEADER_LEN as u8, 0, 16, 0, 1, 0, 0, 0, 60]);
            body.extend((chain.len() as u16).to_be_bytes());
            body.extend(chain);
            body.extend([0xc0, HEADER_LEN as u8, 0, 5, 0, 1, 0, 0, 0, 60, 0, 2, 0xc0 | (last >> 8) as u8, last as u8]);
            body.extend([0xc0, txt_data as u8, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 9]);
            with_header(id, 3, &body)
        }
        3 => {
            // Long names: many labels of random lengths around the limits.
            let mut body = Vec::new();
            let labels = 1 + rng.below(140);
            for _ in 0..labels {
                let len = [1, 2, MAX_LABEL - 1, MAX_LABEL, MAX_LABEL + 1][rng.below(5)];
                body.push(len as u8);
                body.extend((0..len).map(|_| b'a' + rng.below(26) as u8));
            }
            body.push(0);
            body.extend([0, 1, 0, 1]);
            with_header(id, 0, &body)
        }
        _ => {
            // A CNAME loop or long chain of random length.
            let n = 1 + rng.below(2 * MAX_CNAMES);
            let names: Vec<String> = (0..n).map(|i| format!("n{i}.example")).collect();
            let next = |i: usize| if rng.chance(3) { names[0].clone() } else { names[(i + 1) % n].clone() };
            let targets: Vec<String> = (0..n).map(next).collect();
            let rrs: Vec<build::Rr> =
                (0..n).map(|i| (names[i].as_str(), TYPE_CNAME, 60, build::name(&targets[i]))).collect();
            build::response(id, &names[0], TYPE_A, &rrs)
        }
    }
}

/// The next message to try.
fn message(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    match rng.below(10) {
        0 => (0..rng.below(600)).map(|_| rng.byte()).collect(),
        1 => crafted(rng),
        _ => {
            let mut m = seeds[rng.below(seeds.len())].clone();
            for _ in 0..1 + rng.below(4) {
                mutate(rng, &mut m);
            }
            m
        }
    }
}

/// Bytes of a name in wire form, from its presentation form (labels split
/// at dots, `\DDD` one byte); also checks every label's length.
fn check_name(name: &str) -> usize {
    if name.is_empty() {
        return 1;
    }
    let mut total = 1;
    for label in name.split('.') {
        let escapes = label.matches('\\').count();
        let len = label.len() - 3 * escapes;
        assert!((1..=MAX_LABEL).contains(&len), "label {label:?} of {name:?}");
        total += 1 + len;
    }
    assert!(total <= MAX_NAME_WIRE, "{name:?} is {total} bytes");
    total
}

fn seen<'a>(kind: u8, payload: &'a [u8], cut: bool) -> Seen<'a> {
    Seen {
        kind,
        resolver: IpAddr::from([10, 0, 0, 53]),
        server_port: 40000,
        payload,
        cut,
        msg_len: payload.len() as u16,
        ts_ns: 1,
    }
}

/// What the messages did, to check that the fuzzer reaches every path.
#[derive(Default)]
struct Outcomes {
    accepted: u64,
    refused: HashSet<Refused>,
    errors: HashSet<WireError>,
}

/// Runs `m` through everything that reads DNS bytes and checks what is
/// accepted.
fn exercise(m: &[u8], rng: &mut Rng, seen_: &mut Outcomes) {
    if let Some((_, q)) = wire::parse_query(m) {
        check_name(&q.name);
    }
    for _ in 0..2 {
        if let Ok((name, end)) = wire::read_name(m, rng.below(m.len() + 2)) {
            check_name(&name);
            assert!(end <= m.len());
        }
    }
    // As an answer to a query for its own question (so that the reader
    // gets past the matching), and once cut.
    let Some(h) = wire::Header::read(m) else {
        let mut t = QueryTable::default();
        assert_eq!(t.answer(&seen(DNS_KIND_ANSWER, m, false)), Err(Refused::Malformed));
        return;
    };
    let question = match wire::read_question(m, HEADER_LEN) {
        Ok((q, pos)) => {
            if let Err(e) = wire::read_answers(m, pos, h.ancount, &q, false) {
                seen_.errors.insert(e);
            }
            Some(q)
        }
        Err(e) => {
            seen_.errors.insert(e);
            None
        }
    };
    for cut in [false, true] {
        let mut t = QueryTable::default();
        if let Some(q) = &question {
            let query = query_for(m, h.id);
            let recorded = t.query(&seen(DNS_KIND_QUERY, &query, false));
            assert_eq!(recorded, q.qclass == wire::CLASS_IN, "{q:?}");
        }
        let answer = t.answer(&seen(DNS_KIND_ANSWER, m, cut));
        if let Err(r) = answer {
            seen_.refused.insert(r);
        }
        if let Ok(a) = answer {
            assert!(h.is_response() && h.opcode() == 0 && !h.truncated() && h.rcode() == 0 && h.qdcount == 1);
            assert_eq!(Some(&a.question), question.as_ref());
            check_name(&a.question.name);
            for r in &a.records {
                assert!(r.ttl <= 0x7fff_ffff);
                assert!((1..=MAX_CNAMES + 1).contains(&r.names.len()));
                assert_eq!(r.names[0], a.question.name);
                r.names.iter().for_each(|n| {
                    check_name(n);
                });
                let want_v4 = a.question.qtype == TYPE_A;
                assert!(a.question.qtype == TYPE_A || a.question.qtype == TYPE_AAAA);
                assert_eq!(r.addr.is_ipv4(), want_v4);
            }
            assert!(t.is_empty(), "one answer per query");
            seen_.accepted += u64::from(!cut);
        }
    }
}

/// The query `m` (an answer) answers: its id and first question.
fn query_for(m: &[u8], id: u16) -> Vec<u8> {
    let mut query = build::query(id, "", TYPE_A);
    query.truncate(HEADER_LEN);
    query.extend(&m[HEADER_LEN..HEADER_LEN + question_len(m)]);
    query
}

/// Bytes of the first question of `m` (its name may be compressed).
fn question_len(m: &[u8]) -> usize {
    wire::read_question(m, HEADER_LEN).map(|(_, end)| end - HEADER_LEN).unwrap_or(0)
}

#[test]
fn the_dns_reader_survives_random_and_mutated_messages() {
    let iters = env_u64("PCGUARD_FUZZ_ITERS", 20_000);
    let seed = env_u64("PCGUARD_FUZZ_SEED", 0x5eed_d115);
    let progress = Arc::new(AtomicU64::new(0));
    let current = Arc::new(Mutex::new(Vec::new()));
    let (p, c) = (progress.clone(), current.clone());
    let worker = std::thread::spawn(move || {
        let mut rng = Rng(seed);
        let seeds = seeds();
        let mut outcomes = Outcomes::default();
        for i in 0..iters {
            let m = message(&mut rng, &seeds);
            *c.lock().unwrap() = m.clone();
            let start = Instant::now();
            let mut sub = Rng(rng.next());
            exercise(&m, &mut sub, &mut outcomes);
            let took = start.elapsed();
            assert!(took < PER_MESSAGE, "message {i} took {took:?}: {m:02x?}");
            p.store(i + 1, Ordering::Relaxed);
        }
        outcomes
    });
    let mut last = (0, Instant::now());
    while !worker.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
        let done = progress.load(Ordering::Relaxed);
        if done != last.0 {
            last = (done, Instant::now());
        }
        assert!(last.1.elapsed() < STALL, "stuck at message {done}: {:02x?}", current.lock().unwrap());
    }
    let outcomes = match worker.join() {
        Ok(o) => o,
        Err(e) => std::panic::resume_unwind(e),
    };
    // The mutations keep enough messages valid that the deep paths run,
    // and reach every way of refusing one.
    let accepted = outcomes.accepted;
    assert!(accepted * 50 >= iters, "only {accepted} of {iters} messages were accepted answers");
    if iters >= 20_000 {
        use WireError::*;
        for e in [Short, BadLabel, NameTooLong, BadPointer, BadData, BadChain] {
            assert!(outcomes.errors.contains(&e), "no message failed with {e:?}");
        }
        use Refused::*;
        for r in [NoQuery, Header, Truncated, QuestionCount, Rcode, Malformed] {
            assert!(outcomes.refused.contains(&r), "no answer refused as {r:?}");
        }
    }
}

/// Random sequences of queries and answers behave like a plain map of
/// outstanding queries (no timeouts or evictions at this size).
#[test]
fn the_query_table_matches_a_model_of_outstanding_queries() {
    let mut rng = Rng(env_u64("PCGUARD_FUZZ_SEED", 0x5eed_d115) ^ 1);
    let mut t = QueryTable::default();
    let mut model: HashMap<(u16, u16), String> = HashMap::new();
    let names = ["mf.cloud.papercut.com", "a.papercut.com", "graph.microsoft.com"];
    let steps = env_u64("PCGUARD_FUZZ_ITERS", 20_000) / 4;
    for _ in 0..steps {
        let (port, id) = (40000 + rng.below(4) as u16, rng.below(8) as u16);
        let name = names[rng.below(names.len())];
        let mut s = seen(DNS_KIND_QUERY, &[], false);
        s.server_port = port;
        if rng.chance(2) {
            let q = build::query(id, name, TYPE_A);
            s.payload = &q;
            assert!(t.query(&s));
            model.insert((port, id), name.to_string());
        } else {
            let a = build::response(id, name, TYPE_A, &[("@", TYPE_A, 60, build::a("203.0.113.9"))]);
            s.kind = DNS_KIND_ANSWER;
            s.payload = &a;
            let got = t.answer(&s);
            let want = match model.remove(&(port, id)) {
                None => Err(Refused::NoQuery),
                Some(asked) if asked != name => Err(Refused::QuestionMismatch),
                Some(_) => Ok(()),
            };
            assert_eq!(got.map(|_| ()), want);
        }
        assert_eq!(t.len(), model.len());
    }
}
