"""kernel.sysctl in memory: per-namespace kernel parameters with a fresh namespace's defaults.

Only the parameters meshctl reads or writes exist (a fresh namespace's values on this kernel);
others are NotFound as on a kernel without them. net.ipv4.conf.<ifname>.* exist while the link
does; IPVS's net.ipv4.vs.* only when the fake models a kernel with IPVS.
"""

from __future__ import annotations

import errno

from kernel.fake.links import PART as LINKS_PART
from kernel.fake.links import NsLinks, failure
from kernel.fake.world import FakeNamespace, FakeWorld
from kernel.netns import Namespace
from kernel.sysctl import unknown_key

PART = "sysctl"
DEFAULTS = {
    "net.ipv4.ip_forward": "0",
    "net.ipv4.ip_nonlocal_bind": "0",
    "net.ipv4.ip_local_port_range": "32768\t60999",
}
IPVS_DEFAULTS = {
    "net.ipv4.vs.conntrack": "0",
    "net.ipv4.vs.expire_nodest_conn": "0",
    "net.ipv4.vs.expire_quiescent_template": "0",
    "net.ipv4.vs.conn_reuse_mode": "1",
}
# Each of net.ipv4.conf.{all,default,<ifname>}.*; an interface starts from these too.
CONF_DEFAULTS = {
    "forwarding": "0",
    "rp_filter": "0",
    "proxy_arp": "0",
    "route_localnet": "0",
    "accept_local": "0",
    "send_redirects": "1",
    "arp_ignore": "0",
    "arp_announce": "0",
}
CONF = "net.ipv4.conf."
# ip_forward and conf.all.forwarding are one switch, and it sets every interface's forwarding.
FORWARDING = ("net.ipv4.ip_forward", "net.ipv4.conf.all.forwarding")


class FakeSysctl:
    """kernel.sysctl.SysctlAPI in memory; ipvs=True models a kernel with IPVS loaded."""

    def __init__(self, world: FakeWorld, ipvs: bool = False) -> None:
        self.world = world
        self.defaults = {**DEFAULTS, **(IPVS_DEFAULTS if ipvs else {})}

    def get(self, ns: Namespace, key: str) -> str:
        space = self.world.require(ns)
        return self._values(space).get(self._slot(space, ns, key), self._default(key))

    def set(self, ns: Namespace, key: str, value: str) -> None:
        space = self.world.require(ns)
        slot = self._slot(space, ns, key)
        text = self._parse(key, value)
        values = self._values(space)
        if key in FORWARDING:
            values.update(dict.fromkeys(self._forwarding_slots(space), text))
        else:
            values[slot] = text

    def _values(self, space: FakeNamespace) -> dict[str, str]:
        values: dict[str, str] = space.part(PART, dict)
        return values

    def _slot(self, space: FakeNamespace, ns: Namespace, key: str) -> str:
        """Where the key's value is kept; per-interface keys carry the link's index, so a
        recreated link starts from the defaults again. Raises NotFound for an unknown key."""
        if key in FORWARDING:
            return FORWARDING[0]
        if key in self.defaults:
            return key
        if key.startswith(CONF):
            ifname, _, leaf = key[len(CONF) :].rpartition(".")
            if leaf in CONF_DEFAULTS:
                if ifname in ("all", "default"):
                    return key
                links = self._links(space)
                if ifname in links:
                    return f"{CONF}{ifname}@{links[ifname]}.{leaf}"
        raise unknown_key(ns, key)

    def _default(self, key: str) -> str:
        if key.startswith(CONF):
            return CONF_DEFAULTS[key.rpartition(".")[2]]
        return self.defaults[key]

    def _links(self, space: FakeNamespace) -> dict[str, int]:
        """Interface name → index in the namespace (just lo without a FakeLinks)."""
        state: NsLinks | None = space.parts.get(LINKS_PART)
        if state is None:
            return {"lo": 1}
        return {name: link.index for name, link in state.links.items()}

    def _forwarding_slots(self, space: FakeNamespace) -> list[str]:
        per_link = [
            f"{CONF}{name}@{index}.forwarding" for name, index in self._links(space).items()
        ]
        return [FORWARDING[0], f"{CONF}default.forwarding", *per_link]

    def _parse(self, key: str, value: str) -> str:
        """The value as the kernel stores it: integers, tab-separated if several; else EINVAL."""
        try:
            parts = [str(int(part)) for part in str(value).split()]
        except ValueError:
            parts = []
        if not parts:
            raise failure(errno.EINVAL, f"write sysctl {key}={value}")
        return "\t".join(parts)
