"""Requests patched from a template are byte for byte what pyroute2 encodes for them."""

from __future__ import annotations

import random
from collections.abc import Hashable
from dataclasses import replace
from typing import Any

import pytest
from pyroute2.netlink.generic import ipvs as genl
from pyroute2.netlink.rtnl import RTM_DELADDR, RTM_DELNEIGH, RTM_NEWADDR, RTM_NEWNEIGH

from kernel.ipvs import Destination, VirtualService, _Requests, _service_request
from kernel.links import _address_request, mac_for
from kernel.neighbours import AF_BRIDGE, AF_INET, FDB, FDB_STATE, NEIGHBOUR, NTF_SELF, _request
from kernel.netlink import (
    ADD_FLAGS,
    DELETE_FLAGS,
    REPLACE_FLAGS,
    Templates,
    address_field,
    mac_field,
)


def addresses(rng: random.Random, count: int) -> list[str]:
    """IPv4 and IPv6 addresses, the stand-ins' bytes and zero bytes among them."""
    fixed = ["0.0.0.1", "165.165.165.165", "90.90.90.90", "10.0.0.2", "::1", "a5a5::5a5a"]
    v4 = [".".join(str(rng.choice((0, 90, 165, rng.randrange(256)))) for _ in range(4))]
    v6 = [":".join(f"{rng.randrange(1 << 16):x}" for _ in range(8))]
    return fixed + [rng.choice((v4, v6))[0] for _ in range(count)]


@pytest.mark.parametrize("kind, flags", [(RTM_NEWADDR, ADD_FLAGS), (RTM_DELADDR, DELETE_FLAGS)])
def test_address_requests_match_pyroute2(kind: int, flags: int) -> None:
    templates = Templates(_address_request)
    for address in addresses(random.Random(kind), 300):
        prefixlen = 32 if "." in address else 128
        shape = (kind, flags, 7, prefixlen)
        expected = _address_request(shape, (address,))
        assert templates.request(shape, (address_field(address),)) == expected


NEIGHBOUR_SHAPES = [
    (RTM_NEWNEIGH, REPLACE_FLAGS, AF_INET, 7, 0x80, 0, NEIGHBOUR),
    (RTM_DELNEIGH, DELETE_FLAGS, AF_INET, 7, 0, 0, NEIGHBOUR[:1]),
    (RTM_NEWNEIGH, REPLACE_FLAGS, AF_BRIDGE, 9, FDB_STATE, NTF_SELF, FDB),
    (RTM_DELNEIGH, DELETE_FLAGS, AF_BRIDGE, 0xA5A5A5A5 >> 1, FDB_STATE, NTF_SELF, FDB),
]


def test_neighbour_and_fdb_requests_match_pyroute2() -> None:
    """Addresses and MACs (the stand-ins' bytes among them) patched into one template per
    shape, in the attribute order of each shape."""
    templates = Templates(_request)
    rng = random.Random(3)
    ips = [ip for ip in addresses(rng, 300) if "." in ip]
    macs = ["a5:a5:a5:a5:a5:a5", "5a:5a:5a:5a:5a:5a", "00:00:00:00:00:01"]
    for ip in ips:
        shape = rng.choice(NEIGHBOUR_SHAPES)
        mac = rng.choice([*macs, mac_for(ip)])
        fields = {"NDA_DST": address_field(ip), "NDA_LLADDR": mac_field(mac)}
        values = {"NDA_DST": ip, "NDA_LLADDR": mac}
        names = shape[-1]
        expected = _request(shape, tuple(values[name] for name in names))
        assert templates.request(shape, tuple(fields[name] for name in names)) == expected
    # Every shape was patched, none fell back to encoding each request in full.
    assert len(templates._templates) == len(NEIGHBOUR_SHAPES)
    assert all(spots is not None for _, spots in templates._templates.values())


SERVICES = [
    VirtualService(fwmark=0x4D000001, scheduler="rr"),
    VirtualService(fwmark=0xA5A5A5A5, scheduler="rr"),  # a mark made of a stand-in's bytes
    VirtualService(fwmark=0x5A5A5A5A, scheduler="wrr", timeout=30),
    # The service's own address is a stand-in: only the destination's bytes may change.
    VirtualService(protocol="tcp", address="165.165.165.165", port=80, scheduler="rr"),
]


def test_ipvs_destinations_match_pyroute2() -> None:
    requests = _Requests(family_id=33)
    rng = random.Random(1)
    for address in addresses(rng, 200):
        svc = rng.choice(SERVICES)
        if rng.random() < 0.5 and svc.fwmark is not None:
            svc = replace(svc, fwmark=rng.randrange(1, 1 << 32))
        dest = Destination(address, rng.choice((0, 80)), weight=rng.choice((0, 1)))
        for cmd in (genl.IPVS_CMD_NEW_DEST, genl.IPVS_CMD_DEL_DEST):
            patched = requests.destination(cmd, ADD_FLAGS, (svc, dest))
            assert patched == requests._destination(cmd, ADD_FLAGS, svc, dest)


def test_ipvs_services_match_pyroute2() -> None:
    requests = _Requests(family_id=33)
    rng = random.Random(2)
    marks = [1, 0xFFFFFFFF, 0xA5A5A5A5, *(rng.randrange(1, 1 << 32) for _ in range(100))]
    for svc in [*SERVICES, *(replace(SERVICES[0], fwmark=mark) for mark in marks)]:
        for cmd in (genl.IPVS_CMD_NEW_SERVICE, genl.IPVS_CMD_DEL_SERVICE):
            expected = requests._encode(cmd, ADD_FLAGS, _service_request(svc).dump_nla())
            assert requests.service(cmd, ADD_FLAGS, svc) == expected


def test_a_shape_whose_length_follows_the_address_is_encoded_in_full() -> None:
    def encode(shape: Hashable, values: tuple[Any, ...]) -> bytes:
        return f"{shape}:{values[0]}".encode()  # the text's length varies with the address

    templates = Templates(encode)
    assert templates.request("s", (address_field("10.1.2.3"),)) == b"s:10.1.2.3"
    assert templates.request("s", (address_field("192.168.10.200"),)) == b"s:192.168.10.200"
