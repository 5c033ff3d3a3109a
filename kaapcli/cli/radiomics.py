"""``kaapcli radiomics``: IBSI shape and first-order features per label, as JSON and CSV."""

from __future__ import annotations

from typing import Annotated

import typer

from kaapcli.cli.common import OutDir, RunOptions, batch_command, execute


@batch_command
def radiomics(
    image: Annotated[str, typer.Argument(
        help="The image: NIfTI/NRRD/MetaImage file, or a DICOM file/directory of one series.", show_default=False)],
    out: OutDir,
    more_masks: Annotated[list[str] | None, typer.Argument(
        metavar="[MASK]...", help="More mask files or directories: --masks a b c names three.",
        show_default=False)] = None,
    masks: Annotated[list[str] | None, typer.Option(
        "--masks", help="Mask files or directories (repeatable, and the arguments after it are masks too); "
                              "label maps or <stem>--<int>--<name> masks.", show_default=False)] = None,

    bin_width: Annotated[float, typer.Option(
        min=1e-9, help="Bin width (image units) of the intensity histogram features.")] = 25.0,
    *,
    run: RunOptions,
) -> None:
    """Shape and first-order features of every label of every mask, with IBSI feature names.

    Writes OUT/<stem>-radiomics.json ({mask: {label: {feature: value}}}) and OUT/<stem>-radiomics.csv
    (one row per mask and label); <stem> is the image file's name, or the SeriesInstanceUID.
    Masks must lie on the image grid (else: kaapcli resample --reference IMAGE first).
    """
    from pathlib import Path

    from kaapcli.core import fsio
    from kaapcli.core.radiomics import RadiomicsOperator
    from kaapcli.core.resample import is_image_file
    from kaapcli.exitcodes import NoInputError, UsageError

    image_path = Path(image)
    if not image_path.exists():
        raise NoInputError(f"{image_path}: no such file or directory")
    image_files = [image_path] if image_path.is_file() else [p for p in fsio.walk_files(image_path)
                                                             if fsio.is_dicom(p)]
    if not image_files:
        raise UsageError(f"{image_path}: no image file or DICOM series")
    given = [*(masks or []), *(more_masks or [])]
    if not given:
        raise UsageError("no masks: give them with --masks MASK...")
    mask_files = list(dict.fromkeys(p for p in fsio.collect_inputs(given) if is_image_file(p)))
    if not mask_files:
        raise UsageError("--masks: no mask files (NIfTI/NRRD/MetaImage) found")
    op = RadiomicsOperator(image=tuple(image_files), masks=tuple(mask_files), bin_width=bin_width)
    summary = execute(op, [], out, run, "radiomics", items=[op.item()])
    raise typer.Exit(int(summary.exit_code))


def register(app: typer.Typer) -> None:
    app.command()(radiomics)
