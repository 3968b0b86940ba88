"""`meshctl events`: the cluster's event log, read and followed (meshctl.events)."""

from __future__ import annotations

import json
import time

import click

from meshctl.cli import common, formats, output
from meshctl.cli.common import Format, format_option
from meshctl.cli.root import main
from meshctl.model import ValidationError
from meshctl.store import Compacted, Record


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
