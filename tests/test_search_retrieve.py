"""From the index back to the PACS, against a real Orthanc: search records and datasets drive `kaapcli retrieve`,
which pulls each series from where the index says it came from — a [pacs.NAME] profile recorded by
`index --source`, or the AE title the receiver wrote into the file meta — or from --from; a source the
configuration does not name is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
from conftest import dicom_files, kaapcli
from peers import MOVE_AET, Orthanc, orthanc  # noqa: F401 - pytest fixture

from kaapcli.core.index.query import SERIES_KEY

pytestmark = pytest.mark.network


@pytest.fixture()
def site(orthanc: Orthanc, tmp_path: Path) -> tuple[Orthanc, Path, dict[str, int]]:  # noqa: F811
    """Orthanc holding 3 series (3 files each), a kaapcli.toml naming it, and an index of those series made
    from the files with --source orthanc, whose local copies are then deleted."""
    orthanc.clear()
    tree = tmp_path / "tree"
    proc = kaapcli("mock", "-o", tree, "--series", "3", "--slices", "3", "--rows", "16", "--columns", "16",
                   "--seed", "11", "-q")
    assert proc.returncode == 0, proc.stderr
    assert kaapcli("send", tree, "--to", orthanc.dimse, "-q").returncode == 0
    (tmp_path / "kaapcli.toml").write_text(
        f'[pacs.orthanc]\naet = "{orthanc.aet}"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n')
    proc = kaapcli("index", tree, "--index", tmp_path / "i.db", "--source", "orthanc", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    counts: dict[str, int] = {}
    for path in dicom_files(tree):
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
        counts[uid] = counts.get(uid, 0) + 1
    shutil.rmtree(tree)
    return orthanc, tmp_path, counts


def received(root: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in dicom_files(root):
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
        counts[uid] = counts.get(uid, 0) + 1
    return counts


def test_search_then_retrieve_from_the_recorded_pacs(site: tuple[Orthanc, Path, dict[str, int]]) -> None:
    _, work, counts = site
    db = work / "i.db"
    gone = kaapcli("search", "*", "--format", "paths", "--index", db)
    assert gone.returncode == 1 and "3 of 3 files gone" in gone.stderr and gone.stdout == ""
    records = kaapcli("search", "Modality:CT", "--index", db).stdout
    proc = kaapcli("retrieve", "--from-query", "-", "-o", work / "got", "--index", db, input=records, cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert received(work / "got") == counts
    assert len(proc.stdout.splitlines()) == sum(counts.values())
    assert "3 requests, 9 files received, 0 requests failed" in proc.stderr


def test_the_sender_ae_in_the_file_meta_names_the_pacs(site: tuple[Orthanc, Path, dict[str, int]]) -> None:
    """C-MOVE into kaapcli's receiver: the files' meta says ORTHANC sent them; indexed without --source, the
    series are retrieved again from the [pacs.*] profile with that AE title."""
    peer, work, counts = site
    first = sorted(counts)[0]
    moved = work / "moved"
    proc = kaapcli("retrieve", "orthanc", "-k", f"SeriesInstanceUID={first}", "-o", moved, "--method", "move",
                   "--aet", MOVE_AET, "--port", str(peer.move_port), "--bind", "127.0.0.1", "-q", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert kaapcli("index", moved, "--index", work / "moved.db", cwd=work).returncode == 0
    records = kaapcli("search", "*", "--index", work / "moved.db").stdout
    assert json.loads(records)["00020016 SourceApplicationEntityTitle_keyword"] == peer.aet
    proc = kaapcli("retrieve", "--from-query", "-", "-o", work / "again", input=records, cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert received(work / "again") == {first: counts[first]}


def test_from_overrides_and_unknown_sources_are_refused(site: tuple[Orthanc, Path, dict[str, int]]) -> None:
    peer, work, counts = site
    uid = sorted(counts)[0]
    bare = json.dumps({SERIES_KEY: uid})  # a record of a series the index has no source for
    proc = kaapcli("retrieve", "--from-query", "-", "-o", work / "none", input=bare + "\n", cwd=work)
    assert proc.returncode == 2 and f"series {uid}: the index does not record where it came from" in proc.stderr
    assert "hint: give PEER (or --from PEER)" in proc.stderr
    proc = kaapcli("retrieve", "--from", peer.dimse, "--from-query", "-", "-o", work / "from", input=bare, cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert received(work / "from") == {uid: counts[uid]}
    # documents are data: a source that no profile names never makes kaapcli connect anywhere
    hostile = [{SERIES_KEY: "1.2.3", "00020026 SourcePresentationAddress_keyword": "http://203.0.113.7/dicom-web"},
               {SERIES_KEY: "1.2.4", "00020016 SourceApplicationEntityTitle_keyword": "EVIL"},
               {SERIES_KEY: "1.2.5", "00000000 SourcePeer_keyword": "elsewhere"}]
    proc = kaapcli("retrieve", "--from-query", "-", "-o", work / "evil", cwd=work,
                   input="".join(json.dumps(r) + "\n" for r in hostile))
    assert proc.returncode == 2, proc.stderr
    assert "series 1.2.3: came from DICOMweb endpoint 'http://203.0.113.7/dicom-web', which no [pacs.NAME] " \
           "profile of the configuration names (and 2 more)" in proc.stderr
    assert not (work / "evil").exists()


def test_dataset_then_retrieve_with_tags_and_a_limit(site: tuple[Orthanc, Path, dict[str, int]]) -> None:
    _, work, counts = site
    db = work / "i.db"
    uids = sorted(counts)
    assert kaapcli("dataset", "add", "cohort", "--query", "*", "--index", db).returncode == 0
    assert kaapcli("tag", "add", "excluded", "--series", uids[0], "--index", db).returncode == 0
    assert kaapcli("tag", "add", "keep", "--series", uids[2], "--index", db).returncode == 0
    proc = kaapcli("retrieve", "--dataset", "cohort", "--exclude-tag", "excluded", "--limit", "1", "-o",
                   work / "one", "--index", db, cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert received(work / "one") == {uids[1]: counts[uids[1]]}  # the first non-excluded member
    proc = kaapcli("retrieve", "--dataset", "cohort", "--include-tag", "keep", "-o", work / "kept", "--index", db,
                   cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert received(work / "kept") == {uids[2]: counts[uids[2]]}
    records = kaapcli("dataset", "show", "cohort", "--index", db).stdout  # dataset records work as search's do
    proc = kaapcli("retrieve", "--from-query", "-", "-o", work / "all", input=records, cwd=work)
    assert proc.returncode == 0 and received(work / "all") == counts
    assert kaapcli("retrieve", "--include-tag", "keep", "-o", work / "x", cwd=work).returncode == 2
    missing = kaapcli("retrieve", "--dataset", "nope", "-o", work / "x", "--index", db, cwd=work)
    assert missing.returncode == 66 and "dataset 'nope' does not exist" in missing.stderr
