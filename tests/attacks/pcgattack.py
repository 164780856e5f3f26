#!/usr/bin/python3
"""Crafted frames against pcguard, for tests/tests/adversarial.rs.

Run inside the attacker's network namespace, with a JSON spec on stdin:

    {"iface": "eth0", "run": "a1", "first_id": 0, "settle_ms": 25,
     "me":     {"mac": "..", "v4": "10.77.0.5", "v6": "fd77::5"},
     "victim": {"mac": "..", "v4": "10.77.0.1", "v6": "fd77::1",
                "net_dir": "/proc/<pid of a process in the victim's namespace>/net"},
     "ports":  {"tcp_denied": [22, 7777], "udp_denied": 7777,
                "tcp_allowed": 9191, "udp_allowed": 7000, "service": [389]},
     "vxlan":  {"mac": "..", "v4": "10.78.0.1", "src_v4": "10.78.0.2"},   (optional)
     "groups": ["ipv4", ...]}

Every frame is built byte by byte (no checksum or length is fixed up behind
our back) and sent with an AF_PACKET socket on `iface`: from a peer it
arrives at the server's XDP hook as written (after the lab bridge), from
the server it goes through pcguard's TC egress hook.

Each case gets a marker (`pcgadv-<run>-<id>`) carried in every UDP payload
and TCP data byte it sends, so a listener can tell which case reached it.
A case that opens a TCP connection (the victim's kernel would see a SYN)
is completed if the victim answers: the victim's SYN+ACK is acknowledged
and the marker sent as data, wrapped like the opening (same VLAN tags,
same IPv6 extension headers), so that a listener's accept() returns if,
and only if, the firewall let the handshake through. (The test drops the
attacker kernel's own RSTs with nftables so that they do not abort it.)

Cases run one after another; around each one the victim namespace's
/proc/net/snmp and /proc/net/snmp6 are read, and the victim's TCP, UDP
and ICMP-error answers seen on `iface` during the case are recorded.
Output: one JSON document, a list of case results, on stdout.
"""

import json
import socket
import struct
import sys
import threading
import time

from scapy.layers import inet, inet6  # noqa: F401 (binds IP, TCP, UDP, IPv6 for decoding)
from scapy.layers.l2 import Ether

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
PACKET_OUTGOING = 4

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80

HOP, TCP, UDP, IPV6_IN, ROUTING, FRAGMENT, GRE, ESP, AH, ICMPV6, NONE, DEST = (
    0, 6, 17, 41, 43, 44, 47, 50, 51, 58, 59, 60)
ICMP, IPIP, SCTP = 1, 4, 132

# Every TCP flag combination sent as a fake reply or to a denied port.
# Reply-like ones first: pcguard reports a flow once per interval, by its
# first packet (a fake reply is reported as `untracked_reply`).
FLAG_COMBOS = [
    ("ACK", ACK), ("SYN+ACK", SYN | ACK), ("PSH+ACK", PSH | ACK),
    ("FIN+ACK", FIN | ACK), ("RST", RST), ("RST+ACK", RST | ACK), ("FIN", FIN),
    ("URG+ACK", URG | ACK), ("NULL", 0), ("Xmas", FIN | PSH | URG),
    ("SYN+FIN", SYN | FIN), ("SYN+RST", SYN | RST), ("SYN", SYN), ("SYN+URG", SYN | URG),
    ("SYN+ECE+CWR", SYN | ECE | CWR),
]


def is_opening(flags):
    """A segment a listening socket answers with SYN+ACK (Linux LISTEN state)."""
    return flags & (SYN | ACK | RST | FIN) == SYN


# ----------------------------------------------------------------------------
# Byte-level builders


def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def addr_bytes(a):
    return socket.inet_pton(socket.AF_INET6 if ":" in a else socket.AF_INET, a)


def l4_csum(src, dst, proto, seg):
    if ":" in src:
        pseudo = addr_bytes(src) + addr_bytes(dst) + struct.pack("!IxxxB", len(seg), proto)
    else:
        pseudo = addr_bytes(src) + addr_bytes(dst) + struct.pack("!xBH", proto, len(seg))
    return csum(pseudo + seg)


def tcp_seg(src, dst, sport, dport, flags, seq=0, ack=0, data=b"", opts=b""):
    doff = 5 + len(opts) // 4
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, doff << 4, flags, 64240, 0, 0) + opts
    seg = hdr + data
    c = l4_csum(src, dst, TCP, seg)
    return seg[:16] + struct.pack("!H", c) + seg[18:]


def udp_dgram(src, dst, sport, dport, data, length=None):
    ulen = 8 + len(data) if length is None else length
    d = struct.pack("!HHHH", sport, dport, ulen, 0) + data
    c = l4_csum(src, dst, UDP, d) or 0xFFFF
    return d[:6] + struct.pack("!H", c) + d[8:]


def icmp_echo(data=b"pcgadv"):
    m = struct.pack("!BBHHH", 8, 0, 0, 0x4242, 1) + data
    return m[:2] + struct.pack("!H", csum(m)) + m[4:]


def icmp6_echo(src, dst, data=b"pcgadv"):
    m = struct.pack("!BBHHH", 128, 0, 0, 0x4242, 1) + data
    return m[:2] + struct.pack("!H", l4_csum(src, dst, ICMPV6, m)) + m[4:]


def ipv4(src, dst, proto, payload, ident=0, mf=False, off8=0, opts=b"", total=None, ihl=None, df=False):
    """An IPv4 header (checksum computed) and `payload`; `total`/`ihl` override the lengths."""
    hl = 5 + len(opts) // 4 if ihl is None else ihl
    tot = 20 + len(opts) + len(payload) if total is None else total
    frag = (0x4000 if df else 0) | (0x2000 if mf else 0) | off8
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | hl, 0, tot, ident, frag, 64, proto, 0,
                      addr_bytes(src), addr_bytes(dst)) + opts
    return hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:] + payload


def ipv6(src, dst, nh, payload, plen=None):
    p = len(payload) if plen is None else plen
    return struct.pack("!IHBB", 0x60000000, p, nh, 64) + addr_bytes(src) + addr_bytes(dst) + payload


def opt_ext(nh, hdrlen, fill):
    """Hop-by-hop or destination options header of (hdrlen+1)*8 bytes: one
    unknown option of type 0x1e (skip if unknown) holding `fill`."""
    n = (hdrlen + 1) * 8
    data = (fill * n)[: n - 4]
    return bytes([nh, hdrlen, 0x1E, len(data)]) + data


def rt_ext(nh, hdrlen, fill, segleft=0, rtype=0):
    """Routing header; with segments left 0 the receiver skips it."""
    n = (hdrlen + 1) * 8
    return bytes([nh, hdrlen, rtype, segleft]) + (fill * n)[: n - 4]


def frag_ext(nh, off8=0, more=False, ident=0):
    return struct.pack("!BBHI", nh, 0, (off8 << 3) | (1 if more else 0), ident)


def chain(kinds, last, fill, ident=0):
    """Extension headers of `kinds` (("hop"|"dst"|"rt", hdrlen) or ("frag",
    off8, more)), the last one pointing at `last`. Returns (first nh, bytes)."""
    codes = {"hop": HOP, "dst": DEST, "rt": ROUTING, "frag": FRAGMENT}
    out = b""
    for i, k in enumerate(kinds):
        nh = codes[kinds[i + 1][0]] if i + 1 < len(kinds) else last
        if k[0] == "frag":
            out += frag_ext(nh, k[1], k[2], ident)
        elif k[0] == "rt":
            out += rt_ext(nh, k[1], fill)
        else:
            out += opt_ext(nh, k[1], fill)
    return (codes[kinds[0][0]] if kinds else last), out


# ----------------------------------------------------------------------------
# Cases


class Case:
    def __init__(self, cid, group, name, family, proto, sport, dport, marker):
        self.id, self.group, self.name = cid, group, name
        self.family, self.proto, self.sport, self.dport = family, proto, sport, dport
        self.marker = marker
        self.frames = []
        # For a TCP opening: the sequence number of its SYN and how to wrap
        # the segments that complete the handshake.
        self.seq = None
        self.wrap = None
        self.synack = False
        self.completed = False
        self.answers = []
        self.delta = {}
        # Sequence and acknowledgement numbers the case's TCP segments carry
        # (to tell which case a victim's answer is for).
        self.sent_seq = None
        self.sent_ack = None
        # Runs instead of / before sending frames (socket-based controls).
        self.special = None
        self.send_errors = []

    def result(self):
        return {
            "id": self.id, "group": self.group, "name": self.name, "family": self.family,
            "proto": self.proto, "sport": self.sport, "dport": self.dport, "marker": self.marker,
            "opening": self.seq is not None, "synack": self.synack, "completed": self.completed,
            "answers": self.answers, "delta": self.delta, "send_errors": self.send_errors,
            "frames": [f.hex() for f in self.frames[:4]],
            "scapy": [describe(f) for f in self.frames[:4]],
        }


def describe(frame):
    try:
        return repr(Ether(frame))
    except Exception as e:  # scapy cannot decode it: the hex says it all
        return "undecodable by scapy: %s" % e


class Attack:
    def __init__(self, spec):
        self.spec = spec
        self.iface = spec["iface"]
        self.me, self.victim = spec["me"], spec["victim"]
        self.ports = spec["ports"]
        self.src_mac = bytes.fromhex(self.me["mac"].replace(":", ""))
        self.dst_mac = bytes.fromhex(self.victim["mac"].replace(":", ""))
        self.next_id = spec.get("first_id", 0)
        self.cases = []

    # -- plumbing ----------------------------------------------------------

    def case(self, group, name, family, proto, sport, dport):
        c = Case(self.next_id, group, name, family, proto, sport, dport,
                 "pcgadv-%s-%d" % (self.spec["run"], self.next_id))
        self.next_id += 1
        c.sent_seq, c.sent_ack = self.seq_of(c), self.ack_of(c)
        self.cases.append(c)
        return c

    def addrs(self, family):
        k = "v4" if family == 4 else "v6"
        return self.me[k], self.victim[k]

    def eth(self, ethertype, payload, tags=(), dst=None):
        out = (dst or self.dst_mac) + self.src_mac
        for tpid, vid in tags:
            out += struct.pack("!HH", tpid, vid & 0x0FFF)
        return out + struct.pack("!H", ethertype) + payload

    def ident(self, c):
        return (c.id * 2654435761 + 12345) & 0xFFFF

    def seq_of(self, c):
        return (c.id * 7919 * 4096 + 1000) & 0xFFFFFFFF

    def ack_of(self, c):
        return self.seq_of(c) ^ 0x5A5A5A5A

    def data(self, c):
        return (c.marker + "\n").encode()

    def ip(self, family, proto, payload, c, **kw):
        """An unfragmented IP packet (plus `kw` IPv4 header overrides)."""
        src, dst = self.addrs(family)
        if family == 4:
            return ipv4(src, dst, proto, payload, ident=self.ident(c), **kw)
        return ipv6(src, dst, proto, payload)

    def plain_wrap(self, family, tags=(), kinds=()):
        """Wraps a TCP segment in IP (with IPv6 extension headers `kinds`) and
        Ethernet (with VLAN `tags`): how a case's handshake is completed."""
        def wrap(seg, c):
            src, dst = self.addrs(family)
            if family == 4:
                return self.eth(ETH_P_IP, ipv4(src, dst, TCP, seg, ident=self.ident(c) ^ 0x8000), tags)
            nh, ext = chain(kinds, TCP, self.fill_tcp())
            return self.eth(ETH_P_IPV6, ipv6(src, dst, nh, ext + seg), tags)
        return wrap

    def opening(self, c, family, sport, dport, flags=SYN, tags=(), kinds=()):
        """The SYN of case `c` and how to complete its handshake."""
        src, dst = self.addrs(family)
        c.seq = self.seq_of(c)
        c.wrap = self.plain_wrap(family, tags, kinds)
        return tcp_seg(src, dst, sport, dport, flags, seq=c.seq)

    def fill_tcp(self):
        """Decoy bytes for option data and padding: read as a TCP or UDP header
        at any even offset, they name the allowed port (or 9191) both ways."""
        p = self.ports.get("tcp_allowed") or 9191
        return struct.pack("!HH", p, p)

    def fill_udp(self):
        p = self.ports.get("udp_allowed") or 9191
        return struct.pack("!HH", p, p)

    def denied_tcp(self):
        return self.ports["tcp_denied"]

    def sport(self, c):
        return 20000 + c.id % 40000

    # -- sending and watching ---------------------------------------------

    def run(self):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind((self.iface, ETH_P_ALL))
        self.tx = sock
        watcher = Watcher(self, self.iface)
        watcher.start()
        settle = self.spec.get("settle_ms", 25) / 1000.0
        # Controls wait for their handshake; attacks only settle.
        wait = self.spec.get("handshake_wait_ms", 0) / 1000.0
        for c in self.cases:
            before = self.counters()
            watcher.current = c
            if c.seq is not None:
                watcher.openings[(c.sport, c.dport, (c.seq + 1) & 0xFFFFFFFF)] = c
            if c.special:
                c.special(c)
            for f in c.frames:
                try:
                    sock.send(f)
                except OSError as e:
                    # From the server: pcguard's TC hook dropped it
                    # (TC_ACT_SHOT reaches a packet socket as ENOBUFS).
                    c.send_errors.append(e.strerror)
            start = time.time()
            time.sleep(settle)
            while c.seq is not None and not c.completed and time.time() < start + wait:
                time.sleep(0.01)
            if c.synack:
                time.sleep(0.05)  # the data segment lands
            watcher.current = None
            after = self.counters()
            c.delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        time.sleep(0.2)
        watcher.stop = True
        watcher.join()
        return [c.result() for c in self.cases]

    def counters(self):
        net = self.victim.get("net_dir")
        if not net:
            return {}
        return read_snmp(net)


def read_snmp(net_dir):
    """/proc/net/snmp and snmp6 of the namespace whose `net` dir this is, as
    {"Tcp.InSegs": n, "Ip6.ReasmOKs": n, ...}."""
    out = {}
    with open(net_dir + "/snmp") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        proto = names.split(":")[0]
        for k, v in zip(names.split()[1:], values.split()[1:]):
            out[proto + "." + k] = int(v)
    with open(net_dir + "/snmp6") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2:
                name = parts[0]
                for prefix in ("Ip6", "Icmp6", "UdpLite6", "Udp6"):
                    if name.startswith(prefix):
                        out[prefix + "." + name[len(prefix):]] = int(parts[1])
                        break
    return out


class Watcher(threading.Thread):
    """Reads what arrives on the attacker's interface: records the victim's
    answers (with the case they answer, by sequence numbers, else the case
    being sent) and completes handshakes."""

    def __init__(self, attack, iface):
        super().__init__(daemon=True)
        self.attack = attack
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((iface, ETH_P_ALL))
        self.sock.settimeout(0.05)
        self.current = None
        self.stop = False
        self.openings = {}
        self.victim_ips = {attack.victim["v4"], attack.victim["v6"]}
        if attack.spec.get("vxlan"):
            self.victim_ips.add(attack.spec["vxlan"]["v4"])

    def run(self):
        while not self.stop:
            try:
                data, addr = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            if addr[2] == PACKET_OUTGOING:
                continue
            try:
                self.handle(data)
            except Exception as e:  # a frame scapy cannot decode: note it, go on
                if self.current is not None:
                    self.current.answers.append("undecodable frame %s: %s" % (data.hex(), e))

    def owner(self, sport, dport, seq, ack):
        """The case a TCP answer belongs to: its SYN+ACK or RST acknowledges
        the case's sequence number, or its RST carries the case's ack."""
        for c in reversed(self.attack.cases):
            if c.sport == dport and c.dport == sport and c.sent_seq is not None and (
                    (ack - c.sent_seq) & 0xFFFFFFFF < 4096 or seq == c.sent_ack):
                return c
        return self.current

    def handle(self, data):
        pkt = Ether(data)
        ip = pkt.getlayer("IP") or pkt.getlayer("IPv6")
        if ip is None or ip.src not in self.victim_ips:
            return
        c = self.current
        err = None
        if pkt.haslayer("ICMP") and pkt.getlayer("ICMP").type not in (0, 8):
            ic = pkt.getlayer("ICMP")
            err = "icmp %s type %d code %d" % (ip.src, ic.type, ic.code)
        for layer in ("ICMPv6DestUnreach", "ICMPv6ParamProblem", "ICMPv6TimeExceeded", "ICMPv6PacketTooBig"):
            if pkt.haslayer(layer):
                err = "icmp6 %s %s" % (ip.src, layer)
        if err:
            # Quoting one of our packets: it reached the victim's stack.
            if c is not None:
                c.answers.append(err)
            return
        t = pkt.getlayer("TCP")
        if t is not None:
            what = "tcp %s:%d > %d %s seq=%d ack=%d" % (ip.src, t.sport, t.dport, t.flags, t.seq, t.ack)
            o = self.openings.get((t.dport, t.sport, t.ack)) if int(t.flags) & (SYN | ACK) == SYN | ACK else None
            if o is not None:
                o.answers.append(what)
                if not o.synack:
                    o.synack = True
                    self.complete(o, t.seq)
                return
            o = self.owner(t.sport, t.dport, t.seq, t.ack)
            if o is not None:
                o.answers.append(what)
            return
        u = pkt.getlayer("UDP")
        if u is not None and c is not None:
            c.answers.append("udp %s:%d > %d" % (ip.src, u.sport, u.dport))

    def complete(self, c, their_seq):
        a = self.attack
        src, dst = a.addrs(c.family)
        seq, ack = (c.seq + 1) & 0xFFFFFFFF, (their_seq + 1) & 0xFFFFFFFF
        try:
            a.tx.send(c.wrap(tcp_seg(src, dst, c.sport, c.dport, ACK, seq, ack), c))
            a.tx.send(c.wrap(tcp_seg(src, dst, c.sport, c.dport, PSH | ACK, seq, ack, a.data(c)), c))
        except OSError as e:
            c.send_errors.append("completing the handshake: %s" % e.strerror)
            return
        c.completed = True


# ----------------------------------------------------------------------------
# Groups. Each adds cases; ports come from the spec.


def g_tcp_flags(a, group="tcp-flags"):
    """Every flag combination to every denied TCP port, IPv4 and IPv6."""
    for fam in (4, 6):
        for dport in a.denied_tcp():
            for name, flags in FLAG_COMBOS:
                c = a.case(group, "%s to %d" % (name, dport), fam, "tcp", 0, dport)
                c.sport = a.sport(c)
                src, dst = a.addrs(fam)
                if is_opening(flags):
                    seg = a.opening(c, fam, c.sport, dport, flags)
                else:
                    data = a.data(c) if flags & PSH else b""
                    seg = tcp_seg(src, dst, c.sport, dport, flags, seq=a.seq_of(c), ack=a.ack_of(c), data=data)
                c.frames = [a.eth(ETH_P_IP if fam == 4 else ETH_P_IPV6, a.ip(fam, TCP, seg, c))]


def g_fake_replies(a):
    """Class 4: non-SYN "replies" from the service port of a rule that allows
    flows the other way (LDAP 389, database 5432, MFD 7627/80/443 to the
    server; 9191.. from the server), every flag combination, to every
    denied TCP port; plus, from the same ports, openings that hide the SYN
    (tiny IPv4 fragment with a fake ACK tail, VLAN tags, IPv6 split chain)."""
    for sport in a.ports["service"]:
        for fam in (4, 6):
            for dport in a.denied_tcp():
                for name, flags in FLAG_COMBOS:
                    c = a.case("fake-replies", "%s %d->%d" % (name, sport, dport), fam, "tcp", sport, dport)
                    src, dst = a.addrs(fam)
                    if is_opening(flags):
                        seg = a.opening(c, fam, sport, dport, flags)
                    else:
                        data = a.data(c) if flags & PSH else b""
                        seg = tcp_seg(src, dst, sport, dport, flags, seq=a.seq_of(c), ack=a.ack_of(c), data=data)
                    c.frames = [a.eth(ETH_P_IP if fam == 4 else ETH_P_IPV6, a.ip(fam, TCP, seg, c))]
            # The SYN hidden from the firewall. Each way gets its own port (the
            # 4-tuple of a connection that got through stays in use).
            for dport in a.denied_tcp():
                tiny_fragment_syn(a, "fake-replies", fam, sport, dport, ACK)
            spare = a.ports.get("tcp_spare") or a.denied_tcp()
            tags = [(ETH_P_8021Q, 0)] * 4
            dport = spare[0]
            c = a.case("fake-replies", "SYN %d->%d in 4 VID-0 tags" % (sport, dport), fam, "tcp", sport, dport)
            seg = a.opening(c, fam, sport, dport, tags=tags)
            c.frames = [a.eth(ETH_P_IP if fam == 4 else ETH_P_IPV6, a.ip(fam, TCP, seg, c), tags)]
        spare = a.ports.get("tcp_spare") or a.denied_tcp()
        split_chain_syn(a, "fake-replies", sport, spare[-1], "icmp")


def tiny_fragment_syn(a, group, fam, sport, dport, tail_flags, tail=True):
    """Class 1: a first fragment with only the first 8 bytes of a SYN's TCP
    header, a fake rest of the header (flags `tail_flags`) after the end of
    the datagram, and the real rest in a second fragment at offset 1."""
    tail_name = "+".join(n for n, f in [("SYN", SYN), ("ACK", ACK), ("RST", RST), ("FIN", FIN)] if tail_flags & f)
    name = "tiny first fragment %d->%d, %s" % (sport, dport, "fake %s tail" % tail_name if tail else "no tail")
    c = a.case(group, name, fam, "tcp", sport, dport)
    if sport == 0:
        c.sport = sport = a.sport(c)
    src, dst = a.addrs(fam)
    syn = a.opening(c, fam, sport, dport)
    fake = tcp_seg(src, dst, sport, dport, tail_flags, seq=c.seq, ack=a.ack_of(c))
    fake_tail = fake[8:20] if tail else b""
    if fam == 4:
        f1 = ipv4(src, dst, TCP, syn[:8], ident=a.ident(c), mf=True) + fake_tail
        f2 = ipv4(src, dst, TCP, syn[8:], ident=a.ident(c), off8=1)
        c.frames = [a.eth(ETH_P_IP, f1), a.eth(ETH_P_IP, f2)]
    else:
        ident = 0x50000000 + c.id
        f1 = ipv6(src, dst, FRAGMENT, frag_ext(TCP, 0, True, ident) + syn[:8]) + fake_tail
        f2 = ipv6(src, dst, FRAGMENT, frag_ext(TCP, 1, False, ident) + syn[8:])
        c.frames = [a.eth(ETH_P_IPV6, f1), a.eth(ETH_P_IPV6, f2)]
    c.wrap = a.plain_wrap(fam)
    return c


def split_chain_syn(a, group, sport, dport, decoy):
    """Class 2 for TCP: the first fragment ends after the first of two
    destination options headers; the second, with the TCP SYN, is in
    fragment 2. `decoy` (after the first fragment's payload) is what a
    parser reading past the payload would find."""
    c = a.case(group, "IPv6 split chain SYN %d->%d, %s decoy" % (sport, dport, decoy), 6, "tcp", sport, dport)
    if sport == 0:
        c.sport = sport = a.sport(c)
    src, dst = a.addrs(6)
    seg = a.opening(c, 6, sport, dport)
    c.frames = split_chain_frames(a, c, TCP, seg, decoy)
    c.wrap = a.plain_wrap(6)


def decoy_bytes(a, c, kind, proto_after):
    """What follows a first fragment's payload, for a parser that reads on:
    a destination options header then ICMPv6 (passed as ICMP), a fragment
    header with a non-zero offset (passed as a later fragment), or the
    transport header to the allowed port."""
    src, dst = a.addrs(6)
    if kind == "icmp":
        return opt_ext(ICMPV6, 0, b"\0") + icmp6_echo(src, dst)
    if kind == "later-fragment":
        return opt_ext(FRAGMENT, 0, b"\0") + frag_ext(proto_after, 100, False, 7) + b"\0" * 16
    if kind == "allowed-port":
        if proto_after == UDP:
            return opt_ext(UDP, 0, b"\0") + udp_dgram(src, dst, c.sport, a.ports.get("udp_allowed") or 9191, b"x" * 8)
        return opt_ext(TCP, 0, b"\0") + tcp_seg(src, dst, c.sport, a.ports.get("tcp_allowed") or 9191, SYN)
    raise ValueError(kind)


def split_chain_frames(a, c, proto, l4, decoy, reverse=False):
    src, dst = a.addrs(6)
    ident = 0x50000000 + c.id
    first = opt_ext(DEST, 0, b"\0")           # 8 bytes, next header: another DEST
    rest = opt_ext(proto, 0, b"\0") + l4       # fragment 2: the chain's end and L4
    f1 = ipv6(src, dst, FRAGMENT, frag_ext(DEST, 0, True, ident) + first) + decoy_bytes(a, c, decoy, proto)
    f2 = ipv6(src, dst, FRAGMENT, frag_ext(DEST, 1, False, ident) + rest)
    frames = [a.eth(ETH_P_IPV6, f1), a.eth(ETH_P_IPV6, f2)]
    return frames[::-1] if reverse else frames


def g_ipv4(a):
    """IPv4 headers, lengths, options, fragments, other protocols."""
    U, T = a.ports["udp_denied"], a.denied_tcp()
    src, dst = a.addrs(4)

    def udp_case(group, name, build):
        c = a.case(group, name, 4, "udp", 0, U)
        c.sport = a.sport(c)
        c.frames = build(c, udp_dgram(src, dst, c.sport, U, a.data(c)))
        return c

    def syn_case(group, name, dport, build):
        c = a.case(group, name, 4, "tcp", 0, dport)
        c.sport = a.sport(c)
        seg = a.opening(c, 4, c.sport, dport)
        c.frames = build(c, seg)
        return c

    # IP options: IHL 6..15.
    options = {
        "IHL 6 (4 NOPs)": b"\x01" * 4,
        "IHL 8 (record route)": bytes([7, 11, 4]) + b"\0" * 8 + b"\0",
        "IHL 15 (timestamp, 40 bytes)": bytes([68, 40, 5, 0]) + b"\0" * 36,
    }
    for oname, opts in options.items():
        udp_case("ipv4-options", "%s, UDP to %d" % (oname, U),
                 lambda c, d, o=opts: [a.eth(ETH_P_IP, ipv4(src, dst, UDP, d, ident=a.ident(c), opts=o))])
        for dport in T:
            syn_case("ipv4-options", "%s, SYN to %d" % (oname, dport), dport,
                     lambda c, s, o=opts: [a.eth(ETH_P_IP, ipv4(src, dst, TCP, s, ident=a.ident(c), opts=o))])

    # Lengths. A decoy TCP/UDP header after the datagram names the allowed port.
    dport = T[0]
    for name, build in [
        ("complete datagram, 40 trailing decoy bytes",
         lambda c, s: [a.eth(ETH_P_IP, ipv4(src, dst, TCP, s, ident=a.ident(c)) + a.fill_tcp() * 10)]),
        ("total length 40 bytes beyond the frame",
         lambda c, s: [a.eth(ETH_P_IP, ipv4(src, dst, TCP, s, ident=a.ident(c), total=20 + len(s) + 40))]),
        ("total length below the header (16)",
         lambda c, s: [a.eth(ETH_P_IP, ipv4(src, dst, TCP, s, ident=a.ident(c), total=16))]),
        ("total length 20 (no transport header), SYN after it",
         lambda c, s: [a.eth(ETH_P_IP, ipv4(src, dst, TCP, s, ident=a.ident(c), total=20))]),
        ("total length cuts the TCP header at 8, fake ACK tail",
         lambda c, s: [a.eth(ETH_P_IP, ipv4(src, dst, TCP, s[:8], ident=a.ident(c))
                            + tcp_seg(src, dst, c.sport, dport, ACK, c.seq, 1)[8:20])]),
        ("IHL 4",
         lambda c, s: [a.eth(ETH_P_IP, ipv4(src, dst, TCP, s, ident=a.ident(c), ihl=4))]),
        ("IHL 15 beyond a 40-byte total length",
         lambda c, s: [a.eth(ETH_P_IP, ipv4(src, dst, TCP, s, ident=a.ident(c), ihl=15, total=40))]),
        ("TCP data offset 4",
         lambda c, s: [a.eth(ETH_P_IP, ipv4(src, dst, TCP, s[:12] + bytes([0x40]) + s[13:], ident=a.ident(c)))]),
        ("TCP data offset 15 beyond the datagram",
         lambda c, s: [a.eth(ETH_P_IP, ipv4(src, dst, TCP, s[:12] + bytes([0xF0]) + s[13:], ident=a.ident(c)))]),
    ]:
        syn_case("ipv4-lengths", "%s, SYN to %d" % (name, dport), dport, build)
    for name, build in [
        ("UDP, 40 trailing decoy bytes",
         lambda c, d: [a.eth(ETH_P_IP, ipv4(src, dst, UDP, d, ident=a.ident(c)) + a.fill_udp() * 10)]),
        ("UDP length beyond the datagram",
         lambda c, d: [a.eth(ETH_P_IP, ipv4(src, dst, UDP, d[:4] + struct.pack("!H", len(d) + 100) + d[6:],
                                            ident=a.ident(c)))]),
        ("UDP length 7",
         lambda c, d: [a.eth(ETH_P_IP, ipv4(src, dst, UDP, d[:4] + struct.pack("!H", 7) + d[6:], ident=a.ident(c)))]),
        ("total length cuts the UDP header, decoy tail",
         lambda c, d: [a.eth(ETH_P_IP, ipv4(src, dst, UDP, d[:4], ident=a.ident(c)) + a.fill_udp() * 4)]),
    ]:
        udp_case("ipv4-lengths", name, build)

    # Fragments.
    for dport in T:
        for tail in (ACK, SYN | ACK, RST):
            tiny_fragment_syn(a, "ipv4-fragments", 4, 0, dport, tail)
        tiny_fragment_syn(a, "ipv4-fragments", 4, 0, dport, ACK, tail=False)

        def split16(c, s, dport=dport):
            ack = tcp_seg(src, dst, c.sport, dport, ACK, c.seq, 1)
            return [a.eth(ETH_P_IP, ipv4(src, dst, TCP, s[:16], ident=a.ident(c), mf=True) + ack[16:20]),
                    a.eth(ETH_P_IP, ipv4(src, dst, TCP, s[16:], ident=a.ident(c), off8=2))]
        syn_case("ipv4-fragments", "TCP header split 16+4 across fragments (offset 2), fake ACK tail, to %d" % dport,
                 dport, split16)

        def reversed_tiny(c, s, dport=dport):
            ack = tcp_seg(src, dst, c.sport, dport, ACK, c.seq, 1)
            return [a.eth(ETH_P_IP, ipv4(src, dst, TCP, s[8:], ident=a.ident(c), off8=1)),
                    a.eth(ETH_P_IP, ipv4(src, dst, TCP, s[:8], ident=a.ident(c), mf=True) + ack[8:20])]
        syn_case("ipv4-fragments", "tiny fragments in reverse order, fake ACK tail, to %d" % dport, dport, reversed_tiny)

        def overlap(c, s, dport=dport):
            # Fragment 1 holds a whole header with ACK; fragment 2 (offset 1)
            # overwrites bytes 8.. with the SYN's.
            ack = tcp_seg(src, dst, c.sport, dport, ACK, c.seq, 1)
            return [a.eth(ETH_P_IP, ipv4(src, dst, TCP, ack + b"\0" * 4, ident=a.ident(c), mf=True)),
                    a.eth(ETH_P_IP, ipv4(src, dst, TCP, s[8:] + b"\0" * 4, ident=a.ident(c), off8=1))]
        syn_case("ipv4-fragments", "overlapping fragment rewrites ACK into SYN, to %d" % dport, dport, overlap)

        def cut_options(c, s, dport=dport):
            # Data offset 8 (12 bytes of options): the first fragment holds 24.
            seg = tcp_seg(src, dst, c.sport, dport, SYN, c.seq, 0, opts=b"\x01" * 12)
            return [a.eth(ETH_P_IP, ipv4(src, dst, TCP, seg[:24], ident=a.ident(c), mf=True) + seg[24:]),
                    a.eth(ETH_P_IP, ipv4(src, dst, TCP, seg[24:], ident=a.ident(c), off8=3))]
        syn_case("ipv4-fragments", "first fragment cuts the TCP options, to %d" % dport, dport, cut_options)


    for off in (1, 2, 3, 185):
        c = a.case("ipv4-fragments", "lone TCP fragment at offset %d" % off, 4, "tcp", 0, T[0])
        c.sport = a.sport(c)
        seg = tcp_seg(src, dst, c.sport, T[0], SYN, a.seq_of(c))
        c.frames = [a.eth(ETH_P_IP, ipv4(src, dst, TCP, seg, ident=a.ident(c), off8=off))]
    c = a.case("ipv4-fragments", "lone UDP fragment at offset 1", 4, "udp", 0, U)
    c.sport = a.sport(c)
    c.frames = [a.eth(ETH_P_IP, ipv4(src, dst, UDP, udp_dgram(src, dst, c.sport, U, a.data(c)),
                                     ident=a.ident(c), off8=1))]
    udp_case("ipv4-fragments", "empty first fragment, then the datagram as fragments 2 and 3",
             lambda c, d: [a.eth(ETH_P_IP, ipv4(src, dst, UDP, b"", ident=a.ident(c), mf=True)),
                           a.eth(ETH_P_IP, ipv4(src, dst, UDP, d[:8], ident=a.ident(c), mf=True, off8=0)),
                           a.eth(ETH_P_IP, ipv4(src, dst, UDP, d[8:], ident=a.ident(c), off8=1))])

    def udp_frags(c, d):
        big = udp_dgram(src, dst, c.sport, U, a.data(c) + b"." * 1500)
        return [a.eth(ETH_P_IP, ipv4(src, dst, UDP, big[:1480], ident=a.ident(c), mf=True)),
                a.eth(ETH_P_IP, ipv4(src, dst, UDP, big[1480:], ident=a.ident(c), off8=185))]
    udp_case("ipv4-fragments", "fragmented UDP datagram to %d" % U, udp_frags)

    def proto_mismatch(c, d):
        # Fragment 1 says ICMP (passed as network control), fragment 2 (same
        # id) says UDP: reassembly keys on the protocol, so they never meet.
        return [a.eth(ETH_P_IP, ipv4(src, dst, ICMP, d[:8], ident=a.ident(c), mf=True)),
                a.eth(ETH_P_IP, ipv4(src, dst, UDP, d[8:], ident=a.ident(c), off8=1))]
    udp_case("ipv4-fragments", "first fragment ICMP, second fragment UDP (same id)", proto_mismatch)

    # Broadcast and multicast: a listener on the wildcard address gets them.
    bcast = ".".join(dst.split(".")[:3] + ["255"])
    for name, to, mac in [("subnet broadcast %s" % bcast, bcast, b"\xff" * 6),
                          ("limited broadcast", "255.255.255.255", b"\xff" * 6),
                          ("multicast 224.0.0.1", "224.0.0.1", bytes.fromhex("01005e000001"))]:
        c = a.case("ipv4-lengths", "UDP to %d at the %s" % (U, name), 4, "udp", 0, U)
        c.sport = a.sport(c)
        c.frames = [a.eth(ETH_P_IP, ipv4(src, to, UDP, udp_dgram(src, to, c.sport, U, a.data(c)), ident=a.ident(c)),
                          dst=mac)]
    # Protocols passed as network control (ICMP, IGMP) carrying a UDP datagram.
    for name, proto in [("ICMP", ICMP), ("IGMP", 2)]:
        udp_case("ipv4-lengths", "%s carrying a UDP datagram to %d" % (name, U),
                 lambda c, d, proto=proto: [a.eth(ETH_P_IP, ipv4(src, dst, proto, d, ident=a.ident(c)))])


def g_protocols(a, fam):
    """Other IP protocols and tunnels, each carrying a UDP datagram (with the
    marker) to the denied UDP port; VXLAN to UDP 4789 when the victim has a
    VXLAN device."""
    U = a.ports["udp_denied"]
    src, dst = a.addrs(fam)
    group = "protocols-v%d" % fam
    et = ETH_P_IP if fam == 4 else ETH_P_IPV6

    def add(name, proto, body):
        c = a.case(group, name, fam, "udp", 0, U)
        c.sport = a.sport(c)
        inner_udp = udp_dgram(src, dst, c.sport, U, a.data(c))
        inner4 = ipv4(a.me["v4"], a.victim["v4"], UDP,
                      udp_dgram(a.me["v4"], a.victim["v4"], c.sport, U, a.data(c)), ident=a.ident(c))
        inner6 = ipv6(a.me["v6"], a.victim["v6"], UDP, udp_dgram(a.me["v6"], a.victim["v6"], c.sport, U, a.data(c)))
        payload = body(c, inner_udp, inner4, inner6)
        c.frames = [a.eth(et, a.ip(fam, proto, payload, c))]

    add("GRE carrying IPv4/UDP", GRE, lambda c, u, i4, i6: struct.pack("!HH", 0, ETH_P_IP) + i4)
    add("GRE carrying IPv6/UDP", GRE, lambda c, u, i4, i6: struct.pack("!HH", 0, ETH_P_IPV6) + i6)
    add("IPv4-in-IP (proto 4)", IPIP, lambda c, u, i4, i6: i4)
    add("IPv6-in-IP (proto 41)", IPV6_IN, lambda c, u, i4, i6: i6)
    add("ESP", ESP, lambda c, u, i4, i6: struct.pack("!II", 0x1000, 1) + u + b"\0" * 8)
    add("AH then UDP", AH, lambda c, u, i4, i6: struct.pack("!BBHII", UDP, 4, 0, 0x1000, 1) + b"\0" * 12 + u)
    add("SCTP INIT", SCTP, lambda c, u, i4, i6: struct.pack("!HHII", c.sport, U, 0, 0)
        + struct.pack("!BBHIIHHI", 1, 0, 20, 0x1234, 65535, 1, 1, 1) + a.data(c))
    add("protocol 253 (experimental)", 253, lambda c, u, i4, i6: u)
    if fam == 6:
        add("no next header (59) followed by UDP bytes", NONE, lambda c, u, i4, i6: u)
    vx = a.spec.get("vxlan")
    if vx and fam == 4:
        c = a.case(group, "VXLAN (UDP 4789) carrying Ethernet/IPv4/UDP", 4, "udp", 0, U)
        c.sport = a.sport(c)
        inner = ipv4(vx["src_v4"], vx["v4"], UDP, udp_dgram(vx["src_v4"], vx["v4"], c.sport, U, a.data(c)),
                     ident=a.ident(c))
        inner_eth = bytes.fromhex(vx["mac"].replace(":", "")) + a.src_mac + struct.pack("!H", ETH_P_IP) + inner
        vxlan = struct.pack("!II", 0x08000000, vx["vni"] << 8) + inner_eth
        c.frames = [a.eth(ETH_P_IP, ipv4(src, dst, UDP, udp_dgram(src, dst, c.sport, 4789, vxlan), ident=a.ident(c)))]


def g_layer2(a):
    """IPv4 behind ethertypes Linux does not deliver to IP on a plain port."""
    U = a.ports["udp_denied"]
    src, dst = a.addrs(4)
    for name, wrap in [
        ("802.3 LLC/SNAP", lambda p: a.dst_mac + a.src_mac + struct.pack("!H", len(p) + 8)
         + bytes([0xAA, 0xAA, 0x03, 0, 0, 0]) + struct.pack("!H", ETH_P_IP) + p),
        ("tag with TPID 0x9100", lambda p: a.eth(0x9100, struct.pack("!HH", 0, ETH_P_IP) + p)),
        ("MPLS label 16", lambda p: a.eth(0x8847, struct.pack("!I", (16 << 12) | 0x100 | 64) + p)),
        ("PPPoE session", lambda p: a.eth(0x8864, struct.pack("!BBHH", 0x11, 0, 1, len(p) + 2)
                                          + struct.pack("!H", 0x0021) + p)),
        ("IPv4 packet under the IPv6 ethertype", lambda p: a.eth(ETH_P_IPV6, p)),
    ]:
        c = a.case("layer2", "%s carrying IPv4/UDP" % name, 4, "udp", 0, U)
        c.sport = a.sport(c)
        c.frames = [wrap(ipv4(src, dst, UDP, udp_dgram(src, dst, c.sport, U, a.data(c)), ident=a.ident(c)))]


# IPv6 extension-header chains Linux accepts and pcguard walks.
LEGIT_CHAINS = [
    [("hop", 0)], [("hop", 1)], [("hop", 5)],
    [("dst", 0)], [("dst", 2)], [("dst", 5)],
    [("rt", 0)], [("rt", 1)], [("rt", 4)],
    [("frag", 0, False)],
    [("hop", 1), ("dst", 0), ("rt", 2), ("frag", 0, False), ("dst", 1)],
    [("dst", 0)] * 8,
    [("hop", 0)] + [("dst", 1)] * 7,
]
# Chains one of them (Linux or pcguard) refuses.
BAD_CHAINS = [
    [("dst", 0)] * 9,
    [("dst", 0)] * 12,
    [("hop", 0)] + [("rt", 0)] * 8,
    [("dst", 0), ("hop", 0)],
    [("hop", 0), ("hop", 0)],
    [("frag", 0, True), ("frag", 0, True)],
    [("frag", 0, False), ("frag", 0, False)],
]


def chain_name(kinds):
    out = []
    for k in kinds:
        if k[0] == "frag":
            out.append("frag(off %d%s)" % (k[1], ", M" if k[2] else ""))
        else:
            out.append("%s(%d)" % (k[0], k[1]))
    return " ".join(out)


def chain_cases(a, group, kinds, udp_port, tcp_ports):
    src, dst = a.addrs(6)
    if udp_port:
        c = a.case(group, "%s, UDP to %d" % (chain_name(kinds), udp_port), 6, "udp", 0, udp_port)
        c.sport = a.sport(c)
        nh, ext = chain(kinds, UDP, a.fill_udp(), 0x50000000 + c.id)
        c.frames = [a.eth(ETH_P_IPV6, ipv6(src, dst, nh, ext + udp_dgram(src, dst, c.sport, udp_port, a.data(c))))]
    for dport in tcp_ports:
        c = a.case(group, "%s, SYN to %d" % (chain_name(kinds), dport), 6, "tcp", 0, dport)
        c.sport = a.sport(c)
        seg = a.opening(c, 6, c.sport, dport, kinds=[k for k in kinds if k[0] != "frag" or not k[2]])
        nh, ext = chain(kinds, TCP, a.fill_tcp(), 0x50000000 + c.id)
        c.frames = [a.eth(ETH_P_IPV6, ipv6(src, dst, nh, ext + seg))]


def g_ipv6(a):
    """Extension-header chains, payload lengths, fragments."""
    U, T = a.ports["udp_denied"], a.denied_tcp()
    src, dst = a.addrs(6)
    for kinds in LEGIT_CHAINS + BAD_CHAINS:
        chain_cases(a, "ipv6-chains", kinds, U, T[:1])

    def udp_case(name, build):
        c = a.case("ipv6-lengths", name, 6, "udp", 0, U)
        c.sport = a.sport(c)
        c.frames = [a.eth(ETH_P_IPV6, build(c, udp_dgram(src, dst, c.sport, U, a.data(c))))]

    udp_case("payload length 0 (jumbogram without its option)",
             lambda c, d: ipv6(src, dst, DEST, opt_ext(UDP, 0, b"\0") + d, plen=0))
    udp_case("payload length 0, hop-by-hop jumbo payload option",
             lambda c, d: ipv6(src, dst, HOP, bytes([UDP, 0, 0xC2, 4]) + struct.pack("!I", 8 + len(d)) + d, plen=0))
    udp_case("payload length 40 beyond the frame",
             lambda c, d: ipv6(src, dst, DEST, opt_ext(UDP, 0, b"\0") + d, plen=8 + len(d) + 40))
    udp_case("payload length ends inside the chain, rest after it",
             lambda c, d: ipv6(src, dst, DEST, opt_ext(DEST, 0, b"\0") + opt_ext(UDP, 0, b"\0") + d, plen=8))
    udp_case("payload length cuts the UDP header, decoy after it",
             lambda c, d: ipv6(src, dst, DEST, opt_ext(UDP, 0, b"\0") + d[:4], plen=12) + a.fill_udp() * 8)
    udp_case("complete datagram, 40 trailing decoy bytes",
             lambda c, d: ipv6(src, dst, DEST, opt_ext(UDP, 0, b"\0") + d) + a.fill_udp() * 10)
    udp_case("UDP length beyond the datagram",
             lambda c, d: ipv6(src, dst, UDP, d[:4] + struct.pack("!H", len(d) + 64) + d[6:]))
    low24 = addr_bytes(dst)[13:]
    solicited = socket.inet_ntop(socket.AF_INET6, bytes.fromhex("ff02" + "00" * 8 + "0001ff") + low24)
    for name, to, mac in [("all-nodes multicast ff02::1", "ff02::1", bytes.fromhex("333300000001")),
                          ("victim's solicited-node multicast", solicited, bytes.fromhex("3333ff") + low24)]:
        c = a.case("ipv6-lengths", "UDP to %d at the %s" % (U, name), 6, "udp", 0, U)
        c.sport = a.sport(c)
        c.frames = [a.eth(ETH_P_IPV6, ipv6(src, to, UDP, udp_dgram(src, to, c.sport, U, a.data(c))), dst=mac)]
    c = a.case("ipv6-lengths", "UDP to %d from the IPv4-mapped address of an admin" % U, 6, "udp", 0, U)
    c.sport = a.sport(c)
    mapped = "::ffff:10.77.0.7"
    c.frames = [a.eth(ETH_P_IPV6, ipv6(mapped, dst, UDP, udp_dgram(mapped, dst, c.sport, U, a.data(c))))]
    c = a.case("ipv6-lengths", "ICMPv6 (passed as network control) carrying UDP bytes to %d" % U, 6, "udp", 0, U)
    c.sport = a.sport(c)
    c.frames = [a.eth(ETH_P_IPV6, ipv6(src, dst, ICMPV6, udp_dgram(src, dst, c.sport, U, a.data(c))))]

    # Class 2: the first fragment does not hold the whole chain.
    decoys = ["icmp", "later-fragment"] + (["allowed-port"] if a.ports.get("udp_allowed") else [])
    for decoy in decoys:
        c = a.case("ipv6-fragments", "split chain: UDP header in fragment 2, %s decoy" % decoy, 6, "udp", 0, U)
        c.sport = a.sport(c)
        c.frames = split_chain_frames(a, c, UDP, udp_dgram(src, dst, c.sport, U, a.data(c)), decoy)
    c = a.case("ipv6-fragments", "split chain in reverse order, icmp decoy", 6, "udp", 0, U)
    c.sport = a.sport(c)
    c.frames = split_chain_frames(a, c, UDP, udp_dgram(src, dst, c.sport, U, a.data(c)), "icmp", reverse=True)

    # The first fragment ends in the middle of a 24-byte destination options
    # header; a parser that reads on finds a UDP header to the allowed port.
    c = a.case("ipv6-fragments", "first fragment ends inside a header, allowed-port decoy", 6, "udp", 0, U)
    c.sport = a.sport(c)
    ident = 0x50000000 + c.id
    d = udp_dgram(src, dst, c.sport, U, a.data(c))
    dst24 = opt_ext(UDP, 2, b"\0")
    decoy = udp_dgram(src, dst, c.sport, a.ports.get("udp_allowed") or 9191, b"x" * 8)
    c.frames = [
        a.eth(ETH_P_IPV6, ipv6(src, dst, FRAGMENT, frag_ext(DEST, 0, True, ident) + dst24[:16]) + dst24[16:] + decoy),
        a.eth(ETH_P_IPV6, ipv6(src, dst, FRAGMENT, frag_ext(DEST, 2, False, ident) + dst24[16:] + d)),
    ]
    for dport in T:
        for decoy in ["icmp", "later-fragment"] + (["allowed-port"] if a.ports.get("tcp_allowed") else []):
            split_chain_syn(a, "ipv6-fragments", 0, dport, decoy)
        tiny_fragment_syn(a, "ipv6-fragments", 6, 0, dport, ACK)

    for off, proto in [(1, TCP), (2, TCP), (3, TCP), (185, TCP), (1, UDP), (185, UDP)]:
        c = a.case("ipv6-fragments", "lone %s fragment at offset %d" % ("TCP" if proto == TCP else "UDP", off), 6,
                   "tcp" if proto == TCP else "udp", 0, U if proto == UDP else T[0])
        c.sport = a.sport(c)
        l4 = udp_dgram(src, dst, c.sport, U, a.data(c)) if proto == UDP else \
            tcp_seg(src, dst, c.sport, T[0], SYN, a.seq_of(c))
        c.frames = [a.eth(ETH_P_IPV6, ipv6(src, dst, FRAGMENT, frag_ext(proto, off, False, 0x50000000 + c.id) + l4))]

    # Two fragment headers: the second says "later fragment".
    c = a.case("ipv6-fragments", "first fragment whose chain holds a second, later-fragment header", 6, "udp", 0, U)
    c.sport = a.sport(c)
    d = udp_dgram(src, dst, c.sport, U, a.data(c))
    c.frames = [a.eth(ETH_P_IPV6, ipv6(src, dst, FRAGMENT, frag_ext(FRAGMENT, 0, False, 0x50000000 + c.id)
                                        + frag_ext(UDP, 0, False, 0x51000000 + c.id) + d))]

    # Overlapping fragments: the first fragment (a destination options header
    # and a UDP header to the allowed port) passes; fragment 2, at offset 1,
    # would rewrite that UDP header with one to the denied port.
    c = a.case("ipv6-fragments", "overlap: fragment at offset 1 rewrites the UDP header of fragment 1", 6, "udp", 0, U)
    c.sport = a.sport(c)
    ident = 0x50000000 + c.id
    good = udp_dgram(src, dst, c.sport, a.ports.get("udp_allowed") or 9191, a.data(c).ljust(24, b"."))
    bad = udp_dgram(src, dst, c.sport, U, a.data(c).ljust(24, b"."))
    c.frames = [
        a.eth(ETH_P_IPV6, ipv6(src, dst, FRAGMENT, frag_ext(DEST, 0, True, ident) + opt_ext(UDP, 0, b"\0") + good[:8])),
        a.eth(ETH_P_IPV6, ipv6(src, dst, FRAGMENT, frag_ext(DEST, 1, False, ident) + bad)),
    ]


def vlan_patterns(n):
    """(name, tags) with `n` tags."""
    out = [("%d x 802.1Q VID 0" % n, [(ETH_P_8021Q, 0)] * n)]
    if n == 1:
        out.append(("1 x 802.1ad VID 0", [(ETH_P_8021AD, 0)]))
        out.append(("1 x 802.1Q VID 5", [(ETH_P_8021Q, 5)]))
    if n >= 2:
        out.append(("802.1ad VID 0 + %d x 802.1Q VID 0" % (n - 1), [(ETH_P_8021AD, 0)] + [(ETH_P_8021Q, 0)] * (n - 1)))
        out.append(("%d x 802.1ad VID 0" % n, [(ETH_P_8021AD, 0)] * n))
    if n in (4, 9):
        out.append(("outer VID 5 + %d x VID 0" % (n - 1), [(ETH_P_8021Q, 5)] + [(ETH_P_8021Q, 0)] * (n - 1)))
        out.append(("%d x VID 0 + inner VID 5" % (n - 1), [(ETH_P_8021Q, 0)] * (n - 1) + [(ETH_P_8021Q, 5)]))
    return out


def g_vlan(a, counts=range(1, 13), tcp_counts=(1, 3, 4, 8, 9, 10, 12)):
    """Class 3: 1 to 12 VLAN tags (VID 0 and not, 802.1Q and 802.1ad)."""
    U, T = a.ports["udp_denied"], a.denied_tcp()
    for fam in (4, 6):
        src, dst = a.addrs(fam)
        et = ETH_P_IP if fam == 4 else ETH_P_IPV6
        for n in counts:
            for pname, tags in vlan_patterns(n):
                c = a.case("vlan", "%s, IPv%d UDP to %d" % (pname, fam, U), fam, "udp", 0, U)
                c.sport = a.sport(c)
                c.frames = [a.eth(et, a.ip(fam, UDP, udp_dgram(src, dst, c.sport, U, a.data(c)), c), tags)]
        for n in tcp_counts:
            tags = [(ETH_P_8021Q, 0)] * n
            for dport in T:
                c = a.case("vlan", "%d x VID 0, IPv%d SYN to %d" % (n, fam, dport), fam, "tcp", 0, dport)
                c.sport = a.sport(c)
                seg = a.opening(c, fam, c.sport, dport, tags=tags)
                c.frames = [a.eth(et, a.ip(fam, TCP, seg, c), tags)]


def g_controls(a):
    """What must get through: crafted frames to the allowed ports that Linux
    accepts and the policy allows. Asserted delivered by the test."""
    UA, TA = a.ports["udp_allowed"], a.ports["tcp_allowed"]
    for fam in (4, 6):
        src, dst = a.addrs(fam)
        et = ETH_P_IP if fam == 4 else ETH_P_IPV6
        c = a.case("controls", "plain SYN to %d, IPv%d" % (TA, fam), fam, "tcp", 0, TA)
        c.sport = a.sport(c)
        c.frames = [a.eth(et, a.ip(fam, TCP, a.opening(c, fam, c.sport, TA), c))]
        c = a.case("controls", "plain UDP to %d, IPv%d" % (UA, fam), fam, "udp", 0, UA)
        c.sport = a.sport(c)
        c.frames = [a.eth(et, a.ip(fam, UDP, udp_dgram(src, dst, c.sport, UA, a.data(c)), c))]
        for n in range(1, 9):
            for pname, tags in vlan_patterns(n):
                if any(vid for _, vid in tags):
                    continue
                c = a.case("controls", "%s, IPv%d UDP to %d" % (pname, fam, UA), fam, "udp", 0, UA)
                c.sport = a.sport(c)
                c.frames = [a.eth(et, a.ip(fam, UDP, udp_dgram(src, dst, c.sport, UA, a.data(c)), c), tags)]
        for n in (1, 4, 8):
            tags = [(ETH_P_8021Q, 0)] * n
            c = a.case("controls", "%d x VID 0, IPv%d SYN to %d" % (n, fam, TA), fam, "tcp", 0, TA)
            c.sport = a.sport(c)
            c.frames = [a.eth(et, a.ip(fam, TCP, a.opening(c, fam, c.sport, TA, tags=tags), c), tags)]
    src, dst = a.addrs(4)
    c = a.case("controls", "IHL 15 (timestamp option), UDP to %d" % UA, 4, "udp", 0, UA)
    c.sport = a.sport(c)
    c.frames = [a.eth(ETH_P_IP, ipv4(src, dst, UDP, udp_dgram(src, dst, c.sport, UA, a.data(c)), ident=a.ident(c),
                                     opts=bytes([68, 40, 5, 0]) + b"\0" * 36))]
    c = a.case("controls", "UDP to %d with 40 trailing bytes" % UA, 4, "udp", 0, UA)
    c.sport = a.sport(c)
    c.frames = [a.eth(ETH_P_IP, ipv4(src, dst, UDP, udp_dgram(src, dst, c.sport, UA, a.data(c)), ident=a.ident(c))
                      + b"\xee" * 40)]
    c = a.case("controls", "UDP to %d in two fragments (offset 0 with 1480 bytes, offset 185)" % UA, 4, "udp", 0, UA)
    c.sport = a.sport(c)
    big = udp_dgram(src, dst, c.sport, UA, a.data(c) + b"." * 1800)
    c.frames = [a.eth(ETH_P_IP, ipv4(src, dst, UDP, big[:1480], ident=a.ident(c), mf=True)),
                a.eth(ETH_P_IP, ipv4(src, dst, UDP, big[1480:], ident=a.ident(c), off8=185))]
    src, dst = a.addrs(6)
    for kinds in LEGIT_CHAINS:
        chain_cases(a, "controls", kinds, UA, [TA])
    c = a.case("controls", "IPv6 UDP to %d in two fragments" % UA, 6, "udp", 0, UA)
    c.sport = a.sport(c)
    ident = 0x50000000 + c.id
    big = udp_dgram(src, dst, c.sport, UA, a.data(c) + b"." * 1800)
    c.frames = [a.eth(ETH_P_IPV6, ipv6(src, dst, FRAGMENT, frag_ext(UDP, 0, True, ident) + big[:1232])),
                a.eth(ETH_P_IPV6, ipv6(src, dst, FRAGMENT, frag_ext(UDP, 154, False, ident) + big[1232:]))]
    # The kernel's own TCP with IPv6 extension headers (sticky options).
    for opt, name, body in [
        (socket.IPV6_DSTOPTS, "destination options", bytes([0, 1, 0x1E, 12]) + b"\x23\xe7" * 6),
        (socket.IPV6_HOPOPTS, "hop-by-hop options", bytes([0, 0, 1, 4, 0, 0, 0, 0])),
    ]:
        c = a.case("controls", "socket connect() to %d with %s (IPV6_%s)" % (TA, name, "DSTOPTS" if opt == 59 else "HOPOPTS"),
                   6, "tcp", 0, TA)

        def connect(c, opt=opt, body=body):
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_IPV6, opt, body)
            s.bind((a.me["v6"], 0))
            c.sport = s.getsockname()[1]
            s.settimeout(2)
            try:
                s.connect((a.victim["v6"], TA))
                s.sendall(a.data(c))
                c.completed = True
                time.sleep(0.1)
            except OSError as e:
                c.answers.append("connect failed: %s" % e)
            finally:
                s.close()
        c.special = connect


def g_egress_controls(a):
    """From the server to an outbound rule's port: crafted handshakes pass."""
    TA = a.ports["tcp_allowed"]
    for fam in (4, 6):
        et = ETH_P_IP if fam == 4 else ETH_P_IPV6
        for n in (0, 1, 4, 8):
            tags = [(ETH_P_8021Q, 0)] * n
            c = a.case("egress-controls", "%d x VID 0, IPv%d SYN to %d" % (n, fam, TA), fam, "tcp", 0, TA)
            c.sport = a.sport(c)
            c.frames = [a.eth(et, a.ip(fam, TCP, a.opening(c, fam, c.sport, TA, tags=tags), c), tags)]
    for kinds in LEGIT_CHAINS:
        chain_cases(a, "egress-controls", kinds, None, [TA])


GROUPS = {
    "tcp-flags": g_tcp_flags,
    "fake-replies": g_fake_replies,
    "ipv4": g_ipv4,
    "protocols-v4": lambda a: g_protocols(a, 4),
    "protocols-v6": lambda a: g_protocols(a, 6),
    "layer2": g_layer2,
    "ipv6": g_ipv6,
    "vlan": g_vlan,
    "controls": g_controls,
    "egress-controls": g_egress_controls,
}


def main():
    spec = json.load(sys.stdin)
    a = Attack(spec)
    for g in spec["groups"]:
        GROUPS[g](a)
    if spec.get("list_only"):
        json.dump([c.result() for c in a.cases], sys.stdout)
        return
    json.dump(a.run(), sys.stdout)


if __name__ == "__main__":
    main()
