"""``kaapcli config show``: the effective configuration, secrets masked."""

from __future__ import annotations

import json

import typer

config_app = typer.Typer(help="Show the configuration (config file, profiles, KAAPCLI_* variables).",
                         no_args_is_help=True)


@config_app.command("show")
def show(ctx: typer.Context) -> None:
    """Print the effective configuration as JSON; passwords, keys and tokens are masked."""
    cfg = ctx.find_root().obj
    typer.echo(json.dumps(cfg.masked(), indent=2, default=str))


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
