"""`meshctl events`: the cluster's event log, read and followed (meshctl.events)."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import click

from meshctl.cli import common, formats, output
from meshctl.cli.common import Format, format_option
from meshctl.cli.root import main
from meshctl.model import ValidationError


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
@format_option
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

    store = common.store()
    with _stopped_by_signals():
        for event in log.follow_events(store, end):
            show(event)


@contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """SIGINT (Ctrl-C) and SIGTERM end what runs inside cleanly (exit code 0), whatever this
    process inherited: one started in the background by a shell (`nohup ... &`) gets SIGINT
    ignored, and would otherwise follow on after a SIGINT."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only; the caller's own handlers stay
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {number: signal.signal(number, stop) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except KeyboardInterrupt:
        pass
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
