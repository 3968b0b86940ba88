"""`meshctl network create/ls/inspect/rm`."""

from __future__ import annotations

from typing import Literal

import click

from meshctl.cli import common, output
from meshctl.cli.common import Format, Group, format_option, names, pairs, show
from meshctl.cli.root import main
from meshctl.commands.network import create_network, remove_network
from meshctl.commands.read import get_network, list_networks, network_ipam
from meshctl.model import NETWORK, check_name


@main.group(cls=Group)
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
    labels_given = pairs(labels, "--label")
    created = create_network(
        common.store(),
        name,
        subnet=subnet,
        driver=driver,
        internal=internal,
        labels=labels_given,
    )
    click.echo(created.id)


@network.command("ls")
@format_option
def network_ls(fmt: Format) -> None:
    """List networks.

    \b
    Examples:
      meshctl network ls
      meshctl network ls --format '{{.Name}} {{.Subnet}}'
    """
    store = common.store()
    networks = list_networks(store)
    docs = [] if fmt == "table" else [
        output.network_json(n, network_ipam(store, n)) for n in networks
    ]  # fmt: skip
    show(fmt, docs, lambda: output.network_table(networks))


@network.command("inspect")
@click.argument("name", shell_complete=names(NETWORK))
@format_option
def network_inspect(name: str, fmt: Format) -> None:
    """Show network NAME with its gateway and address allocations.

    \b
    Examples:
      meshctl network inspect front
      meshctl network inspect front --format json
    """
    store = common.store()
    net = get_network(store, check_name(name, "network name"))
    state = network_ipam(store, net)
    show(fmt, output.network_json(net, state), lambda: output.network_pretty(net, state))


@network.command("rm")
@click.argument("name", shell_complete=names(NETWORK))
def network_rm(name: str) -> None:
    """Remove network NAME (refused while a service uses it).

    \b
    Example:
      meshctl network rm front
    """
    remove_network(common.store(), check_name(name, "network name"))
    click.echo(name)
