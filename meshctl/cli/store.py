"""`meshctl store rm`: repairing the store by hand, one raw record at a time."""

from __future__ import annotations

import click

from meshctl.cli import common
from meshctl.cli.common import Group
from meshctl.cli.root import main
from meshctl.model import MeshctlError, check_text


@main.group("store", cls=Group)
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
    if not common.store().delete(kind, name):
        raise MeshctlError(f"there is no record {kind} {name}; nothing was removed")
    click.echo(f"{kind} {name}")
