"""The kernel's side of an nftables change: the write of one nf_tables netlink batch, timed alone.

For each S, loads meshctl's layout for S services x 10 backends into a fresh namespace (one
batch, timed: the full sync's kernel part), then times batches of one kind of object each (an
element added and deleted, a chain added with one rule, a chain flushed and deleted) and endpoint
changes as the backend makes them (drain/undrain, remove/re-add a backend of a service), each the
write of its batch only: nothing of the controller's, which bench/control_plane.py measures.
`--foreign N` first loads another table of N empty chains into the namespace (a change must not
cost more for it). Needs root. Prints one markdown table of medians (ms; the full sync in s).

    .venv/bin/python bench/nftables_batch.py --services 100,1000,10000 [--foreign 20000]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from kernel.nftables_batch import write_batch
from kernel.nftables_exprs import RuleContext
from kernel.nftables_messages import (
    Message,
    chain_message,
    change_messages,
    delete_chain_message,
    elements_messages,
    flush_message,
    rule_messages,
)
from kernel.nftables_rules import NftTable, table_change
from meshctl.lb.nftables import REFUSED_SET, NftablesBackend
from meshctl.lb.spec import lb_spec

# control_plane's services and changes are reused as they are; it lives outside the installed
# packages, importable from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.control_plane import LB_ADDRESS, changed, namespace, services  # noqa: E402

ROUNDS = 20


def write(ns: str, messages: Sequence[Message]) -> float:
    """Seconds one batch takes in ns, from its framing until its answers are read (a thread
    entering ns included, about 0.1 ms); a refusal stops the bench."""
    start = time.perf_counter()
    write_batch(ns, messages, "benchmarking nftables batches")
    return time.perf_counter() - start


def median_ms(ns: str, batches: Callable[[int], Sequence[Message]]) -> float:
    return statistics.median(write(ns, batches(i)) for i in range(ROUNDS)) * 1000


def measure(count: int, foreign: int) -> dict[str, str]:
    backend = NftablesBackend()
    vips = list(services(count))
    node = uuid.uuid4().hex[:8]
    with namespace(f"batch{count}") as ns:
        if foreign:
            text = "table ip other {\n" + "".join(f"chain c{i} {{ }}\n" for i in range(foreign))
            subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=text + "}\n",
                           text=True, check=True)  # fmt: skip
        spec = lb_spec(node, "bench", LB_ADDRESS, tuple(vips))
        held = backend.render(spec, spec)
        full = write(ns, list(change_messages(table_change(held, NftTable()))))
        rule = lambda c, r: rule_messages(c, r, RuleContext())  # noqa: E731
        element = lambda i, add: list(  # noqa: E731
            elements_messages(REFUSED_SET, {f"10.250.0.{i}": ""}, None, add)
        )
        row: dict[str, str | float] = {
            "S": f"{count:,}",
            "full sync (s)": f"{full:.2f}",
            "add element": median_ms(ns, lambda i: element(i, True)),
            "delete element": median_ms(ns, lambda i: element(i, False)),
            "add chain + rule": median_ms(
                ns, lambda i: [chain_message(f"bench-{i}", None), *rule(f"bench-{i}", "accept")]
            ),
            "flush chain": median_ms(ns, lambda i: [flush_message(f"bench-{i}")]),
            "delete chain": median_ms(ns, lambda i: [delete_chain_message(f"bench-{i}")]),
        }
        spent = []
        for step in range(ROUNDS):
            index = (step * 7919) % count
            vips[index] = changed(vips[index], step)
            spec = lb_spec(node, "bench", LB_ADDRESS, tuple(vips))
            desired = backend.render(spec, spec)
            spent.append(write(ns, list(change_messages(table_change(desired, held)))))
            held = desired
        row["endpoint change"] = statistics.median(spent) * 1000
    return {k: v if isinstance(v, str) else f"{v:.2f}" for k, v in row.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", default="100,1000", help="comma-separated values of S")
    parser.add_argument("--foreign", type=int, default=0, help="chains of another table")
    args = parser.parse_args()
    rows = [measure(int(s), args.foreign) for s in args.services.split(",")]
    print(f"nftables batches, medians of {ROUNDS} (ms), {args.foreign:,} foreign chains:\n")
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---:|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(row.values()) + " |")


if __name__ == "__main__":
    main()
