"""`meshctl container attach/detach/ls`: foreign namespaces on the mesh's networks."""

from __future__ import annotations

import click

from meshctl.cli import common, output
from meshctl.cli.common import PID_MAX, Format, Group, Int, format_option, names, show
from meshctl.cli.root import main
from meshctl.commands.container import (
    attach_container,
    detach_container,
    namespace_of,
    only_node,
)
from meshctl.commands.read import list_containers
from meshctl.model import CONTAINER, NETWORK, NODE, check_name


@main.group(cls=Group)
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
    type=Int(minimum=1, maximum=PID_MAX),
    help="A process whose network namespace to attach (its start time is recorded: a later "
    "process that gets the same PID is never wired).",
)
@click.option("--netns", "netns_path", help="The namespace's path (e.g. /run/netns/NAME).")
@click.option("--name", required=True, help="A name for the attachment (a DNS label).")
@click.option(
    "--network",
    required=True,
    shell_complete=names(NETWORK),
    help="The network to attach it to.",
)
@click.option(
    "--node",
    shell_complete=names(NODE),
    help="The node whose controller wires it (default: the only node).",
)
@format_option
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
    path, start_time = namespace_of(pid, netns_path)
    store = common.store()
    attached = attach_container(store, name, path, network, node or only_node(store), start_time)
    show(fmt, attached.to_dict(), lambda: f"{attached.name} {attached.network}={attached.address}")


@container.command("detach")
@click.argument("name", shell_complete=names(CONTAINER))
def container_detach(name: str) -> None:
    """Remove exactly what attach added: the veth and the address.

    \b
    Example:
      meshctl container detach legacy
    """
    detach_container(common.store(), check_name(name, "container name"))


@container.command("ls")
@format_option
def container_ls(fmt: Format) -> None:
    """List attached namespaces.

    \b
    Examples:
      meshctl container ls
      meshctl container ls --format '{{.Name}} {{.Address}}'
    """
    containers = list_containers(common.store())
    show(
        fmt,
        [c.to_dict() for c in containers],
        lambda: output.table(
            ["NAME", "NETWORK", "ADDRESS", "NODE", "NETNS"],
            ([c.name, c.network, c.address, c.node, c.netns] for c in containers),
        ),
    )
