"""Start a controller: logging, the node's name, the kernel, the loop."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kernel.system import Kernel
from meshctl.cluster.membership import DEFAULT_TTL
from meshctl.events import DEFAULT_LIMIT, DEFAULT_WINDOW
from meshctl.model import Node, ValidationError, check_address, check_name, check_port
from meshctl.overlay.vxlan import VXLAN_PORT
from meshctl.store import Store

if TYPE_CHECKING:
    from meshctl.commands.cluster_duties import ClusterDuties


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


class JsonFormatter(logging.Formatter):
    """One JSON object per line (--log-format json), for journald, Loki or Elasticsearch:
    time, level, logger, msg, and exc with a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line: dict[str, str] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


LOG_FORMATS = {"logfmt": LogfmtFormatter, "json": JsonFormatter}


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
    advertise_addr: str = ""  # empty: the address of the default route, found at start
    node_ttl: float = DEFAULT_TTL
    vxlan_port: int = VXLAN_PORT
    metrics_addr: str = ""  # empty: no /metrics, /healthz, /readyz
    log_format: str = "logfmt"
    events_window: float = DEFAULT_WINDOW
    events_limit: int = DEFAULT_LIMIT


def controller_settings(
    node: str | None,
    lb_backend: str,
    upstream_dns: Sequence[str],
    resync_period: float,
    advertise_addr: str | None = None,
    node_ttl: float = DEFAULT_TTL,
    vxlan_port: int = VXLAN_PORT,
    metrics_addr: str = "",
    log_format: str = "logfmt",
    events_window: float = DEFAULT_WINDOW,
    events_limit: int = DEFAULT_LIMIT,
) -> ControllerSettings:
    """Check every option at once, so a bad one fails before the node is registered."""
    from meshctl.controller.endpoints import parse_address
    from meshctl.dns.forwarder import parse_upstream

    name = check_name(node or default_node_name(), "--node")
    for value, option in ((resync_period, "--resync-period"), (node_ttl, "--node-ttl")):
        if not value > 0:
            raise ValidationError(f"invalid {option} {value:g}s: use a duration above 0, like 10s")
    if advertise_addr:
        check_address(advertise_addr, "--advertise-addr")
    for upstream in upstream_dns:
        try:
            parse_upstream(upstream)
        except ValueError as err:
            raise ValidationError(f"invalid --upstream-dns: {err}") from None
    check_port(vxlan_port, "--vxlan-port")
    if metrics_addr:
        parse_address(metrics_addr)
    if log_format not in LOG_FORMATS:
        raise ValidationError(f"invalid --log-format {log_format!r}: use logfmt or json")
    if not events_window > 0:
        raise ValidationError(f"invalid --events-window {events_window:g}s: use one above 0")
    if events_limit < 1:
        raise ValidationError(f"invalid --events-max {events_limit}: keep at least 1 event")
    return ControllerSettings(
        name,
        lb_backend,
        list(upstream_dns),
        resync_period,
        advertise_addr or "",
        node_ttl,
        vxlan_port,
        metrics_addr,
        log_format,
        events_window,
        events_limit,
    )


def default_address(kernel: Kernel) -> str:
    """The address of the interface the default route leaves by: where other nodes most
    likely reach this one ("" when there is no default route, as in a lone test namespace)."""
    for route in kernel.links.list_routes(None):
        if route.dst == "default" and route.ifname:
            addresses = kernel.links.list_addresses(None, route.ifname)
            if addresses:
                return addresses[0].cidr.split("/")[0]
    return ""


def run_controller(
    store: Store, state_dir: str, settings: ControllerSettings, duties: ClusterDuties | None = None
) -> int:
    """Run until SIGTERM/SIGINT (with a cluster node's duties beside: the store's member list,
    and on a manager the join endpoint); returns the exit code."""
    from kernel.system import real_kernel
    from meshctl.controller.daemon import Controller
    from meshctl.dns import read_resolv_conf

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LOG_FORMATS[settings.log_format]())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    upstreams = settings.upstreams or read_resolv_conf("/etc/resolv.conf")
    kernel = real_kernel()
    address = settings.advertise_addr or default_address(kernel)
    if not address:
        logging.getLogger("meshctl.controller").warning(
            "no default route: this node advertises no address (give --advertise-addr for "
            "a cluster)"
        )
    controller = Controller(
        store,
        kernel,
        Node(settings.node, address=address, created_at=time.time()),
        state_dir,
        resync_period=settings.resync_period,
        lb_backend=settings.lb_backend,
        upstreams=upstreams,
        node_ttl=settings.node_ttl,
        vxlan_port=settings.vxlan_port,
        metrics_addr=settings.metrics_addr,
        events_window=settings.events_window,
        events_limit=settings.events_limit,
        may_lead=duties is None or duties.manager,  # only managers place tasks
    )
    if duties is not None:  # a node promoted or demoted may lead from then on, or may not
        duties.serve(store, lambda manager: setattr(controller.membership, "may_lead", manager))
    try:
        asyncio.run(controller.run())
    finally:
        if duties is not None:
            duties.stop()
    return 0
