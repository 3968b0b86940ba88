"""Kernel feature probes for `meshctl doctor`: what this kernel can do for the mesh.

Every probe that creates something does it inside a throwaway namespace (mesh-doctor-PID), deleted
in a finally, so asking never changes the host. Results are plain Check records and sysctl values;
the verdict, which sysctls matter and the rendering live in meshctl.controller.doctor.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kernel import netns
from kernel.errors import NotFound
from kernel.iptables import Iptables
from kernel.ipvs import Ipvs
from kernel.links import Links
from kernel.nftables import Nftables
from kernel.sysctl import Sysctl

DOCTOR_NS_PREFIX = "mesh-doctor-"
# Capability bits from include/uapi/linux/capability.h: links and rules need NET_ADMIN,
# creating and entering namespaces needs SYS_ADMIN.
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
NOT_PRIVILEGED = "meshctl doctor needs root (CAP_NET_ADMIN) to probe the kernel; run it with sudo"


@dataclass(frozen=True)
class Check:
    """One probed feature.

    ok: the feature works (for an informational check: the fact holds). required: the mesh
    cannot run without it. detail: one line; on failure, what to do next. info: a fact reported
    for the reader (a setting the controller manages itself), never a verdict.
    """

    name: str
    ok: bool
    required: bool
    detail: str
    info: bool = False


def privileged(status_path: str = "/proc/self/status") -> bool:
    """Whether this process holds CAP_NET_ADMIN and CAP_SYS_ADMIN (effective), as root does."""
    with open(status_path) as f:
        for line in f:
            if line.startswith("CapEff:"):
                caps = int(line.split()[1], 16)
                return all(caps >> bit & 1 for bit in (CAP_NET_ADMIN, CAP_SYS_ADMIN))
    return os.geteuid() == 0  # a kernel without capability lines: uid decides


def _probe(
    name: str, required: bool, fix: str, fn: Callable[[], str | None], ok_detail: str
) -> Check:
    """Run one probe: fn returns None (works) or a reason; an exception is a reason too."""
    try:
        reason = fn()
    except Exception as err:  # a doctor reports every failure, it never stops at one
        reason = str(err)
    if reason is None:
        return Check(name, True, required, ok_detail)
    return Check(name, False, required, f"{_one_line(reason)}; {fix}")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _links_probe(ns: str) -> tuple[Check, Check, Check]:
    """veth pair, bridge with the veth enslaved, vxlan VNI 42: the links the mesh builds."""
    links = Links()

    def veth() -> None:
        links.ensure_veth(ns, "mdveth0", "mdveth1", ns)

    def bridge() -> None:
        links.ensure_bridge(ns, "mdbr0")
        links.set_master(ns, "mdveth0", "mdbr0")

    def vxlan() -> None:
        links.ensure_vxlan(ns, "mdvx0", 42)

    modules = "(CONFIG_{}; on a modular kernel: modprobe {})"
    return (
        _probe(
            "veth",
            True,
            f"the kernel needs veth {modules.format('VETH', 'veth')}",
            veth,
            "veth pair created in a namespace",
        ),
        _probe(
            "bridge",
            True,
            f"the kernel needs bridging {modules.format('BRIDGE', 'bridge')}",
            bridge,
            "bridge created, veth enslaved to it",
        ),
        _probe(
            "vxlan",
            False,
            f"needed only for clusters: the kernel needs {modules.format('VXLAN', 'vxlan')}",
            vxlan,
            "vxlan VNI 42 created (for clusters)",
        ),
    )


def pings(ns: str, address: str, timeout: float = 2.0) -> bool:
    """Whether `address` answers one ICMP echo sent from namespace ns."""
    argv = ["nsenter", f"--net={netns.path(ns)}", "--", "ping", "-c1", "-W", f"{timeout:g}",
            address]  # fmt: skip
    try:
        return subprocess.run(argv, capture_output=True, timeout=timeout + 3).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def sysctl_value(ns: str | None, key: str) -> str | None:
    """The value of a sysctl in ns, or None when the kernel does not have it there."""
    try:
        return Sysctl().get(ns, key)
    except NotFound:
        return None


def _in_namespace_checks(ns: str) -> list[Check]:
    """The probes that need a namespace of their own."""
    checks = [
        *_links_probe(ns),
        _probe(
            "iptables",
            True,
            "meshctl needs iptables-legacy-save/-restore (Debian's iptables package) and a "
            "kernel with legacy xtables (CONFIG_IP_NF_IPTABLES; ip_tables and iptable_nat modules)",
            lambda: Iptables().available(ns),
            "legacy iptables filter and nat tables read and written by "
            "iptables-legacy-save/-restore",
        ),
        _probe(
            "ipvs",
            False,
            "not required: nftables or iptables balances instead; for IPVS: modprobe ip_vs",
            lambda: Ipvs().available(ns),
            "IPVS generic netlink family answers",
        ),
        _probe(
            "nftables",
            False,
            "not required: iptables balances instead; for nftables: apt-get install nftables "
            "and a kernel with nf_tables (CONFIG_NF_TABLES; modprobe nf_tables)",
            lambda: Nftables().available(ns),
            "nft checks a load balancer's transaction (maps, numgen, nat) and lists tables",
        ),
    ]
    # After the iptables probe: opening the nat table loads nf_conntrack where it is a module.
    count = sysctl_value(ns, "net.netfilter.nf_conntrack_count")
    checks.append(
        Check("conntrack", True, True, f"connection tracking active ({count} entries here)")
        if count is not None
        else Check(
            "conntrack",
            False,
            True,
            "net.netfilter.nf_conntrack_count is missing: the load balancer's NAT needs "
            "connection tracking (CONFIG_NF_CONNTRACK; modprobe nf_conntrack)",
        )
    )
    call = sysctl_value(ns, "net.bridge.bridge-nf-call-iptables")
    checks.append(
        Check(
            "br_netfilter",
            call is not None,
            False,
            f"loaded, bridge-nf-call-iptables={call}"
            if call is not None
            else "not loaded (not required: traffic reaches the load balancer routed, not bridged)",
            info=True,
        )
    )
    return checks


def probe() -> list[Check]:
    """Probe every feature in a fresh namespace that is always removed; needs privileged()."""
    ns = f"{DOCTOR_NS_PREFIX}{os.getpid()}"
    try:
        netns.create(ns)
    except Exception as err:  # no namespace: nothing else can be probed without touching the host
        return [
            Check(
                "netns",
                False,
                True,
                f"{_one_line(str(err))}; the kernel needs network namespaces (CONFIG_NET_NS) "
                "and /var/run/netns must be writable",
            )
        ]
    try:
        return [Check("netns", True, True, "network namespace created"), *_in_namespace_checks(ns)]
    finally:
        netns.delete(ns)


def new_namespace_sysctls(keys: Iterable[str]) -> dict[str, str | None]:
    """The values a new network namespace starts with (None: not there, as net.ipv4.vs.* without
    IPVS or an interface's keys before it exists), read in a throwaway namespace."""
    ns = f"{DOCTOR_NS_PREFIX}{os.getpid()}"
    netns.create(ns)
    try:
        return {key: sysctl_value(ns, key) for key in keys}
    finally:
        netns.delete(ns)
