"""`meshctl controller run/health`, `meshctl diff` and `meshctl doctor`: the commands run where
a node's controller runs, about its kernel and its health."""

from __future__ import annotations

import sys
from typing import Literal

import click

from meshctl.cli import common
from meshctl.cli.common import Group, Int, env, names
from meshctl.cli.root import main
from meshctl.model import NODE, check_name, duration


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
    """Report what this kernel supports (IPVS, nftables or iptables, namespaces, conntrack...),
    and warn of a store anyone can write (a plain etcd:// --store).

    \b
    Examples:
      meshctl doctor
      meshctl doctor --format json
      meshctl doctor --node node1
    """
    from meshctl.cli.doctor import run_doctor

    env = common.env()
    # A store named by --store (or this node's cluster) is checked for its protection; the
    # default SQLite file is not opened (doctor runs before anything exists).
    named = node is not None or env.explicit_store or env.cluster is not None
    store = env.store if named else None
    sys.exit(run_doctor(fmt, store, check_name(node, "--node") if node else None))


@main.group(cls=Group)
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
    type=Int(minimum=1),
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

    env = common.env()
    cluster = env.cluster  # a cluster this node joined names the node and its address
    if cluster is not None:
        node = node or cluster.node
        advertise_addr = advertise_addr or cluster.address
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
    duties = None
    if cluster is not None:
        from meshctl.commands.cluster_duties import ClusterDuties

        duties = ClusterDuties(env.state_dir, cluster)
        duties.start_member()  # on a manager: the store this controller opens is (partly) its
    sys.exit(run_controller(env.store, env.state_dir, settings, duties))


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
    from meshctl.controller.endpoints import ask_health

    click.echo(ask_health(metrics_addr, ready, duration(wait_for, "--wait")))


@main.command("diff")
@click.option(
    "--node",
    shell_complete=names(NODE),
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
    lines = diff_lines(common.store(), real_kernel(), name, lb_backend, env().state_dir)
    for line in lines:
        click.echo(line)
    sys.exit(1 if lines else 0)
