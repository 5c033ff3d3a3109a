"""``kaapcli anonymize``: PS3.15 Annex E de-identification with keyed, reproducible pseudonyms."""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from kaapcli.cli.common import Inputs, OutDir, RunOptions, batch_command, fail, run_batch


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
    out: OutDir,
    key: Annotated[str | None, typer.Option(
        "--key", help="Secret key for pseudonyms, UIDs and date shifts (or KAAPCLI_ANON_KEY).",
        show_default=False)] = None,
    key_file: Annotated[Path | None, typer.Option(
        "--key-file", help="Read the secret key from this file.", show_default=False)] = None,
    profile: Annotated[ProfileChoice, typer.Option(
        help="basic: PS3.15 Basic Profile + options; kaapana: Kaapana's 45-tag dcmodify erase, nothing else.",
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
    keep: Annotated[list[str] | None, typer.Option(
        "--keep", metavar="TAG", help="Keep this attribute unchanged (keyword or (gggg,eeee); repeatable).",
        show_default=False, rich_help_panel=PROFILE)] = None,
    replace: Annotated[list[str] | None, typer.Option(
        "--replace", metavar="TAG=VALUE", help="Set this attribute to VALUE (repeatable).",
        show_default=False, rich_help_panel=PROFILE)] = None,
    id_prefix: Annotated[str, typer.Option(
        help="Prefix of the PatientID/PatientName pseudonym.")] = "ANON-",
    burned_in: Annotated[BurnedInChoice, typer.Option(
        help="Pixels that may carry burned-in text: warn, fail the file, or ignore.")] = BurnedInChoice.warn,
    map_file: Annotated[Path | None, typer.Option(
        "--map", help="Record original -> pseudonym (patient, accession, study) in this SQLite file, for "
        "authorized re-identification.", show_default=False)] = None,
    name: Annotated[str, typer.Option(
        "--name", help="Output name template of {DICOM keywords} of the de-identified file.")]
    = "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm",
    *,
    run: RunOptions,
) -> None:
    """De-identify DICOM files (PS3.15 Annex E Basic Profile): keyed pseudonyms and UIDs, markers set.

    The same key gives the same output on any machine and run; keep it secret. Pixel data passes through
    byte for byte. Files go to OUT/<new StudyInstanceUID>/<new SeriesInstanceUID>/<new SOPInstanceUID>.dcm.
    """
    from kaapcli.core import dicom
    from kaapcli.core.anonymize import AnonymizeOperator, Options, parse_replace

    dicom.import_pydicom(pixels=False)  # pixel data passes through as bytes: this process never needs numpy
    secret = _read_key(key, key_file)
    if len(id_prefix) > 40:
        fail("--id-prefix is too long (PatientID holds 64 characters)")
    options = Options(
        profile=profile.value, dates=retain_dates.value if retain_dates else "profile",
        retain_uids=retain_uids, retain_device=retain_device, retain_institution=retain_institution,
        retain_patient_characteristics=retain_patient_characteristics, retain_safe_private=retain_safe_private,
        clean_descriptors=clean_descriptors, keep=tuple(dicom.parse_tag(t) for t in keep or ()),
        replace=tuple(parse_replace(r) for r in replace or ()), id_prefix=id_prefix,
        burned_in=burned_in.value, name=name)
    run_batch(AnonymizeOperator(secret, options, map_file), inputs, out, run)


def register(app: typer.Typer) -> None:
    app.command()(anonymize)
