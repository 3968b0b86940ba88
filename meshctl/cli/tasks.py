"""`meshctl service logs` and `meshctl exec`: a task's output and a command run inside it."""

from __future__ import annotations

import time

import click

from meshctl.cli import common
from meshctl.cli.common import Int, names, task_ref
from meshctl.cli.root import main
from meshctl.cli.service import service
from meshctl.commands.read import find_task, service_tasks
from meshctl.model import SERVICE, TASK, MeshctlError, ValidationError


@service.command("logs")
@click.argument("target", metavar="NAME|TASK", shell_complete=names(SERVICE, TASK))
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines (Ctrl-C stops).")
@click.option("--tail", type=Int(minimum=0), help="Only the last N lines of each task.")
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

    task_ref(target)
    try:
        start = parse_time(since, time.time(), "--since") if since else None
    except TimeError as err:
        raise ValidationError(str(err)) from None
    from meshctl.durations import format_time
    from meshctl.runtime import task_log_lines

    env = common.env()

    def tasks() -> list[tuple[str, str]]:
        shown, prefixed = service_tasks(env.store, target)
        return [(task.id, f"{task.name} | " if prefixed else "") for task in shown]

    lines = task_log_lines(
        env.state_dir, tasks, follow=follow, tail=tail, since=start, timed=timestamps
    )
    for label, line, when in lines:
        click.echo((f"{format_time(when)} " if timestamps else "") + label + line)


@main.command("exec", context_settings={"allow_interspersed_args": False})
@click.argument("task", shell_complete=names(TASK))
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
    found = find_task(common.store(), task_ref(task))
    if found.pid is None or found.state != "running":
        raise MeshctlError(
            f"task {found.name} is not running ({found.state}); see meshctl service ps"
        )
    argv = exec_argv(naming.task_netns(found.id), found.pid, list(command))
    os.execvp(argv[0], argv)
