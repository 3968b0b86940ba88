"""Task processes: start one inside its namespaces, watch it, stop it, adopt it after a restart.

A task is a plain process in its own session (so it outlives the controller) that runs in the
task's network namespace plus private mount and UTS namespaces: hostname = task name and
/etc/resolv.conf, /etc/hosts bind-mounted from the task's files, as Docker does. It is started
through util-linux (nsenter, unshare) and /bin/sh, each stage exec()ing the next, so the PID the
controller spawns is the PID of the task. A pidfd names the process without PID-reuse races.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
from dataclasses import dataclass, field

from kernel import netns
from kernel.errors import KernelError, NotFound

# Docker's resolv.conf for user-defined networks: the embedded DNS server, names tried as given.
RESOLV_CONF = "nameserver 127.0.0.11\noptions ndots:0\n"
TASK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Runs as the last stage before the command: $1 resolv.conf, $2 hosts, $3 hostname, then argv.
# Its stdin is the write end of a pipe: it reports "set up" there, then gives the command
# /dev/null (dash cannot name fds above 9, so the pipe rides on fd 0).
_SETUP_SCRIPT = (
    'mount --bind "$1" /etc/resolv.conf && mount --bind "$2" /etc/hosts && hostname "$3"'
    ' && printf x >&0 && exec </dev/null && shift 3 && exec "$@"'
)
# How long the namespace and file setup may take before start() gives up on it.
SETUP_TIMEOUT = 10.0


def hosts_text(hostname: str, addresses: tuple[str, ...] = ()) -> str:
    """A task's /etc/hosts: localhost entries as Docker writes them, then its own name."""
    lines = [
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        *(f"{address}\t{hostname}" for address in addresses),
    ]
    if not addresses:
        # Without an address the name still resolves, to loopback, so tools that look it up work.
        lines.append(f"127.0.1.1\t{hostname}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class TaskProcessSpec:
    """Everything needed to start one task process; files_dir receives its resolv.conf and hosts.

    hostname defaults to the task name, hosts to hosts_text(hostname).
    """

    task_name: str
    netns: str
    command: tuple[str, ...]
    log_path: str
    files_dir: str
    hostname: str = ""
    env: tuple[tuple[str, str], ...] = ()
    resolv_conf: str = RESOLV_CONF
    hosts: str = ""

    def __post_init__(self) -> None:
        if not self.command:
            raise ValueError(f"task {self.task_name}: the command is empty; give a command to run")


def read_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None.

    Together with the PID it names one process for good: a reused PID has a later start time.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may hold spaces and parentheses: count fields after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[19])


@dataclass
class TaskProcess:
    """A running (or finished) task process, named by pid + start_time and held by a pidfd.

    The exit code is known only for a process this controller started (its child). After an
    adopt() the process is someone else's child: its exit is seen through the pidfd, its code is
    not (None).
    """

    pid: int
    start_time: int
    pidfd: int
    _popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def wait_fd(self) -> int:
        """The pidfd: it turns readable when the process exits (for asyncio's add_reader)."""
        return self.pidfd

    def exited(self) -> bool:
        """Whether the process has ended (does not reap it)."""
        return self.wait(0)

    def wait(self, timeout: float | None) -> bool:
        """Wait up to timeout seconds (None = for ever) for the exit; True once it has ended."""
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return bool(poller.poll(None if timeout is None else max(0, int(timeout * 1000))))

    def exit_code(self) -> int | None:
        """The exit code once ended, negative for a signal as in subprocess; None if running or
        if the process was adopted (not our child, so the kernel tells its code to another)."""
        return self._popen.poll() if self._popen is not None else None

    def stop(self, grace: float) -> int | None:
        """SIGTERM the task's process group, SIGKILL it after grace seconds; return exit_code().

        Whatever is left of the group after the task ended (children it forked) is killed too,
        so the namespace can go away. It blocks up to grace seconds: from an event loop, call
        it through asyncio.to_thread.
        """
        if not self.exited():
            self._signal_group(signal.SIGTERM)
            if not self.wait(grace):
                self._signal_group(signal.SIGKILL)
                self.wait(None)
        self._signal_group(signal.SIGKILL)
        return self.exit_code()

    def close(self) -> None:
        """Release the pidfd (the process goes on). Once only: a second close could hit an
        unrelated file that got the number meanwhile."""
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def _signal_group(self, sig: signal.Signals) -> None:
        # Only while the PID is still ours (running, or a zombie not yet reaped): the group id
        # is the task's PID and must not hit a stranger that got the number later.
        if read_start_time(self.pid) != self.start_time:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise NotFound(f"{name} not found on PATH: install util-linux (apt-get install util-linux)")
    return found


def start(spec: TaskProcessSpec) -> TaskProcess:
    """Start the task's command in its namespaces, in its own session, output appended to its log.

    Returns once hostname and files are in place, so an exec or probe right after sees them; a
    failed setup raises KernelError. A later failure (a missing command) ends the process with a
    message in the log: the caller sees it as an exit.
    """
    nspath = netns.path(spec.netns)
    if not os.path.exists(nspath):
        raise NotFound(f"task {spec.task_name}: network namespace {spec.netns} does not exist")
    hostname = spec.hostname or spec.task_name
    argv = _argv(spec, nspath, hostname)
    # A clean environment, as a container gets: nothing of the controller's leaks in.
    env = {"PATH": TASK_PATH, "HOSTNAME": hostname, "HOME": "/root", **dict(spec.env)}
    os.makedirs(os.path.dirname(spec.log_path) or ".", exist_ok=True)
    log_fd = os.open(spec.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    ready_r, ready_w = os.pipe()
    try:
        popen = subprocess.Popen(
            argv,
            stdin=ready_w,
            stdout=log_fd,
            stderr=subprocess.STDOUT,
            env=env,
            cwd="/",
            start_new_session=True,
        )
    finally:
        os.close(log_fd)
        os.close(ready_w)
    try:
        ready = _read_ready(ready_r)
    finally:
        os.close(ready_r)
    # Our unreaped child cannot vanish or be replaced before these two calls.
    pidfd = os.pidfd_open(popen.pid)
    start_time = read_start_time(popen.pid)
    assert start_time is not None, "an unreaped child always has /proc/PID/stat"
    proc = TaskProcess(popen.pid, start_time, pidfd, popen)
    if not ready:
        # Nobody may exec into or probe a half-made task: end it.
        proc.stop(0)
        proc.close()
        raise KernelError(
            f"task {spec.task_name}: setting up its hostname, resolv.conf and hosts failed; "
            f"see {spec.log_path}"
        )
    return proc


def _argv(spec: TaskProcessSpec, nspath: str, hostname: str) -> list[str]:
    """The task's command behind nsenter, unshare and the setup script, which bind-mounts the
    resolv.conf and hosts written here (the task's files) and sets the hostname."""
    os.makedirs(spec.files_dir, exist_ok=True)
    resolv_path = os.path.join(spec.files_dir, "resolv.conf")
    hosts_path = os.path.join(spec.files_dir, "hosts")
    with open(resolv_path, "w") as f:
        f.write(spec.resolv_conf)
    with open(hosts_path, "w") as f:
        f.write(spec.hosts or hosts_text(hostname))
    return [
        _tool("nsenter"),
        f"--net={nspath}",
        "--",
        _tool("unshare"),
        "--mount",
        "--uts",
        "--propagation",
        "private",
        "--",
        "/bin/sh",
        "-c",
        _SETUP_SCRIPT,
        "sh",
        resolv_path,
        hosts_path,
        hostname,
        *spec.command,
    ]


def _read_ready(fd: int) -> bool:
    """Wait for the setup script's "set up" byte; False on EOF (it failed) or timeout."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if not poller.poll(int(SETUP_TIMEOUT * 1000)):
        return False
    return os.read(fd, 1) == b"x"


PROCESS_FILE = "process"  # in a task's directory: the pid and start time of its process


def write_process_file(task_dir: str, process: TaskProcess) -> None:
    """Name the task's process in its directory at once (atomically), before any store write,
    so that a controller killed right after starting it does not lose it."""
    path = os.path.join(task_dir, PROCESS_FILE)
    with open(f"{path}.new", "w") as f:
        json.dump([process.pid, process.start_time], f)
    os.replace(f"{path}.new", path)


def read_process_file(task_dir: str) -> tuple[int, int] | None:
    """The (pid, start time) a task's directory names, or None."""
    try:
        with open(os.path.join(task_dir, PROCESS_FILE)) as f:
            pid, start_time = json.load(f)
    except (FileNotFoundError, ValueError, TypeError):
        return None
    return int(pid), int(start_time)


def adopt(pid: int, start_time: int) -> TaskProcess | None:
    """Take over a task started by an earlier controller; None if it is gone or the PID reused."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    # Checked after opening: if the start time still matches, the pidfd holds that process.
    if read_start_time(pid) != start_time:
        os.close(pidfd)
        return None
    return TaskProcess(pid, start_time, pidfd)


def exec_argv(ns: str, pid: int, argv: list[str]) -> list[str]:
    """The argv that runs argv inside a running task, as `docker exec` does.

    It enters the task's network, mount and UTS namespaces (so its resolv.conf, hosts and
    hostname) and working directory, with the task's environment; os.execvp() it to keep
    stdin/stdout/stderr attached and pass the exit code through.
    """
    if not argv:
        raise ValueError("nothing to run: give a command after --")
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = [item.decode() for item in f.read().split(b"\0") if item]
    except (FileNotFoundError, ProcessLookupError) as err:
        raise NotFound(f"task process {pid} is not running; check `meshctl service ps`") from err
    return [
        _tool("nsenter"),
        f"--net={netns.path(ns)}",
        f"--target={pid}",
        "--mount",
        "--uts",
        "--wd",
        "--",
        "env",
        "-i",
        *environ,
        *argv,
    ]
