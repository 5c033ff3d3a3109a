"""Units of send's payload (structure check, transcoding) and of the request shapes peers expect (issue #16)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from kaapcli.core.net import dimse, payload
from kaapcli.core.net.query import Query
from kaapcli.exitcodes import KaapcliError


def _scan(path: Path) -> dimse.Instance:
    return dimse.scan(path, check=False)


def test_structure_walk_accepts_every_whole_test_file() -> None:
    for name in ("CT_small.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "rtplan.dcm",
                 "MR_small_implicit.dcm", "priv_SQ.dcm", "UN_sequence.dcm", "waveform_ecg.dcm"):
        path = Path(get_testdata_file(name))
        inst = _scan(path)
        payload.check_structure(path, inst.offset, inst.syntax)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_RLE.dcm", "rtplan.dcm", "MR_small_bigendian.dcm"])
def test_structure_walk_refuses_a_file_cut_anywhere(name: str, tmp_path: Path) -> None:
    """Cut after the file meta at 23 places: each cut is found, unless it falls between two top-level elements
    (then what is left is a whole, shorter dataset: no structure check can tell)."""
    source = Path(get_testdata_file(name))
    data, inst = source.read_bytes(), _scan(source)
    raw = pydicom.dcmread(source, defer_size=0)
    boundaries = {e.value_tell + e.length for e in raw._dict.values()
                  if hasattr(e, "value_tell") and e.length != 0xFFFFFFFF}
    refused = 0
    for cut in range(inst.offset + 1, len(data), max(1, (len(data) - inst.offset) // 23)):
        path = tmp_path / f"cut{cut}.dcm"
        path.write_bytes(data[:cut])
        try:
            payload.check_structure(path, inst.offset, inst.syntax)
        except payload.BadStructure:
            refused += 1
        else:
            assert cut in boundaries, (name, cut)
    assert refused >= 20


def test_scan_refuses_a_truncated_file_with_the_element_and_the_sizes(tmp_path: Path) -> None:
    path = tmp_path / "cut.dcm"
    path.write_bytes(Path(get_testdata_file("MR_small.dcm")).read_bytes()[:-300])  # into the pixels
    with pytest.raises(KaapcliError, match=r"not sent: element \(7FE0,0010\) needs 8192 bytes at byte \d+, but "
                                           r"the file ends after 8030"):
        dimse.scan(path)


def test_structure_walk_refuses_implicit_vr_in_an_explicit_syntax() -> None:
    path = Path(get_testdata_file("SC_rgb_jpeg.dcm"))  # encoded implicit VR although its syntax is explicit
    with pytest.raises(payload.BadStructure, match="has no VR"):
        payload.check_structure(path, _scan(path).offset, _scan(path).syntax)


def test_structure_walk_is_bounded_in_depth(tmp_path: Path) -> None:
    item = b""
    for _ in range(100):  # sequences nested 100 deep, all of undefined length
        item = (struct.pack("<HH2sHI", 0x0040, 0x0100, b"SQ", 0, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000,
                0xFFFFFFFF) + item + struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    path = tmp_path / "deep.dcm"
    path.write_bytes(item)
    with pytest.raises(payload.BadStructure, match="nested"):
        payload.check_structure(path, 0, dimse.EXPLICIT_LE)


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "SC_rgb_small_odd_big_endian.dcm", "rtdose_expb_1frame.dcm",
                                  "MR_small_RLE.dcm", "SC_rgb_rle_32bit.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_transcode_keeps_the_decoded_pixels(name: str) -> None:
    path = Path(get_testdata_file(name))
    inst = _scan(path)
    for target in (dimse.IMPLICIT_LE, dimse.EXPLICIT_LE):
        encoded, note = payload.transcode(path, inst.syntax, target)
        assert note.startswith("sent as")
        again = payload._reread(encoded, pydicom.dcmread(path), target)
        assert np.array_equal(again.pixel_array, pydicom.dcmread(path).pixel_array)
        assert again.SOPInstanceUID == pydicom.dcmread(path).SOPInstanceUID  # kept, never a new one


def test_transcode_refuses_lossy_unless_asked_and_never_compresses() -> None:
    path = Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    with pytest.raises(KaapcliError, match="decompressing lossy data is off"):
        payload.transcode(path, _scan(path).syntax, dimse.IMPLICIT_LE)
    encoded, _ = payload.transcode(path, _scan(path).syntax, dimse.EXPLICIT_LE, "lossy")
    assert payload._reread(encoded, pydicom.dcmread(path), dimse.EXPLICIT_LE).LossyImageCompression == "01"
    plain = Path(get_testdata_file("CT_small.dcm"))
    with pytest.raises(KaapcliError, match="does not compress"):
        payload.transcode(plain, dimse.EXPLICIT_LE, "1.2.840.10008.1.2.4.90")


def test_transcode_refuses_what_it_cannot_verify(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small_bigendian.dcm"))
    ds.PixelData = ds.PixelData[:-2]  # one pixel short: cannot be decoded, so cannot be proven unchanged
    ds.save_as(tmp_path / "short.dcm")
    with pytest.raises(KaapcliError, match="cannot decode the pixel data of the original"):
        payload.transcode(tmp_path / "short.dcm", dimse.EXPLICIT_BE, dimse.IMPLICIT_LE)


def test_contexts_offer_decodable_compressed_files_an_uncompressed_fallback() -> None:
    ct, rle, jpeg = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50"
    rle_file = dimse.Instance(Path("/x/a"), ct, "1.1", rle, 10, True)
    jpeg_file = dimse.Instance(Path("/x/b"), "1.2.3", "1.2", jpeg, 10, True)
    pairs = dimse.contexts_for([rle_file, jpeg_file])
    assert pairs == [(ct, rle), (ct, dimse.EXPLICIT_LE), (ct, dimse.IMPLICIT_LE), ("1.2.3", jpeg)]
    assert dimse.contexts_for([rle_file], "never") == [(ct, rle)]
    assert len(dimse.contexts_for([jpeg_file], "lossy")) == 3


def test_cget_contexts_one_per_syntax_stored_first_within_128() -> None:
    j2k = "1.2.840.10008.1.2.4.90"
    located = dimse.Located(Query("series", {}), ["1.2.840.10008.5.1.4.1.1.4"],
                            {"1.2.840.10008.5.1.4.1.1.4": [j2k]})
    pairs = dimse.get_contexts(located)
    assert pairs[0] == ("1.2.840.10008.5.1.4.1.1.4", j2k) and len(pairs) == len(dimse.GET_SYNTAXES)
    assert len(set(pairs)) == len(pairs)
    many = dimse.Located(Query("study", {}), [f"1.2.3.{i}" for i in range(100)])
    pairs = dimse.get_contexts(many)
    assert len(pairs) <= 127 and {ts for _, ts in pairs} == {dimse.EXPLICIT_LE, dimse.IMPLICIT_LE}
    assert len(dimse.get_contexts(dimse.Located(Query("study", {})))) <= 127  # the fixed list of common classes


def test_qido_query_keeps_wildcards_literal_and_encodes_the_rest() -> None:
    q = Query("study", {"PatientID": "LUNG1-*", "PatientName": "Doe^J?hn", "StudyDescription": "a&b=c d"})
    text = q.qido_query()
    assert "PatientID=LUNG1-*" in text and "PatientName=Doe%5EJ?hn" in text
    assert "StudyDescription=a%26b%3Dc%20d" in text


def test_worklist_identifier_puts_step_keys_in_the_sequence() -> None:
    ds = Query.parse("worklist", ["Modality=CT", "ScheduledStationAETitle=CT1", "PatientID=P1"], []).identifier()
    assert "QueryRetrieveLevel" not in ds and ds.PatientID == "P1"
    [step] = ds.ScheduledProcedureStepSequence
    assert step.Modality == "CT" and step.ScheduledStationAETitle == "CT1" and "ScheduledProcedureStepStartDate" in step
    assert "Modality" not in ds


def test_retrieve_outcome_zero_of_n_is_not_ok() -> None:
    outcome = dimse.RetrieveOutcome("x", status="0x0000 Success", expected=4)
    assert not outcome.ok and outcome.shortfall() == "0 of 4 instances received"
    elsewhere = dimse.RetrieveOutcome("x", completed=4, expected=4, elsewhere=True)
    assert elsewhere.ok and dimse.RetrieveOutcome("x", completed=3, expected=4, elsewhere=True).ok is False


def test_transcode_refuses_pixel_data_that_would_decode_too_large(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 1000  # 8 TB decoded, claimed by a header: refused before any decoder allocates it
    ds.save_as(tmp_path / "huge.dcm")
    with pytest.raises(KaapcliError, match="would decode to"):
        payload.transcode(tmp_path / "huge.dcm", "1.2.840.10008.1.2.5", dimse.IMPLICIT_LE)
