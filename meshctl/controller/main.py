"""Start a controller: logging, the node's name, the kernel, the loop."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import sys
import time

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


def run_controller(
    store: Store,
    state_dir: str,
    *,
    node: str | None,
    lb_backend: str,
    upstream_dns: list[str],
    resync_period: float,
) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    from kernel.system import real_kernel
    from meshctl.controller.daemon import Controller
    from meshctl.dns import read_resolv_conf
    from meshctl.model import check_name

    name = check_name(node or default_node_name(), "--node")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    upstreams = upstream_dns or read_resolv_conf("/etc/resolv.conf")
    controller = Controller(
        store,
        real_kernel(),
        name,
        state_dir,
        resync_period=resync_period,
        lb_backend=lb_backend,
        upstreams=upstreams,
    )
    asyncio.run(controller.run())
    return 0
