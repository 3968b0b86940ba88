"""What /healthz and /readyz say, as kube-proxy's healthz does it: healthy while the last pass
succeeded and no change seen in the store has waited longer than a bound (2 x the resync
period) for a pass to apply it; ready once a pass has converged after the start.

The informer's thread reports changes (changed), the pass thread brackets each pass (begin,
end or failed), the HTTP server's threads ask (health, ready). The waits a pass ends are the
network programming latencies /metrics reports.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

PENDING_CAP = 10_000  # changes remembered while no pass applies them (the oldest are kept)


class Liveness:
    def __init__(self, bound: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.bound = bound
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: deque[float] = deque()  # when each change not yet applied was seen
        self._running_since: float | None = None
        self._problem = ""  # why the last pass did not succeed ("" when it did)
        self._ready = False
        self.last_success = 0.0  # wall-clock time the last pass succeeded (0: none yet)

    def changed(self) -> None:
        """A change reached the controller's copy of the store."""
        with self._lock:
            if len(self._pending) < PENDING_CAP:
                self._pending.append(self._clock())

    def begin(self) -> int:
        """A pass starts: it applies the changes seen so far; returns how many (for end)."""
        with self._lock:
            self._running_since = self._clock()
            return len(self._pending)

    def end(self, covered: int, problem: str) -> list[float]:
        """The pass completed (problem: "" if everything converged, else what fails); returns
        how long each change it applied had waited, in seconds."""
        with self._lock:
            now = self._clock()
            waits = [now - self._pending.popleft() for _ in range(min(covered, len(self._pending)))]
            self._running_since = None
            self._problem = problem
            if not problem:
                self._ready = True
                self.last_success = time.time()
            return waits

    def failed(self, why: str) -> None:
        """The pass raised: nothing it covered counts as applied."""
        with self._lock:
            self._running_since = None
            self._problem = f"the last pass failed: {why}"

    def health(self) -> tuple[bool, str]:
        """(healthy, why not)."""
        with self._lock:
            now = self._clock()
            if self._problem:
                return False, self._problem
            if self._running_since is not None and now - self._running_since > self.bound:
                return False, (
                    f"a pass has been running for {now - self._running_since:.1f}s "
                    f"(bound {self.bound:g}s)"
                )
            if self._pending and now - self._pending[0] > self.bound:
                return False, (
                    f"a store change has waited {now - self._pending[0]:.1f}s for a pass "
                    f"(bound {self.bound:g}s)"
                )
            return True, ""

    def ready(self) -> tuple[bool, str]:
        """(ready, why not): ready once a pass has converged since the start."""
        with self._lock:
            if self._ready:
                return True, ""
            why = f": {self._problem}" if self._problem else ""
            return False, f"the first pass has not converged yet{why}"
