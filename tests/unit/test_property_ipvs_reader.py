"""The property test's IPVS reader (tests/property/observe.py) on saved text: the only check it
gets outside the QEMU lane, whose kernel has IPVS. The iptables text is what
iptables-legacy-save printed for the ipvs backend's tables of two VIPs (one with an active and a
draining backend, one with none); the ipvsadm text is `ipvsadm -S -n`'s format."""

from __future__ import annotations

from tests.property.observe import IpvsDest, IpvsLb, parse_ipvsadm, parse_rules

SAVED = """\
*filter
:INPUT ACCEPT [0:0]
:MESH-REFUSE - [0:0]
-A INPUT -m comment --comment "meshctl:lb-abcd0002" -j MESH-REFUSE
-A MESH-REFUSE -d 10.77.0.6/32 -p tcp -m comment --comment "meshctl:svc-b" -j REJECT --reject-with tcp-reset
-A MESH-REFUSE -d 10.77.0.6/32 -m comment --comment "meshctl:svc-b" -j REJECT --reject-with icmp-port-unreachable
COMMIT
*mangle
:PREROUTING ACCEPT [0:0]
:MESH-MARK - [0:0]
:MESH-MARKS-0A4D0000 - [0:0]
-A PREROUTING -m conntrack --ctstate NEW -m comment --comment "meshctl:lb-abcd0002" -j MESH-MARK
-A MESH-MARK -d 10.77.0.0/24 -m comment --comment "meshctl:lb-abcd0002" -j MESH-MARKS-0A4D0000
-A MESH-MARKS-0A4D0000 -d 10.77.0.5/32 -m comment --comment "meshctl:svc-a" -j MARK --set-xmark 0x4d000005/0xffffffff
-A MESH-MARKS-0A4D0000 -d 10.77.0.6/32 -m comment --comment "meshctl:svc-b" -j MARK --set-xmark 0x4d000006/0xffffffff
COMMIT
"""  # noqa: E501 - lines as the tool prints them

IPVSADM = """\
-A -f 1291845637 -s rr
-a -f 1291845637 -r 10.77.0.11:0 -m -w 1
-a -f 1291845637 -r 10.77.0.12:0 -m -w 0
-A -f 1291845638 -s rr
-A -t 10.1.1.1:80 -s wlc
-a -t 10.1.1.1:80 -r 10.1.1.2:80 -m -w 1
"""


def test_ipvsadm_text_reads_as_fwmark_services_only() -> None:
    services = parse_ipvsadm(IPVSADM)

    assert set(services) == {0x4D000005, 0x4D000006}
    assert services[0x4D000005].scheduler == "rr"
    assert services[0x4D000005].dests == (
        IpvsDest("10.77.0.11", 0, "m", 1),
        IpvsDest("10.77.0.12", 0, "m", 0),
    )
    assert services[0x4D000006].dests == ()


def test_a_vip_balances_over_its_marks_active_destinations_or_is_refused() -> None:
    lb = IpvsLb(parse_rules(SAVED), parse_ipvsadm(IPVSADM))

    active = lb.vip_path("10.77.0.5")
    assert (active.dnat, active.refused, active.problems) == (("10.77.0.11",), False, ())
    none = lb.vip_path("10.77.0.6")
    assert (none.dnat, none.refused, none.problems) == ((), True, ())
    assert lb.vip_path("10.77.0.7").dnat == ()
    assert lb.stray(["10.77.0.5", "10.77.0.6"]) == []


def test_what_no_vip_explains_and_odd_services_are_reported() -> None:
    odd = IPVSADM.replace("-s rr", "-s wlc", 1).replace(":0 -m -w 0", ":8080 -g -w 0")
    lb = IpvsLb(parse_rules(SAVED), parse_ipvsadm(odd))

    problems = lb.vip_path("10.77.0.5").problems
    assert len(problems) == 2 and "wlc" in problems[0] and "10.77.0.12" in problems[1]
    stray = lb.stray(["10.77.0.5"])
    assert stray[0] == "IPVS service fwmark 0x4d000006"
    assert len(stray) == 2 and "10.77.0.6/32" in stray[1]
    unbalanced = IpvsLb(parse_rules(SAVED), {})
    assert unbalanced.vip_path("10.77.0.5").problems == (
        "marked 0x4d000005, which no IPVS service balances",
    )
