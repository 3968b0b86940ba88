"""What the Grafana dashboard (docs/grafana-dashboard.json) shows, drawn without Grafana.

A real Prometheus (Debian's) scrapes a real controller every second while the controller goes
through what its operators watch for: a service scaled up, a task killed, a task turning
unhealthy and back, DNS queries answered and forwarded to an upstream that fails, the firewall
tool broken behind the controller's back (it goes unhealthy) and repaired, a scale down. Then
each panel's queries are asked from Prometheus' HTTP API over the run (query_range) and drawn
with matplotlib into docs/dashboard.png, one plot per panel, the scenario's steps marked.

Run as root from the repository root (about 3 minutes):

    apt-get install prometheus && .venv/bin/pip install '.[dashboard]'
    .venv/bin/python bench/dashboard.py [--out docs/dashboard.png]

Everything lives in a node namespace this script makes (the controller, its tasks and
Prometheus, which listens on the node's loopback only) and is removed in `finally`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from kernel import netns

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ is importable from root
from tests.kernel.mesh import Mesh, breakable_iptables, wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
PROMETHEUS_PORT = 9090
RATE = "5s"  # $__rate_interval for a 1 s scrape: Grafana's rule, 4 x the scrape interval + 1
STEP = 2  # seconds between points of the plots
SICK = "/tmp/meshdash-sick-"  # + a task's name: its health check fails while this exists
SERVER = ["socat", "TCP-LISTEN:80,reuseaddr,fork", "SYSTEM:hostname"]
# A task that asks the mesh's DNS a few names a second, one of them forwarded upstream.
ASKER = ["sh", "-c", "while :; do dig +short web; dig +short tasks.web; dig +short web.1.front; "
         "dig +tries=1 +time=1 upstream.example; sleep 0.2; done >/dev/null"]  # fmt: skip

PROMETHEUS_CONFIG = """
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: meshctl
    static_configs:
      - targets: ["127.0.0.1:9323"]
        labels: {instance: node1}
"""


def query_range(node: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    """Prometheus' answer to a range query, asked from inside the node."""
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": STEP})
    url = f"http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/query_range?{params}"

    def ask() -> Any:
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.load(response)

    answer = netns.run_in(node, ask)
    if answer.get("status") != "success":
        raise RuntimeError(f"prometheus: {expr}: {answer}")
    return answer["data"]["result"]  # type: ignore[no-any-return]


def legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"{{\s*(\w+)\s*}}", lambda m: labels.get(m.group(1), ""), template) or "value"


def scenario(mesh: Mesh, broken: Path, marks: list[tuple[float, str]]) -> None:
    """The steps, each given time to show; marks gets (time, what) for the plots."""

    def step(what: str, seconds: float) -> None:
        marks.append((time.time(), what))
        time.sleep(seconds)

    mesh.cli("network", "create", "front", "--subnet", "10.78.0.0/24")
    mesh.cli("service", "create", "--name", "web", "--replicas", "2", "--network", "front",
             "--health-cmd", f'test ! -e {SICK}"$(hostname)"', "--health-interval", "1s",
             "--health-retries", "1", "--restart-delay", "1s", "--", *SERVER)  # fmt: skip
    mesh.cli("service", "create", "--name", "asker", "--network", "front", "--", *ASKER)
    step("start", 15)
    mesh.cli("service", "scale", "web=6")
    step("scale 2→6", 15)
    victim = mesh.running("web")[0]
    os.kill(victim["pid"], signal.SIGKILL)
    step(f"kill {victim['name']}", 15)
    sick = mesh.running("web")[1]["name"]
    Path(SICK + sick).touch()
    step(f"{sick} unhealthy", 12)
    Path(SICK + sick).unlink()
    step(f"{sick} healthy", 12)
    broken.touch()
    mesh.in_node("iptables-legacy", "-t", "filter", "-F", "MESH-FORWARD", check=True)
    step("firewall tool broken", 15)
    broken.unlink()
    step("repaired", 15)
    mesh.cli("service", "scale", "web=2")
    step("scale 6→2", 15)


def plot(node: str, start: float, end: float, marks: list[tuple[float, str]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = json.loads(DASHBOARD.read_text())["panels"]
    columns = 3
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(18, 3.6 * rows), sharex=True)
    for panel, ax in zip(panels, axes.flat, strict=False):
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", RATE).replace("$instance", ".*")
            for series in query_range(node, expr, start, end):
                points = [(float(t) - start, float(v)) for t, v in series["values"]]
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, label=legend(target["legendFormat"], series["metric"]))
        ax.set_title(panel["title"], fontsize=11)
        unit = panel["fieldConfig"]["defaults"].get("unit", "")
        ax.set_ylabel({"s": "seconds", "ops": "per second", "reqps": "per second"}.get(unit, ""))
        for when, _ in marks:
            ax.axvline(when - start, color="grey", linewidth=0.6, linestyle=":")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    top = axes.flat[0]
    for when, what in marks:
        top.annotate(what, (when - start, 1.02), xycoords=("data", "axes fraction"),
                     rotation=30, fontsize=7, ha="left", va="bottom")  # fmt: skip
    for ax in axes[-1]:
        ax.set_xlabel("seconds into the run")
    figure.suptitle("meshctl dashboard (docs/grafana-dashboard.json), drawn from Prometheus "
                    "scraping a controller through the steps marked", y=0.995)  # fmt: skip
    figure.tight_layout()
    figure.savefig(out, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "dashboard.png"))
    args = parser.parse_args()
    if shutil.which("prometheus") is None:
        sys.exit("bench/dashboard.py: needs Debian's prometheus: apt-get install prometheus")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("bench/dashboard.py: needs matplotlib: .venv/bin/pip install '.[dashboard]'")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # unwinds through the finally blocks
    work = Path(tempfile.mkdtemp(prefix="meshdash-"))
    node = f"mdash{os.getpid()}-node"
    netns.create(node)
    prometheus: subprocess.Popen[bytes] | None = None
    mesh = None
    try:
        subprocess.run(["ip", "-n", node, "link", "set", "lo", "up"], check=True)
        tools, broken = breakable_iptables(work)
        mesh = Mesh(node, str(work / "state"))
        mesh.env["PATH"] = f"{tools}:{os.environ['PATH']}"
        os.makedirs(mesh.state_dir)
        mesh.start_controller("--upstream-dns", "127.0.0.1:5399")  # nothing answers there
        wait_for(lambda: mesh.endpoint("/readyz")[0] == 200, 60, "the controller to be ready")
        (work / "prometheus.yml").write_text(PROMETHEUS_CONFIG)
        prometheus = subprocess.Popen(
            ["nsenter", f"--net={netns.path(node)}", "--", "prometheus",
             f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"],
            stdout=subprocess.DEVNULL, stderr=open(work / "prometheus.log", "wb"),  # noqa: SIM115
        )  # fmt: skip
        wait_for(lambda: query_up(node), 60, "prometheus to scrape the controller")
        start = time.time()
        marks: list[tuple[float, str]] = []
        scenario(mesh, broken, marks)
        time.sleep(3)  # the last scrapes
        end = time.time()
        plot(node, start, end, marks, Path(args.out))
        print(f"wrote {args.out}: {len(marks)} steps over {end - start:.0f}s")
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
        if mesh is not None:
            for name in os.listdir("/tmp"):
                if name.startswith(os.path.basename(SICK)):
                    os.unlink(os.path.join("/tmp", name))
            mesh.close()
        netns.delete(node)
        shutil.rmtree(work, ignore_errors=True)


def query_up(node: str) -> bool:
    """Whether Prometheus has scraped the controller (its `up` series is 1)."""
    try:
        now = time.time()
        result = query_range(node, 'up{job="meshctl"}', now - 5, now)
    except OSError:
        return False
    return any(v == "1" for series in result for _, v in series["values"])


if __name__ == "__main__":
    main()
