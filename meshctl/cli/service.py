"""`meshctl service create/update/ls/inspect/ps/scale/rm`, and the wait for a service's tasks
that create, update, scale and rm do without --detach (meshctl.commands.progress)."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

import click

from meshctl.cli import common, output
from meshctl.cli.common import Format, Group, format_option, names, show, timeout_option
from meshctl.cli.root import main
from meshctl.cli.service_options import spec_changes, spec_options
from meshctl.cluster import nodes
from meshctl.commands.limits import check_replicas
from meshctl.commands.read import get_service, list_services, list_tasks
from meshctl.commands.service import (
    create_service,
    refuse_new_ports_in_use,
    refuse_ports_in_use,
    remove_service,
    scale_services,
    update_service,
)
from meshctl.model import (
    SERVICE,
    MeshctlError,
    Service,
    ascii_int,
    check_name,
    duration,
)
from meshctl.store import Store


@main.group(cls=Group)
def service() -> None:
    """Create, list, inspect, scale, update and remove services; list their tasks; read logs.

    \b
    Examples:
      meshctl service ps web
      meshctl service scale web=5
    """


def _check_routes(store: Store, service: Service, changes: Mapping[str, Any] | None = None) -> None:
    """Routes HAProxy would refuse are refused now, before anything is stored (for an update:
    the service with its changes)."""
    from meshctl.commands.router import check_routes_with_haproxy

    check_routes_with_haproxy(store, service, changes)


def _wait(store: Store, names: Sequence[str], timeout: float, ids: Mapping[str, str]) -> None:
    """Wait until the services' tasks run (or, for removed ones, have stopped), showing each
    slot's progress: docker's bars on a terminal, a line per change otherwise. After timeout,
    or at once when a task ended that its restart policy does not start again, each stuck
    task's reason and exit code 1. ids: service name → id (a removed one's)."""
    from meshctl.commands import progress

    if not nodes.controller_running(store):
        click.echo("no controller is running: tasks stay pending", err=True)
        return
    tty = sys.stderr.isatty()
    drawn, last = 0, ""
    views: list[progress.Progress] = []
    for views in progress.watch(store, names, ids, timeout):
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
    for view in views:
        for reason in progress.stuck(view):
            click.echo(reason, err=True)
    hopeless = any(view.hopeless for view in views)
    why = "cannot converge: a task ended for good" if hopeless else (
        f"did not converge within {timeout:g}s"
    )  # fmt: skip
    raise MeshctlError(f"{', '.join(names)} {why}; see: meshctl service ps {names[0]}")


@service.command("create", context_settings={"allow_interspersed_args": False})
@click.option("--name", required=True, help="Service name (a DNS label of at most 56 characters).")
@spec_options
@timeout_option
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
    spec = Service(name=name, **spec_changes(name, opts, None))
    refuse_ports_in_use(spec.ports)
    store = common.store()
    _check_routes(store, spec)
    created = create_service(store, spec)
    click.echo(created.id)
    if not detach:
        _wait(store, [name], wait, {name: created.id})


# NAME comes first here: options may follow it, and the new command goes after `--`.
@service.command("update")
@click.argument("name", shell_complete=names(SERVICE))
@spec_options
@timeout_option
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
    store = common.store()
    current = get_service(store, check_name(name, "service name"))
    changes = spec_changes(name, opts, current)
    if not changes:
        raise click.UsageError("nothing to update: give at least one option")
    _check_routes(store, current, changes)
    refuse_new_ports_in_use(store, name, changes)
    updated = update_service(store, name, changes)
    click.echo(name)
    if not detach:
        _wait(store, [name], wait, {name: updated.id})


@service.command("ls")
@format_option
def service_ls(fmt: Format) -> None:
    """List services.

    \b
    Examples:
      meshctl service ls
      meshctl service ls --format '{{.Name}}: {{.Running}}/{{.Replicas}}'
    """
    store = common.store()
    services, tasks = list_services(store), list_tasks(store)
    docs = [output.service_summary_json(s, tasks) for s in services]
    show(fmt, docs, lambda: output.service_table(services, tasks))


@service.command("inspect")
@click.argument("name", shell_complete=names(SERVICE))
@format_option
def service_inspect(name: str, fmt: Format) -> None:
    """Show service NAME's spec, with its VIP on each network.

    \b
    Examples:
      meshctl service inspect web
      meshctl service inspect web --format '{{json .Networks}}'
    """
    store = common.store()
    svc = get_service(store, check_name(name, "service name"))
    tasks = list_tasks(store, svc)
    show(fmt, output.service_json(svc, tasks), lambda: output.service_pretty(svc, tasks))


@service.command("ps")
@click.argument("name", shell_complete=names(SERVICE))
@format_option
def service_ps(name: str, fmt: Format) -> None:
    """List the tasks of service NAME, including those shutting down.

    \b
    Examples:
      meshctl service ps web
      meshctl service ps web --format '{{.Name}} {{.State}} {{.Problem}}'
    """
    store = common.store()
    tasks = list_tasks(store, get_service(store, check_name(name, "service name")))
    statuses = nodes.statuses(store)
    docs = [output.task_json(t, statuses) for t in tasks]
    show(fmt, docs, lambda: output.task_table(tasks, statuses=statuses))


@service.command("scale")
@click.argument(
    "assignments",
    nargs=-1,
    required=True,
    metavar="NAME=REPLICAS...",
    shell_complete=names(SERVICE, suffix="="),
)
@click.option("--detach", "-d", is_flag=True, help="Return without waiting for tasks.")
@timeout_option
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
        replicas[check_name(name, "service name")] = check_replicas(name, number)
    store = common.store()
    scaled = scale_services(store, replicas)
    for svc in scaled:
        click.echo(f"{svc.name} scaled to {svc.replicas}")
    if not detach:
        _wait(store, list(replicas), wait, {svc.name: svc.id for svc in scaled})


@service.command("rm")
@click.argument("name", shell_complete=names(SERVICE))
@click.option("--detach", "-d", is_flag=True, help="Return without waiting for the tasks.")
@timeout_option
def service_rm(name: str, detach: bool, timeout: str) -> None:
    """Remove service NAME; its tasks are stopped by their controllers.

    Without --detach it waits until every task has stopped.

    \b
    Examples:
      meshctl service rm web
      meshctl service rm web --detach
    """
    wait = duration(timeout, "--timeout")
    store = common.store()
    removed = remove_service(store, check_name(name, "service name"))
    click.echo(name)
    if not detach:
        _wait(store, [name], wait, {name: removed.id})
