"""Faults with traffic (#27): what a user of the cluster feels during node loss, partitions,
leader failover, rolling updates and dead tasks, counted as requests lost.

A netns cluster (tests/cluster/harness.py: 3 nodes on one etcd, leases of --ttl seconds) runs
a service of 6 tasks published on port 8080 of every node and routed by Host (web.test) by every
node's router, and a client task on every node. Request loops run from start to end
(tests/cluster/traffic.py), each request a new connection with a timeout: from each client task
to the service's VIP, from a host outside the nodes to every node's published port and to every
node's router. The faults (tests/cluster/faults.py) run once each in a fixed order, then at
random (seeded; the seed is printed) until --minutes have passed; after each fault and its heal
every node must converge (every slot once, LB and DNS equal to the serving tasks, `meshctl
diff` empty, nothing leaked), and every failed request is judged: to a task that died (within
its detection time) or not attributable, which breaks the rule.

Re-runs itself in a private mount namespace whose /run/netns is its own (bench/failover.py), so
it sees no other namespaces and no other controller sees its own. Needs root and etcd-server;
everything it makes is removed in `finally` (also on Ctrl-C and SIGTERM).

    .venv/bin/python bench/faults.py [--minutes 30] [--seed S] [--ttl 6] [--faults a,b]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The harness, the campaign and the failover bench's isolation live outside the installed
# packages, importable from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.control_plane import machine  # noqa: E402
from bench.failover import isolate  # noqa: E402
from tests.cluster.faults import FAULTS, Step, build, run_step, table  # noqa: E402
from tests.cluster.harness import Cluster  # noqa: E402

PREFIX = f"mfault{os.getpid()}-"


def step_line(index: int, step: Step) -> str:
    j = step.judged
    converged = f"{step.converged_in:.1f} s" if step.converged_in is not None else "never"
    return (
        f"{index:3d} {step.fault} ({step.what}): {j.sent} requests, {j.failed} failed, "
        f"{j.attributable} to dead tasks, {len(j.unexplained)} not attributable, longest "
        f"window {j.longest:.2f} s; converged {converged} after the heal"
        + (f"; last held up by: {step.held_by[0]}" if step.held_by else "")
    )


def campaign(args: argparse.Namespace, seed: int) -> list[Step]:
    rng = random.Random(seed)
    steps: list[Step] = []
    controller_args = ("--node-ttl", f"{args.ttl:g}s")
    with (
        tempfile.TemporaryDirectory(prefix="meshctl-sick-") as sick,
        Cluster(3, prefix=PREFIX, controller_args=controller_args) as cluster,
    ):
        world = build(cluster, args.ttl, sick, args.interval, args.timeout)
        assert world.traffic is not None
        try:
            began = time.monotonic()
            order = list(args.faults)
            while order or time.monotonic() - began < args.minutes * 60:
                name = order.pop(0) if order else rng.choice(args.faults)
                steps.append(run_step(world, name, rng))
                print(step_line(len(steps), steps[-1]), flush=True)
                for line in steps[-1].broken:
                    print(f"    BROKEN {line}", flush=True)
        finally:
            world.traffic.close()
            if args.logs:
                os.makedirs(args.logs, exist_ok=True)
                for name in cluster.nodes:
                    with open(os.path.join(args.logs, f"{name}.log"), "w") as out:
                        out.write(cluster.logs(name))
    return steps


def report(steps: list[Step], args: argparse.Namespace, seed: int, took: float) -> None:
    commit = subprocess.run(
        ["git", "-C", str(Path(__file__).resolve().parents[1]), "log", "-1", "--oneline"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    load = os.getloadavg()
    print(f"\nFaults with traffic on a 3-node netns cluster; commit {commit}; seed {seed}; "
          f"{len(steps)} faults in {took / 60:.1f} min; leases {args.ttl:g} s; a request every "
          f"{args.interval:g} s per loop, timeout {args.timeout:g} s; {machine()}; load average "
          f"at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}.\n")  # fmt: skip
    print("\n".join(table(steps)))
    broken = [line for s in steps for line in s.broken]
    print(f"\n{len(broken)} broken rules" + (":" if broken else "."))
    for line in broken:
        print(f"  {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    more = "of random faults after the fixed pass (0: the fixed pass only)"
    parser.add_argument("--minutes", type=float, default=0, help=more)
    parser.add_argument("--seed", type=int, default=None, help="of the random faults")
    parser.add_argument("--ttl", type=float, default=6.0, help="the nodes' lease (s)")
    parser.add_argument("--interval", type=float, default=0.05, help="between requests (s)")
    parser.add_argument("--timeout", type=float, default=5.0,
                        help="of each request (s): a client's usual wait")  # fmt: skip
    parser.add_argument("--logs", help="a directory to keep the controllers' logs in")
    parser.add_argument("--faults", default=",".join(FAULTS),
                        help=f"which, comma-separated [{','.join(FAULTS)}]")  # fmt: skip
    args = parser.parse_args()
    args.faults = args.faults.split(",")
    if unknown := set(args.faults) - set(FAULTS):
        parser.error(f"no such fault: {', '.join(sorted(unknown))}")
    isolate()  # re-executes itself first: the seed is drawn after
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    print(f"seed {seed}", flush=True)
    # SIGTERM unwinds like Ctrl-C, so the finally blocks remove the cluster.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    began = time.monotonic()
    steps = campaign(args, seed)
    report(steps, args, seed, time.monotonic() - began)
    if any(s.broken for s in steps):
        sys.exit(1)


if __name__ == "__main__":
    main()
