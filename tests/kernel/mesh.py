"""A test's own mesh: a node namespace, a state dir, a controller process and the CLI.

Every object it makes is removed in close(), also when the test failed: the controller is
stopped, the tasks of its store are killed and their namespaces deleted, the node namespace
(and with it every link and rule in it) goes.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kernel import netns
from tests.conftest import kill_processes_in

MESHCTL = [sys.executable, "-m", "meshctl"]
LB_BACKEND = os.environ.get("MESHCTL_LB_BACKEND", "auto")


class Mesh:
    def __init__(self, node_ns: str, state_dir: str, node_name: str = "node1") -> None:
        self.node_ns = node_ns
        self.state_dir = state_dir
        self.node_name = node_name
        self.controller: subprocess.Popen[bytes] | None = None
        self.controller_log = os.path.join(state_dir, "controller.log")
        self.env = {**os.environ, "MESHCTL_STATE_DIR": state_dir}

    # -- the CLI -------------------------------------------------------------------------------

    def cli(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*MESHCTL, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
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
        extra = ("--lb-backend", LB_BACKEND, *extra)
        log = open(self.controller_log, "ab")  # noqa: SIM115 - the controller holds it open
        self.controller = subprocess.Popen(
            ["nsenter", f"--net={netns.path(self.node_ns)}", "--", *MESHCTL,
             "controller", "run", "--node", self.node_name, "--resync-period", "2s", *extra],
            env=self.env, stdout=log, stderr=log,
        )  # fmt: skip
        log.close()

    def stop_controller(self, sig: int = signal.SIGTERM) -> None:
        if self.controller is not None and self.controller.poll() is None:
            self.controller.send_signal(sig)
            try:
                self.controller.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.controller.kill()
                self.controller.wait()

    def diff(self) -> subprocess.CompletedProcess[str]:
        """meshctl diff, run where the controller runs."""
        return subprocess.run(
            ["nsenter", f"--net={netns.path(self.node_ns)}", "--", *MESHCTL, "diff",
             "--node", self.node_name, "--lb-backend", LB_BACKEND],
            env=self.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

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

        def get() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
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
        return subprocess.run(["nsenter", f"--net={netns.path('mesh-t-' + task_id)}", "--", *argv],
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip

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
        if os.path.exists(os.path.join(self.state_dir, "state.db")):
            for task_id in self.task_ids():
                path = netns.path("mesh-t-" + task_id)
                kill_processes_in(path)
                netns.delete("mesh-t-" + task_id)
            node_id = self.node_id()
            if node_id is not None:
                from meshctl.controller.names import lb_netns_prefix, router_netns

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


def wait_for(probe: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll probe until it returns something truthy; fail naming what never happened."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
