"""The router's HAProxy: its files, its process and its sockets (the edge of meshctl.router).

HAProxy runs in master-worker mode inside the router's namespace, started and adopted as a
task process is (meshctl.runtime: its own session, so it outlives the controller); its pid
and start time are kept in a file so that a restarted controller adopts it. A configuration
is written only after `haproxy -c` accepted it. A reload is SIGUSR2 to the master, which
starts a new worker with the listening sockets of the old one; reload() returns once the new
worker answers on the runtime API (the admin socket), which then takes server changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping

from meshctl import runtime
from meshctl.model import MeshctlError
from meshctl.router.config import RouterFiles
from meshctl.router.slots import Slot

HAPROXY = "haproxy"
SOCKET_TIMEOUT = 2.0
RELOAD_TIMEOUT = 10.0
CHECK_TIMEOUT = 30.0
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the final NUL


class RouterError(MeshctlError):
    """HAProxy refused a configuration or a command, or cannot be reached."""


def check(config: str) -> None:
    """Raise RouterError with HAProxy's first complaint unless `haproxy -c` accepts the
    configuration file."""
    try:
        result = subprocess.run(
            [HAPROXY, "-c", "-f", config], capture_output=True, text=True,
            timeout=CHECK_TIMEOUT,
        )  # fmt: skip
    except FileNotFoundError:
        raise RouterError(
            f"{HAPROXY} not found: install Debian's haproxy package (apt-get install haproxy)"
        ) from None
    if result.returncode != 0:
        raise RouterError(f"haproxy refuses the configuration: {_complaint(result.stderr)}")


def _complaint(stderr: str) -> str:
    """HAProxy's first alert, without its prefix: what is wrong and where."""
    for line in stderr.splitlines():
        if "[ALERT]" in line:
            return line.split(":", 1)[-1].strip() if ") :" in line else line.strip()
    return stderr.strip().splitlines()[0] if stderr.strip() else "no reason given"


def write_private(path: str, text: str) -> None:
    """Write a file only root reads (0600), whole or not at all."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_certificates(files: RouterFiles, pems: Mapping[str, str], crt_list: str) -> None:
    """Each certificate's PEM (certificate then key) in its own 0600 file, the crt-list that
    names them, and no file of a certificate that is gone."""
    os.makedirs(files.certificates, mode=0o700, exist_ok=True)
    wanted = {files.certificate(host): pem for host, pem in pems.items()}
    for path, pem in wanted.items():
        if _read(path) != pem:
            write_private(path, pem)
    for name in os.listdir(files.certificates):
        path = os.path.join(files.certificates, name)
        if path not in wanted and name.endswith(".pem"):
            os.unlink(path)
    if _read(files.crt_list) != crt_list:
        write_private(files.crt_list, crt_list)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def read_config(files: RouterFiles) -> str | None:
    return _read(files.config)


def check_paths(files: RouterFiles) -> None:
    """Unix sockets need short paths: refuse a state dir that makes them too long."""
    for path in (files.admin_socket, files.master_socket, files.tls_socket):
        if len(path.encode()) > UNIX_PATH_MAX:
            raise RouterError(
                f"the router's socket path {path} is longer than {UNIX_PATH_MAX} bytes; "
                "use a shorter --state-dir"
            )


def install(files: RouterFiles, text: str) -> None:
    """Write text as the configuration once `haproxy -c` has accepted it; a refused one is
    not written (the running HAProxy keeps its own) and raised as RouterError."""
    os.makedirs(files.directory, mode=0o700, exist_ok=True)
    candidate = files.config + ".new"
    write_private(candidate, text)
    try:
        check(candidate)
    except RouterError:
        os.unlink(candidate)
        raise
    os.replace(candidate, files.config)


def start(files: RouterFiles, netns: str) -> runtime.TaskProcess:
    """HAProxy's master in the router's namespace, on the installed configuration."""
    check_paths(files)
    for path in (files.admin_socket, files.master_socket):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by a killed HAProxy
    spec = runtime.TaskProcessSpec(
        task_name="router",
        netns=netns,
        command=(HAPROXY, "-W", "-f", files.config, "-S", f"{files.master_socket},mode,600"),
        log_path=files.log,
        files_dir=os.path.join(files.directory, "files"),
    )
    process = runtime.start(spec)
    write_private(files.process, json.dumps({"pid": process.pid, "start_time": process.start_time}))
    return process


def adopt(files: RouterFiles) -> runtime.TaskProcess | None:
    """The HAProxy an earlier controller started, if it still runs."""
    try:
        with open(files.process) as f:
            recorded = json.load(f)
        pid, start_time = int(recorded["pid"]), int(recorded["start_time"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    return runtime.adopt(pid, start_time)


def forget(files: RouterFiles) -> None:
    """The router is stopped for good: no process to adopt, no configuration to reuse."""
    for path in (files.process, files.config):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def reload(
    process: runtime.TaskProcess, files: RouterFiles, timeout: float = RELOAD_TIMEOUT
) -> None:
    """Load the installed configuration into a new worker (SIGUSR2 to the master); return
    once it serves the runtime API. RouterError if the master refused it or took too long."""
    before = _master_state(files)
    os.kill(process.pid, signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while True:
        state = _master_state(files)
        if state is not None and before is not None and state[1] > before[1]:
            raise RouterError(f"haproxy failed to reload its configuration; see {files.log}")
        if state is not None and (before is None or state[0] > before[0]) and state[2]:
            worker = state[2]
            with contextlib.suppress(RouterError):
                if f"Pid: {worker}\n" in command(files, "show info"):
                    return
        if time.monotonic() > deadline:
            raise RouterError(f"haproxy did not finish reloading within {timeout:g}s")
        time.sleep(0.005)


def _master_state(files: RouterFiles) -> tuple[int, int, int] | None:
    """parse_proc of the master's answer, None if it does not answer (it is re-executing
    itself)."""
    try:
        return parse_proc(_ask(files.master_socket, "show proc"))
    except RouterError:
        return None


def parse_proc(text: str) -> tuple[int, int, int]:
    """(reloads, failed reloads, the newest worker's pid: 0 if none) from the master's
    `show proc`."""
    reloads = failed = worker = 0
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1] == "master":
            reloads = int(fields[2])
            if "[failed:" in line:
                failed = int(line.split("[failed:")[1].split("]")[0])
        elif len(fields) >= 3 and fields[1] == "worker" and fields[2] == "0":
            worker = int(fields[0])
    return reloads, failed, worker


def _ask(path: str, text: str) -> str:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(SOCKET_TIMEOUT)
            sock.connect(path)
            sock.sendall(text.encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)  # the master's CLI answers once the asking is over
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except OSError as err:
        raise RouterError(f"cannot reach haproxy at {path}: {err}") from None
    return b"".join(chunks).decode(errors="replace")


def command(files: RouterFiles, text: str) -> str:
    """One runtime API command, its answer."""
    return _ask(files.admin_socket, text)


def apply(files: RouterFiles, commands: Iterable[str]) -> None:
    """Send each command; RouterError at the first one HAProxy refuses."""
    for text in commands:
        answer = command(files, text).strip()
        accepted = not answer or ("changed" in answer or "no need" in answer)
        if not accepted:
            raise RouterError(f"haproxy refused {text!r}: {answer.splitlines()[0]}")


def servers(files: RouterFiles) -> dict[str, list[Slot]]:
    """Every backend's server slots as the running worker has them."""
    return parse_servers_state(command(files, "show servers state"))


def parse_servers_state(text: str) -> dict[str, list[Slot]]:
    """`show servers state`: backend name → its server slots (ready: operational state 2,
    running; a server in maintenance is 0, stopped)."""
    lines = text.splitlines()
    header = next((line for line in lines if line.startswith("# ")), None)
    if header is None:
        raise RouterError(f"haproxy answered no server state: {lines[:1]}")
    column = {name: index for index, name in enumerate(header[2:].split())}
    found: dict[str, list[Slot]] = {}
    for line in lines:
        fields = line.split()
        if line.startswith("#") or len(fields) < len(column):
            continue
        backend = fields[column["be_name"]]
        found.setdefault(backend, []).append(
            Slot(
                name=fields[column["srv_name"]],
                address=fields[column["srv_addr"]],
                port=int(fields[column["srv_port"]]),
                ready=fields[column["srv_op_state"]] == "2",
            )
        )
    return found


def sessions(files: RouterFiles) -> dict[str, int]:
    """Requests and tunnels in progress, by server address."""
    return parse_stat(command(files, "show stat"))


def parse_stat(text: str) -> dict[str, int]:
    """`show stat` (CSV): each server address → its current sessions (scur), summed over the
    backends that have it."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("# "):
        raise RouterError("haproxy answered no statistics")
    column = {name: index for index, name in enumerate(lines[0][2:].split(","))}
    total: dict[str, int] = {}
    for line in lines[1:]:
        fields = line.split(",")
        if len(fields) <= max(column["addr"], column["scur"]) or fields[1] in (
            "FRONTEND",
            "BACKEND",
        ):
            continue
        address = fields[column["addr"]].rpartition(":")[0]
        if address and fields[column["scur"]].isdigit():
            total[address] = total.get(address, 0) + int(fields[column["scur"]])
    return total
