"""The command line's names for the model's fields: a ValidationError names the field it is
about (`invalid replicas -1: ...`), and the CLI reports it under the flag that set it
(`invalid --replicas -1: ...`), so what users see for a bad flag names the flag."""

from __future__ import annotations

from meshctl.model import ValidationError

# Field (as ValidationError.field names it) → the flag that sets it.
FLAGS = {
    "replicas": "--replicas",
    "env": "--env",
    "endpoint_mode": "--endpoint-mode",
    "networks": "--network",
    "ports": "--publish",
    "stop_grace_period": "--stop-grace-period",
    "max_replicas_per_node": "--replicas-max-per-node",
    "constraints": "--constraint",
    "hostnames": "--hostname",
    "hostname_path": "--hostname-path",
    "hostname_sticky": "--hostname-sticky",
    "hostname_tls": "--hostname-tls",
    "health.command": "--health-cmd",
    "health.http": "--health-http",
    "health.path": "--health-http path",
    "health.tcp.port": "--health-tcp port",
    "health.http.port": "--health-http port",
    "health.interval": "--health-interval",
    "health.timeout": "--health-timeout",
    "health.interval/health.timeout": "--health-interval/--health-timeout",
    "health.start_period": "--health-start-period",
    "health.retries": "--health-retries",
    "restart.condition": "--restart-condition",
    "restart.delay": "--restart-delay",
    "restart.max_attempts": "--restart-max-attempts",
    "labels": "--label",
    "availability": "--availability",
    "address": "--advertise-addr",
    "netns": "--netns",
    "http_port": "--http-port",
    "https_port": "--https-port",
    "mode": "--publish-mode",
    "cert": "--cert",
    "key": "--key",
}
# Where a command sets a field with a flag of its own: (group, command) → field → flag.
COMMAND_FLAGS = {("node", "update"): {"labels": "--label-add"}}


def flag_error(err: ValidationError, command: tuple[str, str] | None = None) -> str:
    """The error's one line as the command line says it: `invalid FIELD` as `invalid FLAG`."""
    message = str(err)
    flags = {**FLAGS, **COMMAND_FLAGS.get(command or ("", ""), {})}
    flag = flags.get(err.field or "")
    subject = f"invalid {err.field}"
    if flag is None or not message.startswith(subject):
        return message
    return f"invalid {flag}" + message[len(subject) :]
