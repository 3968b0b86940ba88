"""The docker-like command line: parse, call meshctl.ops, print (meshctl.output).

Imports no kernel module at import time, so `meshctl --help` works without root. Exit codes:
0 ok, 1 failed (one line on stderr, nothing changed), 2 usage error (click's own).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal, TypeVar, cast

import click
from click.shell_completion import CompletionItem, get_completion_class

from meshctl import formats, ops, output
from meshctl.cluster import nodes
from meshctl.model import (
    CONTAINER,
    NETWORK,
    NODE,
    REPLICAS_CEILING,
    SERVICE,
    TASK,
    Availability,
    HealthCheck,
    HealthKind,
    MeshctlError,
    NetworkAttachment,
    PublishedPort,
    PublishMode,
    RestartPolicy,
    Router,
    Service,
    Task,
    ValidationError,
    ascii_int,
    check_name,
    check_text,
    duration,
    proc_pid,
)
from meshctl.store import (
    Compacted,
    Record,
    Store,
    StoreError,
    default_store_url,
    open_store,
    resolve_state_dir,
)

POLL_INTERVAL = 0.5
Format = str  # table, json or a template (meshctl.formats)
F = TypeVar("F", bound=Callable[..., Any])
# Limits a host sets in the environment (see README, "Limits").
MAX_REPLICAS_ENV = "MESHCTL_MAX_REPLICAS"
DEFAULT_MAX_REPLICAS = 1_000
MAX_NETWORKS_ENV = "MESHCTL_MAX_NETWORKS"
DEFAULT_MAX_NETWORKS = 1_000
PID_MAX = 4_194_304  # the kernel's PID_MAX_LIMIT


class _Group(click.Group):
    """A click group that turns meshctl's errors into one line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (MeshctlError, StoreError) as err:
            raise click.ClickException(str(err)) from None
        except Exception as err:
            # Kernel errors carry their own one-line message; imported lazily (no root for --help).
            from kernel.errors import KernelError

            if isinstance(err, KernelError):
                raise click.ClickException(str(err)) from None
            raise


class _Env:
    """The state dir and store of this invocation; the store is opened on first use."""

    def __init__(self, state_dir: str | None, store_url: str | None) -> None:
        self.state_dir = resolve_state_dir(state_dir)
        self.store_url = store_url or default_store_url(self.state_dir)
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self.store_url)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


class _Int(click.ParamType):
    """A whole number in ASCII digits, optionally within [minimum, maximum]: click's int also
    takes ' 3', '+3', '1_000' and other scripts' digits."""

    name = "integer"

    def __init__(self, minimum: int | None = None, maximum: int | None = None) -> None:
        self.minimum = minimum
        self.maximum = maximum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            number: int | None = value
        else:
            number = ascii_int(value)
        if number is None:
            self.fail(f"{value!r} is not a whole number in digits 0-9 (at most 18)", param, ctx)
        if self.minimum is not None and number < self.minimum:
            self.fail(f"{number} is below {self.minimum}", param, ctx)
        if self.maximum is not None and number > self.maximum:
            self.fail(f"{number} is above {self.maximum}", param, ctx)
        return number


def _env_limit(variable: str, default: int, ceiling: int | None = None) -> int:
    """A limit set by an environment variable: a whole number from 1 (to ceiling)."""
    text = os.environ.get(variable)
    if text is None:
        return default
    value = ascii_int(text)
    if value is None or value < 1 or (ceiling is not None and value > ceiling):
        top = f" to {ceiling:,}" if ceiling is not None else " or more"
        raise ValidationError(f"invalid ${variable} {text!r}: set a whole number from 1{top}")
    return value


def _check_replicas(name: str, replicas: int) -> int:
    """Refuse a replica count above $MESHCTL_MAX_REPLICAS before any task is planned."""
    limit = _env_limit(MAX_REPLICAS_ENV, DEFAULT_MAX_REPLICAS, REPLICAS_CEILING)
    if replicas > limit:
        raise ValidationError(
            f"invalid replicas {replicas} for service {name}: at most {limit:,} per service; "
            f"use fewer, or raise ${MAX_REPLICAS_ENV}"
        )
    return replicas


def _task_ref(text: str) -> str:
    """A service name, a task name (web.1) or a task id, checked before it reaches the store."""
    service, dot, slot = text.rpartition(".")
    slot_number = ascii_int(slot) if dot else None
    if dot and slot_number is not None and slot_number > 0:
        check_name(service, "service name")
        return text
    return check_name(text, "service or task name")


def _check_format(ctx: click.Context, param: click.Parameter, value: str) -> str:
    return formats.check(value)


def _names(
    *kinds: str, suffix: str = ""
) -> Callable[[click.Context, click.Parameter, str], list[CompletionItem]]:
    """Shell completion of the names of the store's records of these kinds (a task's is its
    `web.1`). The store is the command line's (--state-dir, --store, their variables); one
    that does not exist yet, or cannot be read, completes nothing."""

    def complete(
        ctx: click.Context, param: click.Parameter, incomplete: str
    ) -> list[CompletionItem]:
        root = ctx.find_root().params
        state_dir = resolve_state_dir(root.get("state_dir"))
        url = root.get("store_url") or default_store_url(state_dir)
        if url.startswith("sqlite://") and not os.path.exists("/" + url[9:].lstrip("/")):
            return []
        try:
            with open_store(url) as store:
                found = {
                    str(r.value.get("name", r.name)) if kind == TASK else r.name
                    for kind in kinds
                    for r in store.list(kind)
                }
        except Exception:  # completion must never print a traceback into the shell
            return []
        return [CompletionItem(n + suffix) for n in sorted(found) if n.startswith(incomplete)]

    return complete


def _format_option(fn: F) -> F:
    return click.option(
        "--format",
        "fmt",
        default="table",
        show_default=True,
        callback=_check_format,
        help="table, json (stable: docs/cli-json.md) or a template applied to each item's "
        "JSON, as docker's: '{{.Name}} {{.Id}}', '{{json .}}'.",
    )(fn)


def _show(fmt: Format, docs: Any, table: Callable[[], str]) -> None:
    """Print docs (a JSON document or a list of them) as --format says."""
    if fmt == "json":
        click.echo(output.dumps(docs))
    elif fmt == "table":
        click.echo(table())
    else:
        template = formats.parse(fmt)
        for doc in docs if isinstance(docs, list) else [docs]:
            click.echo(formats.render(template, doc))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--state-dir",
    envvar="MESHCTL_STATE_DIR",
    help="Directory of meshctl's state (default /var/lib/meshctl).",
)
@click.option(
    "--store",
    "store_url",
    envvar="MESHCTL_STORE",
    help="Store URL (default sqlite:///<state-dir>/state.db).",
)
@click.pass_context
def main(ctx: click.Context, state_dir: str | None, store_url: str | None) -> None:
    """meshctl: DNS discovery and kernel load balancing for services on plain Linux hosts.

    \b
    Examples:
      meshctl network create front --subnet 10.20.0.0/24
      meshctl service create --name web --replicas 3 --network front -- sleep infinity
      meshctl --store etcd://10.0.0.1:2379 node ls
    """
    env = _Env(state_dir, store_url)
    ctx.obj = env
    ctx.call_on_close(env.close)


def _env() -> _Env:
    env = click.get_current_context().find_object(_Env)
    assert env is not None, "commands run inside main"
    return env


def _store() -> Store:
    return _env().store


def _pairs(values: Iterable[str], option: str) -> dict[str, str]:
    """Read repeated KEY=VALUE options into a dict."""
    result = {}
    for value in values:
        key, eq, val = value.partition("=")
        if not eq or not key:
            raise ValidationError(f"invalid {option} {value!r}: write KEY=VALUE")
        result[key] = val
    return result


# -- network ---------------------------------------------------------------------------------


@main.group(cls=_Group)
def network() -> None:
    """Create, list, inspect and remove networks.

    \b
    Examples:
      meshctl network create front
      meshctl network ls
    """


@network.command("create")
@click.argument("name")
@click.option("--subnet", help="IPv4 CIDR; default: the next free /24 of 10.10.0.0/16.")
@click.option(
    "--driver",
    type=click.Choice(["bridge", "overlay"]),
    help="overlay: one network across the cluster's nodes (VXLAN); bridge: each node's own. "
    "[default: overlay with an etcd store, else bridge]",
)
@click.option("--internal", is_flag=True, help="No egress: tasks reach only this network.")
@click.option("--label", "labels", multiple=True, metavar="K=V", help="A label (repeatable).")
def network_create(
    name: str,
    subnet: str | None,
    driver: Literal["bridge", "overlay"] | None,
    internal: bool,
    labels: tuple[str],
) -> None:
    """Create network NAME and print its id.

    At most $MESHCTL_MAX_NETWORKS networks exist at once (default 1,000).

    \b
    Examples:
      meshctl network create front --subnet 10.20.0.0/24 --label team=web
      meshctl network create --driver overlay --internal back
    """
    check_name(name, "network name")
    labels_given = _pairs(labels, "--label")
    store = _store()
    limit = _env_limit(MAX_NETWORKS_ENV, DEFAULT_MAX_NETWORKS)
    count = len(ops.list_networks(store))
    if count >= limit:
        raise ValidationError(
            f"cannot create network {name}: {count} networks exist, the limit is {limit:,}; "
            f"remove one, or raise ${MAX_NETWORKS_ENV}"
        )
    created = ops.create_network(
        store,
        name,
        subnet=subnet,
        driver=driver,
        internal=internal,
        labels=labels_given,
    )
    click.echo(created.id)


@network.command("ls")
@_format_option
def network_ls(fmt: Format) -> None:
    """List networks.

    \b
    Examples:
      meshctl network ls
      meshctl network ls --format '{{.Name}} {{.Subnet}}'
    """
    store = _store()
    networks = ops.list_networks(store)
    docs = [] if fmt == "table" else [
        output.network_json(n, ops.network_ipam(store, n)) for n in networks
    ]  # fmt: skip
    _show(fmt, docs, lambda: output.network_table(networks))


@network.command("inspect")
@click.argument("name", shell_complete=_names(NETWORK))
@_format_option
def network_inspect(name: str, fmt: Format) -> None:
    """Show network NAME with its gateway and address allocations.

    \b
    Examples:
      meshctl network inspect front
      meshctl network inspect front --format json
    """
    store = _store()
    net = ops.get_network(store, check_name(name, "network name"))
    state = ops.network_ipam(store, net)
    _show(fmt, output.network_json(net, state), lambda: output.network_pretty(net, state))


@network.command("rm")
@click.argument("name", shell_complete=_names(NETWORK))
def network_rm(name: str) -> None:
    """Remove network NAME (refused while a service uses it).

    \b
    Example:
      meshctl network rm front
    """
    ops.remove_network(_store(), check_name(name, "network name"))
    click.echo(name)


# -- service ---------------------------------------------------------------------------------


@main.group(cls=_Group)
def service() -> None:
    """Create, list, inspect, scale, update and remove services; list their tasks; read logs.

    \b
    Examples:
      meshctl service ps web
      meshctl service scale web=5
    """


def _service_options(fn: F) -> F:
    """The spec options shared by `service create` and `service update`."""
    options = [
        click.option(
            "--replicas",
            type=_Int(),
            help=f"Number of tasks [create: 1; at most ${MAX_REPLICAS_ENV}, default "
            f"{DEFAULT_MAX_REPLICAS:,}].",
        ),
        click.option(
            "--network",
            "networks",
            shell_complete=_names(NETWORK),
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
        click.option(
            "--health-tcp", type=_Int(), metavar="PORT", help="Health check: TCP connect."
        ),
        click.option("--health-http", metavar="PORT/PATH", help="Health check: HTTP GET, 2xx/3xx."),
        click.option("--health-interval", metavar="D", help="Time between checks [30s]."),
        click.option("--health-timeout", metavar="D", help="Time a check may take [30s]."),
        click.option(
            "--health-retries", type=_Int(), help="Failures in a row to be unhealthy [3]."
        ),
        click.option("--health-start-period", metavar="D", help="Failures ignored after start."),
        click.option(
            "--restart-condition", type=click.Choice(["any", "on-failure", "none"]), help="[any]"
        ),
        click.option("--restart-delay", metavar="D", help="Wait before a restart [5s]."),
        click.option(
            "--restart-max-attempts", type=_Int(), help="Restarts before giving up [0=∞]."
        ),
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


def _spec_changes(name: str, opts: Mapping[str, Any], current: Service | None) -> dict[str, Any]:
    """The Service fields the options set (only those given, so update changes only them)."""
    changes: dict[str, Any] = {}
    if opts["command"]:
        changes["command"] = tuple(opts["command"])
    if opts["replicas"] is not None:
        changes["replicas"] = _check_replicas(name, opts["replicas"])
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
        changes["env"] = _pairs(opts["env"], "--env")
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


def _check_routes(store: Store, service: Service) -> None:
    """Routes HAProxy would refuse are refused now, before anything is stored."""
    from meshctl.router.ops import check_with_haproxy

    check_with_haproxy(store, service)


def _wait(store: Store, names: Sequence[str], timeout: float, ids: Mapping[str, str]) -> None:
    """Wait until the services' tasks run (or, for removed ones, have stopped), showing each
    slot's progress: docker's bars on a terminal, a line per change otherwise. After timeout,
    or at once when a task ended that its restart policy does not start again, each stuck
    task's reason and exit code 1. ids: service name → id (a removed one's)."""
    from meshctl import progress

    if not nodes.controller_running(store):
        click.echo("no controller is running: tasks stay pending", err=True)
        return
    tty = sys.stderr.isatty()
    deadline = time.monotonic() + timeout
    seen: dict[tuple[str, int | None], float] = {}  # (task, pid) → when first seen running
    drawn, last = 0, ""
    while True:
        now = time.monotonic()
        statuses = nodes.statuses(store)
        tasks = ops.list_tasks(store)
        for task in tasks:
            if task.state == "running":
                seen.setdefault((task.id, task.pid), now)
        views = []
        for name in names:
            try:
                service: Service | None = ops.get_service(store, name)
            except MeshctlError:
                service = None  # removed (rm, or meanwhile)
            sid = service.id if service is not None else ids[name]
            mine = [t for t in tasks if t.service_id == sid]
            views.append(progress.progress(name, service, mine, statuses, seen, now))
        if tty:
            lines = [line for view in views for line in progress.bars(view)]
            up = f"\x1b[{drawn}F" if drawn else ""
            click.echo(up + "".join(f"\x1b[2K{line}\n" for line in lines), err=True, nl=False)
            drawn = len(lines)
        else:
            line = "; ".join(progress.summary(view) for view in views)
            if line != last:
                click.echo(line, err=True)
                last = line
        if all(view.converged for view in views):
            if not tty:
                click.echo(f"{', '.join(names)}: converged", err=True)
            return
        hopeless = any(view.hopeless for view in views)
        if now > deadline or hopeless:
            for view in views:
                for reason in progress.stuck(view):
                    click.echo(reason, err=True)
            why = "cannot converge: a task ended for good" if hopeless else (
                f"did not converge within {timeout:g}s"
            )  # fmt: skip
            raise MeshctlError(f"{', '.join(names)} {why}; see: meshctl service ps {names[0]}")
        time.sleep(POLL_INTERVAL)


def _timeout_option(fn: F) -> F:
    return click.option(
        "--timeout",
        default="60s",
        show_default=True,
        metavar="D",
        help="Without --detach: how long to wait for the tasks before failing with why.",
    )(fn)


# Everything after the first argument is the command, so its own options need no `--`.
def _refuse_ports_in_use(ports: Iterable[PublishedPort]) -> None:
    """A published port that a process of this host already holds is refused at once (where
    the controller runs elsewhere, it reports the clash on the service's tasks instead)."""
    from kernel.sockets import Sockets

    held = Sockets().bound_ports(None)
    for port in ports:
        if (port.published, port.protocol) in held:
            raise MeshctlError(
                f"published port {port.published}/{port.protocol} is already in use on this host; "
                "free it or publish another port"
            )


@service.command("create", context_settings={"allow_interspersed_args": False})
@click.option("--name", required=True, help="Service name (a DNS label of at most 56 characters).")
@_service_options
@_timeout_option
def service_create(name: str, detach: bool, timeout: str, **opts: Any) -> None:
    """Create a service running COMMAND in each task; print its id.

    Without --detach it waits until every task runs (and is healthy, with a health check),
    showing each one's progress, and fails with each stuck task's reason after --timeout.

    \b
    Examples:
      meshctl service create --name web --replicas 3 --network front:www -- \\
          socat TCP-LISTEN:80,reuseaddr,fork SYSTEM:hostname
      meshctl service create --name api --publish 8000:80 --health-http 80/healthz -d -- ./api
    """
    wait = duration(timeout, "--timeout")
    if not opts["command"]:
        raise click.UsageError("missing COMMAND: put it after '--', like: -- sleep infinity")
    if opts["hostnames_add"] or opts["hostnames_rm"]:
        raise click.UsageError("--hostname-add/--hostname-rm change a service; use --hostname")
    spec = Service(name=name, **_spec_changes(name, opts, None))
    _refuse_ports_in_use(spec.ports)
    store = _store()
    _check_routes(store, spec)
    created = ops.create_service(store, spec)
    click.echo(created.id)
    if not detach:
        _wait(store, [name], wait, {name: created.id})


# NAME comes first here: options may follow it, and the new command goes after `--`.
@service.command("update")
@click.argument("name", shell_complete=_names(SERVICE))
@_service_options
@_timeout_option
def service_update(name: str, detach: bool, timeout: str, **opts: Any) -> None:
    """Change options of service NAME (given list options replace the old list).

    Tasks are replaced one at a time, the new one running before the old one stops; without
    --detach it waits for all of them as `service create` does.

    \b
    Examples:
      meshctl service update web --env RELEASE=2
      meshctl service update web --replicas 4 --timeout 2m
    """
    wait = duration(timeout, "--timeout")
    store = _store()
    current = ops.get_service(store, check_name(name, "service name"))
    changes = _spec_changes(name, opts, current)
    if not changes:
        raise click.UsageError("nothing to update: give at least one option")
    if set(changes) & ops.ROUTE_FIELDS:
        try:
            candidate: Service | None = replace(current, **changes)
        except ValidationError:
            candidate = None  # ops.update_service says what is wrong, in its order
        if candidate is not None:
            _check_routes(store, candidate)
    old_ports = {(p.published, p.protocol) for p in ops.get_service(store, name).ports}
    _refuse_ports_in_use(
        [p for p in changes.get("ports", ()) if (p.published, p.protocol) not in old_ports]
    )
    updated = ops.update_service(store, name, changes)
    click.echo(name)
    if not detach:
        _wait(store, [name], wait, {name: updated.id})


@service.command("ls")
@_format_option
def service_ls(fmt: Format) -> None:
    """List services.

    \b
    Examples:
      meshctl service ls
      meshctl service ls --format '{{.Name}}: {{.Running}}/{{.Replicas}}'
    """
    store = _store()
    services, tasks = ops.list_services(store), ops.list_tasks(store)
    docs = [output.service_summary_json(s, tasks) for s in services]
    _show(fmt, docs, lambda: output.service_table(services, tasks))


@service.command("inspect")
@click.argument("name", shell_complete=_names(SERVICE))
@_format_option
def service_inspect(name: str, fmt: Format) -> None:
    """Show service NAME's spec, with its VIP on each network.

    \b
    Examples:
      meshctl service inspect web
      meshctl service inspect web --format '{{json .Networks}}'
    """
    store = _store()
    svc = ops.get_service(store, check_name(name, "service name"))
    tasks = ops.list_tasks(store, svc)
    _show(fmt, output.service_json(svc, tasks), lambda: output.service_pretty(svc, tasks))


@service.command("ps")
@click.argument("name", shell_complete=_names(SERVICE))
@_format_option
def service_ps(name: str, fmt: Format) -> None:
    """List the tasks of service NAME, including those shutting down.

    \b
    Examples:
      meshctl service ps web
      meshctl service ps web --format '{{.Name}} {{.State}} {{.Problem}}'
    """
    store = _store()
    tasks = ops.list_tasks(store, ops.get_service(store, check_name(name, "service name")))
    statuses = nodes.statuses(store)
    docs = [output.task_json(t, statuses) for t in tasks]
    _show(fmt, docs, lambda: output.task_table(tasks, statuses=statuses))


@service.command("scale")
@click.argument(
    "assignments",
    nargs=-1,
    required=True,
    metavar="NAME=REPLICAS...",
    shell_complete=_names(SERVICE, suffix="="),
)
@click.option("--detach", "-d", is_flag=True, help="Return without waiting for tasks.")
@_timeout_option
def service_scale(assignments: tuple[str, ...], detach: bool, timeout: str) -> None:
    """Set the number of tasks of one or more services, all at once.

    Without --detach it waits until each service runs exactly that many tasks, and fails
    with each stuck task's reason (no suitable node, its exit code, unhealthy) after --timeout.

    \b
    Examples:
      meshctl service scale web=5 api=2
      meshctl service scale web=0 --detach
    """
    wait = duration(timeout, "--timeout")
    replicas: dict[str, int] = {}
    for item in assignments:
        name, eq, count = item.partition("=")
        number = ascii_int(count)
        if not eq or number is None:
            raise click.BadParameter(f"{item!r}: write NAME=REPLICAS, like web=3")
        replicas[check_name(name, "service name")] = _check_replicas(name, number)
    store = _store()
    scaled = ops.scale_services(store, replicas)
    for svc in scaled:
        click.echo(f"{svc.name} scaled to {svc.replicas}")
    if not detach:
        _wait(store, list(replicas), wait, {svc.name: svc.id for svc in scaled})


@service.command("rm")
@click.argument("name", shell_complete=_names(SERVICE))
@click.option("--detach", "-d", is_flag=True, help="Return without waiting for the tasks.")
@_timeout_option
def service_rm(name: str, detach: bool, timeout: str) -> None:
    """Remove service NAME; its tasks are stopped by their controllers.

    Without --detach it waits until every task has stopped.

    \b
    Examples:
      meshctl service rm web
      meshctl service rm web --detach
    """
    wait = duration(timeout, "--timeout")
    store = _store()
    removed = ops.remove_service(store, check_name(name, "service name"))
    click.echo(name)
    if not detach:
        _wait(store, [name], wait, {name: removed.id})


@service.command("logs")
@click.argument("target", metavar="NAME|TASK", shell_complete=_names(SERVICE, TASK))
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines (Ctrl-C stops).")
@click.option("--tail", type=_Int(minimum=0), help="Only the last N lines of each task.")
@click.option(
    "--since",
    metavar="TIME",
    help="Only lines written since then: a duration back (10m), Unix seconds or RFC 3339.",
)
@click.option("--timestamps", "-t", is_flag=True, help="Start each line with when it was written.")
def service_logs(
    target: str, follow: bool, tail: int | None, since: str | None, timestamps: bool
) -> None:
    """Print a service's task output, each line prefixed `web.1 | `, or one task's output.

    A task's log is rotated at 10 MiB, keeping 3 files (log, log.1, log.2): the oldest
    lines go first, and the output starts with the oldest kept. A line's time is when the
    node's controller saw it written (a few times a second; lines written while no
    controller ran carry the time it came back).

    \b
    Examples:
      meshctl service logs web --follow --tail 10
      meshctl service logs web.2 --since 5m --timestamps
    """
    from meshctl.durations import TimeError, parse_time

    _task_ref(target)
    try:
        start = parse_time(since, time.time(), "--since") if since else None
    except TimeError as err:
        raise ValidationError(str(err)) from None
    env = _env()
    store = env.store

    def tasks() -> tuple[list[Task], bool]:
        """The tasks to show and whether lines get a task prefix (a service was named)."""
        if store.get("service", target) is not None:
            return ops.list_tasks(store, ops.get_service(store, target)), True
        return [ops.find_task(store, target)], False

    show = _LogOptions(start, timestamps)
    offsets: dict[str, int] = {}
    shown, prefixed = tasks()
    for task in shown:
        offsets[task.id] = _print_log(env.state_dir, task, prefixed, None, tail, show)
    while follow:
        time.sleep(POLL_INTERVAL)
        shown, prefixed = tasks()
        for task in shown:
            offsets[task.id] = _print_log(
                env.state_dir, task, prefixed, offsets.get(task.id, 0), None, show
            )


class _LogOptions:
    """Which lines `service logs` prints (written since `since`) and how (`timestamps`)."""

    def __init__(self, since: float | None = None, timestamps: bool = False) -> None:
        self.since = since
        self.timestamps = timestamps

    @property
    def timed(self) -> bool:
        return self.since is not None or self.timestamps


def _print_log(
    state_dir: str,
    task: Task,
    prefixed: bool,
    offset: int | None,
    tail: int | None,
    show: _LogOptions | None = None,
) -> int:
    """Print the task's complete log lines from byte offset of its live log on (None: all of
    it, its rotated files first); return the new offset."""
    from meshctl.durations import format_time
    from meshctl.runtime import rotated_paths

    show = show or _LogOptions()
    path = ops.task_log_path(state_dir, task)
    earlier: list[tuple[str, int, bytes]] = []  # (file, offset, bytes): lines of rotated files
    if offset is None:
        earlier = [(p, 0, _read_log(p, 0) or b"") for p in rotated_paths(path)]
        offset = 0
    elif os.path.exists(path) and os.path.getsize(path) < offset:
        # Rotated (copied to log.1 and emptied) since the last read: log.1's rest comes first.
        rotated = rotated_paths(path)[-1]
        earlier = [(rotated, offset, _read_log(rotated, offset) or b"")]
        offset = 0
    data = _read_log(path, offset)
    if data is None:
        return offset
    complete = data[: data.rfind(b"\n") + 1]  # a partial last line waits for its end
    lines: list[tuple[str, float]] = []
    for file, start, chunk in [*earlier, (path, offset, complete)]:
        lines += _timed_lines(file, start, chunk, show.timed)
    if show.since is not None:
        lines = [(line, when) for line, when in lines if when >= show.since]
    if tail is not None:
        lines = lines[-tail:] if tail else []
    prefix = f"{task.name} | " if prefixed else ""
    for line, when in lines:
        click.echo((f"{format_time(when)} " if show.timestamps else "") + prefix + line)
    return offset + len(complete)


def _timed_lines(file: str, start: int, chunk: bytes, timed: bool) -> list[tuple[str, float]]:
    """The lines of chunk (read from file at offset start), each with when it was written
    (0.0 unless timed); a last line without its newline (a rotated file's cut) counts."""
    from meshctl.runtime import line_time, read_times

    notes = read_times(file) if timed else []
    fallback = os.path.getmtime(file) if timed and os.path.exists(file) else 0.0
    out, end = [], start
    for raw in chunk.split(b"\n")[: -1 if chunk.endswith(b"\n") else None]:
        end += len(raw) + 1
        text = raw.decode(errors="replace").removesuffix("\r")
        out.append((text, line_time(notes, end - 1, fallback) if timed else 0.0))
    return out if chunk else []


def _read_log(path: str, offset: int) -> bytes | None:
    """The bytes of a log file from offset on; None if it does not exist (yet)."""
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            return log.read()
    except FileNotFoundError:
        return None


# -- nodes ---------------------------------------------------------------------------------


@main.group(cls=_Group)
def node() -> None:
    """List, inspect, update and remove the cluster's nodes (each runs a controller).

    \b
    Examples:
      meshctl node ls
      meshctl node update --availability drain node1
    """


@node.command("ls")
@_format_option
def node_ls(fmt: Format) -> None:
    """List nodes: STATUS is ready while the node's controller is live, else down.

    \b
    Examples:
      meshctl node ls
      meshctl node ls --format '{{.Name}} {{.State}} {{.Message}}'
    """
    views = nodes.node_views(_store())
    _show(fmt, [output.node_json(v) for v in views], lambda: output.node_table(views))


@node.command("inspect")
@click.argument("name", shell_complete=_names(NODE))
@_format_option
def node_inspect(name: str, fmt: Format) -> None:
    """Show node NAME: address, status, availability, labels.

    \b
    Examples:
      meshctl node inspect node1
      meshctl node inspect node1 --format json
    """
    store = _store()
    wanted = nodes.get_node(store, name).name
    (view,) = [v for v in nodes.node_views(store) if v.node.name == wanted]
    _show(fmt, output.node_json(view), lambda: output.node_pretty(view))


@node.command("update")
@click.argument("name", shell_complete=_names(NODE))
@click.option(
    "--availability",
    type=click.Choice(["active", "pause", "drain"]),
    help="active: takes tasks; pause: keeps its tasks, takes no new ones; drain: its tasks "
    "move to other nodes, one at a time, new before old.",
)
@click.option("--label-add", "labels_add", multiple=True, metavar="K=V", help="Add or set a label.")
@click.option("--label-rm", "labels_rm", multiple=True, metavar="K", help="Remove a label.")
def node_update(
    name: str, availability: str | None, labels_add: tuple[str, ...], labels_rm: tuple[str, ...]
) -> None:
    """Change node NAME's availability or labels (constraints use the labels).

    \b
    Examples:
      meshctl node update --availability drain node1
      meshctl node update --label-add zone=b --label-rm rack node2
    """
    if availability is None and not labels_add and not labels_rm:
        raise click.UsageError("nothing to update: give --availability, --label-add or --label-rm")
    nodes.update_node(
        _store(),
        name,
        availability=cast(Availability | None, availability),
        labels_add=_pairs(labels_add, "--label-add"),
        labels_rm=labels_rm,
    )
    click.echo(name)


@node.command("rm")
@click.argument("name", shell_complete=_names(NODE))
def node_rm(name: str) -> None:
    """Remove node NAME, which must be down: its tasks already run elsewhere.

    Its record goes, with its tasks' and attached containers' records and every address it
    held (tasks, containers, its load balancers and router on each network).

    \b
    Example:
      meshctl node rm node3
    """
    nodes.remove_node(_store(), name)
    click.echo(name)


# -- completion ------------------------------------------------------------------------------


@main.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the script that completes meshctl's commands, options and the store's names
    (services, networks, tasks, nodes) in SHELL.

    \b
    Examples:
      source <(meshctl completion bash)                       # this shell
      meshctl completion bash > /etc/bash_completion.d/meshctl
      meshctl completion zsh > "${fpath[1]}/_meshctl"
      meshctl completion fish > ~/.config/fish/completions/meshctl.fish
    """
    cls = get_completion_class(shell)
    assert cls is not None, shell
    prog = "meshctl"
    click.echo(cls(main, {}, prog, "_MESHCTL_COMPLETE").source())


# -- events ----------------------------------------------------------------------------------


@main.command("events")
@click.option(
    "--since",
    metavar="TIME",
    help="Show events from then on: a duration back (10m), Unix seconds or an RFC 3339 time "
    "[default: only new events; with --until, every kept one].",
)
@click.option(
    "--until", metavar="TIME", help="Stop at then (as --since); a past time: print and exit."
)
@click.option(
    "--filter",
    "filters",
    multiple=True,
    metavar="KEY=VALUE",
    help="Only matching events (repeatable; a key given twice matches either value): "
    "type=task|service|network|node|health|reconcile, action=, name=, id=, node=, "
    "service=, network=.",
)
@_format_option
def events(since: str | None, until: str | None, filters: tuple[str, ...], fmt: Format) -> None:
    """Print the cluster's events as they happen, as `docker events`: task, service, network,
    node and health transitions and reconcile errors, in the order they happened.

    The controllers' leader keeps them in the store for an hour (at most 10,000, see
    `controller run --events-window`), so any node can read them, also after the fact.
    With --format json each event is one JSON object per line (docs/cli-json.md).

    \b
    Examples:
      meshctl events --since 10m --filter service=web
      meshctl events --filter type=task --filter action=failed --format json
      meshctl events --since 1h --until 0s --format '{{.Type}} {{.Action}} {{.Name}}'
    """
    from meshctl import events as log
    from meshctl.durations import TimeError, parse_time

    now = time.time()
    try:
        start = parse_time(since, now, "--since") if since else None
        end = parse_time(until, now, "--until") if until else None
    except TimeError as err:
        raise ValidationError(str(err)) from None
    if start is None:
        start = -float("inf") if end is not None else now
    wanted = log.parse_filters(filters)
    template = formats.parse(fmt) if fmt not in ("table", "json") else None

    def show(event: log.MeshEvent) -> None:
        if not (start <= event.time and (end is None or event.time <= end)):
            return
        if not log.matches(event, wanted):
            return
        if fmt == "json":
            click.echo(json.dumps(event.to_dict()))
        elif template is not None:
            click.echo(formats.render(template, event.to_dict()))
        else:
            click.echo(output.event_line(event))

    store = _store()
    try:
        revision = store.revision()  # first: what is written while listing comes by the watch
        listed = log.read_events(store)
        for event in listed:
            show(event)
        seen = {e.key for e in listed}
        while end is None or time.time() < end:
            wait = 1.0 if end is None else max(0.0, min(1.0, end - time.time()))
            try:
                changes = store.watch(revision, timeout=wait)
            except Compacted:
                revision = store.revision()
                changes = []
                for event in log.read_events(store):
                    if event.key not in seen:
                        seen.add(event.key)
                        show(event)
            for change in changes:
                revision = max(revision, change.revision)
                if change.kind != log.EVENT or change.type != "put" or change.name in seen:
                    continue
                record = Record(change.kind, change.name, change.value or {}, 0, change.revision)
                try:
                    show(log.MeshEvent.from_record(record))
                except (KeyError, TypeError, ValueError):
                    continue
    except KeyboardInterrupt:
        return


# -- doctor ----------------------------------------------------------------------------------


@main.command("doctor")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="Output format; the JSON is stable (docs/cli-json.md).",
)
@click.option(
    "--node",
    help="Also check this node's overlay paths to its peers (a ping over VXLAN from its load "
    "balancers to theirs); run it where that node's controller runs.",
)
def doctor(fmt: Literal["table", "json"], node: str | None) -> None:
    """Report what this kernel supports (IPVS, nftables or iptables, namespaces, conntrack...).

    \b
    Examples:
      meshctl doctor
      meshctl doctor --format json
      meshctl doctor --node node1
    """
    from meshctl.controller.doctor import run_doctor

    env = _env()
    store_url = env.store_url if node is not None else None
    sys.exit(run_doctor(fmt, store_url, check_name(node, "--node") if node else None))


# -- controller and tasks --------------------------------------------------------------------


@main.group(cls=_Group)
def controller() -> None:
    """Run the per-node controller.

    \b
    Examples:
      meshctl controller run
      meshctl controller health --ready
    """


@controller.command("run")
@click.option("--node", help="This node's name (default: the host name).")
@click.option(
    "--lb-backend",
    type=click.Choice(["auto", "ipvs", "nftables", "iptables"]),
    default="auto",
    show_default=True,
    help="Load-balancer backend; auto picks the first the kernel runs, in this order (see doctor).",
)
@click.option(
    "--upstream-dns", multiple=True, help="Upstream resolver (default: /etc/resolv.conf)."
)
@click.option("--resync-period", default="10s", show_default=True, help="Full resync interval.")
@click.option(
    "--advertise-addr",
    metavar="IP",
    help="The address other nodes reach this one on (default: the default route's).",
)
@click.option(
    "--node-ttl",
    default="10s",
    show_default=True,
    help="How long the node stays up without its controller: then its tasks move elsewhere.",
)
@click.option(
    "--vxlan-port",
    type=int,
    default=4789,
    show_default=True,
    help="UDP port of the overlay networks on the underlay (the same on every node).",
)
@click.option(
    "--metrics-addr",
    default="127.0.0.1:9323",
    show_default=True,
    metavar="IP:PORT",
    help="Where to serve /metrics (Prometheus), /healthz and /readyz; '' for nowhere.",
)
@click.option(
    "--log-format",
    type=click.Choice(["logfmt", "json"]),
    default="logfmt",
    show_default=True,
    help="Log lines on stderr: key=value pairs, or one JSON object per line.",
)
@click.option(
    "--events-window",
    default="1h",
    show_default=True,
    help="How long `meshctl events` keeps events (the leader prunes older ones).",
)
@click.option(
    "--events-max",
    type=_Int(minimum=1),
    default=10_000,
    show_default=True,
    help="How many events are kept at most (the oldest go first).",
)
def controller_run(
    node: str | None,
    lb_backend: str,
    upstream_dns: tuple[str, ...],
    resync_period: str,
    advertise_addr: str | None,
    node_ttl: str,
    vxlan_port: int,
    metrics_addr: str,
    log_format: str,
    events_window: str,
    events_max: int,
) -> None:
    """Run the controller in the foreground on this node (the network namespace it starts in).

    It registers the node (refused while another controller runs it) and keeps it up with a
    lease in the store; the controller holding the leader key places every node's tasks.
    Stop it with SIGTERM: tasks keep running and a new controller adopts them. In a test or on
    a host that should stay untouched, start it inside a namespace with
    `nsenter --net=/run/netns/NODE meshctl controller run` (not `ip netns exec`, whose private
    mount namespace would hide the task namespaces the controller makes).

    \b
    Examples:
      meshctl controller run --node node1 --advertise-addr 10.0.0.11
      meshctl controller run --metrics-addr :9323 --log-format json
      nsenter --net=/run/netns/node1 meshctl controller run --node node1
    """
    from meshctl.controller.main import controller_settings, run_controller

    # Every option is checked before the store is opened (the node registers in it).
    settings = controller_settings(
        node,
        lb_backend,
        upstream_dns,
        duration(resync_period, "--resync-period"),
        advertise_addr,
        duration(node_ttl, "--node-ttl"),
        vxlan_port,
        metrics_addr,
        log_format,
        duration(events_window, "--events-window"),
        events_max,
    )
    env = _env()
    sys.exit(run_controller(env.store, env.state_dir, settings))


@controller.command("health")
@click.option("--ready", is_flag=True, help="Ask /readyz (the first pass converged) instead.")
@click.option(
    "--metrics-addr",
    default="127.0.0.1:9323",
    show_default=True,
    metavar="IP:PORT",
    help="Where the controller serves them (its --metrics-addr).",
)
@click.option("--wait", "wait_for", default="0s", metavar="D", help="Ask again until then.")
def controller_health(ready: bool, metrics_addr: str, wait_for: str) -> None:
    """Ask this node's controller whether it is healthy (/healthz) or ready (/readyz); print
    its answer and exit 0 when it says so, else 1 with the reason.

    Run it where the controller runs (its network namespace). Healthy: the last pass
    succeeded and no change waits longer than 2 x the resync period; ready: a pass has
    converged since it started (docs/metrics.md).

    \b
    Examples:
      meshctl controller health
      meshctl controller health --ready --wait 90s     # e.g. systemd's ExecStartPost
    """
    import urllib.error
    import urllib.request

    from meshctl.controller.endpoints import parse_address

    host, port = parse_address(metrics_addr)
    host = f"[{host}]" if ":" in host else host or "127.0.0.1"
    url = f"http://{host}:{port}/{'readyz' if ready else 'healthz'}"
    deadline = time.monotonic() + duration(wait_for, "--wait")
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                click.echo(response.read().decode().strip())
                return
        except urllib.error.HTTPError as err:
            why = err.read().decode().strip() or f"HTTP {err.code}"
        except OSError as err:
            why = f"no controller answers on {url}: {getattr(err, 'reason', err)}"
        if time.monotonic() >= deadline:
            raise MeshctlError(f"{'not ready' if ready else 'unhealthy'}: {why}")
        time.sleep(POLL_INTERVAL)


@main.command("exec", context_settings={"allow_interspersed_args": False})
@click.argument("task", shell_complete=_names(TASK))
@click.argument("command", nargs=-1, required=True)
def exec_(task: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside a running task (name like web.1, or id), as `docker exec` does.

    It gets the task's network, mount and UTS namespaces (its hostname, resolv.conf and hosts)
    and environment; stdin, stdout and stderr stay attached and its exit code is meshctl's.

    \b
    Examples:
      meshctl exec web.1 -- hostname
      meshctl exec web.2 -- sh
    """
    import os

    from meshctl import naming
    from meshctl.runtime import exec_argv

    if command[:1] == ("--",):  # click keeps the separator once parsing stopped at TASK
        command = command[1:]
    if not command:
        raise click.UsageError("give the command to run after --, like: meshctl exec web.1 -- sh")
    found = ops.find_task(_store(), _task_ref(task))
    if found.pid is None or found.state != "running":
        raise MeshctlError(
            f"task {found.name} is not running ({found.state}); see meshctl service ps"
        )
    argv = exec_argv(naming.task_netns(found.id), found.pid, list(command))
    os.execvp(argv[0], argv)


@main.group(cls=_Group)
def container() -> None:
    """Attach namespaces made by other runtimes (Docker, podman, unshare) to networks.

    \b
    Examples:
      meshctl container attach --pid 4242 --name legacy --network front
      meshctl container ls
    """


@container.command("attach")
@click.option(
    "--pid",
    type=_Int(minimum=1, maximum=PID_MAX),
    help="A process whose network namespace to attach (its start time is recorded: a later "
    "process that gets the same PID is never wired).",
)
@click.option("--netns", "netns_path", help="The namespace's path (e.g. /run/netns/NAME).")
@click.option("--name", required=True, help="A name for the attachment (a DNS label).")
@click.option(
    "--network",
    required=True,
    shell_complete=_names(NETWORK),
    help="The network to attach it to.",
)
@click.option(
    "--node",
    shell_complete=_names(NODE),
    help="The node whose controller wires it (default: the only node).",
)
@_format_option
def container_attach(
    pid: int | None,
    netns_path: str | None,
    name: str,
    network: str,
    node: str | None,
    fmt: Format,
) -> None:
    """Give a foreign namespace an address on NETWORK: one veth, nothing else of its changes.

    \b
    Examples:
      meshctl container attach --pid 4242 --name legacy --network front
      meshctl container attach --netns /run/netns/db --name db --network back --node node2
    """
    if (pid is None) == (netns_path is None):
        raise click.UsageError("give exactly one of --pid PID or --netns PATH")
    check_name(name, "container name")
    if node is not None:
        check_name(node, "--node")
    path = netns_path if netns_path is not None else f"/proc/{pid}/ns/net"
    _refuse_own_netns(path)
    start_time = _start_time(path)
    store = _store()
    if node is None:
        known = [v.node.name for v in nodes.node_views(store)]
        if len(known) != 1:
            raise MeshctlError(
                f"{'no node is known' if not known else 'several nodes are known'}: "
                "say which node's controller wires it with --node NAME"
            )
        node = known[0]
    attached = ops.attach_container(store, name, path, network, node, start_time)
    _show(fmt, attached.to_dict(), lambda: f"{attached.name} {attached.network}={attached.address}")


def _refuse_own_netns(path: str) -> None:
    """Refuse the namespace meshctl itself runs in, or the host's (PID 1's): a mesh leg there
    would wire the node itself into the network."""
    try:
        target = os.stat(path)
    except OSError:
        return  # a missing path is refused by ops.attach_container, saying so
    for own, whose in (("/proc/self/ns/net", "meshctl's own"), ("/proc/1/ns/net", "the host's")):
        try:
            mine = os.stat(own)
        except OSError:
            continue  # PID 1's is not readable without root
        if (target.st_dev, target.st_ino) == (mine.st_dev, mine.st_ino):
            raise ValidationError(
                f"invalid namespace {path}: it is {whose} network namespace; attaching it "
                "would put a mesh leg into the node itself: give a container's namespace"
            )


def _start_time(path: str) -> int | None:
    """For /proc/PID/ns/net, the start time of PID's process, recorded against PID reuse."""
    from meshctl.runtime import read_start_time

    pid = proc_pid(path)
    if pid is None:
        return None
    start_time = read_start_time(pid)
    if start_time is None:
        raise MeshctlError(f"process {pid} is not running; give the PID of a running process")
    return start_time


@container.command("detach")
@click.argument("name", shell_complete=_names(CONTAINER))
def container_detach(name: str) -> None:
    """Remove exactly what attach added: the veth and the address.

    \b
    Example:
      meshctl container detach legacy
    """
    ops.detach_container(_store(), check_name(name, "container name"))


@container.command("ls")
@_format_option
def container_ls(fmt: Format) -> None:
    """List attached namespaces.

    \b
    Examples:
      meshctl container ls
      meshctl container ls --format '{{.Name}} {{.Address}}'
    """
    containers = ops.list_containers(_store())
    _show(
        fmt,
        [c.to_dict() for c in containers],
        lambda: output.table(
            ["NAME", "NETWORK", "ADDRESS", "NODE", "NETNS"],
            ([c.name, c.network, c.address, c.node, c.netns] for c in containers),
        ),
    )


@main.group(cls=_Group)
def router() -> None:
    """The HTTP routing mesh: an HAProxy on every node routes HTTP by Host header (and TLS by
    SNI) to the services created with --hostname.

    \b
    Examples:
      meshctl router enable
      meshctl service create --name web --network front --hostname app.example.com -- ./web
    """


@router.command("enable")
@click.option("--http-port", type=_Int(1, 65535), default=80, show_default=True)
@click.option("--https-port", type=_Int(1, 65535), default=443, show_default=True)
@click.option(
    "--publish-mode",
    type=click.Choice(["ingress", "host"]),
    default="ingress",
    show_default=True,
    help="ingress: every node's ports spread over every node's router (the routing mesh); "
    "host: each node's own router, which sees the client's address.",
)
def router_enable(http_port: int, https_port: int, publish_mode: str) -> None:
    """Run the router on every node (or move it to other ports); print its id.

    \b
    Examples:
      meshctl router enable
      meshctl router enable --http-port 8080 --https-port 8443 --publish-mode host
    """
    from meshctl.router.ops import enable_router, get_router

    store = _store()
    current = get_router(store)
    held = {p.published for p in current.ports()} if current else set()
    wanted = Router(http_port, https_port, cast(PublishMode, publish_mode)).ports()
    _refuse_ports_in_use([p for p in wanted if p.published not in held])
    click.echo(enable_router(store, http_port, https_port, cast(PublishMode, publish_mode)).id)


@router.command("disable")
def router_disable() -> None:
    """Stop the router on every node; routes stay stored for when it is enabled again.

    \b
    Examples:
      meshctl router disable
    """
    from meshctl.router.ops import disable_router

    click.echo(disable_router(_store()).id)


@router.command("inspect")
@_format_option
def router_inspect(fmt: Format) -> None:
    """Show the router: ports, routes, certificates, and how it does on each node.

    \b
    Examples:
      meshctl router inspect
      meshctl router inspect --format '{{json .Routes}}'
    """
    from meshctl.router.ops import get_router, list_certificates

    store = _store()
    current = get_router(store)
    if current is None:
        raise MeshctlError("the router is not enabled; enable it with: meshctl router enable")
    args = (current, ops.list_services(store), list_certificates(store), nodes.statuses(store))
    _show(fmt, output.router_json(*args), lambda: output.router_pretty(*args))


@router.group("cert", cls=_Group)
def router_cert() -> None:
    """The certificates the router terminates TLS with, chosen by SNI.

    \b
    Examples:
      meshctl router cert add app.example.com --cert app.pem --key app.key
      meshctl router cert ls
    """


@router_cert.command("add")
@click.argument("host")
@click.option("--cert", "cert_path", required=True, help="The certificate (PEM; its chain after).")
@click.option("--key", "key_path", required=True, help="Its private key (PEM).")
def router_cert_add(host: str, cert_path: str, key_path: str) -> None:
    """Store the certificate for HOST (`*.example.com`: every name below), replacing one.

    \b
    Examples:
      meshctl router cert add app.example.com --cert app.pem --key app.key
      meshctl router cert add '*.example.com' --cert wildcard.pem --key wildcard.key
    """
    from meshctl.router.ops import add_certificate

    click.echo(add_certificate(_store(), host.lower(), cert_path, key_path).host)


@router_cert.command("ls")
@_format_option
def router_cert_ls(fmt: Format) -> None:
    """List the stored certificates (never their keys).

    \b
    Examples:
      meshctl router cert ls
      meshctl router cert ls --format '{{.Host}}'
    """
    from meshctl.router.ops import list_certificates

    certificates = list_certificates(_store())
    _show(fmt, [output.certificate_json(c) for c in certificates],
          lambda: output.certificate_table(certificates))  # fmt: skip


@router_cert.command("rm")
@click.argument("host")
def router_cert_rm(host: str) -> None:
    """Remove the certificate for HOST.

    \b
    Examples:
      meshctl router cert rm app.example.com
    """
    from meshctl.router.ops import remove_certificate

    remove_certificate(_store(), host.lower())
    click.echo(host.lower())


@main.group("store", cls=_Group)
def store_group() -> None:
    """Repair the store by hand (for a record an error names as invalid).

    \b
    Example:
      meshctl store rm service broken-record
    """


@store_group.command("rm")
@click.argument("kind")
@click.argument("name")
def store_rm(kind: str, name: str) -> None:
    """Delete the raw record KIND NAME, as an error naming it invalid says.

    Nothing that refers to it changes (tasks of a service, addresses it holds): use it only
    for a record meshctl cannot read, and remove or re-create what depends on it after.

    \b
    Example:
      meshctl store rm task 4ff15fb0c883
    """
    check_text(kind, "record kind")
    check_text(name, "record name")
    if not _store().delete(kind, name):
        raise MeshctlError(f"there is no record {kind} {name}; nothing was removed")
    click.echo(f"{kind} {name}")


@main.command("diff")
@click.option(
    "--node",
    shell_complete=_names(NODE),
    help="This node's name (default: the host name), as the controller's.",
)
@click.option(
    "--lb-backend",
    type=click.Choice(["auto", "ipvs", "nftables", "iptables"]),
    default="auto",
    show_default=True,
    help="The backend to compare with [auto: the one recorded for the node].",
)
def diff(node: str | None, lb_backend: str) -> None:
    """Print what the kernel of this node lacks or has too much of; exit 0 when converged.

    Run it where the controller runs (its network namespace). Each line is one difference:
    `+` missing, `-` to remove, `~` to change, `!` what the controller cannot change (a link
    of another's with the name it wants, a network that fails on this node). Exit code 1 when
    there is any. The backend is the one recorded for the node by its controller, unless given.

    \b
    Examples:
      meshctl diff
      nsenter --net=/run/netns/node1 meshctl diff --node node1
    """
    from kernel.system import real_kernel
    from meshctl.controller.diff import diff_lines
    from meshctl.controller.main import default_node_name

    name = check_name(node or default_node_name(), "--node")
    lines = diff_lines(_store(), real_kernel(), name, lb_backend, _env().state_dir)
    for line in lines:
        click.echo(line)
    sys.exit(1 if lines else 0)
