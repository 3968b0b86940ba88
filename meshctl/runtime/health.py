"""Health checks: probes run from inside a task's namespaces, and the state they add up to.

The probes are async so one event loop can watch every task: `cmd` runs `/bin/sh -c CMD` inside
the task (as `meshctl exec`), `tcp` connects from the task's namespace to its own address, `http`
sends a GET there and wants a 2xx/3xx. HealthTracker is the pure state machine that turns probe
results into starting/healthy/unhealthy with Docker's rules for retries and the start period. A
service without a health check has no tracker: its running tasks count as healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from kernel import netns
from kernel.errors import NotFound
from meshctl.model import HealthCheck
from meshctl.runtime.process import exec_argv

HealthState = Literal["starting", "healthy", "unhealthy"]
# Docker keeps this much of a probe's output for `inspect`.
MAX_OUTPUT = 4096


@dataclass(frozen=True)
class ProbeResult:
    """One probe's verdict and what it said (command output, HTTP status line, or the error)."""

    ok: bool
    output: str


async def probe_cmd(ns: str, pid: int, command: str, timeout: float) -> ProbeResult:
    """Run `/bin/sh -c command` inside the task; exit status 0 is healthy."""
    proc = await asyncio.create_subprocess_exec(
        *exec_argv(ns, pid, ["/bin/sh", "-c", command]),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # its own group, so a timeout kills whatever it started
    )
    try:
        async with asyncio.timeout(timeout):
            out, _ = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        return ProbeResult(False, f"health command timed out after {timeout:g}s")
    text = out[:MAX_OUTPUT].decode(errors="replace")
    return ProbeResult(proc.returncode == 0, text)


async def _connect(ns: str, address: str, port: int) -> socket.socket:
    """A TCP socket made inside namespace ns (it stays there), connected without blocking."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = netns.run_in(ns, socket.socket, family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (address, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _reason(err: OSError) -> str:
    # asyncio's connect errors carry their own wording in strerror; the errno's text is clearer.
    return os.strerror(err.errno) if err.errno else str(err)


async def probe_tcp(ns: str, address: str, port: int, timeout: float) -> ProbeResult:
    """Connect to address:port from inside namespace ns; an accepted connection is healthy."""
    try:
        async with asyncio.timeout(timeout):
            sock = await _connect(ns, address, port)
    except TimeoutError:
        return ProbeResult(False, f"connect to {address}:{port} timed out after {timeout:g}s")
    except OSError as err:
        return ProbeResult(False, f"connect to {address}:{port}: {_reason(err)}")
    sock.close()
    return ProbeResult(True, f"connected to {address}:{port}")


async def probe_http(ns: str, address: str, port: int, path: str, timeout: float) -> ProbeResult:
    """GET path from address:port inside namespace ns; a 2xx or 3xx status is healthy."""
    where = f"http://{address}:{port}{path}"
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            sock = await _connect(ns, address, port)
            try:
                request = f"GET {path} HTTP/1.0\r\nHost: {address}:{port}\r\n"
                request += "User-Agent: meshctl-health\r\nConnection: close\r\n\r\n"
                await loop.sock_sendall(sock, request.encode())
                head = b""
                while b"\r\n" not in head and len(head) < MAX_OUTPUT:
                    chunk = await loop.sock_recv(sock, MAX_OUTPUT)
                    if not chunk:
                        break
                    head += chunk
            finally:
                sock.close()
    except TimeoutError:
        return ProbeResult(False, f"GET {where} timed out after {timeout:g}s")
    except OSError as err:
        return ProbeResult(False, f"GET {where}: {_reason(err)}")
    status_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
    parts = status_line.split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return ProbeResult(False, f"GET {where}: not an HTTP response: {status_line!r}")
    return ProbeResult(200 <= int(parts[1]) < 400, f"GET {where}: {status_line}")


async def run_probe(check: HealthCheck, ns: str, pid: int, address: str) -> ProbeResult:
    """Run the probe the check describes against one task (address: its own, for tcp/http)."""
    if check.kind == "cmd":
        return await probe_cmd(ns, pid, check.command, check.timeout)
    if check.kind == "tcp":
        return await probe_tcp(ns, address, check.port, check.timeout)
    return await probe_http(ns, address, check.port, check.path, check.timeout)


class HealthTracker:
    """Health of one task from its probe results, with Docker's rules.

    It is `starting` until the first success (then `healthy`) or until `retries` failures in a
    row (then `unhealthy`); failures within start_period of the start do not count. From then on
    one success makes it healthy, `retries` failures in a row unhealthy. Probes are due one
    interval after the start and one interval after each result.
    """

    def __init__(self, interval: float, retries: int, start_period: float, started_at: float):
        self.interval = interval
        # Docker reads 0 retries as its default, 3; fewer than one would never be unhealthy.
        self.retries = retries or 3
        self.start_period_ends = started_at + start_period
        self.state: HealthState = "starting"
        self.failures = 0
        self.next_at = started_at + interval

    @classmethod
    def for_check(cls, check: HealthCheck, started_at: float) -> HealthTracker:
        return cls(check.interval, check.retries, check.start_period, started_at)

    def due(self, now: float) -> bool:
        """Whether the next probe should run now."""
        return now >= self.next_at

    def record(self, ok: bool, now: float) -> HealthState:
        """Take one probe result at time now; return the (possibly new) state."""
        self.next_at = now + self.interval
        if ok:
            self.failures = 0
            self.state = "healthy"
        elif self.state != "starting" or now >= self.start_period_ends:
            self.failures += 1
            if self.failures >= self.retries:
                self.state = "unhealthy"
        return self.state


async def monitor(
    check: HealthCheck,
    ns: str,
    pid: int,
    address: str,
    on_change: Callable[[HealthState, ProbeResult], Awaitable[None]],
    started_at: float | None = None,
) -> None:
    """Probe one task process on the check's schedule, calling on_change at every new state,
    until that process (or its namespace) is gone.

    Run it as an asyncio task and cancel it when the task stops; it may find the process gone
    first (the caller learns of an exit only on its next pass), and then ends: the process's
    end is its supervisor's to handle, not a probe failure. on_change is where the caller adds
    the task to its service's load balancer and DNS answers (healthy) or takes it out.
    """
    tracker = HealthTracker.for_check(check, time.monotonic() if started_at is None else started_at)
    while True:
        await asyncio.sleep(max(0.0, tracker.next_at - time.monotonic()))
        before = tracker.state
        try:
            result = await run_probe(check, ns, pid, address)
        except NotFound:
            return
        if tracker.record(result.ok, time.monotonic()) != before:
            await on_change(tracker.state, result)
