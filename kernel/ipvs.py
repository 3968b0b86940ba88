"""IPVS virtual services and their destinations through pyroute2's generic netlink IPVS socket.

Services and destinations are frozen dataclasses in canonical form: what `ensure_*` writes is what
`list_*` and `snapshot` read back. meshctl always sets the scheduler and masquerade forwarding
itself, because pyroute2's defaults (wlc, direct routing) are not what a service mesh wants.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, TypeVar, cast

from pyroute2.netlink import NETLINK_GENERIC, NLM_F_ACK, NLM_F_REPLACE, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError

from kernel import netns
from kernel.errors import (
    ENSURE_DONE,
    KernelError,
    Unsupported,
    calling,
    deleting,
    ensuring,
    errno_of,
)
from kernel.netlink import (
    ADD_FLAGS,
    DELETE_FLAGS,
    Field,
    NetlinkBatch,
    Templates,
    address_field,
    judged,
)

T = TypeVar("T")
E = TypeVar("E")  # what a batch step acts on: a service, or a (service, destination) pair

# pyroute2's "change" flags, which its service("set") and dest("set") send.
EDIT_FLAGS = NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE

Proto = Literal["tcp", "udp"]
Forward = Literal["masq", "local", "tunnel", "route"]

_PROTOCOLS: dict[str, int] = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
# IP_VS_CONN_F_MASQ/LOCALNODE/TUNNEL/DROUTE from include/uapi/linux/ip_vs.h.
_FORWARDS: dict[str, int] = {"masq": 0, "local": 1, "tunnel": 2, "route": 3}
_FWD_MASK = 0x7  # IP_VS_CONN_F_FWD_MASK
IP_VS_SVC_F_PERSISTENT = 0x1
_IP_VS_SVC_F_HASHED = 0x2  # kernel-internal; dumps show it on every service

NO_IPVS = "the kernel has no IPVS (generic netlink family IPVS not found)"


@dataclass(frozen=True)
class VirtualService:
    """A virtual service: address:port/protocol, or a firewall mark (then address is None).

    The kernel keeps no address, port or protocol for a fwmark service, so those are
    canonicalised to None, 0 and "tcp"; fwmark services are IPv4. A timeout > 0 means
    persistence, which sets the persistent flag.
    """

    address: str | None = None
    port: int = 0
    protocol: Proto = "tcp"
    fwmark: int | None = None
    scheduler: str = "rr"
    timeout: int = 0
    flags: int = 0

    def __post_init__(self) -> None:
        if self.fwmark is not None:
            if not 0 < self.fwmark <= 0xFFFFFFFF:
                raise ValueError(f"fwmark {self.fwmark} must be between 1 and 0xffffffff")
            object.__setattr__(self, "address", None)
            object.__setattr__(self, "port", 0)
            object.__setattr__(self, "protocol", "tcp")
        else:
            if self.address is None or not 0 < self.port <= 0xFFFF:
                raise ValueError(
                    "a virtual service needs an address and a port 1-65535, or a fwmark"
                )
            object.__setattr__(self, "address", str(ipaddress.ip_address(self.address)))
        if self.protocol not in _PROTOCOLS:
            raise ValueError(f"protocol {self.protocol!r} must be one of {sorted(_PROTOCOLS)}")
        if not self.scheduler:
            raise ValueError("a virtual service needs a scheduler, for example 'rr'")
        if self.timeout > 0:
            object.__setattr__(self, "flags", self.flags | IP_VS_SVC_F_PERSISTENT)

    @property
    def key(self) -> tuple[str, int, str] | int:
        """What the kernel identifies the service by: (address, port, protocol) or the fwmark."""
        if self.fwmark is not None:
            return self.fwmark
        assert self.address is not None
        return (self.address, self.port, self.protocol)

    @property
    def family(self) -> int:
        if self.address is None:
            return socket.AF_INET
        return (
            socket.AF_INET6 if ipaddress.ip_address(self.address).version == 6 else socket.AF_INET
        )


@dataclass(frozen=True)
class Destination:
    """A real server of a virtual service; (address, port) identifies it within the service."""

    address: str
    port: int
    weight: int = 1
    forward: Forward = "masq"

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", str(ipaddress.ip_address(self.address)))
        if not 0 <= self.port <= 0xFFFF or self.weight < 0:
            raise ValueError(f"destination {self.address}:{self.port} weight {self.weight} invalid")
        if self.forward not in _FORWARDS:
            raise ValueError(f"forward {self.forward!r} must be one of {sorted(_FORWARDS)}")

    @property
    def key(self) -> tuple[str, int]:
        return (self.address, self.port)


def service_order(svc: VirtualService) -> tuple[int, int, str, int, str]:
    """A stable order for listings (the kernel dumps in hash order)."""
    return (svc.fwmark is not None, svc.fwmark or 0, svc.address or "", svc.port, svc.protocol)


def destination_order(dest: Destination) -> tuple[str, int]:
    return dest.key


@dataclass(frozen=True)
class IpvsChange:
    """A batch for one namespace, made in this order: services ensured, destinations ensured
    and deleted, services deleted."""

    ensure_services: tuple[VirtualService, ...] = ()
    ensure_destinations: tuple[tuple[VirtualService, Destination], ...] = ()
    delete_destinations: tuple[tuple[VirtualService, Destination], ...] = ()
    delete_services: tuple[VirtualService, ...] = ()


class IpvsAPI(Protocol):
    """The IPVS verbs the controller uses; kernel.fake.ipvs.FakeIpvs implements it."""

    def available(self, ns: netns.Namespace) -> str | None: ...

    def ensure_service(self, ns: netns.Namespace, svc: VirtualService) -> None: ...

    def delete_service(self, ns: netns.Namespace, svc: VirtualService) -> None: ...

    def list_services(self, ns: netns.Namespace) -> list[VirtualService]: ...

    def ensure_destination(
        self, ns: netns.Namespace, svc: VirtualService, dest: Destination
    ) -> None: ...

    def delete_destination(
        self, ns: netns.Namespace, svc: VirtualService, dest: Destination
    ) -> None: ...

    def list_destinations(self, ns: netns.Namespace, svc: VirtualService) -> list[Destination]: ...

    def snapshot(self, ns: netns.Namespace) -> dict[VirtualService, list[Destination]]: ...

    def apply(self, ns: netns.Namespace, change: IpvsChange) -> None: ...


def _netmask(family: int) -> str:
    """The netmask attribute an add/edit needs: a mask for IPv4, a prefix length for IPv6.

    The kernel copies the attribute into a u32 and reads an IPv6 one as the prefix length (it
    must be 1-128), so /128 is encoded in host byte order through pyroute2's ip4addr type.
    """
    if family == socket.AF_INET6:
        return socket.inet_ntoa(struct.pack("=I", 128))
    return "255.255.255.255"


def _service_request(svc: VirtualService) -> Any:
    """The pyroute2 service record with every attribute set (an edit needs them all)."""
    from pyroute2.ipvs import IPVSService

    fields: dict[str, Any] = {
        "af": svc.family,
        "sched_name": svc.scheduler,
        "timeout": svc.timeout,
        "flags": {"flags": svc.flags, "mask": 0xFFFFFFFF},
        "netmask": _netmask(svc.family),
    }
    if svc.fwmark is not None:
        fields["fwmark"] = svc.fwmark
    else:
        fields.update(protocol=_PROTOCOLS[svc.protocol], addr=svc.address, port=svc.port)
    return IPVSService(**fields)


def _destination_request(dest: Destination) -> Any:
    from pyroute2.ipvs import IPVSDest

    return IPVSDest(
        addr=dest.address,
        port=dest.port,
        weight=dest.weight,
        fwd_method=_FORWARDS[dest.forward],
    )


def _service_from(msg: Any) -> VirtualService:
    """A dumped service message as a canonical VirtualService."""
    attrs = msg.get_attr("IPVS_CMD_ATTR_SERVICE")
    flags = attrs.get_attr("IPVS_SVC_ATTR_FLAGS")
    fwmark = attrs.get_attr("IPVS_SVC_ATTR_FWMARK")
    protocol = attrs.get_attr("IPVS_SVC_ATTR_PROTOCOL")
    return VirtualService(
        address=attrs.get_attr("IPVS_SVC_ATTR_ADDR") if not fwmark else None,
        port=attrs.get_attr("IPVS_SVC_ATTR_PORT") or 0,
        protocol="udp" if protocol == socket.IPPROTO_UDP else "tcp",
        fwmark=fwmark or None,
        scheduler=attrs.get_attr("IPVS_SVC_ATTR_SCHED_NAME"),
        timeout=attrs.get_attr("IPVS_SVC_ATTR_TIMEOUT") or 0,
        flags=(flags["flags"] if flags is not None else 0) & ~_IP_VS_SVC_F_HASHED,
    )


def _destination_from(msg: Any) -> Destination:
    attrs = msg.get_attr("IPVS_CMD_ATTR_DEST")
    forward = attrs.get_attr("IPVS_DEST_ATTR_FWD_METHOD") & _FWD_MASK
    names = {code: name for name, code in _FORWARDS.items()}
    return Destination(
        address=attrs.get_attr("IPVS_DEST_ATTR_ADDR"),
        port=attrs.get_attr("IPVS_DEST_ATTR_PORT"),
        weight=attrs.get_attr("IPVS_DEST_ATTR_WEIGHT"),
        forward=names.get(forward, "masq"),  # type: ignore[arg-type]
    )


def _session(ns: netns.Namespace, fn: Callable[[Any], T]) -> T:
    """Run fn(socket) with an IPVS generic netlink socket opened inside ns, then close it."""

    def body() -> T:
        from pyroute2 import IPVS

        try:
            sock = IPVS()
        except NetlinkError as err:
            if errno_of(err) == 2:  # ENOENT: no such generic netlink family
                raise Unsupported(
                    f"{NO_IPVS} in netns {ns or '(node)'}; load the ip_vs module or use the "
                    "iptables backend"
                ) from err
            raise
        try:
            return fn(sock)
        finally:
            sock.close()

    with calling(f"open IPVS in netns {ns or '(node)'}"):
        return netns.run_in(ns, body)


def _dump_destinations(sock: Any, svc: VirtualService) -> list[Destination]:
    dests = [_destination_from(m) for m in sock.dest("dump", service=_service_request(svc))]
    return sorted(dests, key=destination_order)


def _what(svc: VirtualService) -> str:
    return f"IPVS service {svc.key}"


def _dest_what(entry: tuple[VirtualService, Destination]) -> str:
    svc, dest = entry
    return f"IPVS destination {dest.key} of service {svc.key}"


def _judged_destination(guard: AbstractContextManager[None], code: int) -> None:
    """judged, with what to do when the kernel refuses a destination's address."""
    try:
        judged(guard, code)
    except KernelError as err:
        if err.code != errno.EINVAL:
            raise
        # The kernel refuses a destination whose address is not unicast as seen from ns.
        raise KernelError(
            f"{err}; the destination must be a unicast address routable from the "
            "namespace (its loopback up, its addresses and routes set)",
            err.code,
        ) from err


def _blank_mark(svc: VirtualService) -> tuple[VirtualService, tuple[Field, ...]]:
    """A fwmark service with its mark left blank (as 1), and the mark as a template field; any
    other service as it is, with no field."""
    if svc.fwmark is None:
        return svc, ()
    return replace(svc, fwmark=1), (("u32", svc.fwmark),)


def _with_mark(svc: VirtualService, mark: tuple[Any, ...]) -> VirtualService:
    """The service with the blank mark filled in (mark is () for a service without one)."""
    return replace(svc, fwmark=mark[0]) if mark else svc


class _Requests:
    """The encoded IPVS generic netlink requests of one batch, as pyroute2's IPVS.service() and
    IPVS.dest() build them, from templates: a fwmark service's requests differ only in its mark,
    a destination's in its address (and its service's mark). pyroute2's encoder cost 0.3 ms a
    request natively and 5 ms under the QEMU lane's emulation, 10x ipvsadm, so a sync of 1,000
    services encodes a handful of templates instead of 11,000 requests."""

    def __init__(self, family_id: int) -> None:
        self._family_id = family_id
        self._services = Templates(self._service_shape)
        self._destinations = Templates(self._destination_shape)

    def service(self, cmd: int, flags: int, svc: VirtualService) -> bytes:
        blank, fields = _blank_mark(svc)
        return self._services.request((cmd, flags, blank), fields)

    def destination(self, cmd: int, flags: int, entry: tuple[VirtualService, Destination]) -> bytes:
        svc, dest = entry
        blank, fields = _blank_mark(svc)
        shape = (cmd, flags, blank, dest.port, dest.weight, dest.forward)
        return self._destinations.request(shape, (*fields, address_field(dest.address)))

    def _service_shape(self, shape: Hashable, values: tuple[Any, ...]) -> bytes:
        cmd, flags, svc = cast(tuple[Any, ...], shape)
        svc = _with_mark(svc, values)
        return self._encode(cmd, flags, _service_request(svc).dump_nla())

    def _destination_shape(self, shape: Hashable, values: tuple[Any, ...]) -> bytes:
        cmd, flags, svc, port, weight, forward = cast(tuple[Any, ...], shape)
        *mark, address = values
        dest = Destination(address, port, weight, forward)
        return self._destination(cmd, flags, _with_mark(svc, tuple(mark)), dest)

    def _destination(self, cmd: int, flags: int, svc: VirtualService, dest: Destination) -> bytes:
        key = _service_request(svc).dump_key()
        return self._encode(cmd, flags, key, _destination_request(dest).dump_nla())

    def _encode(self, cmd: int, flags: int, service: Any, dest: Any = None) -> bytes:
        from pyroute2.netlink.generic.ipvs import GENL_VERSION, ipvsmsg

        msg = ipvsmsg()
        msg["cmd"] = cmd
        msg["version"] = GENL_VERSION
        msg["attrs"] = [("IPVS_CMD_ATTR_SERVICE", service)]
        if dest is not None:
            msg["attrs"].append(("IPVS_CMD_ATTR_DEST", dest))
        msg["header"]["type"] = self._family_id
        msg["header"]["flags"] = flags
        msg.encode()
        return bytes(msg.data)


def _ensure(
    batch: NetlinkBatch,
    items: Sequence[E],
    request: Callable[[int, int, E], bytes],
    cmds: tuple[int, int],
    what: Callable[[E], str],
    judge: Callable[[AbstractContextManager[None], int], None] = judged,
) -> None:
    """Add every item; those already there are then edited to the values asked for (an edit
    with the same values changes nothing in the kernel)."""
    add, edit = cmds
    present = []
    for item, code in zip(items, batch.run(request(add, ADD_FLAGS, i) for i in items), strict=True):
        if code in ENSURE_DONE:
            present.append(item)
        judge(ensuring(f"add {what(item)}"), code)
    edits = batch.run(request(edit, EDIT_FLAGS, i) for i in present)
    for item, code in zip(present, edits, strict=True):
        judge(calling(f"edit {what(item)}"), code)


def _delete(
    batch: NetlinkBatch,
    items: Sequence[E],
    request: Callable[[int, int, E], bytes],
    cmd: int,
    what: Callable[[E], str],
) -> None:
    for item, code in zip(
        items, batch.run(request(cmd, DELETE_FLAGS, i) for i in items), strict=True
    ):
        judged(deleting(f"delete {what(item)}"), code)


def _apply(sock: Any, change: IpvsChange) -> None:
    """change's steps in IpvsChange's order, each step BATCH_SIZE requests per write."""
    from pyroute2.netlink.generic import ipvs as genl

    requests = _Requests(sock.prid)
    with NetlinkBatch(NETLINK_GENERIC) as batch:
        cmds = (genl.IPVS_CMD_NEW_SERVICE, genl.IPVS_CMD_SET_SERVICE)
        _ensure(batch, change.ensure_services, requests.service, cmds, _what)
        cmds = (genl.IPVS_CMD_NEW_DEST, genl.IPVS_CMD_SET_DEST)
        _ensure(
            batch,
            change.ensure_destinations,
            requests.destination,
            cmds,
            _dest_what,
            _judged_destination,
        )
        _delete(
            batch,
            change.delete_destinations,
            requests.destination,
            genl.IPVS_CMD_DEL_DEST,
            _dest_what,
        )
        _delete(batch, change.delete_services, requests.service, genl.IPVS_CMD_DEL_SERVICE, _what)


class Ipvs:
    """IpvsAPI on the real kernel through pyroute2's IPVS socket."""

    def available(self, ns: netns.Namespace) -> str | None:
        """None if IPVS answers in ns, else a one-line reason (for `meshctl doctor`)."""
        try:
            _session(ns, lambda sock: None)
        except Unsupported:
            return NO_IPVS
        except Exception as err:  # any other failure is a reason too, said in one line
            return f"IPVS does not work here: {err}"
        return None

    def ensure_service(self, ns: netns.Namespace, svc: VirtualService) -> None:
        """Create the service, or bring an existing one to svc's scheduler, timeout and flags."""
        self.apply(ns, IpvsChange(ensure_services=(svc,)))

    def delete_service(self, ns: netns.Namespace, svc: VirtualService) -> None:
        """Delete the service and its destinations; a missing service is already done."""
        self.apply(ns, IpvsChange(delete_services=(svc,)))

    def list_services(self, ns: netns.Namespace) -> list[VirtualService]:
        def run(sock: Any) -> list[VirtualService]:
            return sorted((_service_from(m) for m in sock.service("dump")), key=service_order)

        return _session(ns, run)

    def ensure_destination(
        self, ns: netns.Namespace, svc: VirtualService, dest: Destination
    ) -> None:
        """Add the destination, or bring an existing one to dest's weight and forwarding."""
        self.apply(ns, IpvsChange(ensure_destinations=((svc, dest),)))

    def delete_destination(
        self, ns: netns.Namespace, svc: VirtualService, dest: Destination
    ) -> None:
        """Remove the destination; a missing one (or a missing service) is already done."""
        self.apply(ns, IpvsChange(delete_destinations=((svc, dest),)))

    def apply(self, ns: netns.Namespace, change: IpvsChange) -> None:
        """Make a batch of changes, in IpvsChange's order, many requests per write. Not atomic:
        a failure raises naming its entry, after the ones before it (and the rest of its write)
        are made; a retry is safe."""
        _session(ns, lambda sock: _apply(sock, change))

    def list_destinations(self, ns: netns.Namespace, svc: VirtualService) -> list[Destination]:
        """The service's destinations; none for a missing service (the kernel's dump is empty)."""

        def run(sock: Any) -> list[Destination]:
            with calling(f"list destinations of IPVS service {svc.key}"):
                return _dump_destinations(sock, svc)

        return _session(ns, run)

    def snapshot(self, ns: netns.Namespace) -> dict[VirtualService, list[Destination]]:
        """Every service with its destinations, read through one socket, for the reconciler."""

        def run(sock: Any) -> dict[VirtualService, list[Destination]]:
            with calling("dump IPVS services"):
                services = sorted(
                    (_service_from(m) for m in sock.service("dump")), key=service_order
                )
                return {svc: _dump_destinations(sock, svc) for svc in services}

        return _session(ns, run)
