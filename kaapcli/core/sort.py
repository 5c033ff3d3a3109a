"""Sort DICOM files into a tree named from their tags, copying bytes exactly or hard-linking.

Only the header fields the template names are read (no pixel data), so sorting runs at
file-copy speed.  An output name is never overwritten with different content: two
inputs that map to one name make the second a failed item; identical content is fine
(that is also what makes a re-run or ``--force`` safe).
"""

from __future__ import annotations

import errno
import filecmp
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from kaapcli.core import dicom, fsio
from kaapcli.core.batch import BaseOperator, Context, Item, Outcome
from kaapcli.exitcodes import CantCreateError, DataError, UsageError

DEFAULT_TEMPLATE = ("{PatientID}/{StudyDate}_{StudyInstanceUID}/{Modality}_{SeriesNumber}_{SeriesInstanceUID}/"
                    "{SOPInstanceUID}.dcm")


def check_template(template: str) -> list[str]:
    """The keywords a template names; UsageError when it is not a relative path of ``{Keyword}`` fields."""
    from pydicom.datadict import tag_for_keyword

    try:
        fields = dicom.template_fields(template)
        sample = fsio.render_template(template, {name: "x" for name in fields})
    except (ValueError, IndexError, KeyError) as exc:
        raise UsageError(f"--layout {template!r}: {exc}", hint="fields look like {PatientID}") from None
    unknown = [name for name in fields if tag_for_keyword(name) is None]
    if unknown:
        raise UsageError(f"--layout {template!r}: {', '.join(unknown)} is not a DICOM keyword")
    if not fields or any(part in (".", "..") for part in sample.parts) or not sample.parts:
        raise UsageError(f"--layout {template!r}: needs at least one {{Keyword}} field and no . or .. parts")
    return fields


def same_content(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b) or filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


class SortOperator(BaseOperator):
    """Places one file per item at ``OUT/<template rendered from its header>``."""

    name = "sort"
    supports_dry_run = True

    def __init__(self, template: str = DEFAULT_TEMPLATE, link: bool = False):
        self.template = template
        self.link = link
        self.fields = check_template(template)

    def options(self) -> dict[str, Any]:
        return {"template": self.template, "link": self.link}

    def destination(self, src: Path, out: Path) -> Path:
        ds = dicom.read(src, stop_before_pixels=True, specific_tags=self.fields)
        return out / fsio.render_template(self.template, dicom.template_values(ds, self.template))

    def process(self, item: Item, ctx: Context) -> Outcome:
        assert ctx.out is not None
        src = item.paths[0]
        with dicom.collect_warnings() as warnings:
            dest = self.destination(src, ctx.out)
        if ctx.dry_run:
            return Outcome(skipped=True, message=f"would {'link' if self.link else 'copy'} to {dest}")
        if self.link:
            try:
                place_new(src, dest, hard_link=True)
                return Outcome(outputs=[dest])
            except OSError as exc:
                if exc.errno not in NO_LINKS:
                    raise CantCreateError(f"{dest}: cannot link: {exc.strerror}") from None
                warnings.append(f"cannot hard-link to {dest} ({exc.strerror}): copied instead")
        try:
            place_new(src, dest, hard_link=False)
        except OSError as exc:
            raise CantCreateError(f"{dest}: cannot write: {exc.strerror}") from None
        return Outcome(outputs=[dest], warnings=warnings)


NO_LINKS = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP)  # other device, or no hard links here


def place_new(src: Path, dest: Path, hard_link: bool) -> None:
    """Make ``dest`` a hard link to, or an exact copy of, ``src``: atomically, never over different content.

    ``os.link`` fails when the name exists, so two workers racing for one name cannot both win; an
    existing ``dest`` with the same bytes is accepted (re-runs, duplicate inputs).
    """
    fsio.ensure_dir(dest.parent)
    if hard_link:
        try:
            os.link(src, dest)
        except FileExistsError:
            _require_same(src, dest)
        return
    tmp = dest.parent / f".{dest.name}.{secrets.token_hex(4)}{fsio.TMP_SUFFIX}"
    try:
        shutil.copyfile(src, tmp)
        try:
            os.link(tmp, dest)
        except FileExistsError:
            _require_same(src, dest)
        except OSError as exc:
            if exc.errno not in NO_LINKS:
                raise
            if dest.exists():  # a file system without hard links: rename only onto a free name
                _require_same(src, dest)
            else:
                os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _require_same(src: Path, dest: Path) -> None:
    if not same_content(src, dest):
        raise DataError(f"{dest} already exists with different content (another input maps to the same name)",
                        hint="add a unique field such as {SOPInstanceUID} to --layout")
