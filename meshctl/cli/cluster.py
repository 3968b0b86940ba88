"""`meshctl cluster init/join/join-token/leave`: a cluster that forms itself, as swarm's does."""

from __future__ import annotations

import socket

import click

from meshctl.cli import common
from meshctl.cli.common import Group
from meshctl.cli.root import main
from meshctl.cluster.config import CLIENT_PORT, JOIN_PORT, PEER_PORT
from meshctl.model import check_name, duration

ODD_MANAGERS = (
    "Managers hold the cluster's store: run an odd number of them (3 or 5) to survive the "
    "loss of one (or two); with 2, losing either stops every write."
)


@main.group(cls=Group)
def cluster() -> None:
    """Make a cluster, join it, hand out its join tokens, and leave it.

    \b
    Examples:
      meshctl cluster init --advertise-addr 10.0.0.1
      meshctl cluster join-token worker
      meshctl cluster join --token MESHCTL-1-... --advertise-addr 10.0.0.2 10.0.0.1
      meshctl cluster leave
    """


def _node_name(node: str | None) -> str:
    return check_name(node or socket.gethostname().split(".")[0], "--node")


@cluster.command("init")
@click.option(
    "--advertise-addr", "address", required=True, help="This node's address on the underlay."
)
@click.option("--node", help="This node's name (default: the host name).")
@click.option("--client-port", type=common.Int(1, 65535), default=CLIENT_PORT, show_default=True,
              help="The store's client port on this manager.")  # fmt: skip
@click.option("--peer-port", type=common.Int(1, 65535), default=PEER_PORT, show_default=True,
              help="The store's peer port on this manager.")  # fmt: skip
@click.option("--join-port", type=common.Int(1, 65535), default=JOIN_PORT, show_default=True,
              help="Where this manager takes joining nodes.")  # fmt: skip
@click.option("--cert-expiry", default="2160h", show_default=True, metavar="DURATION",
              help="How long node certificates are valid (90 days); each node renews its "
              "own at half.")  # fmt: skip
def cluster_init(
    address: str, node: str | None, client_port: int, peer_port: int, join_port: int,
    cert_expiry: str,
) -> None:  # fmt: skip
    """Make a cluster with this node as its first manager: its CA, its store (an etcd member
    on this node, TLS with client certificates and a user per node), and its join tokens.

    \b
    Examples:
      meshctl cluster init --advertise-addr 10.0.0.1
      meshctl cluster init --advertise-addr 10.0.0.1 --node node1
    """
    from meshctl.commands.cluster import init

    name = _node_name(node)
    days = duration(cert_expiry, "--cert-expiry") / 86400
    made = init(common.env().state_dir, name, address, client_port, peer_port, join_port, days)
    click.echo(f"Cluster initialized: this node ({name}) is a manager.\n")
    click.echo("Start its controller (it also runs the node's store member):\n")
    click.echo("    meshctl controller run\n")
    click.echo("To add a worker to this cluster, run on it:\n")
    click.echo(f"    {made.join_command('worker')}\n")
    click.echo("To add a manager, run `meshctl cluster join-token manager` and follow it.")
    click.echo(ODD_MANAGERS)


@cluster.command("join")
@click.argument("manager")
@click.option("--token", required=True, help="A join token (`meshctl cluster join-token`).")
@click.option(
    "--advertise-addr", "address", required=True, help="This node's address on the underlay."
)
@click.option("--node", help="This node's name (default: the host name).")
def cluster_join(manager: str, token: str, address: str, node: str | None) -> None:
    """Join the cluster a manager (ADDRESS[:PORT]) belongs to, as the token's role.

    \b
    Examples:
      meshctl cluster join --token MESHCTL-1-... --advertise-addr 10.0.0.2 10.0.0.1
    """
    from meshctl.commands.cluster import join_cluster

    name = _node_name(node)
    admitted = join_cluster(common.env().state_dir, manager, token, name, address)
    click.echo(f"This node ({name}) joined the cluster as a {admitted.role}.")
    if admitted.role == "manager":
        click.echo("Its etcd member runs and votes. " + ODD_MANAGERS)
    click.echo("Start its controller:  meshctl controller run")


@cluster.command("join-token")
@click.argument("role", type=click.Choice(["worker", "manager"]))
@click.option("--quiet", "-q", is_flag=True, help="Print the token only.")
@click.option("--rotate", is_flag=True, help="Replace the token: the old one admits no one.")
def cluster_join_token(role: str, quiet: bool, rotate: bool) -> None:
    """Print the command that joins a node as a ROLE (manager only).

    \b
    Examples:
      meshctl cluster join-token worker
      meshctl cluster join-token --rotate --quiet manager
    """
    from meshctl.commands.cluster import join_token

    tokens = join_token(common.env().state_dir, role, rotate=rotate)
    if quiet:
        click.echo(tokens.tokens[role])
        return
    if rotate:
        click.echo(f"The {role} join token was rotated: the old one admits no one now.")
    click.echo(f"To add a {role} to this cluster, run on it:\n")
    click.echo(f"    {tokens.join_command(role)}")


@cluster.command("leave")
@click.option("--force", is_flag=True,
              help="Leave even as a manager (its member leaves the store; the last manager "
              "takes the store down with it).")  # fmt: skip
def cluster_leave(force: bool) -> None:
    """Take this node out of its cluster; stop its controller first.

    A worker asks a manager to retire it: its store user goes (its credentials open nothing
    from then) and its record with it, and its tasks run elsewhere. A manager is demoted first
    (`meshctl node demote NODE`), or leaves with --force. Then this node forgets the cluster:
    its config, keys and passwords, and a manager's etcd member and data.

    \b
    Examples:
      meshctl cluster leave
      meshctl cluster leave --force
    """
    from meshctl.commands.cluster_roles import leave

    click.echo(leave(common.env().state_dir, force))
