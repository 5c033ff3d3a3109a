"""``kaapcli merge-masks``: combine mask files into one label map, or fuse chosen labels into one."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from kaapcli.cli.common import OutDir, RunOptions, batch_command, execute


class Mode(str, Enum):
    combine = "combine"
    fuse = "fuse"


class GroupBy(str, Enum):
    stem = "stem"
    folder = "folder"
    all = "all"


@batch_command
def merge_masks(
    inputs: Annotated[list[str], typer.Argument(
        help="Mask files (NIfTI/NRRD/MetaImage), directories (recursed) or - for paths on stdin.",
        show_default=False)],
    out: OutDir,
    mode: Annotated[Mode, typer.Option(help="combine: all labels into one label map; fuse: also merge the "
                                            "--labels into one label named --into.")] = Mode.combine,
    labels: Annotated[str | None, typer.Option(
        "--labels", metavar="A,B", help="fuse: the labels (names or label_int values) to merge.",
        show_default=False)] = None,
    into: Annotated[str | None, typer.Option(
        "--into", metavar="NAME", help="fuse: the name of the merged label.", show_default=False)] = None,
    group_by: Annotated[GroupBy, typer.Option(
        help="Which masks form one output: same case stem (<stem>--<int>--<name>), same folder, or all.")]
        = GroupBy.stem,
    *,
    run: RunOptions,
) -> None:
    """Merge masks into one label map per case: OUT/<case>/<case>.nii.gz plus OUT/<case>/seg_info.json.

    Labels are painted in order of label_int, then name; a mask overlapping voxels already painted
    with another label is skipped whole, with a warning naming both labels and the voxel count.
    Masks of one case must share one grid (else the case fails: use kaapcli resample first).
    """
    from kaapcli.core import fsio
    from kaapcli.core.masks import MergeMasksOperator, group_masks

    fuse = tuple(x.strip() for x in (labels or "").split(",") if x.strip())
    op = MergeMasksOperator(mode=mode.value, fuse=fuse, into=(into or "").strip())
    items = group_masks(fsio.collect_inputs(inputs), group_by.value)
    summary = execute(op, [], out, run, "merge-masks", items=items)
    raise typer.Exit(int(summary.exit_code))


def register(app: typer.Typer) -> None:
    app.command("merge-masks")(merge_masks)
