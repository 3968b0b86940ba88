"""`meshctl node ls/inspect/update/rm/promote/demote`: the cluster's nodes."""

from __future__ import annotations

from typing import cast

import click

from meshctl.cli import common, output
from meshctl.cli.common import Format, Group, format_option, names, pairs, show
from meshctl.cli.root import main
from meshctl.cluster import nodes
from meshctl.commands.node import remove_node, update_node
from meshctl.model import NODE, Availability


@main.group(cls=Group)
def node() -> None:
    """List, inspect, update, promote, demote and remove the cluster's nodes (each runs a
    controller).

    \b
    Examples:
      meshctl node ls
      meshctl node update --availability drain node1
      meshctl node promote node2
    """


@node.command("ls")
@format_option
def node_ls(fmt: Format) -> None:
    """List nodes: STATUS is ready while the node's controller is live, else down.

    \b
    Examples:
      meshctl node ls
      meshctl node ls --format '{{.Name}} {{.State}} {{.Message}}'
    """
    views = nodes.node_views(common.store())
    show(fmt, [output.node_json(v) for v in views], lambda: output.node_table(views))


@node.command("inspect")
@click.argument("name", shell_complete=names(NODE))
@format_option
def node_inspect(name: str, fmt: Format) -> None:
    """Show node NAME: address, status, availability, labels.

    \b
    Examples:
      meshctl node inspect node1
      meshctl node inspect node1 --format json
    """
    store = common.store()
    wanted = nodes.get_node(store, name).name
    (view,) = [v for v in nodes.node_views(store) if v.node.name == wanted]
    show(fmt, output.node_json(view), lambda: output.node_pretty(view))


@node.command("update")
@click.argument("name", shell_complete=names(NODE))
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
    update_node(
        common.store(),
        name,
        availability=cast(Availability | None, availability),
        labels_add=pairs(labels_add, "--label-add"),
        labels_rm=labels_rm,
    )
    click.echo(name)


@node.command("rm")
@click.argument("name", shell_complete=names(NODE))
def node_rm(name: str) -> None:
    """Remove node NAME, which must be down: its tasks already run elsewhere.

    Its record goes, with its tasks' and attached containers' records and every address it
    held (tasks, containers, its load balancers and router on each network). In a cluster
    made by `meshctl cluster init` (run it on a manager), its store user goes first: its
    certificate and password open nothing from that moment. A manager is demoted first.

    \b
    Example:
      meshctl node rm node3
    """
    env = common.env()
    if env.cluster is None:
        remove_node(env.store, name)
    else:
        from meshctl.commands.cluster_roles import Admin, retire

        retire(Admin.here(env.state_dir), env.store, name)
    click.echo(name)


@node.command("promote")
@click.argument("name", shell_complete=names(NODE))
def node_promote(name: str) -> None:
    """Make worker NAME a manager (run it on a manager of a cluster made by `cluster init`).

    Its store user may write desired state at once; its controller then takes a manager's
    certificate and starts an etcd member of the store on its node (a learner, a voter once it
    has caught up). Keep an odd number of managers (3 or 5).

    \b
    Example:
      meshctl node promote node2
    """
    from meshctl.commands.cluster_roles import promote

    changed = promote(common.env().state_dir, common.store(), name)
    click.echo(f"node {name} is a manager {'now' if changed else 'already'}")


@node.command("demote")
@click.argument("name", shell_complete=names(NODE))
def node_demote(name: str) -> None:
    """Make manager NAME a worker (run it on a manager).

    Its etcd member leaves the store first, which is refused for the last manager, or when the
    managers left would not make a quorum; then its store user becomes a worker's, it gives up
    the leadership, and its controller stops the member and forgets the managers' secrets.

    \b
    Example:
      meshctl node demote node3
    """
    from meshctl.commands.cluster_roles import demote

    changed = demote(common.env().state_dir, common.store(), name)
    click.echo(f"node {name} is a worker {'now' if changed else 'already'}")
