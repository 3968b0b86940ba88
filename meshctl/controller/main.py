"""Start a controller: logging, the node's name, the kernel, the loop."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from meshctl.model import ValidationError, check_name
from meshctl.store import Store


class LogfmtFormatter(logging.Formatter):
    """Structured lines on stderr: time, level, logger, then the message."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (
            f"time={stamp}.{int(record.msecs):03d}Z level={record.levelname.lower()} "
            f"logger={record.name} msg={record.getMessage()!r}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def default_node_name() -> str:
    """The host name as a DNS label (a node name must be one)."""
    label = re.sub(r"[^a-z0-9-]", "-", socket.gethostname().split(".")[0].lower()).strip("-")
    return label[:63] or "node"


@dataclass(frozen=True)
class ControllerSettings:
    """The controller's options, validated: made before anything opens the store."""

    node: str
    lb_backend: str
    upstreams: list[str]  # empty: the host's resolvers, read at start
    resync_period: float


def controller_settings(
    node: str | None, lb_backend: str, upstream_dns: Sequence[str], resync_period: float
) -> ControllerSettings:
    """Check every option at once, so a bad one fails before the node is registered."""
    from meshctl.dns.forwarder import parse_upstream

    name = check_name(node or default_node_name(), "--node")
    if not resync_period > 0:
        raise ValidationError(
            f"invalid --resync-period {resync_period:g}s: use a duration above 0, like 10s"
        )
    for upstream in upstream_dns:
        try:
            parse_upstream(upstream)
        except ValueError as err:
            raise ValidationError(f"invalid --upstream-dns: {err}") from None
    return ControllerSettings(name, lb_backend, list(upstream_dns), resync_period)


def run_controller(store: Store, state_dir: str, settings: ControllerSettings) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    from kernel.system import real_kernel
    from meshctl.controller.daemon import Controller
    from meshctl.dns import read_resolv_conf

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    upstreams = settings.upstreams or read_resolv_conf("/etc/resolv.conf")
    controller = Controller(
        store,
        real_kernel(),
        settings.node,
        state_dir,
        resync_period=settings.resync_period,
        lb_backend=settings.lb_backend,
        upstreams=upstreams,
    )
    asyncio.run(controller.run())
    return 0
