"""A stateful property test of one node: random user actions against a real controller.

The actions are what a user (or the world) does: create and remove networks (small subnets
sometimes), create, scale, update (rolling) and remove services with 0-4 replicas on 1-2
networks, with or without a health check, kill -9 a task's process, make a task sick or well
again, and restart the controller (SIGTERM or SIGKILL). The model keeps what the user asked
for; after every step one invariant waits (bounded) until the node has settled and then checks:

- `meshctl diff` is empty and the store holds what the model says (names, subnets, replicas,
  versions), so a refused command changed nothing;
- every VIP's load balancer sends new connections to exactly its service's serving tasks
  (running, desired running, healthy or without a check), evenly, and refuses them when there
  are none; the LB namespace holds exactly the VIPs and its own address. Read twice: from its
  rules (observe.LB_READERS, the backend's own tool), and with packets: every task answers a
  TCP connection on TASK_PORT with its name and address, and a new connection per serving
  task to each VIP, from the node namespace, must be answered by each serving task once
  (every backend takes turns) and by no other, or refused when none serves;
- the embedded DNS, asked from inside tasks, answers `<service>` with the VIPs and
  `tasks.<service>` with exactly the serving tasks on the networks the asker shares;
- nothing is left that the store does not explain: task and LB namespaces, links in the node
  namespace, rule comments, address claims, task directories, and processes of this run;
- progress: a task that is not sick serves again within a bound (back-off included), a sick
  one stops serving, updates finish, and tasks on their way out are gone in time; a controller
  restart keeps every running task's process.

After teardown removes everything through the CLI, nothing of the run may remain.
Settings (steps, seeds) come from the caller: tests/property/test_mesh_machine.py for CI,
bench/property.py for long campaigns. Every bound is scaled to the machine (tests.conftest.scaled),
so the machine also runs in the QEMU lane's emulated CPU, with the ipvs backend.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from hypothesis import note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kernel import netns
from kernel.errors import KernelError
from meshctl.store import StoreError, open_store
from tests.conftest import TEST_NETNS_PREFIX, kill_processes_in, scaled, scaled_duration
from tests.kernel.mesh import Mesh, wait_for
from tests.property import observe

NETWORKS = ("n0", "n1", "n2")
SERVICES = ("s0", "s1", "s2")
# Overlapping on purpose (refused), /29 small enough to fill, /30 too small (refused);
# None: the default pool's next /24.
SUBNETS = (None, "10.77.0.0/24", "10.77.1.0/24", "10.77.0.0/28", "10.77.0.16/29",
           "10.77.2.0/29", "10.77.3.0/30")  # fmt: skip
SMALLEST_PREFIX = 29  # `network create` refuses anything smaller (documented in its error)
MAX_REPLICAS = 4
NODE = "node1"
# The controller runs the backend the machine names (MeshMachine.backend), and the checks read
# its LB namespaces with that backend's own tool (observe.LB_READERS). Nothing listens on the
# upstream: a quick SERVFAIL.
UPSTREAM_ARGS = ("--upstream-dns", "127.0.0.1")

# Bounds in seconds on a native host; each is scaled where it is used (tests.conftest.scaled).
SETTLE = 20.0  # how long the node may take to settle after a step
READY = 20.0  # how long a task may take to serve, back-off not counted
SICK_OUT = 10.0  # how long a sick task may keep serving (interval 0.5 s × 2 retries + slack)
LEAVING = 20.0  # how long a task on its way out may stay in the store
BACKOFF_BASE, BACKOFF_CAP = 0.1, 60.0  # the supervisor's restart back-off (restart-delay 0)
STABLE_RUN = 10.0  # a process that ran this long resets the back-off, however it ends (F4)
HEALTH_ARGS = ("--health-interval", scaled_duration(0.5), "--health-retries", "2",
               "--health-timeout", scaled_duration(2))  # fmt: skip
# Every task answers a connection on TASK_PORT with its name (its hostname, as tests/kernel's
# tasks do) and the address it was reached at, which tells a slot's new task from its old one;
# shell builtins only, no process more per connection than the shell. The node namespace is
# the client: its bridges hold the networks' gateway addresses, so it reaches each VIP as a
# task on the network does, without being a backend.
TASK_PORT = 80
TASK_COMMAND = (
    "socat",
    f"TCP-LISTEN:{TASK_PORT},reuseaddr,fork",
    "SYSTEM:read name </proc/sys/kernel/hostname; echo $name $SOCAT_SOCKADDR",
)
CONNECT_TIMEOUT = 1.0  # a connection sent to a task that is gone times out
# Exceptions the controller logs that are reported product bugs (tests/property/
# test_findings.py): counted, not failed on, so a campaign goes on to find others. Each is the
# exception's last line, with the traceback before it removed from the log text checked.
KNOWN_TRACEBACKS: dict[str, str] = {}


@dataclass
class Stats:
    """What a run did, over all examples (printed by the callers)."""

    examples: int = 0
    steps: int = 0
    checks: int = 0
    connections: int = 0  # new TCP connections sent through VIPs
    connecting: float = 0.0  # seconds spent sending them
    settle_waits: list[float] = field(default_factory=list)
    warnings: Counter[str] = field(default_factory=Counter)  # controller warnings by text
    known: dict[str, int] = field(default_factory=dict)  # known finding → times seen
    example_times: list[float] = field(default_factory=list)
    actions: Counter[str] = field(default_factory=Counter)  # action → runs
    outcomes: Counter[str] = field(default_factory=Counter)  # "refused: ..." / "skipped: ..."

    def reset(self) -> None:
        """Count afresh: each backend's run prints its own."""
        fresh = Stats()
        for f in fields(self):
            setattr(self, f.name, getattr(fresh, f.name))

    def summary(self) -> str:
        waits = sorted(self.settle_waits) or [0.0]
        times = sorted(self.example_times) or [0.0]
        lines = [
            f"{self.examples} examples, {self.steps} steps, {self.checks} checks, "
            f"{self.connections} connections through VIPs ({self.connecting:.1f}s), "
            f"settled after median {waits[len(waits) // 2]:.1f}s, max {waits[-1]:.1f}s; "
            f"an example took median {times[len(times) // 2]:.0f}s",
            "actions: " + ", ".join(f"{k} {v}" for k, v in sorted(self.actions.items())),
            "outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())),
            f"known findings seen: {self.known or 'none'}; "
            f"{sum(self.warnings.values())} controller warnings",
            *(f"  {n} x {w}" for w, n in self.warnings.most_common(20)),
        ]
        return "\n".join(lines)


STATS = Stats()


@dataclass
class NetModel:
    id: str
    subnet: str


@dataclass
class SvcModel:
    id: str
    networks: tuple[str, ...]
    replicas: int
    health: bool
    restart: str
    version: int = 1
    rev: int = 0  # the REV env value of its current spec
    settle_by: float = 0.0  # by then (if no slot is sick): replicas current tasks, none leaving


F = TypeVar("F", bound=Callable[..., Any])


def _guarded(fn: F) -> F:
    """Mark the machine broken when a rule or the check fails (teardown then only cleans)."""

    @functools.wraps(fn)
    def wrapper(self: MeshMachine, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except BaseException:
            self.broken = True
            raise

    return wrapper  # type: ignore[return-value]


# How refusals are counted in the summary: the first of these their message holds.
REASONS = ("not found", "already", "overlap", "invalid subnet", "no free address", "in use", "used")


def _tracebacks(log: str) -> list[tuple[str, str]]:
    """Each Python traceback in a log, with its last line (the exception)."""
    found = []
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            end = next((j for j in range(i + 1, len(lines)) if not lines[j].startswith(" ")), i)
            found.append(("\n".join(lines[i : end + 1]), lines[end]))
    return found


# Which network or service an action takes: one that exists (the model's, by index), or at
# times (ANY) any name of the pool. Drawn as numbers, not from the model, so that what
# hypothesis draws never depends on what the system did (which it cannot replay exactly).
ANY = 9
PICK = st.integers(0, ANY)


def _pick(existing: dict[str, Any], pool: tuple[str, ...], pick: int) -> str:
    names = sorted(existing)
    return names[pick % len(names)] if names and pick != ANY else pool[pick % len(pool)]


@dataclass(frozen=True)
class Action:
    """One user action: a MeshMachine method and its arguments (its repr is the call)."""

    kind: str
    args: tuple[tuple[str, Any], ...]

    def __repr__(self) -> str:
        return f"{self.kind}({', '.join(f'{k}={v!r}' for k, v in self.args)})"


def _action(kind: str, **arguments: st.SearchStrategy[Any]) -> st.SearchStrategy[Action]:
    return st.fixed_dictionaries(arguments).map(lambda a: Action(kind, tuple(a.items())))


SLOT = st.integers(1, MAX_REPLICAS)
ACTIONS: dict[str, st.SearchStrategy[Action]] = {
    "flip_health": _action("flip_health", pick=PICK, slot=SLOT),
    "kill_task": _action("kill_task", pick=PICK, slot=SLOT),
    "service_scale": _action("service_scale", pick=PICK, replicas=st.integers(0, MAX_REPLICAS)),
    "service_update": _action("service_update", pick=PICK),
    "service_create": _action(
        "service_create",
        pick=PICK,
        replicas=st.integers(0, MAX_REPLICAS),
        picks=st.lists(PICK, min_size=1, max_size=2),
        health=st.booleans(),
        restart=st.sampled_from(("any", "on-failure")),
    ),
    "service_rm": _action("service_rm", pick=PICK),
    "network_create": _action("network_create", pick=PICK, subnet=st.sampled_from(SUBNETS)),
    "network_rm": _action("network_rm", pick=PICK),
    "restart_controller": _action("restart_controller", kill=st.booleans()),
}
# One rule draws the action from this mix rather than one rule per action: hypothesis turns
# random subsets of rules off in each example, and a few examples then leave whole actions
# out. The simplest example repeats the first: flip_health, a health check that flaps.
WEIGHTS = {"flip_health": 2, "kill_task": 2, "service_scale": 2, "service_update": 2,
           "service_create": 2, "service_rm": 1, "network_create": 2, "network_rm": 1,
           "restart_controller": 1}  # fmt: skip
ACTION = st.sampled_from([k for k, n in WEIGHTS.items() for _ in range(n)]).flatmap(
    ACTIONS.__getitem__
)


def _fresh(existing: dict[str, Any], pool: tuple[str, ...], pick: int) -> str:
    """A name for a new object: mostly one not taken yet, at times any (a duplicate)."""
    free = [name for name in pool if name not in existing]
    return free[0] if free and pick != ANY else pool[pick % len(pool)]


MOVED = "the store changed while it was being checked"


def _settled_view(store: dict[str, dict[str, dict[str, Any]]]) -> tuple[Any, ...]:
    """What the load balancers, DNS, links, namespaces and claims follow: every record but
    a task's state, pid and health, of which only whether it serves."""
    tasks = {
        tid: (t["desired_state"], serving(t), t["addresses"], t["spec_version"], t["node"])
        for tid, t in store["task"].items()
    }
    return (store["network"], store["service"], store["address"], tasks)


def _changes(
    before: dict[str, dict[str, dict[str, Any]]], after: dict[str, dict[str, dict[str, Any]]]
) -> str:
    """What changed between two store reads, field by field (history left out)."""
    changes = []
    for kind in sorted(before):
        old, new = before[kind], after.get(kind, {})
        for name in sorted(set(old) | set(new)):
            a, b = old.get(name), new.get(name)
            if a == b:
                continue
            if a is None or b is None:
                changes.append(f"{kind} {name} {'added' if a is None else 'deleted'}")
                continue
            fields = sorted(k for k in set(a) | set(b) if k != "history" and a.get(k) != b.get(k))
            what = ", ".join(f"{k} {a.get(k)!r}→{b.get(k)!r}" for k in fields)
            changes.append(f"{kind} {b.get('name', name)}: {what}")
    return "; ".join(changes)[:2000]


def backoff(failures: int) -> float:
    return min(BACKOFF_CAP, BACKOFF_BASE * 2**failures)


def serving(task: dict[str, Any]) -> bool:
    """The user's definition: it should get new connections and be in DNS answers."""
    return (
        task["desired_state"] == "running"
        and task["state"] == "running"
        and task["health"] in ("none", "healthy")
    )


class MeshMachine(RuleBasedStateMachine):
    backend = "iptables"  # the controller's --lb-backend; test_mesh_machine runs each

    def controller_args(self) -> tuple[str, ...]:
        return ("--lb-backend", self.backend, *UPSTREAM_ARGS)

    def __init__(self) -> None:
        super().__init__()
        STATS.examples += 1
        self.broken = False
        self.tag = f"{os.getpid()}-{STATS.examples}"
        self.marker = f"MESHPROP={self.tag}".encode()
        self.workdir = tempfile.mkdtemp(prefix="meshprop-")
        self.flags = os.path.join(self.workdir, "flags")
        os.makedirs(self.flags)
        self.began = time.monotonic()
        self.history: list[str] = []  # what each step did, for failure messages
        self.node_ns = f"{TEST_NETNS_PREFIX}prop{STATS.examples}"
        netns.create(self.node_ns)
        os.makedirs(os.path.join(self.workdir, "state"))
        self.mesh = Mesh(self.node_ns, os.path.join(self.workdir, "state"), NODE)
        try:
            subprocess.run(["ip", "-n", self.node_ns, "link", "set", "lo", "up"], check=True)
            self.mesh.start_controller(*self.controller_args())
            self.node_id: str = wait_for(self.mesh.node_id, 15, "the controller's node record")
        except BaseException:
            self._force_cleanup()
            raise
        self.networks: dict[str, NetModel] = {}
        self.services: dict[str, SvcModel] = {}
        self.sick_since: dict[str, float] = {}  # task name → when its sick flag was set
        self.sick_by: dict[str, float] = {}  # task name → by then it must not serve
        self.failures: dict[str, int] = {}  # task name → bound on restarts in a row
        self.ready_by: dict[str, float] = {}  # task name → by then it serves (unless sick)
        self.leaving_since: dict[str, float] = {}  # task id → first seen on its way out
        self.known_tasks: set[str] = set()  # every task id seen, for leftover namespaces
        self.tasks: dict[str, dict[str, Any]] = {}  # the store's tasks at the last check
        self.expect_pids: dict[str, int] | None = None  # after a restart: pids to keep
        self.log_seen = 0

    # -- helpers ---------------------------------------------------------------------------------

    def _note(self, text: str) -> None:
        """Say what a step did: in hypothesis's report and in this example's history."""
        note(text)
        self.history.append(f"{time.monotonic() - self.began:7.1f}s {text}")

    def _cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = self.mesh.cli(*args, check=False)
        if args[0] in ("network", "service") and args[1] not in ("inspect", "ps", "ls"):
            self._note(f"$ meshctl {' '.join(args)}  → exit {result.returncode} "
                       f"{result.stderr.strip()}")  # fmt: skip
        return result

    def _judge(self, result: subprocess.CompletedProcess[str], expect: str, what: str) -> bool:
        """Check a command's outcome against what the model expects ('ok', 'fail' or
        'either'); a refusal must be one line with exit code 1. True if it succeeded."""
        ok = result.returncode == 0
        err = result.stderr.strip()
        if expect == "ok":
            assert ok, f"{what}: refused unexpectedly: {err}"
        if expect == "fail":
            assert not ok, f"{what}: accepted, the model expected a refusal: {result.stdout}"
        if not ok:
            reason = next((k for k in REASONS if k in err.lower()), err[7:60])
            STATS.outcomes[f"{' '.join(what.split()[:2])} refused: {reason}"] += 1
            assert result.returncode == 1, f"{what}: exit code {result.returncode}: {err}"
            assert err.startswith("Error: ") and "\n" not in err, f"{what}: not one line: {err!r}"
            assert "Traceback" not in result.stderr, f"{what}: {result.stderr}"
        return ok

    def _free(self, network: str) -> int:
        """Addresses a new task or VIP may still take on a network, as `network inspect` says:
        hosts minus gateway minus allocations minus the one kept for this node's LB."""
        info = json.loads(self._cli("network", "inspect", network, "--format", "json").stdout)
        net = ipaddress.IPv4Network(info["subnet"])
        owners = [a["owner"] for a in info["allocations"]]
        kept = 0 if any(o.startswith("lb:") for o in owners) else 1
        return net.num_addresses - 3 - len(owners) - kept

    def _room(self, networks: tuple[str, ...], need: int) -> str:
        """'ok' if every network surely has room for need more addresses, else 'either'.

        A rolling update may hold a new address for each of its service's tasks before the
        old ones go, so every service's replicas on a network count as taken once more.
        """
        for network in networks:
            in_flight = sum(s.replicas for s in self.services.values() if network in s.networks)
            if self._free(network) - in_flight < need:
                return "either"
        return "ok"

    def _set_ready(self, name: str, extra: float = 0.0) -> None:
        wait = scaled(READY) + backoff(self.failures.get(name, 0)) + extra
        self.ready_by[name] = max(self.ready_by.get(name, 0.0), time.monotonic() + wait)

    def _health_args(self) -> list[str]:
        return ["--health-cmd", f"test ! -e {self.flags}/$HOSTNAME", *HEALTH_ARGS]

    def _env_args(self, rev: int) -> list[str]:
        return ["--env", self.marker.decode(), "--env", f"REV={rev}"]

    # Hypothesis's simplest example draws zeros: a /24, two replicas with a health check, and
    # then always the first rule in its order (fewest arguments, then name): network_rm, which
    # is refused (the network is in use). Cheap, and a refusal must change nothing.
    @initialize(
        subnet=st.sampled_from(SUBNETS),
        replicas=st.sampled_from((2, 0, 1, 3, 4)),
        health=st.sampled_from((True, False)),
    )
    @_guarded
    def start(self, subnet: str | None, replicas: int, health: bool) -> None:
        """A network and a service on it to begin with: even the simplest example does work."""
        STATS.steps += 1
        self._network_create(NETWORKS[0], subnet)
        self._service_create(SERVICES[0], replicas, [0], health, "any")

    # -- networks --------------------------------------------------------------------------------

    def network_create(self, pick: int, subnet: str | None) -> None:
        self._network_create(_fresh(self.networks, NETWORKS, pick), subnet)

    def _network_create(self, name: str, subnet: str | None) -> None:
        expect = "ok"
        if name in self.networks:
            expect = "fail"
        if subnet is not None:
            net = ipaddress.IPv4Network(subnet)
            if net.prefixlen > SMALLEST_PREFIX or any(
                net.overlaps(ipaddress.IPv4Network(n.subnet)) for n in self.networks.values()
            ):
                expect = "fail"
        args = ["network", "create", name] + (["--subnet", subnet] if subnet else [])
        result = self._cli(*args)
        if self._judge(result, expect, " ".join(args)):
            info = json.loads(self._cli("network", "inspect", name, "--format", "json").stdout)
            assert info["id"] == result.stdout.strip(), (info, result.stdout)
            assert subnet is None or info["subnet"] == subnet, info
            self.networks[name] = NetModel(info["id"], info["subnet"])

    def network_rm(self, pick: int) -> None:
        name = _pick(self.networks, NETWORKS, pick)
        used = any(name in s.networks for s in self.services.values())
        expect = "fail" if name not in self.networks or used else "ok"
        if self._judge(self._cli("network", "rm", name), expect, f"network rm {name}"):
            del self.networks[name]

    # -- services --------------------------------------------------------------------------------

    def service_create(
        self, pick: int, replicas: int, picks: list[int], health: bool, restart: str
    ) -> None:
        name = _fresh(self.services, SERVICES, pick)
        self._service_create(name, replicas, picks, health, restart)

    def _service_create(
        self, name: str, replicas: int, picks: list[int], health: bool, restart: str
    ) -> None:
        networks = list(dict.fromkeys(_pick(self.networks, NETWORKS, p) for p in picks))
        if name in self.services or any(n not in self.networks for n in networks):
            expect = "fail"
        else:
            expect = self._room(tuple(networks), 1 + replicas)
        args = ["service", "create", "--name", name, "--replicas", str(replicas)]
        for network in networks:
            args += ["--network", network]
        args += self._env_args(0) + (self._health_args() if health else [])
        args += ["--restart-condition", restart, "--restart-delay", "0s"]
        args += ["--stop-grace-period", "1s", "--detach", "--", *TASK_COMMAND]
        if self._judge(self._cli(*args), expect, f"service create {name} {networks} x{replicas}"):
            service_id = json.loads(
                self._cli("service", "inspect", name, "--format", "json").stdout
            )["id"]
            self.services[name] = SvcModel(service_id, tuple(networks), replicas, health, restart)
            for slot in range(1, replicas + 1):
                self._set_ready(f"{name}.{slot}")

    def service_scale(self, pick: int, replicas: int) -> None:
        name = _pick(self.services, SERVICES, pick)
        service = self.services.get(name)
        if service is None:
            expect = "fail"
        else:
            expect = self._room(service.networks, max(0, replicas - service.replicas))
        result = self._cli("service", "scale", f"{name}={replicas}", "--detach")
        if self._judge(result, expect, f"service scale {name}={replicas}"):
            assert service is not None
            for slot in range(service.replicas + 1, replicas + 1):
                self._set_ready(f"{name}.{slot}")
            service.replicas = replicas
            service.settle_by = time.monotonic() + scaled(READY)

    def service_update(self, pick: int) -> None:
        """A new env: a rolling update, one task at a time, new before old (old first when no
        address is free for the new one beside it)."""
        name = _pick(self.services, SERVICES, pick)
        service = self.services.get(name)
        rev = service.rev + 1 if service else 1
        args = ["service", "update", name, *self._env_args(rev), "--detach"]
        expect = "fail" if service is None else "ok"
        if service is not None and any(
            ipaddress.IPv4Network(self.networks[n].subnet).prefixlen > 24 for n in service.networks
        ):
            expect = "either"  # refused when a network has no address for the first new task
        if self._judge(self._cli(*args), expect, " ".join(args)):
            assert service is not None
            service.version += 1
            service.rev = rev
            # One at a time: each replacement starts, turns healthy, then the old one stops.
            service.settle_by = time.monotonic() + scaled(READY + 5 * service.replicas)
            for slot in range(1, service.replicas + 1):
                self._set_ready(f"{name}.{slot}", scaled(5 * slot))

    def service_rm(self, pick: int) -> None:
        name = _pick(self.services, SERVICES, pick)
        service = self.services.get(name)
        result = self._cli("service", "rm", name)
        if self._judge(result, "fail" if service is None else "ok", f"service rm {name}"):
            assert service is not None
            del self.services[name]

    # -- the world -------------------------------------------------------------------------------

    def kill_task(self, pick: int, slot: int) -> None:
        """kill -9 the process of the running task `name.slot` (if there is one)."""
        name = _pick(self.services, SERVICES, pick)
        task_name = f"{name}.{slot}"
        for task in self.tasks.values():
            if task["name"] != task_name or task["state"] != "running" or task["pid"] is None:
                continue
            if task["desired_state"] != "running":
                continue
            p = observe.proc(task["pid"])
            if p is None or p.start_time != task["start_time"]:
                continue  # gone meanwhile: never signal a reused PID
            os.kill(task["pid"], signal.SIGKILL)
            self._note(f"kill -9 {task['pid']} ({task_name}, task {task['id']})")
            # Until it has died, a snapshot would still show it serving and pass as settled.
            died = observe.wait_dead(task["pid"], p.start_time, scaled(10))
            assert died, f"{task_name} outlived kill -9"
            self.failures[task_name] = self.failures.get(task_name, 0) + 1
            self._set_ready(task_name)
            service = self.services.get(name)
            if service is not None:
                service.settle_by = max(service.settle_by, self.ready_by[task_name])

    def flip_health(self, pick: int, slot: int) -> None:
        """Make the health check of every task named `name.slot` fail, or pass again."""
        name = _pick(self.services, SERVICES, pick)
        task_name = f"{name}.{slot}"
        flag = os.path.join(self.flags, task_name)
        now = time.monotonic()
        self._note(f"{task_name}: {'well' if task_name in self.sick_since else 'sick'}")
        if task_name in self.sick_since:
            os.unlink(flag)
            # While sick, a task with a check is replaced about once a second (probe
            # interval × retries, a stop and a start), each replacement one more failure.
            sick_for = now - self.sick_since.pop(task_name)
            self.sick_by.pop(task_name, None)
            self.failures[task_name] = self.failures.get(task_name, 0) + int(sick_for) + 2
            self._set_ready(task_name)
            service = self.services.get(name)
            if service is not None:
                service.settle_by = max(service.settle_by, self.ready_by[task_name])
        else:
            open(flag, "w").close()
            self.sick_since[task_name] = now
            self.sick_by[task_name] = now + scaled(SICK_OUT)

    def restart_controller(self, kill: bool) -> None:
        """Stop the controller (SIGKILL or SIGTERM) and start a new one: it adopts the tasks."""
        self.expect_pids = {
            tid: t["pid"]
            for tid, t in self.tasks.items()
            if serving(t) and t["pid"] is not None and t["name"] not in self.sick_since
        }
        self._note(f"controller restart ({'SIGKILL' if kill else 'SIGTERM'})")
        self.mesh.stop_controller(signal.SIGKILL if kill else signal.SIGTERM)
        self.mesh.start_controller(*self.controller_args())
        self.failures.clear()  # a new controller starts every back-off afresh

    @rule(action=ACTION)
    @_guarded
    def act(self, action: Action) -> None:
        self.history.append(f"{time.monotonic() - self.began:7.1f}s {action!r}")
        STATS.steps += 1
        STATS.actions[action.kind] += 1
        getattr(self, action.kind)(**dict(action.args))

    # -- the check -------------------------------------------------------------------------------

    @invariant()
    @_guarded
    def settled(self) -> None:
        """Wait (bounded) until the node has settled, then hold it to the store and the model."""
        STATS.checks += 1
        began = time.monotonic()
        problems: list[str] = []
        seen: list[str] = []  # the last problems found in a snapshot the store held still for
        while True:
            problems = self._problems()
            if not problems:
                break
            if not problems[0].startswith(MOVED):
                seen = problems
            if time.monotonic() - began > scaled(SETTLE):
                # The example's steps too: a failure that hypothesis cannot replay (timing)
                # is reported without them.
                raise AssertionError(
                    f"not settled {scaled(SETTLE):g}s after the step:\n  "
                    + "\n  ".join(problems)
                    + ("\nbefore that:\n  " + "\n  ".join(seen) if seen != problems else "")
                    + "\nsteps:\n  "
                    + "\n  ".join(self.history[-60:])
                )
            time.sleep(0.1)
        STATS.settle_waits.append(time.monotonic() - began)
        self._check_restart_kept_pids()
        self._check_log()
        self._note_stable_runs()

    def _read_store(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The records the checks compare with: kind → name → value."""
        try:
            store = open_store(f"sqlite:///{self.mesh.state_dir}/state.db")
        except StoreError as err:
            raise AssertionError(f"{err}\n{self._store_holders()}") from err
        try:
            kinds = ("network", "service", "task", "address")
            return {kind: {r.name: r.value for r in store.list(kind)} for kind in kinds}
        finally:
            store.close()

    def _store_holders(self) -> str:
        """Who has the store file open, and the file locks on it (for a `store is busy`)."""
        db = os.path.join(self.mesh.state_dir, "state.db")
        inodes = {str(os.stat(f).st_ino) for f in (db, db + "-wal", db + "-shm")
                  if os.path.exists(f)}  # fmt: skip
        holders = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
                opened = any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith(db) for fd in fds)
                if opened:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmdline = f.read().replace(b"\0", b" ").decode()
                    holders.append(f"{pid}: {cmdline}")
            except OSError:
                continue
        with open("/proc/locks") as table:
            locks = [line.strip() for line in table if line.split()[5].split(":")[-1] in inodes]
        return "open by:\n  " + "\n  ".join(holders) + "\nlocks:\n  " + "\n  ".join(locks)

    def _problems(self) -> list[str]:
        """What is wrong with one snapshot (store, kernel, DNS, processes); cheap checks first,
        `meshctl diff` and `service ps` last. A snapshot the store moved under is retried."""
        controller = self.mesh.controller
        if controller is None or controller.poll() is not None:
            raise AssertionError(f"the controller exited: {self._log_tail()}")
        store = self._read_store()
        tasks = store["task"]
        self.tasks = tasks
        self.known_tasks |= set(tasks)
        kernel = self._observe_kernel(store)
        answers = self._observe_dns(store)
        problems = self._model_problems(store)
        task_problems = self._process_problems(tasks)
        problems += self._namespace_problems(store)
        problems += self._link_problems(store, kernel["links"])
        problems += self._lb_problems(store, kernel["lb"])
        problems += self._mark_problems(store, kernel["tables"])
        problems += self._address_problems(store)
        problems += self._dns_problems(store, answers)
        problems += self._progress_problems(tasks)
        if not problems:
            problems += self._traffic_problems(store)
        if not problems:
            diff = self.mesh.diff()
            if diff.returncode != 0:
                shown = (diff.stdout + diff.stderr).strip()
                problems.append(f"meshctl diff (exit {diff.returncode}): {shown}")
        ps: tuple[str, list[dict[str, Any]]] | None = None
        if not problems:
            # One service's `service ps` per check, in turn: the user's view of the records.
            names = sorted(self.services)
            if names:
                name = names[STATS.checks % len(names)]
                ps = (name, self._ps(name))
        after = self._read_store()
        if _settled_view(after) != _settled_view(store):
            return [f"{MOVED}: {_changes(store, after)}"]
        # A task's state, pid and health may move (a sick task restarting) without touching
        # anything above: what is said of such a task holds if its record stayed the same.
        still = {tid for tid, t in tasks.items() if after["task"].get(tid) == t}
        problems += [text for tid, text in task_problems if tid is None or tid in still]
        if ps is not None:
            problems += self._ps_problems(*ps, {t: tasks[t] for t in still})
        return problems

    def _ps(self, name: str) -> list[dict[str, Any]]:
        result = self.mesh.cli("service", "ps", name, "--format", "json", check=False)
        if result.returncode != 0:
            raise AssertionError(f"service ps {name}: {result.stderr}\n{self._store_holders()}")
        found: list[dict[str, Any]] = json.loads(result.stdout)
        return found

    # -- observing -------------------------------------------------------------------------------

    def _lb_ns(self, network_id: str) -> str:
        return f"mesh-lb-{self.node_id[:8]}-{network_id[:8]}"

    def _observe_kernel(self, store: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
        lb = {}
        tables = {"node": observe.iptables_save(self.node_ns)}
        for network in store["network"].values():
            ns = self._lb_ns(network["id"])
            if netns.exists(ns):
                tables[ns] = observe.iptables_save(ns)  # for the marks, whatever the backend
                reading = observe.LB_READERS[self.backend](ns, tables[ns])
                lb[network["id"]] = (reading, observe.addresses(ns, "eth0"))
        return {"links": observe.links(self.node_ns), "lb": lb, "tables": tables}

    def _askers(self, tasks: dict[str, dict[str, Any]]) -> dict[frozenset[str], str]:
        """One running task per set of networks: DNS answers depend on the asker's networks."""
        askers: dict[frozenset[str], str] = {}
        for task_id, task in sorted(tasks.items()):
            if task["state"] == "running" and task["desired_state"] == "running":
                askers.setdefault(frozenset(task["addresses"]), task_id)
        return askers

    def _dns_questions(self, store: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
        names = [q for s in SERVICES for q in (s, f"tasks.{s}")]
        live = {s["id"] for s in store["service"].values()}
        names += sorted(
            {
                t["name"]
                for t in store["task"].values()
                if t["desired_state"] == "running" and t["service_id"] in live
            }
        )
        return names

    def _observe_dns(
        self, store: dict[str, dict[str, dict[str, Any]]]
    ) -> dict[frozenset[str], dict[str, observe.DnsAnswer]]:
        questions = self._dns_questions(store)
        answers = {}
        for networks, task_id in self._askers(store["task"]).items():
            try:
                answers[networks] = observe.ask(f"mesh-t-{task_id}", questions, scaled(2))
            except (OSError, KernelError):
                continue  # the namespace went away meanwhile: the fingerprint will show it
        return answers

    # -- comparing -------------------------------------------------------------------------------

    def _model_problems(self, store: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
        problems = []
        have = {name: (n["id"], n["subnet"]) for name, n in store["network"].items()}
        want = {name: (n.id, n.subnet) for name, n in self.networks.items()}
        if have != want:
            problems.append(f"networks in the store {have}, the model says {want}")
        for name in set(store["service"]) | set(self.services):
            stored, model = store["service"].get(name), self.services.get(name)
            if stored is None or model is None:
                problems.append(f"service {name}: store {stored is not None}, model {model}")
                continue
            got = (
                stored["id"],
                tuple(a["network"] for a in stored["networks"]),
                stored["replicas"],
                stored["version"],
                stored["env"].get("REV"),
                stored["health"] is not None,
            )
            wanted = (model.id, model.networks, model.replicas, model.version, str(model.rev),
                      model.health)  # fmt: skip
            if got != wanted:
                problems.append(f"service {name} in the store {got}, the model says {wanted}")
        return problems

    def _ps_problems(
        self, name: str, ps: list[dict[str, Any]], tasks: dict[str, dict[str, Any]]
    ) -> list[str]:
        """`service ps` shows what the store holds (of the tasks that held still)."""
        service_id = self.services[name].id
        mine = sorted(
            (t for t in tasks.values() if t["service_id"] == service_id),
            key=lambda t: (t["slot"], t["created_at"]),
        )
        keys = ("id", "name", "desired_state", "state", "health", "pid", "addresses")

        def view(ts: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
            return [tuple(t[k] for k in keys) for t in ts]

        shown = [t for t in ps if t["id"] in tasks]
        if view(shown) != view(mine):
            return [f"service ps {name} shows {view(shown)}, the store holds {view(mine)}"]
        return []

    def _process_problems(self, tasks: dict[str, dict[str, Any]]) -> list[tuple[str | None, str]]:
        """What is wrong with the tasks' processes, each with the task it concerns (None: a
        process no task has): a running task has its live process in its namespace, and
        every process of this run is a task's or a health probe's."""
        problems: list[tuple[str | None, str]] = []
        expected = {}
        for task_id, task in tasks.items():
            name = f"task {task['name']} ({task_id})"
            if task["pid"] is None:
                if task["state"] == "running":
                    problems.append((task_id, f"{name} is running without a pid"))
                continue
            expected[task["pid"]] = task
            p = observe.proc(task["pid"])
            if task["state"] != "running":
                continue
            if p is None or p.start_time != task["start_time"]:
                problems.append((task_id, f"{name} is running with pid {task['pid']}: gone"))
            elif not netns.exists(f"mesh-t-{task_id}"):
                problems.append((task_id, f"{name} is running without its namespace"))
            elif p.netns_inode != netns.inode(f"mesh-t-{task_id}"):
                problems.append((task_id, f"{name}: pid {task['pid']} is not in its namespace"))
        controller = self.mesh.controller
        assert controller is not None
        for pid, p in observe.processes_with(self.marker).items():
            owner = expected.get(pid)
            if owner is not None and owner["start_time"] == p.start_time:
                continue
            lineage = observe.ancestors(pid)
            if controller.pid in lineage:
                continue  # a health probe the controller runs inside a task
            if any(ancestor in expected for ancestor in lineage):
                continue  # a connection's server: the task's socat forked it
            # Started after the store was read, its task is still in it (recorded or not).
            held = next((tid for tid, t in tasks.items() if t["desired_state"] == "running"
                         and netns.exists(f"mesh-t-{tid}")
                         and p.netns_inode == netns.inode(f"mesh-t-{tid}")), None)  # fmt: skip
            problems.append((held, f"process {pid} ({p.cmdline}) of this run belongs to no task"))
        return problems

    def _namespace_problems(self, store: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
        problems = []
        tasks = store["task"]
        task_dir = os.path.join(self.mesh.state_dir, "tasks")
        dirs = set(os.listdir(task_dir)) if os.path.isdir(task_dir) else set()
        self.known_tasks |= dirs
        for task_id in sorted(self.known_tasks - set(tasks)):
            if netns.exists(f"mesh-t-{task_id}"):
                problems.append(f"namespace mesh-t-{task_id} of a task the store no longer has")
        for task_id in sorted(dirs - set(tasks)):
            problems.append(f"{task_dir}/{task_id} of a task the store no longer has")
        have = set(netns.list_namespaces(f"mesh-lb-{self.node_id[:8]}-"))
        want = {self._lb_ns(n["id"]) for n in store["network"].values()}
        if have != want:
            problems.append(f"LB namespaces {sorted(have)}, the networks want {sorted(want)}")
        return problems

    def _link_problems(
        self, store: dict[str, dict[str, dict[str, Any]]], links: list[dict[str, Any]]
    ) -> list[str]:
        """Every link in the node namespace is a network's bridge or LB leg, or a task's veth,
        carrying that object's mark and on the right bridge."""
        explained: dict[str, tuple[str, str | None]] = {}  # name → (alias, master)
        networks = {n["name"]: n for n in store["network"].values()}
        for network in networks.values():
            bridge = f"mesh{network['id'][:8]}"
            explained[bridge] = (f"meshctl:{network['id']}", None)
            explained[f"meshl{network['id'][:8]}"] = (f"meshctl:{network['id']}", bridge)
        order = {s["id"]: [a["network"] for a in s["networks"]] for s in store["service"].values()}
        for task_id, task in store["task"].items():
            # eth0, eth1, ... in the order the service lists its networks (then by name).
            wanted = order.get(task["service_id"], [])
            legs = sorted(
                task["addresses"],
                key=lambda n: (n not in wanted, wanted.index(n) if n in wanted else 0, n),
            )
            for index, network in enumerate(legs):
                net = networks.get(network)
                master = f"mesh{net['id'][:8]}" if net else None
                explained[f"meshv{task_id[:8]}{index:x}"] = (f"meshctl:{task_id}", master)
        problems = []
        for link in links:
            name = link["ifname"]
            if name == "lo":
                continue
            if name not in explained:
                problems.append(f"link {name} in the node namespace: no store object explains it")
                continue
            alias, master = explained[name]
            if link.get("ifalias") != alias:
                problems.append(f"link {name} has alias {link.get('ifalias')!r}, want {alias!r}")
            if master is not None and link.get("master") != master:
                problems.append(f"link {name} is on {link.get('master')}, want {master}")
        return problems

    def _lb_problems(
        self, store: dict[str, dict[str, dict[str, Any]]], lb: dict[str, Any]
    ) -> list[str]:
        problems = []
        tasks = store["task"].values()
        lb_addresses = {
            (a["network"], name.split("/", 1)[1])
            for name, a in store["address"].items()
            if a["owner"] == f"lb:{NODE}"
        }
        for network in store["network"].values():
            if network["id"] not in lb:
                continue  # its namespace is missing: _namespace_problems says so
            reading, addresses = lb[network["id"]]
            prefix = ipaddress.IPv4Network(network["subnet"]).prefixlen
            want_addresses = {f"{a}/{prefix}" for n, a in lb_addresses if n == network["name"]}
            vips = {}
            for service in store["service"].values():
                for attachment in service["networks"]:
                    if attachment["network"] == network["name"] and attachment["vip"]:
                        vips[attachment["vip"]] = service
                        want_addresses.add(f"{attachment['vip']}/32")
            if addresses != want_addresses:
                problems.append(f"LB of {network['name']} holds {sorted(addresses)}, "
                                f"want {sorted(want_addresses)}")  # fmt: skip
            for vip, service in sorted(vips.items()):
                want = sorted(
                    t["addresses"][network["name"]]
                    for t in tasks
                    if t["service_id"] == service["id"]
                    and network["name"] in t["addresses"]
                    and serving(t)
                )
                path = reading.vip_path(vip)
                where = f"VIP {vip} of {service['name']} on {network['name']}"
                if list(path.dnat) != want:
                    problems.append(f"{where} balances over {list(path.dnat)}, want {want}")
                if path.refused != (not want):
                    problems.append(f"{where}: refused={path.refused} with backends {want}")
                problems += [f"{where}: {p}" for p in path.problems]
            problems += [f"LB of {network['name']}: {p}" for p in reading.stray(vips)]
        return problems

    def _traffic_problems(self, store: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
        """New TCP connections to every VIP from the node namespace: one per serving task,
        each answered by a different serving task (all backends take turns), or one refused
        when none serves."""
        problems = []
        tasks = store["task"].values()
        for service in store["service"].values():
            for attachment in service["networks"]:
                vip, network = attachment["vip"], attachment["network"]
                if not vip:
                    continue
                want = sorted(
                    f"{t['name']} {t['addresses'][network]}"
                    for t in tasks
                    if t["service_id"] == service["id"] and network in t["addresses"] and serving(t)
                )
                expect = want or ["refused"]
                began = time.monotonic()
                heard = observe.connect(self.node_ns, vip, TASK_PORT, len(expect), CONNECT_TIMEOUT)
                STATS.connecting += time.monotonic() - began
                STATS.connections += len(heard)
                if sorted(heard) != expect:
                    problems.append(f"VIP {vip} of {service['name']} on {network}: new "
                                    f"connections answered {heard}, want {expect}")  # fmt: skip
        return problems

    def _mark_problems(
        self, store: dict[str, dict[str, dict[str, Any]]], tables: dict[str, Any]
    ) -> list[str]:
        """Every rule comment names an object in the store (or the node itself)."""
        ids = {"node"}
        ids |= {f"net-{n['id']}" for n in store["network"].values()}
        ids |= {f"lb-{n['id']}" for n in store["network"].values()}
        ids |= {s["id"] for s in store["service"].values()}
        ids |= {f"dns-{t}" for t in store["task"]}
        problems = []
        for where, saved in tables.items():
            for mark in sorted(observe.marks(saved) - ids):
                problems.append(f"rules in {where} marked meshctl:{mark}: not in the store")
        return problems

    def _address_problems(self, store: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
        """Address claims and their owners explain each other exactly."""
        ids = {n["id"]: name for name, n in store["network"].items()}
        claims = {}
        problems = []
        for name, claim in store["address"].items():
            network_id, address = name.split("/", 1)
            if ids.get(network_id) != claim["network"]:
                problems.append(f"address claim {name} ({claim}) of no network in the store")
            claims[(claim["network"], address)] = claim["owner"]
        owners = {}
        for service in store["service"].values():
            for a in service["networks"]:
                if a["vip"]:
                    owners[(a["network"], a["vip"])] = f"vip:{service['id']}"
        for task_id, task in store["task"].items():
            for network, address in task["addresses"].items():
                if network in store["network"]:
                    owners[(network, address)] = f"task:{task_id}"
        for key in sorted(set(claims) | set(owners)):
            claimed, held = claims.get(key), owners.get(key)
            if claimed == f"lb:{NODE}" and held is None:
                continue
            if claimed != held:
                problems.append(f"address {key}: claimed by {claimed}, held by {held}")
        return problems

    def _dns_problems(
        self,
        store: dict[str, dict[str, dict[str, Any]]],
        answers: dict[frozenset[str], dict[str, observe.DnsAnswer]],
    ) -> list[str]:
        problems = []
        services = {s["name"]: s for s in store["service"].values()}
        live = {s["id"] for s in services.values()}
        tasks = [t for t in store["task"].values() if t["service_id"] in live]
        for networks, got in answers.items():
            want: dict[str, frozenset[str] | None] = {}  # None: not meshctl's to answer
            for name in SERVICES:
                service = services.get(name)
                attached = service["networks"] if service else []
                shared = [a for a in attached if a["network"] in networks]
                if service is None or not shared:
                    want[name] = want[f"tasks.{name}"] = None
                    continue
                on = {a["network"] for a in shared}
                want[name] = frozenset(a["vip"] for a in shared)
                want[f"tasks.{name}"] = frozenset(
                    address
                    for t in tasks
                    if t["service_id"] == service["id"] and serving(t)
                    for network, address in t["addresses"].items()
                    if network in on
                )
            for t in tasks:
                if t["desired_state"] == "running":
                    found = {a for n, a in t["addresses"].items() if n in networks}
                    previous = want.get(t["name"]) or frozenset()
                    want[t["name"]] = frozenset(previous | found) or None
            for name, answer in got.items():
                expected = want.get(name)
                asker = "/".join(sorted(networks))
                if expected is None:
                    if answer.addresses:
                        problems.append(f"DNS {name} from {asker}: {sorted(answer.addresses)}, "
                                        "want no answer from meshctl")  # fmt: skip
                elif answer.rcode != "NOERROR" or answer.addresses != expected:
                    got_text = f"{answer.rcode} {sorted(answer.addresses)}"
                    problems.append(f"DNS {name} from {asker}: {got_text}, want {sorted(expected)}")
        return problems

    def _progress_problems(self, tasks: dict[str, dict[str, Any]]) -> list[str]:
        now = time.monotonic()
        problems = []
        for task_id, task in tasks.items():
            if task["desired_state"] != "running":
                since = self.leaving_since.setdefault(task_id, now)
                if now - since > scaled(LEAVING):
                    problems.append(f"task {task['name']} ({task_id}) still {task['state']} "
                                    f"{now - since:.0f}s after it was told to leave")  # fmt: skip
        for name, service in self.services.items():
            mine = [t for t in tasks.values() if t["service_id"] == service.id]
            live = [t for t in mine if t["desired_state"] == "running"]
            any_sick = False
            for slot in range(1, service.replicas + 1):
                task_name = f"{name}.{slot}"
                sick = service.health and task_name in self.sick_since
                any_sick |= sick
                serves = [t for t in live if t["name"] == task_name and serving(t)]
                if sick and serves and now > self.sick_by[task_name]:
                    problems.append(f"{task_name} is sick but still serving: {serves}")
                if not sick and not serves and now > self.ready_by.get(task_name, 0):
                    states = [(t["spec_version"], t["state"], t["health"]) for t in mine
                              if t["name"] == task_name]  # fmt: skip
                    problems.append(f"{task_name} is not serving: {states}")
            if any_sick or now <= service.settle_by:
                continue
            slots = sorted(t["slot"] for t in live)
            versions = {t["spec_version"] for t in live}
            if slots != list(range(1, service.replicas + 1)) or versions - {service.version}:
                problems.append(f"service {name} has tasks in slots {slots} of versions "
                                f"{sorted(versions)}, want 1..{service.replicas} of "
                                f"{service.version}")  # fmt: skip
            if len(mine) != len(live):
                problems.append(f"service {name} still has tasks on their way out")
        for task_id in set(self.leaving_since) - set(tasks):
            del self.leaving_since[task_id]
        return problems

    def _check_restart_kept_pids(self) -> None:
        """After a controller restart: every task that served before runs the same process."""
        if self.expect_pids is None:
            return
        expect, self.expect_pids = self.expect_pids, None
        changed = {
            self.tasks[tid]["name"]: (pid, self.tasks[tid]["pid"])
            for tid, pid in expect.items()
            if tid in self.tasks
            and self.tasks[tid]["desired_state"] == "running"
            and self.tasks[tid]["name"] not in self.sick_since
            and self.tasks[tid]["pid"] != pid
        }
        assert not changed, f"the controller restart replaced processes (old, new): {changed}"

    def _note_stable_runs(self) -> None:
        """A slot whose one live task serves with a process that has run longer than
        STABLE_RUN (and runs still) restarts with no back-off left the next time it fails."""
        now = time.time()
        live = Counter(t["name"] for t in self.tasks.values() if t["desired_state"] == "running")
        for task in self.tasks.values():
            if not serving(task) or task["pid"] is None or live[task["name"]] != 1:
                continue
            started = [e["time"] for e in task["history"]
                       if e["message"] == f"started, pid {task['pid']}"]  # fmt: skip
            p = observe.proc(task["pid"])
            alive = p is not None and p.start_time == task["start_time"]
            if started and started[-1] < now - STABLE_RUN - 1 and alive:
                self.failures.pop(task["name"], None)

    def _log_tail(self, lines: int = 30) -> str:
        with open(self.mesh.controller_log, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def _check_log(self) -> None:
        """A traceback in the controller's log is a failure, unless it is a known finding
        (counted), and so is a second diff that was not empty after an apply ("not converged
        after apply"); warnings are collected."""
        with open(self.mesh.controller_log, errors="replace") as f:
            f.seek(self.log_seen)
            new = f.read()
            self.log_seen = f.tell()
        unknown = []
        for block, last in _tracebacks(new):
            finding = KNOWN_TRACEBACKS.get(last)
            if finding is None:
                unknown.append(block)
            else:
                STATS.known[finding] = STATS.known.get(finding, 0) + 1
        assert not unknown, "the controller logged an exception:\n" + "\n".join(unknown)
        unconverged = [line for line in new.splitlines() if "not converged after apply" in line]
        assert not unconverged, "the controller did not converge:\n" + "\n".join(unconverged)
        STATS.warnings.update(
            line.split(" msg=", 1)[-1] for line in new.splitlines() if "level=warning" in line
        )

    # -- teardown --------------------------------------------------------------------------------

    def teardown(self) -> None:
        """Remove everything through the CLI and check nothing is left, stop the controller and
        check nothing of the run remains; then force the rest away (also after a failure)."""
        left: list[str] = []
        try:
            if not self.broken:
                self._remove_all()
                self.mesh.stop_controller(signal.SIGTERM)
                left = self._leftovers()
        finally:
            self._force_cleanup()
            STATS.example_times.append(time.monotonic() - self.began)
        assert not left, f"left after teardown: {left}"

    def _remove_all(self) -> None:
        for name in sorted(self.services):
            self.mesh.cli("service", "rm", name)
        wait_for(lambda: not self.mesh.task_ids(), LEAVING, "every task forgotten")
        for name in sorted(self.networks):
            self.mesh.cli("network", "rm", name)
        self.services.clear()
        self.networks.clear()
        self.mesh.wait_converged(SETTLE)
        store = self._read_store()
        kernel = self._observe_kernel(store)
        problems = self._namespace_problems(store) + self._link_problems(store, kernel["links"])
        problems += self._mark_problems(store, kernel["tables"])
        problems += self._address_problems(store)
        problems += [text for _, text in self._process_problems(store["task"])]
        assert not problems, f"left after removing everything: {problems}"
        self._check_log()

    def _force_cleanup(self) -> None:
        self.mesh.stop_controller(signal.SIGTERM)
        self.mesh.close()
        for pid in observe.processes_with(self.marker):
            os.kill(pid, signal.SIGKILL)
        kill_processes_in(netns.path(self.node_ns))
        netns.delete(self.node_ns)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _leftovers(self) -> list[str]:
        left = [f"namespace mesh-t-{t}" for t in sorted(self.known_tasks)
                if netns.exists(f"mesh-t-{t}")]  # fmt: skip
        left += netns.list_namespaces(f"mesh-lb-{self.node_id[:8]}-")
        left += [f"process {pid}" for pid in observe.processes_with(self.marker)]
        return left
