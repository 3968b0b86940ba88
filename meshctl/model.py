"""Desired and observed state as frozen dataclasses: Network, Service, Task, Node.

Each class validates itself in __post_init__ (one-line errors naming the field and the fix), so
no invalid object exists, and round-trips through to_dict()/from_dict() as the store's JSON.
Rules that need other objects (unique names, overlapping subnets, unknown networks, ports in
use) live in meshctl.commands, which sees the whole store. Durations are float seconds.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import typing
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar, cast, get_args

from meshctl.durations import DurationError, format_duration, parse_duration

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


@dataclass(frozen=True)
class Network:
    """A network: a bridge per node; an overlay joins the bridges of its nodes by VXLAN (its
    VNI, claimed in the store with it); internal = no egress."""

    name: str
    subnet: str
    driver: Driver = "bridge"
    internal: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    id: str = field(default_factory=new_id)
    created_at: float = 0.0
    vni: int = 0  # overlay only

    def __post_init__(self) -> None:
        check_name(self.name, "network name")
        object.__setattr__(self, "subnet", _subnet(self.subnet))
        _check_choice(self.driver, Driver, "driver")
        if self.driver == "overlay" and not VNI_FIRST <= self.vni <= VNI_LAST:
            raise ValidationError(
                f"invalid VNI {self.vni} of overlay network {self.name}: use {VNI_FIRST} to "
                f"{VNI_LAST}"
            )
        for key, value in self.labels.items():
            check_label(key, value)

    @property
    def overlay(self) -> bool:
        return self.driver == "overlay"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "subnet": self.subnet,
            "driver": self.driver,
            "internal": self.internal,
            "labels": dict(self.labels),
            "created_at": self.created_at,
            "vni": self.vni,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Network:
        return cls(
            name=data["name"],
            subnet=data["subnet"],
            driver=data.get("driver", "bridge"),
            internal=bool(data.get("internal", False)),
            labels=dict(data.get("labels", {})),
            id=data["id"],
            created_at=float(data.get("created_at", 0.0)),
            vni=int(data.get("vni", 0)),
        )


@dataclass(frozen=True)
class NetworkAttachment:
    """A service's place on a network: extra DNS aliases, and its VIP there (vip mode only)."""

    network: str
    aliases: tuple[str, ...] = ()
    vip: str | None = None

    def __post_init__(self) -> None:
        check_name(self.network, "network name")
        for alias in self.aliases:
            check_name(alias, f"alias on network {self.network}")

    def to_dict(self) -> dict[str, Any]:
        return {"network": self.network, "aliases": list(self.aliases), "vip": self.vip}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NetworkAttachment:
        return cls(data["network"], tuple(data.get("aliases", ())), data.get("vip"))

    @classmethod
    def parse(cls, text: str) -> NetworkAttachment:
        """Read --network NET[:ALIAS[,ALIAS]]."""
        name, _, aliases = text.partition(":")
        return cls(name, tuple(a for a in aliases.split(",") if a) if aliases else ())


@dataclass(frozen=True)
class PublishedPort:
    """A published port: `ingress` on every node through the routing mesh, `host` where a task runs.

    traffic=local (ingress only) sends a node's published traffic only to that node's tasks.
    """

    published: int
    target: int
    protocol: Protocol = "tcp"
    mode: PublishMode = "ingress"
    traffic: Traffic = "cluster"

    def __post_init__(self) -> None:
        check_port(self.published, "published port")
        check_port(self.target, "target port")
        _check_choice(self.protocol, Protocol, "protocol")
        _check_choice(self.mode, PublishMode, "publish mode")
        _check_choice(self.traffic, Traffic, "publish traffic")
        if self.traffic == "local" and self.mode != "ingress":
            raise ValidationError(
                f"invalid ports {self}: traffic=local needs mode=ingress; drop one of them", "ports"
            )

    def __str__(self) -> str:
        return f"*:{self.published}->{self.target}/{self.protocol}"

    @property
    def routed(self) -> bool:
        """Whether the port goes through the routing mesh (the ingress network's VIP); the
        others go to the tasks' address on the service's first network."""
        return self.mode == "ingress" and self.traffic == "cluster"

    def to_dict(self) -> dict[str, Any]:
        return {
            "published": self.published,
            "target": self.target,
            "protocol": self.protocol,
            "mode": self.mode,
            "traffic": self.traffic,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PublishedPort:
        return cls(
            data["published"],
            data["target"],
            data.get("protocol", "tcp"),
            data.get("mode", "ingress"),
            data.get("traffic", "cluster"),
        )

    @classmethod
    def parse(cls, text: str) -> PublishedPort:
        """Read --publish [mode=ingress|host,][traffic=cluster|local,]PUBLISHED:TARGET[/PROTO]."""
        options: dict[str, str] = {}
        *settings, ports = text.split(",")
        for setting in settings:
            key, eq, value = setting.partition("=")
            if not eq or key not in ("mode", "traffic"):
                raise ValidationError(
                    f"invalid ports {text!r}: unknown setting {setting!r}; "
                    "use mode=ingress|host or traffic=cluster|local",
                    "ports",
                )
            options[key] = value
        spec, _, protocol = ports.partition("/")
        published, colon, target = spec.partition(":")
        published_port, target_port = ascii_int(published), ascii_int(target)
        if not colon or published_port is None or target_port is None:
            raise ValidationError(
                f"invalid ports {text!r}: write PUBLISHED:TARGET[/tcp|/udp], like 8000:80", "ports"
            )
        return cls(
            published_port,
            target_port,
            cast(Protocol, protocol or "tcp"),
            cast(PublishMode, options.get("mode", "ingress")),
            cast(Traffic, options.get("traffic", "cluster")),
        )


@dataclass(frozen=True)
class HealthCheck:
    """How a task's health is probed: `cmd` runs /bin/sh -c inside the task, `tcp` connects,
    `http` expects a 2xx/3xx from GET PATH; after `retries` failures in a row it is unhealthy."""

    kind: HealthKind
    command: str = ""
    port: int = 0
    path: str = "/"
    interval: float = 30.0
    timeout: float = 30.0
    retries: int = 3
    start_period: float = 0.0

    def __post_init__(self) -> None:
        _check_choice(self.kind, HealthKind, "health check kind")
        if self.kind == "cmd" and not self.command.strip():
            raise ValidationError(
                "invalid health.command: the command is empty; give a command", "health.command"
            )
        if self.kind in ("tcp", "http"):
            check_port(self.port, f"health.{self.kind}.port")
        if self.kind == "http" and not _HTTP_PATH.fullmatch(self.path):
            raise ValidationError(
                f"invalid health.path {self.path!r}: write PORT/PATH, like 8080/healthz "
                "(no spaces or control characters in PATH)",
                "health.path",
            )
        check_text(self.command, "health.command")
        _check_seconds(self.interval, "health.interval")
        _check_seconds(self.timeout, "health.timeout")
        _check_seconds(self.start_period, "health.start_period")
        if self.interval == 0 or self.timeout == 0:
            raise ValidationError(
                "invalid health.interval/health.timeout 0: use a duration above 0, like 5s",
                "health.interval/health.timeout",
            )
        _check_count(self.retries, "health.retries")

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "command": self.command,
            "port": self.port,
            "path": self.path,
            "interval": self.interval,
            "timeout": self.timeout,
            "retries": self.retries,
            "start_period": self.start_period,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HealthCheck:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    @staticmethod
    def parse_http(text: str) -> tuple[int, str]:
        """Read --health-http PORT/PATH (PATH defaults to /)."""
        port, slash, path = text.partition("/")
        number = ascii_int(port)
        if number is None:
            raise ValidationError(
                f"invalid health.http {text!r}: write PORT/PATH, like 8080/healthz", "health.http"
            )
        return number, "/" + path if slash else "/"

    def describe(self) -> str:
        """One line for tables: what is probed and how often."""
        probe = {
            "cmd": self.command,
            "tcp": f"tcp {self.port}",
            "http": f"http {self.port}{self.path}",
        }
        return f"{probe[self.kind]} every {format_duration(self.interval)}"


@dataclass(frozen=True)
class RestartPolicy:
    """When a stopped task is restarted: always (any), after a non-zero exit, or never."""

    condition: RestartCondition = "any"
    delay: float = 5.0
    max_attempts: int = 0  # 0 = unlimited, as in Docker

    def __post_init__(self) -> None:
        _check_choice(self.condition, RestartCondition, "restart.condition")
        _check_seconds(self.delay, "restart.delay")
        _check_count(self.max_attempts, "restart.max_attempts")

    def to_dict(self) -> dict[str, Any]:
        return {"condition": self.condition, "delay": self.delay, "max_attempts": self.max_attempts}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RestartPolicy:
        return cls(data["condition"], float(data["delay"]), int(data["max_attempts"]))


# A route's target port on the tasks when --hostname gives none.
HTTP_TARGET_PORT = 80
TLS_TARGET_PORT = 443


def parse_route_host(text: str) -> tuple[str, int | None]:
    """Read --hostname HOST[:PORT]: the host (a DNS name or `*.` before one) and the tasks'
    port, if given. Hosts are matched case-insensitively: write them in lowercase."""
    check_one_line(text, "hostnames")
    host, colon, port = text.partition(":")
    number = ascii_int(port) if colon else None
    if not _ROUTE_HOST.fullmatch(host) or (colon and number is None):
        raise ValidationError(
            f"invalid hostnames {text!r}: write a lowercase DNS name, optionally `*.` before "
            "it and :PORT after it (the tasks' port), like app.example.com or *.example.com:8080",
            "hostnames",
        )
    if number is not None:
        check_port(number, f"hostnames {text} port", "hostnames")
    return host, number


@dataclass(frozen=True)
class Route:
    """One route of the HTTP routing mesh: requests for `host` (any name below it for
    `*.NAME`) whose path starts with `path` go to the service's tasks on `port`; with
    tls=passthrough, TLS connections whose SNI names the host go to them untouched."""

    host: str
    port: int
    path: str = "/"
    sticky: bool = False
    tls: RouteTls = "terminate"

    @property
    def wildcard(self) -> bool:
        return self.host.startswith("*.")

    def __str__(self) -> str:
        where = self.path if self.path != "/" else ""
        passthrough = " (tls passthrough)" if self.tls == "passthrough" else ""
        return f"{self.host}{where}->{self.port}{passthrough}"


@dataclass(frozen=True)
class Service:
    """A replicated service: its spec as the user gave it, plus id, version and VIPs.

    version grows with every `service update`; tasks carry the spec_version they run, so the
    controller can roll the ones that are behind.
    """

    name: str
    command: tuple[str, ...]
    replicas: int = 1
    env: dict[str, str] = field(default_factory=dict)
    networks: tuple[NetworkAttachment, ...] = ()
    endpoint_mode: EndpointMode = "vip"
    ports: tuple[PublishedPort, ...] = ()
    health: HealthCheck | None = None
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    stop_grace_period: float = 10.0
    # Routes of the HTTP routing mesh: HOST or HOST:PORT, with one path prefix, stickiness and
    # TLS mode for all of them (see routes()).
    hostnames: tuple[str, ...] = ()
    hostname_path: str = ""
    hostname_sticky: bool = False
    hostname_tls: RouteTls = "terminate"
    # Where its tasks may run (node.labels.K==V, node.name!=N...) and how many on one node.
    constraints: tuple[str, ...] = ()
    max_replicas_per_node: int = 0  # 0: no limit
    id: str = field(default_factory=new_id)
    version: int = 1
    created_at: float = 0.0
    updated_at: float = 0.0

    def __post_init__(self) -> None:
        check_name(self.name, "service name")
        if len(self.name) > SERVICE_NAME_MAX:
            raise ValidationError(
                f"invalid service name {self.name!r}: it has {len(self.name)} characters, use at "
                f"most {SERVICE_NAME_MAX} (a task's hostname NAME.SLOT must fit Linux's "
                f"{HOSTNAME_MAX})"
            )
        if not self.command or not self.command[0]:
            raise ValidationError(
                f"service {self.name}: no command; put it after '--', "
                "like: -- python3 -m http.server"
            )
        for arg in self.command:
            check_text(arg, "command argument")
        _check_count(self.replicas, "replicas")
        if self.replicas > REPLICAS_CEILING:
            raise ValidationError(
                f"invalid replicas {self.replicas}: a service has at most "
                f"{REPLICAS_CEILING:,} tasks",
                "replicas",
            )
        for key, value in self.env.items():
            if not _ENV_KEY.fullmatch(key):
                raise ValidationError(
                    f"invalid env key {key!r}: use letters, digits and '_', not starting "
                    "with a digit (KEY=VALUE)",
                    "env",
                )
            check_text(value, f"env {key} value", "env")
        _check_choice(self.endpoint_mode, EndpointMode, "endpoint_mode")
        routed = any(port.routed for port in self.ports)
        joined = {a.network for a in self.networks} | ({INGRESS} if routed else set())
        if len(joined) > MAX_SERVICE_NETWORKS:
            raise ValidationError(
                f"invalid networks: service {self.name} is on {len(joined)} networks, "
                f"at most {MAX_SERVICE_NETWORKS} are possible (a routing-mesh port adds the "
                f"{INGRESS} network); drop some",
                "networks",
            )
        seen_networks: set[str] = set()
        for attachment in self.networks:
            if attachment.network in seen_networks:
                raise ValidationError(
                    f"invalid networks {attachment.network}: given twice; give each network once",
                    "networks",
                )
            seen_networks.add(attachment.network)
        seen_ports: set[tuple[int, str]] = set()
        for port in self.ports:
            if (port.published, port.protocol) in seen_ports:
                raise ValidationError(
                    f"invalid ports: port {port.published}/{port.protocol} is published "
                    "twice; publish each port/protocol once",
                    "ports",
                )
            seen_ports.add((port.published, port.protocol))
            if self.endpoint_mode == "dnsrr" and port.mode == "ingress":
                raise ValidationError(
                    f"invalid ports {port.published}:{port.target}: endpoint mode dnsrr has "
                    "no VIP for the ingress routing mesh; use mode=host or --endpoint-mode vip",
                    "ports",
                )
            if not port.routed and not any(a.network != INGRESS for a in self.networks):
                # ingress_rules sends such a port to the tasks' address on the first network.
                raise ValidationError(
                    f"invalid ports {port}: mode=host and traffic=local send the port to "
                    "the tasks' address on the service's first network; add --network NAME",
                    "ports",
                )
        _check_seconds(self.stop_grace_period, "stop_grace_period")
        self._check_routes()
        for constraint in self.constraints:
            Constraint.parse(constraint)
        _check_count(self.max_replicas_per_node, "max_replicas_per_node")

    def _check_routes(self) -> None:
        _check_choice(self.hostname_tls, RouteTls, "hostname_tls")
        hosts = [parse_route_host(text)[0] for text in self.hostnames]
        if len(set(hosts)) != len(hosts):
            raise ValidationError(
                f"invalid hostnames: a host is given twice in {', '.join(self.hostnames)}; "
                "give each host once",
                "hostnames",
            )
        given = [
            option
            for option, value in (
                ("hostname_path", self.hostname_path),
                ("hostname_sticky", self.hostname_sticky),
                ("hostname_tls passthrough", self.hostname_tls == "passthrough"),
            )
            if value
        ]
        if given and not hosts:
            field = given[0].partition(" ")[0]
            raise ValidationError(f"invalid {given[0]}: it needs --hostname HOST", field)
        if self.hostname_path and not _ROUTE_PATH.fullmatch(self.hostname_path):
            raise ValidationError(
                f"invalid hostname_path {self.hostname_path!r}: write a path starting with /, "
                "like /api (letters, digits and -._~!$&*+,;=:@%/ only)",
                "hostname_path",
            )
        if self.hostname_tls == "passthrough" and (self.hostname_path or self.hostname_sticky):
            raise ValidationError(
                "invalid hostname_tls passthrough: the router sees only the TLS server name "
                "of such a route, neither path nor cookie; drop --hostname-path and "
                "--hostname-sticky",
                "hostname_tls",
            )

    def routes(self) -> tuple[Route, ...]:
        """The service's routes (none without --hostname)."""
        default = TLS_TARGET_PORT if self.hostname_tls == "passthrough" else HTTP_TARGET_PORT
        routes = []
        for text in self.hostnames:
            host, port = parse_route_host(text)
            routes.append(
                Route(host, port or default, self.hostname_path or "/", self.hostname_sticky,
                      self.hostname_tls)
            )  # fmt: skip
        return tuple(routes)

    def placement(self) -> tuple[Constraint, ...]:
        return tuple(Constraint.parse(c) for c in self.constraints)

    def vips(self) -> dict[str, str]:
        """The service's VIP on each network (empty in dnsrr mode)."""
        return {a.network: a.vip for a in self.networks if a.vip}

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "version": self.version,
            "command": list(self.command),
            "replicas": self.replicas,
            "env": dict(self.env),
            "networks": [a.to_dict() for a in self.networks],
            "endpoint_mode": self.endpoint_mode,
            "ports": [p.to_dict() for p in self.ports],
            "health": self.health.to_dict() if self.health else None,
            "restart": self.restart.to_dict(),
            "stop_grace_period": self.stop_grace_period,
            "hostnames": list(self.hostnames),
            "hostname_path": self.hostname_path,
            "hostname_sticky": self.hostname_sticky,
            "hostname_tls": self.hostname_tls,
            "constraints": list(self.constraints),
            "max_replicas_per_node": self.max_replicas_per_node,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Service:
        health, restart = data.get("health"), data.get("restart")
        return cls(
            name=data["name"],
            command=tuple(data["command"]),
            replicas=int(data["replicas"]),
            env=dict(data.get("env", {})),
            networks=tuple(NetworkAttachment.from_dict(a) for a in data.get("networks", ())),
            endpoint_mode=data.get("endpoint_mode", "vip"),
            ports=tuple(PublishedPort.from_dict(p) for p in data.get("ports", ())),
            health=HealthCheck.from_dict(health) if health else None,
            restart=RestartPolicy.from_dict(restart) if restart else RestartPolicy(),
            stop_grace_period=float(data.get("stop_grace_period", 10.0)),
            hostnames=tuple(data.get("hostnames", ())),
            hostname_path=str(data.get("hostname_path", "")),
            hostname_sticky=bool(data.get("hostname_sticky", False)),
            hostname_tls=data.get("hostname_tls", "terminate"),
            constraints=tuple(data.get("constraints", ())),
            max_replicas_per_node=int(data.get("max_replicas_per_node", 0)),
            id=data["id"],
            version=int(data.get("version", 1)),
            created_at=float(data.get("created_at", 0.0)),
            updated_at=float(data.get("updated_at", 0.0)),
        )


@dataclass(frozen=True)
class Task:
    """One replica (`web.1`): desired state from ops, observed state from the controller.

    node is "" until a node's controller claims the task (a compare-and-swap on its record).
    Stored under its id, so a slot can be re-created while its old task still drains.
    """

    service: str
    service_id: str
    slot: int
    spec_version: int
    desired_state: DesiredState = "running"
    state: TaskState = "pending"
    node: str = ""
    addresses: dict[str, str] = field(default_factory=dict)
    pid: int | None = None
    health: Health = "none"
    exit_code: int | None = None
    error: str = ""
    id: str = field(default_factory=new_id)
    created_at: float = 0.0
    updated_at: float = 0.0
    # With pid, names the process for good (a reused PID starts later): how a restarted
    # controller re-adopts the task instead of starting it again.
    start_time: int | None = None
    restarts: int = 0
    history: tuple[TaskEvent, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "history", tuple(self.history))
        _check_choice(self.desired_state, DesiredState, "task desired state")
        _check_choice(self.state, TaskState, "task state")
        _check_choice(self.health, Health, "task health")
        if self.slot < 1:
            raise ValidationError(f"invalid task slot {self.slot}: slots start at 1")

    @property
    def name(self) -> str:
        return f"{self.service}.{self.slot}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "service": self.service,
            "service_id": self.service_id,
            "slot": self.slot,
            "spec_version": self.spec_version,
            "desired_state": self.desired_state,
            "state": self.state,
            "node": self.node,
            "addresses": dict(self.addresses),
            "pid": self.pid,
            "health": self.health,
            "exit_code": self.exit_code,
            "error": self.error,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "start_time": self.start_time,
            "restarts": self.restarts,
            "history": [e.to_dict() for e in self.history],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data and k != "history"}
        history = tuple(TaskEvent.from_dict(e) for e in data.get("history", ()))
        return cls(**fields, history=history)

    def with_event(self, now: float, state: TaskState, message: str = "") -> Task:
        """The task in `state`, the transition recorded (the last HISTORY_SIZE are kept)."""
        event = TaskEvent(now, state, message)
        history = (*self.history, event)[-HISTORY_SIZE:]
        return replace(self, state=state, updated_at=now, history=history)


HISTORY_SIZE = 10


@dataclass(frozen=True)
class TaskEvent:
    """One transition of a task: when, into which observed state, and why."""

    time: float
    state: str
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"time": self.time, "state": self.state, "message": self.message}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskEvent:
        return cls(float(data["time"]), str(data["state"]), str(data.get("message", "")))


@dataclass(frozen=True)
class Node:
    """A node = the namespace a controller runs in: the address other nodes reach it on (its
    underlay address), labels for placement constraints and its availability. Whether it is up
    is not stored here: a live controller keeps a NodeStatus under its lease."""

    name: str
    address: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    availability: Availability = "active"
    id: str = field(default_factory=new_id)
    created_at: float = 0.0
    lb_backend: str = ""  # the load-balancer backend its controller runs (or last ran)

    def __post_init__(self) -> None:
        check_name(self.name, "node name")
        _check_choice(self.availability, Availability, "availability")
        if self.address:
            check_address(self.address, "address")
        for key, value in self.labels.items():
            check_label(key, value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "address": self.address,
            "labels": dict(self.labels),
            "availability": self.availability,
            "created_at": self.created_at,
            "lb_backend": self.lb_backend,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Node:
        return cls(
            name=data["name"],
            address=str(data.get("address", "")),
            labels=dict(data.get("labels", {})),
            availability=data.get("availability", "active"),
            id=data["id"],
            created_at=float(data.get("created_at", 0.0)),
            lb_backend=str(data.get("lb_backend", "")),
        )


@dataclass(frozen=True)
class NodeStatus:
    """What a live controller says of its node, kept under its lease (gone: the node is down).

    message is "" when all is well, else why passes fail ("degraded: ..."); errors names the
    networks that fail on this node and why (the others keep converging). pid, pid_start and
    boot_id name the controller process, so a controller restarted on the same host can take
    over from one that died before its lease ran out.
    """

    node: str
    since: float = 0.0
    message: str = ""
    errors: dict[str, str] = field(default_factory=dict)
    pid: int = 0
    pid_start: int = 0
    boot_id: str = ""
    lb_backend: str = ""
    vxlan_port: int = 0  # the UDP port its overlays use

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "since": self.since,
            "message": self.message,
            "errors": dict(self.errors),
            "pid": self.pid,
            "pid_start": self.pid_start,
            "boot_id": self.boot_id,
            "lb_backend": self.lb_backend,
            "vxlan_port": self.vxlan_port,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeStatus:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**fields)


_CONSTRAINT = re.compile(r"node\.(name|id|labels\.([A-Za-z0-9][A-Za-z0-9._/-]*))\s*(==|!=)\s*(.*)")


@dataclass(frozen=True)
class Constraint:
    """A placement constraint as docker writes it: node.name==N, node.id!=I, node.labels.K==V."""

    field: str  # "name", "id" or "labels.K"
    equal: bool
    value: str

    @classmethod
    def parse(cls, text: str) -> Constraint:
        check_one_line(text, "constraints")
        match = _CONSTRAINT.fullmatch(text.strip(" ")) if isinstance(text, str) else None
        if match is None or not match.group(4).strip():
            raise ValidationError(
                f"invalid constraints {text!r}: write node.labels.KEY==VALUE, "
                "node.labels.KEY!=VALUE, node.name==NAME or node.id==ID",
                "constraints",
            )
        return cls(match.group(1), match.group(3) == "==", match.group(4).strip())

    def matches(self, node: Node) -> bool:
        if self.field == "name":
            have: str | None = node.name
        elif self.field == "id":
            have = node.id
        else:
            have = node.labels.get(self.field.removeprefix("labels."))
        return (have == self.value) == self.equal

    def __str__(self) -> str:
        return f"node.{self.field}{'==' if self.equal else '!='}{self.value}"


@dataclass(frozen=True)
class Container:
    """A namespace another runtime made (Docker, podman, unshare...), attached to a network.

    netns is the path the node's controller opens (/proc/PID/ns/net or a bind mount); the
    controller adds one veth (`mesh-<network-id>` inside) with the address, and nothing else.
    """

    name: str
    netns: str
    network: str
    node: str
    address: str = ""
    id: str = field(default_factory=new_id)
    created_at: float = 0.0
    # For a netns of the form /proc/PID/ns/net: that process's start time when it was attached.
    # A PID is reused once its process ends; the controller wires nothing into a namespace
    # whose PID no longer names that process (see meshctl.node.desired.container_spec).
    start_time: int | None = None

    def __post_init__(self) -> None:
        check_name(self.name, "container name")
        check_name(self.network, "network name")
        check_name(self.node, "node name")
        if not self.netns.startswith("/"):
            raise ValidationError(
                f"invalid netns {self.netns!r}: give an absolute path like /run/netns/NAME", "netns"
            )
        check_one_line(self.netns, "netns")

    @property
    def pid(self) -> int | None:
        """The process whose namespace netns names, if it is /proc/PID/ns/net."""
        return proc_pid(self.netns)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "netns": self.netns,
            "network": self.network,
            "node": self.node,
            "address": self.address,
            "created_at": self.created_at,
            "start_time": self.start_time,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Container:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class Router:
    """The HTTP routing mesh, while enabled: one HAProxy per node, published on http_port and
    https_port through the routing mesh (mode ingress: the router's VIP on the ingress network
    spreads over every node's router) or straight to the node's own router (mode host: it sees
    the client's address). cookie_key seeds the sticky-session cookies, the same on every node
    so that a cookie holds whichever node's router a request reaches."""

    http_port: int = 80
    https_port: int = 443
    mode: PublishMode = "ingress"
    vip: str | None = None  # on the ingress network (mode ingress)
    cookie_key: str = field(default_factory=lambda: secrets.token_hex(16))
    id: str = field(default_factory=new_id)
    created_at: float = 0.0

    def __post_init__(self) -> None:
        check_port(self.http_port, "http_port")
        check_port(self.https_port, "https_port")
        _check_choice(self.mode, PublishMode, "mode")
        if self.http_port == self.https_port:
            raise ValidationError(
                f"invalid https_port {self.https_port}: it is the --http-port too; give two "
                "different ports",
                "https_port",
            )

    def ports(self) -> tuple[PublishedPort, ...]:
        """The router's ports as published ports (it listens on the same numbers)."""
        return tuple(
            PublishedPort(port, port, "tcp", self.mode)
            for port in (self.http_port, self.https_port)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "http_port": self.http_port,
            "https_port": self.https_port,
            "mode": self.mode,
            "vip": self.vip,
            "cookie_key": self.cookie_key,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Router:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class Certificate:
    """A certificate and its key (PEM) that the router presents for `host` (`*.NAME`: any name
    below NAME) when a TLS client names it (SNI)."""

    host: str
    cert: str
    key: str
    created_at: float = 0.0

    def __post_init__(self) -> None:
        if not _ROUTE_HOST.fullmatch(self.host):
            raise ValidationError(
                f"invalid certificate host {self.host!r}: write a lowercase DNS name, "
                "optionally with `*.` before it, like app.example.com or *.example.com"
            )
        check_text(self.cert, "cert")
        check_text(self.key, "key")

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "cert": self.cert,
            "key": self.key,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Certificate:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class _Decodable(typing.Protocol):
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any: ...


class _StoredRecord(typing.Protocol):
    """What from_record reads of a store record (meshctl.store.Record)."""

    @property
    def kind(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def value(self) -> Any: ...


D = TypeVar("D", bound=_Decodable)


class CorruptRecordError(MeshctlError):
    """A stored record the model cannot read: hand-edited, damaged, or of another version."""


def from_record(cls: type[D], record: _StoredRecord) -> D:
    """The model object a store record holds; a record it cannot be read from is a one-line
    error naming the record and how to get rid of it, not a KeyError deep in from_dict."""
    try:
        if not isinstance(record.value, dict):
            raise TypeError(f"a JSON object was expected, not {type(record.value).__name__}")
        return cast(D, cls.from_dict(record.value))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        detail = f"missing field {err}" if isinstance(err, KeyError) else str(err)
        raise CorruptRecordError(
            f"{record.kind} {record.name}: stored record is invalid ({detail}); remove it with: "
            f"meshctl store rm {record.kind} {record.name}"
        ) from None
