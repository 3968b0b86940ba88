"""A test's own mesh: a node namespace, a state dir, a controller process and the CLI.

Every object it makes is removed in close(), also when the test failed: the controller is
stopped, the tasks of its store are killed and their namespaces deleted, the node namespace
(and with it every link and rule in it) goes.

The CLI runs in this process (click's runner), `meshctl diff` in a thread inside the node
namespace: a fresh interpreter per command costs most of a minute under the QEMU lane's
emulated CPU. Only `meshctl exec`, which replaces its process, runs as a process of its own.
Every timing goes through tests.conftest.scaled (MESHCTL_TIME_SCALE).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from kernel import netns
from meshctl.cli import main
from meshctl.cluster.membership import DEFAULT_TTL
from meshctl.naming import task_netns
from tests.conftest import kill_processes_in, scaled, scaled_duration, tcp_read, udp_read

MESHCTL = [sys.executable, "-m", "meshctl"]
LB_BACKEND = os.environ.get("MESHCTL_LB_BACKEND", "auto")
RESYNC_PERIOD = 2.0  # seconds, before scaling: drift is repaired within this


class Mesh:
    def __init__(self, node_ns: str, state_dir: str, node_name: str = "node1") -> None:
        self.node_ns = node_ns
        self.state_dir = state_dir
        self.node_name = node_name
        self.controller: subprocess.Popen[bytes] | None = None
        self.controller_log = os.path.join(state_dir, "controller.log")
        self.env = {**os.environ, "MESHCTL_STATE_DIR": state_dir}

    # -- the CLI -------------------------------------------------------------------------------

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """meshctl ARGS with this mesh's state dir, as a user runs it: its exit code, stdout
        and stderr (with the traceback, should it crash)."""
        if args[:1] == ("exec",):  # it replaces its process (execvp): one of its own
            result = subprocess.run([*MESHCTL, *args], env=self.env, capture_output=True,
                                    text=True, timeout=scaled(60))  # fmt: skip
        else:
            result = invoke_cli(list(args), self.env)
        if check and result.returncode != 0:
            raise AssertionError(f"meshctl {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def ps(self, service: str) -> list[dict[str, Any]]:
        return json.loads(self.cli("service", "ps", service, "--format", "json").stdout)  # type: ignore[no-any-return]

    def running(self, service: str) -> list[dict[str, Any]]:
        return [
            t
            for t in self.ps(service)
            if t["state"] == "running" and t["desired_state"] == "running"
        ]

    def wait_running(self, service: str, count: int, timeout: float = 20) -> list[dict[str, Any]]:
        def probe() -> list[dict[str, Any]] | None:
            tasks = self.running(service)
            return tasks if len(tasks) == count else None

        return wait_for(probe, timeout, f"{count} running tasks of {service}")  # type: ignore[no-any-return]

    # -- the controller ------------------------------------------------------------------------

    def start_controller(self, *extra: str) -> None:
        """The controller in the node namespace, with the backend the lane asks for (the QEMU
        lane sets MESHCTL_LB_BACKEND=ipvs; here auto picks nftables)."""
        assert self.controller is None or self.controller.poll() is not None
        extra = ("--lb-backend", LB_BACKEND, "--resync-period", scaled_duration(RESYNC_PERIOD),
                 "--node-ttl", scaled_duration(DEFAULT_TTL), *extra)  # fmt: skip
        log = open(self.controller_log, "ab")  # noqa: SIM115 - the controller holds it open
        self.controller = subprocess.Popen(
            ["nsenter", f"--net={netns.path(self.node_ns)}", "--", *MESHCTL,
             "controller", "run", "--node", self.node_name, *extra],
            env=self.env, stdout=log, stderr=log,
        )  # fmt: skip
        log.close()

    def stop_controller(self, sig: int = signal.SIGTERM) -> None:
        if self.controller is not None and self.controller.poll() is None:
            self.controller.send_signal(sig)
            try:
                self.controller.wait(timeout=scaled(15))
            except subprocess.TimeoutExpired:
                self.controller.kill()
                self.controller.wait()

    def diff(self) -> subprocess.CompletedProcess[str]:
        """meshctl diff, run where the controller runs: in a thread inside the node namespace
        (setns moves one thread; what diff forks and the threads it starts follow it)."""
        argv = ["diff", "--node", self.node_name, "--lb-backend", LB_BACKEND]
        return netns.run_in(self.node_ns, invoke_cli, argv, self.env)

    def wait_converged(self, timeout: float = 15, what: str = "meshctl diff to be empty") -> None:
        """Wait until `meshctl diff` is empty; on timeout, fail with what it still shows."""
        last: list[subprocess.CompletedProcess[str]] = []

        def converged() -> bool:
            last[:] = [self.diff()]
            return last[0].returncode == 0

        try:
            wait_for(converged, timeout, what)
        except AssertionError as err:
            shown = (last[0].stdout + last[0].stderr).strip() if last else ""
            raise AssertionError(f"{err}; meshctl diff still shows:\n{shown}") from None

    def endpoint(self, path: str, port: int = 9323) -> tuple[int, str]:
        """GET http://127.0.0.1:PORT/PATH from the node (where the controller serves /metrics,
        /healthz, /readyz) with a real HTTP client: (status, body); (0, why) if none answers."""
        import urllib.error
        import urllib.request

        url = f"http://127.0.0.1:{port}{path}"

        def get() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(url, timeout=scaled(5)) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as err:
                return err.code, err.read().decode()
            except OSError as err:
                return 0, str(err)

        return netns.run_in(self.node_ns, get)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a family's samples on /metrics whose labels include these."""
        from prometheus_client.parser import text_string_to_metric_families

        code, text = self.endpoint("/metrics")
        assert code == 200, text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    def lb_backend(self) -> str:
        """The load-balancer backend the node's controller runs, as it recorded it."""
        node = json.loads(self.cli("node", "inspect", self.node_name, "--format", "json").stdout)
        return str(node["lb_backend"])

    def node_id(self) -> str | None:
        from meshctl.store import open_store

        store = open_store(f"sqlite:///{self.state_dir}/state.db")
        try:
            record = store.get("node", self.node_name)
            return str(record.value["id"]) if record else None
        finally:
            store.close()

    def in_node(self, *argv: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.node_ns, *argv],
                              capture_output=True, text=True, **kwargs)  # fmt: skip

    def in_task(
        self, task_id: str, *argv: str, timeout: float = 10
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in a task's network namespace (not its mount namespace)."""
        return subprocess.run(["nsenter", f"--net={netns.path(task_netns(task_id))}", "--", *argv],
                              capture_output=True, text=True, timeout=scaled(timeout))  # fmt: skip

    def dig(self, task: dict[str, Any], *query: str) -> list[str]:
        """dig +short inside a running task's network and mount namespaces, so through its own
        resolv.conf (127.0.0.11, redirected to the embedded DNS server) as `meshctl exec` would,
        without starting a Python process for it; the answers sorted."""
        argv = ["dig", "+short", "+tries=1", f"+time={round(scaled(2))}", *query]
        done = subprocess.run(["nsenter", "-t", str(task["pid"]), "--net", "--mount", "--", *argv],
                              capture_output=True, text=True, timeout=scaled(10))  # fmt: skip
        return sorted(done.stdout.split())

    def task_ids(self) -> list[str]:
        """Every task this mesh's store knows, read straight from the store file."""
        from meshctl.store import open_store

        store = open_store(f"sqlite:///{self.state_dir}/state.db")
        try:
            return [r.name for r in store.list("task")]
        finally:
            store.close()

    def close(self) -> None:
        self.stop_controller(signal.SIGKILL)
        keep_log(self.controller_log)
        if os.path.exists(os.path.join(self.state_dir, "state.db")):
            for task_id in self.task_ids():
                kill_processes_in(netns.path(task_netns(task_id)))
                netns.delete(task_netns(task_id))
            node_id = self.node_id()
            if node_id is not None:
                from meshctl.naming import lb_netns_prefix, router_netns

                for name in netns.list_namespaces(lb_netns_prefix(node_id)):
                    netns.delete(name)
                # The router's HAProxy runs in its own session, as tasks do.
                kill_processes_in(netns.path(router_netns(node_id)))
                netns.delete(router_netns(node_id))


def breakable_iptables(tmp_path: Path) -> tuple[Path, Path]:
    """A PATH dir whose iptables-legacy-restore fails while the returned file exists: the
    kernel's firewall tool broken behind the controller's back."""
    tools = tmp_path / "bin"
    tools.mkdir()
    broken = tmp_path / "broken"
    wrapper = tools / "iptables-legacy-restore"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'[ -e {broken} ] && {{ echo "iptables-legacy-restore: broken for the test" >&2; '
        "exit 1; }\n"
        'exec /usr/sbin/iptables-legacy-restore "$@"\n'
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return tools, broken


def keep_log(path: str) -> None:
    """Copy a controller's log into $MESHCTL_TEST_LOGS (the QEMU lane's results: the guest's
    /tmp goes with the VM), named after the test that ran it."""
    keep = os.environ.get("MESHCTL_TEST_LOGS")
    if not keep or not os.path.exists(path):
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "unknown").split(" ")[0]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", test.removeprefix("tests/"))
    os.makedirs(keep, exist_ok=True)
    with open(path, "rb") as src, open(os.path.join(keep, f"{name}.log"), "ab") as dst:
        shutil.copyfileobj(src, dst)


def invoke_cli(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the CLI in this process with env as its environment; the result as a process's."""
    done = CliRunner().invoke(main, argv, env=env)
    stderr = done.stderr
    if done.exc_info is not None and not isinstance(done.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*done.exc_info))
    return subprocess.CompletedProcess(["meshctl", *argv], done.exit_code, done.stdout, stderr)


def ask(ns: str, address: str, port: int, udp: bool = False) -> str:
    """What a client in namespace ns (a task's: task_netns) hears from address:port over a new
    TCP connection or UDP flow; "" when nothing answers."""
    try:
        return netns.run_in(ns, udp_read if udp else tcp_read, address, port)
    except OSError:
        return ""


def wait_for(probe: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll probe until it returns something truthy, for timeout seconds (scaled); fail naming
    what never happened."""
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
