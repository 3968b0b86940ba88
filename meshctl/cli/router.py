"""`meshctl router enable/disable/inspect` and `router cert add/ls/rm`: the HTTP routing mesh."""

from __future__ import annotations

from typing import cast

import click

from meshctl.cli import common, output
from meshctl.cli.common import Format, Group, Int, format_option, show
from meshctl.cli.root import main
from meshctl.cluster import nodes
from meshctl.commands.read import list_services
from meshctl.model import MeshctlError, PublishMode, Router


@main.group(cls=Group)
def router() -> None:
    """The HTTP routing mesh: an HAProxy on every node routes HTTP by Host header (and TLS by
    SNI) to the services created with --hostname.

    \b
    Examples:
      meshctl router enable
      meshctl service create --name web --network front --hostname app.example.com -- ./web
    """


@router.command("enable")
@click.option("--http-port", type=Int(1, 65535), default=80, show_default=True)
@click.option("--https-port", type=Int(1, 65535), default=443, show_default=True)
@click.option(
    "--publish-mode",
    type=click.Choice(["ingress", "host"]),
    default="ingress",
    show_default=True,
    help="ingress: every node's ports spread over every node's router (the routing mesh); "
    "host: each node's own router, which sees the client's address.",
)
def router_enable(http_port: int, https_port: int, publish_mode: str) -> None:
    """Run the router on every node (or move it to other ports); print its id.

    \b
    Examples:
      meshctl router enable
      meshctl router enable --http-port 8080 --https-port 8443 --publish-mode host
    """
    from meshctl.commands.router import enable_router, refuse_router_ports_in_use

    store = common.store()
    refuse_router_ports_in_use(
        store, Router(http_port, https_port, cast(PublishMode, publish_mode))
    )
    click.echo(enable_router(store, http_port, https_port, cast(PublishMode, publish_mode)).id)


@router.command("disable")
def router_disable() -> None:
    """Stop the router on every node; routes stay stored for when it is enabled again.

    \b
    Examples:
      meshctl router disable
    """
    from meshctl.commands.router import disable_router

    click.echo(disable_router(common.store()).id)


@router.command("inspect")
@format_option
def router_inspect(fmt: Format) -> None:
    """Show the router: ports, routes, certificates, and how it does on each node.

    \b
    Examples:
      meshctl router inspect
      meshctl router inspect --format '{{json .Routes}}'
    """
    from meshctl.commands.read import get_router, list_certificates

    store = common.store()
    current = get_router(store)
    if current is None:
        raise MeshctlError("the router is not enabled; enable it with: meshctl router enable")
    args = (current, list_services(store), list_certificates(store), nodes.statuses(store))
    show(fmt, output.router_json(*args), lambda: output.router_pretty(*args))


@router.group("cert", cls=Group)
def router_cert() -> None:
    """The certificates the router terminates TLS with, chosen by SNI.

    \b
    Examples:
      meshctl router cert add app.example.com --cert app.pem --key app.key
      meshctl router cert ls
    """


@router_cert.command("add")
@click.argument("host")
@click.option("--cert", "cert_path", required=True, help="The certificate (PEM; its chain after).")
@click.option("--key", "key_path", required=True, help="Its private key (PEM).")
def router_cert_add(host: str, cert_path: str, key_path: str) -> None:
    """Store the certificate for HOST (`*.example.com`: every name below), replacing one.

    \b
    Examples:
      meshctl router cert add app.example.com --cert app.pem --key app.key
      meshctl router cert add '*.example.com' --cert wildcard.pem --key wildcard.key
    """
    from meshctl.commands.router import add_certificate

    click.echo(add_certificate(common.store(), host.lower(), cert_path, key_path).host)


@router_cert.command("ls")
@format_option
def router_cert_ls(fmt: Format) -> None:
    """List the stored certificates (never their keys).

    \b
    Examples:
      meshctl router cert ls
      meshctl router cert ls --format '{{.Host}}'
    """
    from meshctl.commands.read import list_certificates

    certificates = list_certificates(common.store())
    show(fmt, [output.certificate_json(c) for c in certificates],
          lambda: output.certificate_table(certificates))  # fmt: skip


@router_cert.command("rm")
@click.argument("host")
def router_cert_rm(host: str) -> None:
    """Remove the certificate for HOST.

    \b
    Examples:
      meshctl router cert rm app.example.com
    """
    from meshctl.commands.router import remove_certificate

    remove_certificate(common.store(), host.lower())
    click.echo(host.lower())
