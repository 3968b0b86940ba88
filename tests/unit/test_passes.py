"""The pass runner: writers then reconcilers in their declared order, each part timed and its
failures merged, convergence checked once after each apply; and the node's reconcilers on the
fake kernel, run by it: one pass wires a task and its DNS redirect without re-running anything,
and drift waits for the next full pass."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kernel.system import Kernel, fake_kernel
from meshctl import naming
from meshctl.commands.network import create_network
from meshctl.commands.service import create_service
from meshctl.controller.build import node_parts
from meshctl.controller.dataplane import Dataplane, choose_task_dns
from meshctl.controller.metrics import Metrics
from meshctl.controller.passes import PassResult, PassRunner
from meshctl.lb.backends import backend_named
from meshctl.model import NetworkAttachment, Service
from meshctl.reconcile import PassContext, Reconciler, ResyncClock
from meshctl.store.sqlite import SqliteStore
from meshctl.view import ClusterView, read_view
from tests.unit.leader import settle


@dataclass
class Writer:
    name: str
    trace: list[str]
    changes: bool = False
    fails: dict[str, str] = field(default_factory=dict)

    def write(self, view: ClusterView) -> tuple[bool, dict[str, str]]:
        self.trace.append(f"write {self.name}")
        return self.changes, self.fails


@dataclass
class Part:
    """A reconciler whose plan is how many things are left to do (apply does `fixes` of them)."""

    name: str
    trace: list[str]
    left: int = 0
    fixes: int = 0
    fails: dict[str, str] = field(default_factory=dict)
    converges: bool = True
    due: float = float("inf")

    def plan(self, view: ClusterView, ctx: PassContext) -> int:
        self.trace.append(f"plan {self.name} full={ctx.full} errors={sorted(ctx.port_errors)}")
        return self.left

    def apply(self, plan: int, ctx: PassContext) -> dict[str, str]:
        self.trace.append(f"apply {self.name}")
        self.left -= min(self.fixes, plan)
        ctx.port_errors[self.name] = "seen"  # what a later reconciler reads
        ctx.due(self.due)
        return self.fails

    def describe(self, plan: int) -> Iterator[str]:
        return iter([f"~ {plan} left"])


def _view(tmp_path: Path) -> tuple[SqliteStore, ClusterView]:
    store = SqliteStore(str(tmp_path / "state.db"))
    return store, read_view(store)


def _run(
    runner: PassRunner, view: ClusterView, reads: list[bool] | None = None
) -> tuple[PassResult, PassContext]:
    made: list[PassContext] = []

    def read(wait: bool) -> ClusterView:
        (reads if reads is not None else []).append(wait)
        return view

    def context(view: ClusterView, full: bool) -> PassContext:
        made.append(PassContext("node1", "n1", full))
        return made[-1]

    result = runner.run(read, context, lambda result: "")
    return result, made[0]


def test_writers_then_reconcilers_in_order_each_timed_failures_merged(tmp_path: Path) -> None:
    trace: list[str] = []
    _, view = _view(tmp_path)
    metrics = Metrics()
    writers = (
        Writer("tasks", trace, changes=True),
        Writer("orchestrate", trace, fails={"front": "no address left"}),
    )
    reconcilers: tuple[Reconciler[int], ...] = (
        Part("node", trace, left=1, fixes=1, due=2e9),
        Part("lb", trace, fails={"back": "cannot set up"}, due=1e9),
        Part("node", trace),  # a kind that runs twice is timed once
    )
    runner = PassRunner(writers, reconcilers, ResyncClock(10.0), metrics.reconcile)
    reads: list[bool] = []
    result, ctx = _run(runner, view, reads)
    assert trace == [
        "write tasks",
        "write orchestrate",
        "plan node full=True errors=[]",
        "apply node",
        "plan node full=True errors=['node']",  # the convergence check: nothing left
        "plan lb full=True errors=['node']",
        "apply lb",
        "plan node full=True errors=['lb', 'node']",
        "apply node",
    ]
    assert reads == [False, True]  # the first writer changed the store: read again, waiting
    assert result.failures == {"front": "no address left", "back": "cannot set up"}
    assert result.deadline == 1e9 and ctx.full
    sample = metrics.registry.get_sample_value
    count = "meshctl_reconcile_duration_seconds_count"
    assert sample(count, {"kind": "orchestrate", "result": "error"}) == 1
    assert sample(count, {"kind": "tasks", "result": "success"}) == 1
    assert sample(count, {"kind": "node", "result": "success"}) == 1
    assert sample(count, {"kind": "lb", "result": "error"}) == 1
    assert sample(count, {"kind": "pass", "result": "success"}) == 1
    trace.clear()
    _, ctx = _run(runner, view)
    assert not ctx.full  # within the resync period


def test_a_plan_left_after_a_clean_apply_is_reported_once_per_pass(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trace: list[str] = []
    _, view = _view(tmp_path)
    stuck = Part("lb", trace, left=2, fixes=1)
    failing = Part("node", trace, left=2, fails={"front": "broken"})
    processes = Part("tasks", trace, left=2, converges=False)
    runner = PassRunner((), (stuck, failing, processes), ResyncClock(10.0), Metrics().reconcile)
    with caplog.at_level(logging.WARNING, "meshctl.controller"):
        _run(runner, view)
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["lb not converged after apply: ~ 1 left"]
    # The failing one is planned again (what it caches is refreshed) but not reported: its
    # failure says why; the processes are never planned twice.
    assert [line.split(" full")[0] for line in trace] == [
        "plan lb", "apply lb", "plan lb", "plan node", "apply node", "plan node",
        "plan tasks", "apply tasks",
    ]  # fmt: skip


def _store(tmp_path: Path) -> SqliteStore:
    store = SqliteStore(str(tmp_path / "state.db"))
    create_network(store, "front", subnet="10.60.0.0/24")
    create_service(
        store, Service("web", ("true",), replicas=1, networks=(NetworkAttachment("front"),))
    )
    settle(store)
    for record in store.list("task"):
        store.put("task", record.name, {**record.value, "node": "node1"})
    return store


@dataclass
class Endpoints:
    """The DNS endpoints' part of a pass: ports for every wired task namespace present."""

    name = "dns"
    converges = False
    ports: dict[str, tuple[int, int]] = field(default_factory=dict)

    def plan(self, view: ClusterView, ctx: PassContext) -> list[str]:
        return [t for t in sorted(ctx.wired) if naming.task_netns(t) in ctx.present]

    def apply(self, plan: list[str], ctx: PassContext) -> dict[str, str]:
        for task_id in plan:
            if task_id not in self.ports:
                self.ports[task_id] = ctx.dns_added[task_id] = (40000, 40001)
        return {}

    def describe(self, plan: list[str]) -> Iterator[str]:
        return iter(())


def _node_pass(
    tmp_path: Path, kernel: Kernel, now: list[float]
) -> tuple[ClusterView, PassRunner, Endpoints]:
    view = read_view(_store(tmp_path))
    parts = node_parts(
        kernel, Dataplane(backend_named("iptables"), choose_task_dns(kernel)),
        node="node1", node_id="n1", address="",
        vxlan_port=4789, state_dir=str(tmp_path), resync_period=10.0,
    )  # fmt: skip
    endpoints = Endpoints()
    order = (parts.node, endpoints, parts.redirects, parts.lb)
    runner = PassRunner((), order, ResyncClock(10.0, lambda: now[0]), Metrics().reconcile)
    return view, runner, endpoints


def _context(view: ClusterView, endpoints: Endpoints) -> Callable[[ClusterView, bool], PassContext]:
    def context(v: ClusterView, full: bool) -> PassContext:
        return PassContext(
            "node1", "n1", full, wired=frozenset(view.tasks), dns_ports=dict(endpoints.ports)
        )

    return context


def test_one_pass_wires_a_task_and_its_dns_redirect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The redirect follows the DNS endpoint, which follows the wiring: in one pass, in the
    declared order, with no part run again; a full plan afterwards is empty."""
    from meshctl.node import reconciler as node_reconciler

    now = [1000.0]
    monkeypatch.setattr(node_reconciler.time, "monotonic", lambda: now[0])
    kernel = fake_kernel()
    view, runner, endpoints = _node_pass(tmp_path, kernel, now)
    result = runner.run(lambda wait: view, _context(view, endpoints), lambda r: "")
    assert result.failures == {}
    (task_id,) = view.tasks
    assert endpoints.ports == {task_id: (40000, 40001)}
    fresh = node_parts(
        kernel, Dataplane(backend_named("iptables"), choose_task_dns(kernel)),
        node="node1", node_id="n1", address="",
        vxlan_port=4789, state_dir=str(tmp_path), resync_period=10.0,
    )  # fmt: skip
    ctx = PassContext("node1", "n1", True, frozenset(view.tasks), dict(endpoints.ports))
    for reconciler in fresh.compared()[:2]:
        assert list(reconciler.describe(reconciler.plan(view, ctx))) == []
    ns = naming.task_netns(task_id)
    redirect = kernel.iptables.list_owned(ns, "nat") or kernel.nftables.list_table(ns)
    assert redirect  # by a nat rule, or by nftables where it runs


def test_drift_waits_for_the_next_full_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meshctl.node import reconciler as node_reconciler

    now = [1000.0]
    monkeypatch.setattr(node_reconciler.time, "monotonic", lambda: now[0])
    kernel = fake_kernel()
    view, runner, endpoints = _node_pass(tmp_path, kernel, now)
    context = _context(view, endpoints)
    runner.run(lambda wait: view, context, lambda r: "")
    bridge = naming.bridge(view.networks["front"].id)
    assert kernel.links.get_link(None, bridge) is not None
    kernel.links.delete_link(None, bridge)  # behind the controller's back
    now[0] += 1
    runner.run(lambda wait: view, context, lambda r: "")
    assert kernel.links.get_link(None, bridge) is None  # trusted until the next full observe
    now[0] += 10
    runner.run(lambda wait: view, context, lambda r: "")
    assert kernel.links.get_link(None, bridge) is not None
