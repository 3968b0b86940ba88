"""The task runtime: task processes in their own namespaces, and their health checks.

Callers import from here; only `kernel/` touches netlink, this package runs processes and probes
and keeps their logs bounded.
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
from meshctl.runtime.logs import (
    LOG_KEEP,
    LOG_MAX_BYTES,
    LogClock,
    line_time,
    read_log,
    read_times,
    rotate_log,
    rotated_paths,
    task_log_lines,
    task_log_path,
)
from meshctl.runtime.process import (
    RESOLV_CONF,
    TaskProcess,
    TaskProcessSpec,
    adopt,
    exec_argv,
    hosts_text,
    read_process_file,
    read_start_time,
    start,
    write_process_file,
)

__all__ = [
    "LOG_KEEP",
    "LOG_MAX_BYTES",
    "LogClock",
    "line_time",
    "read_log",
    "read_times",
    "RESOLV_CONF",
    "read_process_file",
    "write_process_file",
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
    "rotate_log",
    "rotated_paths",
    "run_probe",
    "start",
    "task_log_lines",
    "task_log_path",
]
