"""What every noun's commands share: the group that turns meshctl's errors into one line, the
invocation's store, option types, --format and printing by it, completion of the store's names.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import click
from click.shell_completion import CompletionItem

from meshctl.cli import formats, output
from meshctl.cli.flags import flag_error
from meshctl.cluster import config as cluster_config
from meshctl.cluster.config import ClusterConfig
from meshctl.model import (
    TASK,
    MeshctlError,
    ValidationError,
    ascii_int,
    check_name,
)
from meshctl.store import Store, StoreError, default_store_url, open_store, resolve_state_dir
from meshctl.store.etcd_access import EtcdAccess

Format = str  # table, json or a template (meshctl.cli.formats)
F = TypeVar("F", bound=Callable[..., Any])
PID_MAX = 4_194_304  # the kernel's PID_MAX_LIMIT


class Group(click.Group):
    """A click group that turns meshctl's errors into one line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ValidationError as err:
            command = (ctx.info_name or "", ctx.invoked_subcommand or "")
            raise click.ClickException(flag_error(err, command)) from None
        except (MeshctlError, StoreError) as err:
            raise click.ClickException(_explained(err)) from None
        except Exception as err:
            # Kernel errors carry their own one-line message; imported lazily (no root for --help).
            from kernel.errors import KernelError

            if isinstance(err, KernelError):
                raise click.ClickException(str(err)) from None
            raise


def _explained(err: Exception) -> str:
    """The error, and on a cluster's worker whose write the store refused, why."""
    found = click.get_current_context().find_object(Env)
    cluster = found.cluster if found is not None else None
    if cluster is not None and cluster.role == "worker" and "is not allowed to" in str(err):
        return f"this node is not a manager: run it on a manager ({err})"
    return str(err)


def store_access(
    cacert: str | None,
    cert: str | None,
    key: str | None,
    user: str | None,
    password_file: str | None,
) -> EtcdAccess | None:
    """The TLS and login options of an https:// store; None when none is given."""
    if not any((cacert, cert, key, user, password_file)):
        return None
    return EtcdAccess(cacert or "", cert or "", key or "", user or None, password_file or None)


class Env:
    """The state dir and store of this invocation; the store is opened on first use."""

    def __init__(
        self, state_dir: str | None, store_url: str | None, access: EtcdAccess | None = None
    ) -> None:
        self.state_dir = resolve_state_dir(state_dir)
        self.explicit_store = store_url is not None
        self.store_url = store_url or default_store_url(self.state_dir)
        self.access = access
        self._store: Store | None = None

    @property
    def cluster(self) -> ClusterConfig | None:
        """The cluster this node joined (`cluster init` or `join`), unless --store names
        another store."""
        return None if self.explicit_store else cluster_config.load(self.state_dir)

    @property
    def store(self) -> Store:
        if self._store is None:
            if self.cluster is not None:  # its store, with this node's certificate and login
                from meshctl.commands.cluster import open_cluster_store

                self._store = open_cluster_store(self.state_dir)
            else:
                self._store = open_store(self.store_url, self.access)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


def env() -> Env:
    found = click.get_current_context().find_object(Env)
    assert found is not None, "commands run inside main"
    return found


def store() -> Store:
    return env().store


class Int(click.ParamType):
    """A whole number in ASCII digits, optionally within [minimum, maximum]: click's int also
    takes ' 3', '+3', '1_000' and other scripts' digits."""

    name = "integer"

    def __init__(self, minimum: int | None = None, maximum: int | None = None) -> None:
        self.minimum = minimum
        self.maximum = maximum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            number: int | None = value
        else:
            number = ascii_int(value)
        if number is None:
            self.fail(f"{value!r} is not a whole number in digits 0-9 (at most 18)", param, ctx)
        if self.minimum is not None and number < self.minimum:
            self.fail(f"{number} is below {self.minimum}", param, ctx)
        if self.maximum is not None and number > self.maximum:
            self.fail(f"{number} is above {self.maximum}", param, ctx)
        return number


def pairs(values: Iterable[str], option: str) -> dict[str, str]:
    """Read repeated KEY=VALUE options into a dict."""
    result = {}
    for value in values:
        key, eq, val = value.partition("=")
        if not eq or not key:
            raise ValidationError(f"invalid {option} {value!r}: write KEY=VALUE")
        result[key] = val
    return result


def task_ref(text: str) -> str:
    """A service name, a task name (web.1) or a task id, checked before it reaches the store."""
    service, dot, slot = text.rpartition(".")
    slot_number = ascii_int(slot) if dot else None
    if dot and slot_number is not None and slot_number > 0:
        check_name(service, "service name")
        return text
    return check_name(text, "service or task name")


def names(
    *kinds: str, suffix: str = ""
) -> Callable[[click.Context, click.Parameter, str], list[CompletionItem]]:
    """Shell completion of the names of the store's records of these kinds (a task's is its
    `web.1`). The store is the command line's (--state-dir, --store, their variables); one
    that does not exist yet, or cannot be read, completes nothing."""

    def complete(
        ctx: click.Context, param: click.Parameter, incomplete: str
    ) -> list[CompletionItem]:
        root = ctx.find_root().params
        state_dir = resolve_state_dir(root.get("state_dir"))
        url = root.get("store_url") or default_store_url(state_dir)
        if url.startswith("sqlite://") and not os.path.exists("/" + url[9:].lstrip("/")):
            return []
        try:
            access = store_access(
                *(root.get(o) for o in ("cacert", "cert", "key", "user", "password_file"))
            )
            with open_store(url, access) as opened:
                found = {
                    str(r.value.get("name", r.name)) if kind == TASK else r.name
                    for kind in kinds
                    for r in opened.list(kind)
                }
        except Exception:  # completion must never print a traceback into the shell
            return []
        return [CompletionItem(n + suffix) for n in sorted(found) if n.startswith(incomplete)]

    return complete


def _check_format(ctx: click.Context, param: click.Parameter, value: str) -> str:
    return formats.check(value)


def format_option(fn: F) -> F:
    return click.option(
        "--format",
        "fmt",
        default="table",
        show_default=True,
        callback=_check_format,
        help="table, json (stable: docs/cli-json.md) or a template applied to each item's "
        "JSON, as docker's: '{{.Name}} {{.Id}}', '{{json .}}'.",
    )(fn)


def timeout_option(fn: F) -> F:
    return click.option(
        "--timeout",
        default="60s",
        show_default=True,
        metavar="D",
        help="Without --detach: how long to wait for the tasks before failing with why.",
    )(fn)


def show(fmt: Format, docs: Any, table: Callable[[], str]) -> None:
    """Print docs (a JSON document or a list of them) as --format says."""
    if fmt == "json":
        click.echo(output.dumps(docs))
    elif fmt == "table":
        click.echo(table())
    else:
        template = formats.parse(fmt)
        for doc in docs if isinstance(docs, list) else [docs]:
            click.echo(formats.render(template, doc))
