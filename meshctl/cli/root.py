"""The `meshctl` group itself: its options (--state-dir, --store and the TLS and login of an
https:// store) and the store they name."""

from __future__ import annotations

import click

from meshctl.cli.common import Env, Group, store_access


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
    help="Store URL (default sqlite:///<state-dir>/state.db): etcd://HOST:PORT[,...][/PREFIX] "
    "is an etcd without TLS or login, which anyone who reaches it controls; https://… is one "
    "over TLS (--cacert, --cert, --key) with an etcd login (--user, --password-file).",
)
@click.option(
    "--cacert",
    envvar="MESHCTL_CACERT",
    metavar="FILE",
    help="https:// store: the cluster CA that signed etcd's certificate.",
)
@click.option(
    "--cert",
    envvar="MESHCTL_CERT",
    metavar="FILE",
    help="https:// store: this node's client certificate.",
)
@click.option(
    "--key", envvar="MESHCTL_KEY", metavar="FILE", help="https:// store: the key of --cert."
)
@click.option("--user", envvar="MESHCTL_USER", metavar="NAME", help="https:// store: etcd user.")
@click.option(
    "--password-file",
    envvar="MESHCTL_PASSWORD_FILE",
    metavar="FILE",
    help="https:// store: the file holding --user's password.",
)
@click.pass_context
def main(
    ctx: click.Context,
    state_dir: str | None,
    store_url: str | None,
    cacert: str | None,
    cert: str | None,
    key: str | None,
    user: str | None,
    password_file: str | None,
) -> None:
    """meshctl: DNS discovery and kernel load balancing for services on plain Linux hosts.

    \b
    Examples:
      meshctl network create front --subnet 10.20.0.0/24
      meshctl service create --name web --replicas 3 --network front -- sleep infinity
      meshctl --store etcd://10.0.0.1:2379 node ls
      meshctl --store https://10.0.0.1:2379 --cacert ca.pem --cert node.pem \\
        --key node.key --user node1 --password-file node1.password node ls
    """
    env = Env(state_dir, store_url, store_access(cacert, cert, key, user, password_file))
    ctx.obj = env
    ctx.call_on_close(env.close)
