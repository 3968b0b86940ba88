"""The `meshctl` group itself: its options (--state-dir, --store) and the store they name."""

from __future__ import annotations

import click

from meshctl.cli.common import Env, Group


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--state-dir",
    envvar="MESHCTL_STATE_DIR",
    help="Directory of meshctl's state (default /var/lib/meshctl).",
)
@click.option(
    "--store",
    "store_url",
    envvar="MESHCTL_STORE",
    help="Store URL (default sqlite:///<state-dir>/state.db).",
)
@click.pass_context
def main(ctx: click.Context, state_dir: str | None, store_url: str | None) -> None:
    """meshctl: DNS discovery and kernel load balancing for services on plain Linux hosts.

    \b
    Examples:
      meshctl network create front --subnet 10.20.0.0/24
      meshctl service create --name web --replicas 3 --network front -- sleep infinity
      meshctl --store etcd://10.0.0.1:2379 node ls
    """
    env = Env(state_dir, store_url)
    ctx.obj = env
    ctx.call_on_close(env.close)
