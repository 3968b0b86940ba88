"""The options of `service create` and `service update`, and the Service fields they set."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import click

from meshctl.cli.common import F, Int, names, pairs
from meshctl.commands.limits import DEFAULT_MAX_REPLICAS, MAX_REPLICAS_ENV, check_replicas
from meshctl.model import (
    NETWORK,
    HealthCheck,
    HealthKind,
    NetworkAttachment,
    PublishedPort,
    RestartPolicy,
    Service,
    ValidationError,
    duration,
)


def spec_options(fn: F) -> F:
    """The spec options shared by `service create` and `service update`."""
    options = [
        click.option(
            "--replicas",
            type=Int(),
            help=f"Number of tasks [create: 1; at most ${MAX_REPLICAS_ENV}, default "
            f"{DEFAULT_MAX_REPLICAS:,}].",
        ),
        click.option(
            "--network",
            "networks",
            shell_complete=names(NETWORK),
            multiple=True,
            metavar="NET[:ALIAS[,ALIAS]]",
            help="Attach to a network, with extra DNS aliases (repeatable; at most 16, a "
            "routing-mesh port adds one).",
        ),
        click.option(
            "--publish",
            "ports",
            multiple=True,
            metavar="[mode=ingress|host,][traffic=cluster|local,]PUBLISHED:TARGET[/tcp|/udp]",
            help="Publish a port (repeatable); mode=host and traffic=local need --network.",
        ),
        click.option("--endpoint-mode", type=click.Choice(["vip", "dnsrr"]), help="[create: vip]"),
        click.option("--health-cmd", help="Health check: a command run with /bin/sh -c."),
        click.option("--health-tcp", type=Int(), metavar="PORT", help="Health check: TCP connect."),
        click.option("--health-http", metavar="PORT/PATH", help="Health check: HTTP GET, 2xx/3xx."),
        click.option("--health-interval", metavar="D", help="Time between checks [30s]."),
        click.option("--health-timeout", metavar="D", help="Time a check may take [30s]."),
        click.option("--health-retries", type=Int(), help="Failures in a row to be unhealthy [3]."),
        click.option("--health-start-period", metavar="D", help="Failures ignored after start."),
        click.option(
            "--restart-condition", type=click.Choice(["any", "on-failure", "none"]), help="[any]"
        ),
        click.option("--restart-delay", metavar="D", help="Wait before a restart [5s]."),
        click.option("--restart-max-attempts", type=Int(), help="Restarts before giving up [0=∞]."),
        click.option("--stop-grace-period", metavar="D", help="SIGTERM to SIGKILL [10s]."),
        click.option("--env", "env", multiple=True, metavar="K=V", help="Environment variable."),
        click.option(
            "--hostname",
            "hostnames",
            multiple=True,
            metavar="HOST[:PORT]",
            help="Route HTTP for HOST (`*.example.com`: every name below) to the tasks' PORT "
            "[80; passthrough: 443] through the router (repeatable; replaces the list).",
        ),
        click.option(
            "--hostname-add",
            "hostnames_add",
            multiple=True,
            metavar="HOST[:PORT]",
            help="Add a route (update; repeatable).",
        ),
        click.option(
            "--hostname-rm",
            "hostnames_rm",
            multiple=True,
            metavar="HOST",
            help="Remove the route of HOST (update; repeatable).",
        ),
        click.option("--hostname-path", metavar="/PATH", help="Route only paths under /PATH."),
        click.option(
            "--hostname-sticky/--no-hostname-sticky",
            default=None,
            help="Keep each client on one task (a cookie).",
        ),
        click.option(
            "--hostname-tls",
            type=click.Choice(["terminate", "passthrough"]),
            help="HTTPS: terminated by the router with its certificate [terminate], or "
            "passed through by SNI to tasks that terminate TLS themselves.",
        ),
        click.option(
            "--constraint",
            "constraints",
            multiple=True,
            metavar="EXPR",
            help="Where tasks may run: node.labels.K==V, node.labels.K!=V, node.name==N "
            "(repeatable; all must hold).",
        ),
        click.option(
            "--replicas-max-per-node",
            type=click.IntRange(min=0),
            help="At most this many tasks of the service on one node [0: no limit].",
        ),
        click.option("--detach", "-d", is_flag=True, help="Return without waiting for tasks."),
        click.argument("command", nargs=-1, metavar="-- COMMAND [ARG...]"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _health(opts: Mapping[str, Any], current: HealthCheck | None) -> HealthCheck | None:
    """The health check the options describe, layered over the current one (update)."""
    kinds: dict[HealthKind, Any] = {
        "cmd": opts["health_cmd"],
        "tcp": opts["health_tcp"],
        "http": opts["health_http"],
    }
    given = {k: v for k, v in kinds.items() if v is not None}
    if len(given) > 1:
        raise click.UsageError("give only one of --health-cmd, --health-tcp, --health-http")
    settings: dict[str, Any] = {}
    for key in ("interval", "timeout", "start_period"):
        text = opts[f"health_{key}"]
        if text is not None:
            settings[key] = duration(text, f"--health-{key.replace('_', '-')}")
    if opts["health_retries"] is not None:
        settings["retries"] = opts["health_retries"]
    if given:
        kind, value = next(iter(given.items()))
        if kind == "cmd":
            settings.update(command=value, port=0, path="/")
        elif kind == "tcp":
            settings.update(command="", port=value, path="/")
        else:
            port, path = HealthCheck.parse_http(value)
            settings.update(command="", port=port, path=path)
        return replace(current, kind=kind, **settings) if current else HealthCheck(kind, **settings)
    if not settings:
        return current
    if current is None:
        raise click.UsageError(
            "health settings need a check: add --health-cmd, --health-tcp or --health-http"
        )
    return replace(current, **settings)


def spec_changes(name: str, opts: Mapping[str, Any], current: Service | None) -> dict[str, Any]:
    """The Service fields the options set (only those given, so update changes only them)."""
    changes: dict[str, Any] = {}
    if opts["command"]:
        changes["command"] = tuple(opts["command"])
    if opts["replicas"] is not None:
        changes["replicas"] = check_replicas(name, opts["replicas"])
    if opts["networks"]:
        changes["networks"] = tuple(NetworkAttachment.parse(n) for n in opts["networks"])
    if opts["ports"]:
        changes["ports"] = tuple(PublishedPort.parse(p) for p in opts["ports"])
    if opts["endpoint_mode"] is not None:
        changes["endpoint_mode"] = opts["endpoint_mode"]
    current_health = current.health if current else None
    health = _health(opts, current_health)
    if health is not current_health:
        changes["health"] = health
    restart = current.restart if current else RestartPolicy()
    restart_changes: dict[str, Any] = {}
    if opts["restart_condition"] is not None:
        restart_changes["condition"] = opts["restart_condition"]
    if opts["restart_delay"] is not None:
        restart_changes["delay"] = duration(opts["restart_delay"], "--restart-delay")
    if opts["restart_max_attempts"] is not None:
        restart_changes["max_attempts"] = opts["restart_max_attempts"]
    if restart_changes:
        changes["restart"] = replace(restart, **restart_changes)
    if opts["stop_grace_period"] is not None:
        changes["stop_grace_period"] = duration(opts["stop_grace_period"], "--stop-grace-period")
    if opts["env"]:
        changes["env"] = pairs(opts["env"], "--env")
    hostnames = _hostnames(opts, current.hostnames if current else ())
    if hostnames is not None:
        changes["hostnames"] = hostnames
    if opts["hostname_path"] is not None:
        changes["hostname_path"] = "" if opts["hostname_path"] == "/" else opts["hostname_path"]
    if opts["hostname_sticky"] is not None:
        changes["hostname_sticky"] = opts["hostname_sticky"]
    if opts["hostname_tls"] is not None:
        changes["hostname_tls"] = opts["hostname_tls"]
    if opts["constraints"]:
        changes["constraints"] = tuple(opts["constraints"])
    if opts["replicas_max_per_node"] is not None:
        changes["max_replicas_per_node"] = opts["replicas_max_per_node"]
    return changes


def _hostnames(opts: Mapping[str, Any], current: tuple[str, ...]) -> tuple[str, ...] | None:
    """The routes' hosts the options give (None: unchanged). Hosts match case-insensitively,
    so they are kept in lowercase; a host added again replaces its old port."""
    if not (opts["hostnames"] or opts["hostnames_add"] or opts["hostnames_rm"]):
        return None
    hosts = [h.lower() for h in opts["hostnames"]] if opts["hostnames"] else list(current)
    removed = {h.lower().partition(":")[0] for h in opts["hostnames_rm"]}
    added = [h.lower() for h in opts["hostnames_add"]]
    replaced = removed | {h.partition(":")[0] for h in added}
    unknown = removed - {h.partition(":")[0] for h in hosts}
    if unknown:
        raise ValidationError(
            f"invalid --hostname-rm {sorted(unknown)[0]}: the service has no such route "
            f"({', '.join(hosts) or 'none'})"
        )
    return tuple(h for h in hosts if h.partition(":")[0] not in replaced) + tuple(added)
