"""A service's spec: its published ports, health check, restart policy and HTTP routes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from meshctl.durations import format_duration
from meshctl.model.fields import (
    _ENV_KEY,
    _HTTP_PATH,
    _ROUTE_HOST,
    _ROUTE_PATH,
    HOSTNAME_MAX,
    INGRESS,
    MAX_SERVICE_NETWORKS,
    REPLICAS_CEILING,
    SERVICE_NAME_MAX,
    EndpointMode,
    HealthKind,
    Protocol,
    PublishMode,
    RestartCondition,
    RouteTls,
    Traffic,
    ValidationError,
    _check_choice,
    _check_count,
    _check_seconds,
    ascii_int,
    check_name,
    check_one_line,
    check_port,
    check_text,
    new_id,
)
from meshctl.model.network import NetworkAttachment
from meshctl.model.node import Constraint


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
        self._check_networks()
        self._check_ports()
        _check_seconds(self.stop_grace_period, "stop_grace_period")
        self._check_routes()
        for constraint in self.constraints:
            Constraint.parse(constraint)
        _check_count(self.max_replicas_per_node, "max_replicas_per_node")

    def _check_networks(self) -> None:
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

    def _check_ports(self) -> None:
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
