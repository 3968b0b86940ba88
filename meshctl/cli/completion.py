"""`meshctl completion SHELL`: the script that completes commands, options and the store's
names (meshctl.cli.common.names)."""

from __future__ import annotations

import click
from click.shell_completion import get_completion_class

from meshctl.cli.root import main


@main.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the script that completes meshctl's commands, options and the store's names
    (services, networks, tasks, nodes) in SHELL.

    \b
    Examples:
      source <(meshctl completion bash)                       # this shell
      meshctl completion bash > /etc/bash_completion.d/meshctl
      meshctl completion zsh > "${fpath[1]}/_meshctl"
      meshctl completion fish > ~/.config/fish/completions/meshctl.fish
    """
    cls = get_completion_class(shell)
    assert cls is not None, shell
    prog = "meshctl"
    click.echo(cls(main, {}, prog, "_MESHCTL_COMPLETE").source())
