"""``kaapcli modify``: edit DICOM headers (DCMTK dcmodify's vocabulary) into a new tree or in place."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kaapcli.cli.common import Inputs, RunOptions, batch_command, batch_inputs, execute

TAGS = "TAG: keyword (PatientName), (gggg,eeee), gggg,eeee, gggg|eeee, or a path like Seq[0].Tag ([*] = all items)."


@batch_command
def modify(
    inputs: Inputs,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Output directory: the input tree is mirrored there.", show_default=False)] = None,
    in_place: Annotated[bool, typer.Option(
        "--in-place", help="Overwrite the input files (atomically, one by one) instead of writing -o.")] = False,
    insert: Annotated[list[str] | None, typer.Option(
        "--insert", "-i", metavar="TAG=VALUE",
        help="Set TAG, creating it (and sequences/items on its path) when missing. Repeatable.")] = None,
    modify_: Annotated[list[str] | None, typer.Option(
        "--modify", "-m", metavar="TAG=VALUE",
        help="Set TAG only where it exists (absent: a warning). Repeatable.")] = None,
    erase: Annotated[list[str] | None, typer.Option(
        "--erase", "-e", metavar="TAG", help="Erase TAG (or a sequence item: Seq[1]). Repeatable.")] = None,
    erase_all: Annotated[list[str] | None, typer.Option(
        "--erase-all", metavar="TAG", help="Erase TAG everywhere, inside sequences too. Repeatable.")] = None,
    erase_private: Annotated[bool, typer.Option(
        "--erase-private", help="Erase all private elements (odd groups), inside sequences too.")] = False,
    condition: Annotated[list[str] | None, typer.Option(
        "--if", metavar="COND",
        help="Only files where TAG=PATTERN, TAG!=PATTERN (* ? wildcards), TAG (present) or !TAG (absent) "
             "holds; repeatable, all must hold. Other files are skipped, not copied.")] = None,
    new_uids: Annotated[list[str] | None, typer.Option(
        "--new-uids", metavar="LEVEL",
        help="New UIDs for study|series|instance (repeatable), the same for every file of one "
             "study/series; references to them follow.")] = None,
    uid_seed: Annotated[str, typer.Option(
        "--uid-seed", help="Key for --new-uids: another seed gives other (still deterministic) UIDs.")] = "",
    kaapana_tags: Annotated[list[str] | None, typer.Option(
        "--kaapana-tags", metavar="STRING",
        help="Kaapana's \"(gggg,eeee)=value;(gggg,eeee)=value\": each set or inserted, like -i.")] = None,
    *,
    run: RunOptions,
) -> None:
    """Edit DICOM headers without decoding pixel data; the transfer syntax is kept.

    TAG is a keyword (PatientName), a tag ((0010,0010), 0010,0010, 0010|0010) or a sequence path
    (ReferencedSeriesSequence[0].SeriesInstanceUID; [*] = every item). Values of multi-valued
    elements are separated by a backslash. A tag the dictionary does not know (private) is
    inserted as TAG=VR:value, e.g. -i "(0009,1001)=LO:x". Edits apply in this order: --new-uids,
    --erase-private, --erase-all, -e, -m, -i.
    """
    from kaapcli.core.modify import ModifyOperator, parse_edits
    from kaapcli.exitcodes import UsageError

    if in_place == (out is not None):
        raise UsageError("give either -o DIR or --in-place" if not in_place else "-o cannot be used with --in-place")
    edits = parse_edits(inserts=insert or (), modifies=modify_ or (), erase=erase or (), erase_all=erase_all or (),
                        erase_private=erase_private, conditions=condition or (), new_uids=new_uids or (),
                        uid_seed=uid_seed, kaapana_tags=kaapana_tags or ())
    if edits.is_empty():
        raise UsageError("nothing to do", hint="give at least one of -i, -m, -e, --erase-all, --erase-private, "
                                               "--new-uids, --kaapana-tags")
    op = ModifyOperator(edits, in_place=in_place)
    summary = execute(op, batch_inputs(inputs, out), out, run, "modify", sources=inputs)
    raise typer.Exit(int(summary.exit_code))


def register(app: typer.Typer) -> None:
    app.command()(modify)
