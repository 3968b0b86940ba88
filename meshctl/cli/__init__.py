"""The docker-like command line: one thin module per noun, each parsing its options, calling
meshctl.commands (or a reconciler's describe) and printing with output.py and formats.py.

Imports no kernel module at import time, so `meshctl --help` works without root. Exit codes:
0 ok, 1 failed (one line on stderr, nothing changed), 2 usage error (click's own).
"""

from meshctl.cli import (  # noqa: F401  each registers its commands on main
    cluster,
    completion,
    container,
    controller,
    events,
    network,
    node,
    router,
    service,
    store,
    tasks,
)
from meshctl.cli.root import main

__all__ = ["main"]
