"""Request and DNS loops from inside a task, for the tests that restart controllers (#27): each
round a `dig` through the task's own resolv.conf (127.0.0.11) and a new HTTP connection through
a VIP, each with a client's usual timeout, every failure kept with its time."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType

from tests.conftest import scaled

# What a client waits before it calls a query or a request failed: glibc's resolver and curl's
# defaults are 5 s and longer. A restart may delay answers by its gap, never lose one.
CLIENT_TIMEOUT = 5.0


@dataclass
class Loops:
    """Two threads inside one task (its pid: nsenter --net --mount, so through its resolv.conf)
    until closed: one asks name (dig, expecting answer), one gets url (curl, expecting 200)."""

    pid: int
    name: str
    answer: str
    url: str
    # (began, ended) of each query or request, by client ("dig", "curl")
    sent: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    failed: list[tuple[str, float]] = field(default_factory=list)  # (client, began) of each
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _mark: int = 0

    def __enter__(self) -> Loops:
        wait = round(scaled(CLIENT_TIMEOUT))
        dig = ["dig", "+short", "+tries=1", f"+time={wait}", self.name]
        curl = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", str(wait), self.url]
        for argv, expect in ((dig, self.answer), (curl, "200")):
            self.sent[argv[0]] = []
            thread = threading.Thread(target=self._loop, args=(argv, expect), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=scaled(3 * CLIENT_TIMEOUT))

    def answered(self, more: int) -> bool:
        """Whether `more` queries and requests ended since the last call that said yes."""
        count = sum(len(times) for times in self.sent.values())
        if count >= self._mark + more:
            self._mark = count
            return True
        return False

    def during(self, client: str, start: float, end: float) -> int:
        """How many of client's queries or requests were under way between start and end."""
        return sum(1 for began, ended in self.sent[client] if began <= end and ended >= start)

    def _loop(self, argv: list[str], expect: str) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            done = subprocess.run(
                ["nsenter", "-t", str(self.pid), "--net", "--mount", "--", *argv],
                capture_output=True, text=True, timeout=scaled(3 * CLIENT_TIMEOUT),
            )  # fmt: skip
            self.sent[argv[0]].append((began, time.monotonic()))
            if done.stdout.strip() != expect:
                self.failed.append((argv[0], began))
                self.failures.append(
                    f"{argv[0]} after {time.monotonic() - began:.2f}s: "
                    f"{(done.stdout + done.stderr).strip()!r} (exit {done.returncode})"
                )
            time.sleep(0.05)
