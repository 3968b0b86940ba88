"""What every record shares: the value types, the record kinds (store key prefixes), the errors,
and the checks of single fields (names, addresses, ports, durations, subnets)."""

from __future__ import annotations

import ipaddress
import re
import secrets
from typing import Any, Literal, get_args

from meshctl.durations import DurationError, parse_duration

# bridge: one node's own network; overlay: one network across nodes (VXLAN between them).
Driver = Literal["bridge", "overlay"]
EndpointMode = Literal["vip", "dnsrr"]
PublishMode = Literal["ingress", "host"]
Traffic = Literal["cluster", "local"]
Protocol = Literal["tcp", "udp"]
HealthKind = Literal["cmd", "tcp", "http"]
RestartCondition = Literal["any", "on-failure", "none"]
# removed: the service is gone; the task's controller tears it down and deletes the record.
DesiredState = Literal["running", "shutdown", "removed"]
TaskState = Literal[
    "pending", "assigned", "starting", "running", "complete", "failed", "shutdown", "rejected"
]
Health = Literal["none", "starting", "healthy", "unhealthy"]
NodeState = Literal["ready", "down"]
# active: takes new tasks; pause: keeps its tasks, takes none; drain: its tasks move away.
Availability = Literal["active", "pause", "drain"]
# How the router treats HTTPS for a route: terminate TLS with a stored certificate, or pass the
# connection through untouched, chosen by SNI, to tasks that terminate TLS themselves.
RouteTls = Literal["terminate", "passthrough"]

# Kinds of store records this module's objects are kept under.
NETWORK = "network"
SERVICE = "service"
TASK = "task"
NODE = "node"
# A live controller's report on its node, under the controller's lease: gone = node down.
NODE_STATUS = "node-status"
# Who places tasks: one key under the leader's lease (name: LEADER_KEY).
LEADER = "leader"
LEADER_KEY = "scheduler"
CONTAINER = "container"
# The routing mesh's network: services publishing through it join it (see meshctl.commands.network).
INGRESS = "ingress"
# The HTTP routing mesh: one record (name ROUTER_KEY) while it is enabled, and its certificates.
ROUTER = "router"
ROUTER_KEY = "router"
CERTIFICATE = "router-cert"

# Every pattern is applied with fullmatch: `$` would also match before a final newline.
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
_LABEL_RE = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Docker's label keys: reverse-DNS-like words (com.example.team), also with '_' and '/'.
_LABEL_KEY = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/-]{0,251}[A-Za-z0-9])?")
# ASCII digits only: str.isdigit() and int() also take other scripts' digits (and '²', which
# int() refuses); 18 digits keep int() far from its limit on huge input.
_INTEGER = re.compile(r"-?[0-9]{1,18}")
# An HTTP request target: printable ASCII without spaces, so the request line stays one line.
_HTTP_PATH = re.compile(r"/[!-~]*")
# A route's host: a DNS name, or `*.` before one (every name below it); at most 253 characters.
_ROUTE_HOST = re.compile(rf"(?=.{{1,253}}\Z)(\*\.)?{_LABEL_RE}(\.{_LABEL_RE})*")
# A route's path prefix: RFC 3986 path characters but for quotes, parentheses and backslash,
# which HAProxy's configuration language would read as its own.
_ROUTE_PATH = re.compile(r"/[A-Za-z0-9._~!$&*+,;=:@%/-]*")
_PROC_NETNS = re.compile(r"/proc/([1-9][0-9]{0,9})/ns/net")

# A task's hostname is NAME.SLOT and Linux keeps at most 64 characters of a hostname: a
# service name leaves room for the dot and a slot of up to 7 digits (REPLICAS_CEILING).
HOSTNAME_MAX = 64
REPLICAS_CEILING = 1_000_000
SERVICE_NAME_MAX = HOSTNAME_MAX - 1 - len(str(REPLICAS_CEILING))
# A task's veth is named with one hex digit for its leg (controller.node_kernel.LEG_INDEXES).
MAX_SERVICE_NETWORKS = 16
# Ranges the kernel treats specially (this host, loopback, link-local, multicast, reserved and
# broadcast): a bridge or route there would break the node's own networking.
RESERVED_SUBNETS = {
    ipaddress.IPv4Network("0.0.0.0/8"): "'this network'",
    ipaddress.IPv4Network("127.0.0.0/8"): "loopback",
    ipaddress.IPv4Network("169.254.0.0/16"): "link-local",
    ipaddress.IPv4Network("224.0.0.0/4"): "multicast",
    ipaddress.IPv4Network("240.0.0.0/4"): "reserved and broadcast",
}


class MeshctlError(Exception):
    """An error the user can act on; the CLI prints its one-line message and exits 1."""


class ValidationError(MeshctlError, ValueError):
    """Input that breaks a rule; the message names the field and how to fix it.

    field: the field the message is about, as it reads `invalid FIELD ...` (a stored
    record's name for it, like `replicas` or `health.interval`): the CLI says the flag that
    set it instead (meshctl.cli.flags), so a corrupt stored record is not told as a bad flag.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotFoundError(MeshctlError):
    """A named object that does not exist."""


def new_id() -> str:
    """A stable random id, 12 hex characters like Docker's short ids."""
    return secrets.token_hex(6)


def check_name(name: str, what: str = "name") -> str:
    """Return `name` if it is a DNS label (lowercase letters, digits, `-`, at most 63)."""
    if not isinstance(name, str) or not _DNS_LABEL.fullmatch(name) or len(name) > 63:
        raise ValidationError(
            f"invalid {what} {name!r}: use 1-63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return name


def ascii_int(text: str) -> int | None:
    """The whole number `text` writes in ASCII digits (an optional leading '-'), else None."""
    return int(text) if _INTEGER.fullmatch(text) else None


def parse_int(text: str, what: str) -> int:
    """ascii_int(text), or a ValidationError naming `what`."""
    value = ascii_int(text)
    if value is None:
        raise ValidationError(
            f"invalid {what} {text!r}: write a whole number in digits 0-9 (at most 18), like 3",
            what,
        )
    return value


def check_text(text: str, what: str, field: str | None = None) -> str:
    """Return `text` if a process and the store can take it: no NUL byte, valid UTF-8.
    field: what the error is about, when `what` says more (default: what)."""
    field = field or what
    if "\0" in text:
        raise ValidationError(f"invalid {what} {text!r}: it contains a NUL byte; remove it", field)
    try:
        text.encode()
    except UnicodeEncodeError:
        raise ValidationError(f"invalid {what} {text!r}: it is not valid UTF-8", field) from None
    return text


def check_one_line(text: str, what: str, field: str | None = None) -> str:
    """Return `text` if it prints on one line: no newline, control or unencodable character."""
    if not text.isprintable():
        raise ValidationError(
            f"invalid {what} {text!r}: use printable characters only (no newline or tab)",
            field or what,
        )
    return check_text(text, what, field)


def proc_pid(netns: str) -> int | None:
    """The PID in a namespace path of the form /proc/PID/ns/net, else None."""
    match = _PROC_NETNS.fullmatch(netns)
    return int(match.group(1)) if match else None


def check_label(key: str, value: str, what: str = "labels") -> None:
    """A label as Docker's: a reverse-DNS-like key and a one-line value."""
    if not isinstance(key, str) or not _LABEL_KEY.fullmatch(key):
        raise ValidationError(
            f"invalid {what} key {key!r}: use letters, digits, '.', '_', '/' and '-', "
            "starting and ending with a letter or digit, like com.example.team",
            what,
        )
    check_one_line(value, f"{what} {key} value", what)


def check_address(text: str, what: str) -> str:
    """Return text if it is an IPv4 address a node can be reached on."""
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        raise ValidationError(
            f"invalid {what} {text!r}: write an IPv4 address like 10.0.0.5", what
        ) from None
    if address.is_unspecified or address.is_multicast or address.is_loopback:
        raise ValidationError(
            f"invalid {what} {text}: use the address other nodes reach this one on, not a "
            "loopback, multicast or unspecified one",
            what,
        )
    return text


def check_port(port: int, what: str, field: str | None = None) -> int:
    """Return `port` if it is a port number 1-65535."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValidationError(
            f"invalid {what} {port!r}: use a port number from 1 to 65535", field or what
        )
    return port


def _check_choice(value: str, allowed: Any, what: str) -> None:
    """Raise unless value is one of the Literal type's options."""
    options = get_args(allowed)
    if value not in options:
        raise ValidationError(f"invalid {what} {value!r}: use one of {', '.join(options)}", what)


def _check_seconds(value: float, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValidationError(
            f"invalid {what} {value!r}: use a duration like 500ms, 5s or 1m30s", what
        )


def _check_count(value: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValidationError(f"invalid {what} {value!r}: use a whole number, 0 or more", what)


def duration(text: str, what: str) -> float:
    """Parse a Docker duration for field `what`, as a ValidationError on bad input."""
    try:
        return parse_duration(text, what)
    except DurationError as err:
        raise ValidationError(str(err)) from None


def check_not_reserved(subnet: str, what: str = "subnet") -> None:
    """Refuse an IPv4 network that overlaps a range the kernel reserves (RESERVED_SUBNETS).

    For every source of subnets: --subnet, the address pool ($MESHCTL_ADDRESS_POOL) and the
    ingress network ($MESHCTL_INGRESS_SUBNET). `subnet` must already parse as an IPv4 network.
    """
    net = ipaddress.IPv4Network(subnet)
    for reserved, kind in RESERVED_SUBNETS.items():
        if net.overlaps(reserved):
            raise ValidationError(
                f"invalid {what} {subnet}: it overlaps {reserved} ({kind} addresses); use a "
                "private range like 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16"
            )


def _subnet(text: str) -> str:
    """The canonical form of an IPv4 CIDR, rejecting host bits, tiny, non-v4 and reserved ones."""
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError:
        raise ValidationError(
            f"invalid subnet {text!r}: write an IPv4 network in CIDR form like 10.20.0.0/24 "
            "(no host bits set)"
        ) from None
    if not isinstance(net, ipaddress.IPv4Network) or net.prefixlen > 29:
        raise ValidationError(
            f"invalid subnet {text!r}: use an IPv4 network of /29 or larger "
            "(a gateway and a load-balancer address need room)"
        )
    check_not_reserved(str(net))
    return str(net)


# VXLAN network identifiers meshctl hands out (libnetwork starts at 4096 too).
VNI_FIRST = 4096
VNI_LAST = 2**24 - 1
