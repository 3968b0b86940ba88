"""The one runner of the command-line tools kernel/ keeps (iptables-legacy-save/-restore, nft):
start a tool inside a namespace, stream its input to it as the caller renders it, and turn a
failure into a typed KernelError that names the tool's complaint and what to do next.
"""

from __future__ import annotations

import itertools
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from kernel import netns
from kernel.errors import KernelError, PermissionDenied, Unsupported

_CHUNK = 2048  # lines per write to a tool's stdin


@dataclass(frozen=True)
class Tool:
    """How to run one family of tools and read their failures.

    package: where the tool comes from, said when it is missing. denied: stderr texts that mean
    the caller lacks the privilege. lines: what its input lines are (said when one holds a line
    break). failed_line: where its complaint names the input line it refused, if it does.
    """

    package: str
    denied: tuple[str, ...]
    lines: str
    failed_line: re.Pattern[str] | None = None

    def run(
        self,
        ns: netns.Namespace,
        what: str,
        command: list[str],
        stdin: Iterable[str] | None = None,
        hint: str = "",
    ) -> str:
        """Run command inside ns, writing it the lines of stdin, and return its stdout; a failure
        raises a KernelError naming the tool's complaint (and the input line it refused), then
        `hint`, what to do.

        The lines are written as they come, a chunk at a time, so the tool parses a batch while
        the caller is still rendering it (both cores work: a 210,000-rule iptables batch renders
        in 0.6 s). A line with a line break in it kills the tool before it commits: nothing is
        changed.
        """
        where = f"{what} in netns {ns or '(node)'}"

        def start() -> subprocess.Popen[str]:
            # A process started from a thread that entered ns is born in ns.
            given = subprocess.PIPE if stdin is not None else subprocess.DEVNULL
            pipe = subprocess.PIPE
            return subprocess.Popen(command, stdin=given, stdout=pipe, stderr=pipe, text=True)

        try:
            tool = netns.run_in(ns, start)
        except FileNotFoundError as err:
            raise Unsupported(f"{where}: {command[0]} not found; install {self.package}") from err
        sent: list[str] = []
        try:
            if stdin is not None:
                self._feed(tool, stdin, sent)
        except BaseException:
            tool.kill()
            tool.communicate()
            raise
        stdout, stderr = tool.communicate()
        if tool.returncode == 0:
            return stdout
        complaints = [line.strip() for line in stderr.splitlines() if line.strip()]
        reason = complaints[0] if complaints else f"{command[0]} exited with {tool.returncode}"
        failed = self.failed_line.search(stderr) if self.failed_line is not None else None
        if failed and 0 < int(failed.group(1)) <= len(sent):
            number = int(failed.group(1))
            reason += f" (input line {number}: {sent[number - 1]})"
        if any(text in stderr for text in self.denied):
            raise PermissionDenied(f"{where}: {reason}; run as root (CAP_NET_ADMIN)")
        raise KernelError(f"{where}: {reason}; {hint}")

    def _feed(self, tool: subprocess.Popen[str], lines: Iterable[str], sent: list[str]) -> None:
        """Write lines to the tool's stdin, keeping them in sent; stop quietly if it has exited
        (its complaint says why). communicate() closes its stdin afterwards."""
        assert tool.stdin is not None
        it = iter(lines)
        try:
            while chunk := list(itertools.islice(it, _CHUNK)):
                for line in chunk:
                    if "\n" in line or "\r" in line:
                        raise ValueError(f"{line!r}: {self.lines} cannot hold line breaks")
                sent += chunk
                tool.stdin.write("\n".join(chunk) + "\n")
                tool.stdin.flush()
        except BrokenPipeError:
            pass
