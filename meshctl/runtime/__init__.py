"""The task runtime: task processes in their own namespaces, and their health checks.

Callers import from here; only `kernel/` touches netlink, this package runs processes and probes.
"""

from meshctl.runtime.health import (
    HealthState,
    HealthTracker,
    ProbeResult,
    monitor,
    probe_cmd,
    probe_http,
    probe_tcp,
    run_probe,
)
from meshctl.runtime.process import (
    RESOLV_CONF,
    TaskProcess,
    TaskProcessSpec,
    adopt,
    exec_argv,
    hosts_text,
    read_start_time,
    start,
)

__all__ = [
    "RESOLV_CONF",
    "HealthState",
    "HealthTracker",
    "ProbeResult",
    "TaskProcess",
    "TaskProcessSpec",
    "adopt",
    "exec_argv",
    "hosts_text",
    "monitor",
    "probe_cmd",
    "probe_http",
    "probe_tcp",
    "read_start_time",
    "run_probe",
    "start",
]
