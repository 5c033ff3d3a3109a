"""Options of the index commands that ``kaapcli retrieve`` takes too (``--dataset``): a module of their own, so a
``retrieve`` run does not import the index commands (start-up time)."""

from __future__ import annotations

from typing import Annotated

import typer

PANEL = "Index"
IndexOpt = Annotated[str | None, typer.Option(
    "--index", envvar="KAAPCLI_INDEX", show_default=False, rich_help_panel=PANEL,
    help="A path (embedded SQLite index; default $XDG_DATA_HOME/kaapcli/index.db), an http(s):// OpenSearch "
         "URL, or the NAME of an [index.NAME] config profile.")]
ProjectOpt = Annotated[str | None, typer.Option(
    "--project", envvar="KAAPCLI_PROJECT", show_default=False, rich_help_panel=PANEL,
    help="Project (OpenSearch index project_NAME; default admin).")]
DatasetOpt = Annotated[str | None, typer.Option(
    "--dataset", show_default=False, rich_help_panel=PANEL,
    help="Retrieve the series of this dataset of the index (from where each came from, or PEER).")]
IncludeTagOpt = Annotated[list[str] | None, typer.Option(
    "--include-tag", show_default=False, rich_help_panel=PANEL,
    help="--dataset: only series with this tag (repeatable: all of them).")]
ExcludeTagOpt = Annotated[list[str] | None, typer.Option(
    "--exclude-tag", show_default=False, rich_help_panel=PANEL,
    help="--dataset: no series with this tag (repeatable).")]
