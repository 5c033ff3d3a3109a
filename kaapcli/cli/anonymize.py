"""``kaapcli anonymize``: PS3.15 Annex E de-identification with keyed, reproducible pseudonyms."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from kaapcli.cli.common import Inputs, RunOptions, batch_command, fail, run_batch


class ProfileChoice(str, Enum):
    basic = "basic"
    kaapana = "kaapana"


class DatesChoice(str, Enum):
    full = "full"
    shift = "shift"


class BurnedInChoice(str, Enum):
    warn = "warn"
    fail = "fail"
    ignore = "ignore"


class PseudonymChoice(str, Enum):
    hex = "hex"
    realistic = "realistic"


class ModeChoice(str, Enum):
    bulk = "bulk"
    single_slice = "single-slice"


PROFILE = "Profile options (PS3.15 Table E.1-1)"


def _read_key(key: str | None, key_file: Path | None) -> bytes:
    """--key, else --key-file, else KAAPCLI_ANON_KEY; never echoed anywhere."""
    if key and key_file:
        fail("give either --key or --key-file, not both")
    if key_file is not None:
        try:
            data = key_file.read_bytes().strip()
        except OSError as exc:
            fail(f"--key-file {key_file}: {exc.strerror}", hint="the file holds the secret key on one line")
        if not data:
            fail(f"--key-file {key_file} is empty")
        return data
    key = key or os.environ.get("KAAPCLI_ANON_KEY", "")
    if not key:
        fail("a secret key is required: pseudonyms and UIDs are derived from it",
             hint="pass --key SECRET, --key-file FILE or set KAAPCLI_ANON_KEY; keep the same key to keep "
                  "patients linked across runs")
    return key.encode()


@batch_command
def anonymize(
    inputs: Inputs,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Output directory (or --in-place).", show_default=False)] = None,
    in_place: Annotated[bool, typer.Option(
        "--in-place", help="Overwrite each input file with its de-identified version (atomically, one by one; "
        "file names are kept). Without it, anonymize never writes over an input.")] = False,
    key: Annotated[str | None, typer.Option(
        "--key", help="Secret key for pseudonyms, UIDs and date shifts (or KAAPCLI_ANON_KEY).",
        show_default=False)] = None,
    key_file: Annotated[Path | None, typer.Option(
        "--key-file", help="Read the secret key from this file.", show_default=False)] = None,
    profile: Annotated[ProfileChoice, typer.Option(
        help="basic: PS3.15 Basic Profile + options; kaapana: Kaapana's 45 tags only (UIDs among them keyed, "
        "Type 2 ones emptied, the rest erased; the Basic Profile options do not apply).",
        rich_help_panel=PROFILE)] = ProfileChoice.basic,
    retain_dates: Annotated[DatesChoice | None, typer.Option(
        "--retain-dates", help="full: keep dates; shift: move them back by one keyed offset per patient "
        "(default: the profile's action).", show_default=False, rich_help_panel=PROFILE)] = None,
    retain_uids: Annotated[bool, typer.Option(
        "--retain-uids", help="Keep original UIDs.", rich_help_panel=PROFILE)] = False,
    retain_device: Annotated[bool, typer.Option(
        "--retain-device", help="Keep device identity (station, serial numbers).", rich_help_panel=PROFILE)] = False,
    retain_institution: Annotated[bool, typer.Option(
        "--retain-institution", help="Keep institution identity.", rich_help_panel=PROFILE)] = False,
    retain_patient_characteristics: Annotated[bool, typer.Option(
        "--retain-patient-characteristics", help="Keep sex, age, size, weight, ...",
        rich_help_panel=PROFILE)] = False,
    retain_safe_private: Annotated[bool, typer.Option(
        "--retain-safe-private", help="Keep the private elements of kaapcli's safe list (all others removed).",
        rich_help_panel=PROFILE)] = False,
    clean_descriptors: Annotated[bool, typer.Option(
        "--clean-descriptors", help="Keep descriptions unless they hold the file's identifying strings.",
        rich_help_panel=PROFILE)] = False,
    clean_structured_content: Annotated[bool, typer.Option(
        "--clean-structured-content", help="Keep SR and waveform free text unless it holds identifying strings "
        "or patterns (default: a dummy).", rich_help_panel=PROFILE)] = False,
    keep: Annotated[list[str] | None, typer.Option(
        "--keep", metavar="TAG", help="Keep this attribute unchanged (keyword or (gggg,eeee); repeatable).",
        show_default=False, rich_help_panel=PROFILE)] = None,
    replace: Annotated[list[str] | None, typer.Option(
        "--replace", metavar="TAG=VALUE", help="Set this attribute to VALUE (repeatable).",
        show_default=False, rich_help_panel=PROFILE)] = None,
    id_prefix: Annotated[str, typer.Option(
        help="Prefix of the PatientID/PatientName pseudonym.")] = "ANON-",
    pseudonyms: Annotated[PseudonymChoice, typer.Option(
        help="hex: PatientName = PatientID = <prefix><hex>; realistic: a keyed fake name of the recorded sex and "
        "a birth date moved like the patient's other dates (as DIANA's GUIDMint).")] = PseudonymChoice.hex,
    mode: Annotated[ModeChoice, typer.Option(
        help="bulk: every file; single-slice: only the first file (in path order) of each series, for quick "
        "checks (Kaapana's anonymizer modes).")] = ModeChoice.bulk,
    burned_in: Annotated[BurnedInChoice, typer.Option(
        help="Pixels that may carry burned-in text: warn, fail the file, or ignore.")] = BurnedInChoice.warn,
    map_file: Annotated[Path | None, typer.Option(
        "--map", help="Record original -> pseudonym (patient, accession, study) in this SQLite file (mode 0600, "
        "outside OUT and the inputs), for authorized re-identification.", show_default=False)] = None,
    name: Annotated[str, typer.Option(
        "--layout", help="Output name template of {DICOM keywords} of the de-identified file.")]
    = "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm",
    *,
    run: RunOptions,
) -> None:
    """De-identify DICOM files (PS3.15 2026c Annex E Basic Profile): keyed pseudonyms and UIDs, markers set.

    The same key gives the same output on any machine and run; keep it secret. Pixel data passes through
    byte for byte. Files go to OUT/<new StudyInstanceUID>/<new SeriesInstanceUID>/<new SOPInstanceUID>.dcm,
    or over the inputs with --in-place. Check the result with kaapcli phi-scan OUT --originals INPUT.
    """
    from kaapcli.core import dicom
    from kaapcli.core.anonymize import DEFAULT_NAME, AnonymizeOperator, Options, check_destinations, parse_replace

    if in_place == (out is not None):
        fail("give either -o DIR or --in-place" if not in_place else "-o cannot be used with --in-place",
             hint="--in-place overwrites the inputs; -o writes a new tree and never touches them")
    if in_place and name != DEFAULT_NAME:
        fail("--layout cannot be used with --in-place (the files keep their names)")
    dicom.import_pydicom(pixels=False)  # pixel data passes through as bytes: this process never needs numpy
    secret = _read_key(key, key_file)
    if len(id_prefix) > 40:
        fail("--id-prefix is too long (PatientID holds 64 characters)")
    options = Options(
        profile=profile.value, dates=retain_dates.value if retain_dates else "profile",
        retain_uids=retain_uids, retain_device=retain_device, retain_institution=retain_institution,
        retain_patient_characteristics=retain_patient_characteristics, retain_safe_private=retain_safe_private,
        clean_descriptors=clean_descriptors, clean_structured_content=clean_structured_content,
        keep=tuple(dicom.parse_tag(t) for t in keep or ()), replace=tuple(parse_replace(r) for r in replace or ()),
        id_prefix=id_prefix, pseudonyms=pseudonyms.value, burned_in=burned_in.value, name=name)
    check_destinations(out, map_file, [Path(a) for a in inputs if a != "-"])
    op = AnonymizeOperator(secret, options, map_file, in_place=in_place, single_slice=mode is ModeChoice.single_slice)
    run_batch(op, inputs, out, run, "anonymize")


def register(app: typer.Typer) -> None:
    app.command()(anonymize)
