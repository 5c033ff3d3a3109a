"""concat-json, zip/unzip, split and clean: determinism, atomicity and refusals that keep data safe."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
from conftest import kaapcli

from kaapcli.core.split import assign

# --------------------------------------------------------------------------- concat-json


def test_concat_json_array_and_lines_in_input_order(tmp_path: Path) -> None:
    src = tmp_path / "in"
    (src / "b").mkdir(parents=True)
    (src / "a.json").write_text('{"name": "a", "n": 1}')
    (src / "b" / "c.jsonl").write_text('{"name": "c1"}\n\n{"name": "c2"}\n')
    (src / "b" / "d.json").write_text('[1, 2]')
    (src / "notes.txt").write_text("skipped")
    proc = kaapcli("concat-json", src, "-o", src / "all.json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{src / 'all.json'}\n"
    assert json.loads((src / "all.json").read_text()) == [{"name": "a", "n": 1}, {"name": "c1"}, {"name": "c2"},
                                                         [1, 2]]
    # A re-run over the same directory leaves out its own previous output and gives the same bytes.
    before = (src / "all.json").read_bytes()
    assert kaapcli("concat-json", src, "-o", src / "all.json", "-q").returncode == 0
    assert (src / "all.json").read_bytes() == before

    assert kaapcli("concat-json", src / "b", src / "a.json", "-o", tmp_path / "all.jsonl").returncode == 0
    lines = (tmp_path / "all.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"name": "c1"}, {"name": "c2"}, [1, 2], {"name": "a", "n": 1}]


def test_concat_json_bad_files_are_named_with_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "good.json").write_text('{"ok": true}')
    (tmp_path / "bad.json").write_text('{\n  "a": 1,\n  "b": ]\n}')
    (tmp_path / "bad.jsonl").write_text('{"x": 1}\n{"x": 2\n')
    proc = kaapcli("concat-json", tmp_path / "good.json", tmp_path / "bad.json", tmp_path / "bad.jsonl",
                   "-o", tmp_path / "out.json")
    assert proc.returncode == 1
    assert f"{tmp_path / 'bad.json'}: bad JSON at line 3 column 8" in proc.stderr
    assert f"{tmp_path / 'bad.jsonl'}: bad JSON at line 2 column" in proc.stderr
    assert json.loads((tmp_path / "out.json").read_text()) == [{"ok": True}]

    only_bad = kaapcli("concat-json", tmp_path / "bad.json", "-o", tmp_path / "none.json")
    assert only_bad.returncode == 65 and not (tmp_path / "none.json").exists()
    assert kaapcli("concat-json", tmp_path / "good.json", "-o", tmp_path / "out.csv").returncode == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left behind


# --------------------------------------------------------------------------- zip / unzip

def make_tree(root: Path) -> Path:
    (root / "series" / "deep").mkdir(parents=True)
    (root / "series" / "a.dcm").write_bytes(b"\x00" * 300)
    (root / "series" / "deep" / "b.dcm").write_bytes(os.urandom(5000))
    (root / "meta.json").write_text('{"k": 1}')
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    (root / ".hidden").write_text("not stored")
    return root


def test_zip_is_deterministic_and_readable_by_infozip(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    assert kaapcli("zip", tree, "-o", tmp_path / "one.zip").returncode == 0
    old = time.time() - 86400 * 400
    for path in tree.rglob("*"):
        os.utime(path, (old, old))
    proc = kaapcli("zip", tree, "-o", tmp_path / "two.zip")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{tmp_path / 'two.zip'}\n"
    assert (tmp_path / "one.zip").read_bytes() == (tmp_path / "two.zip").read_bytes()

    with zipfile.ZipFile(tmp_path / "one.zip") as zf:
        names = zf.namelist()
        assert names == sorted(names) == ["meta.json", "run.sh", "series/a.dcm", "series/deep/b.dcm"]
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert stat.S_IMODE(zf.getinfo("run.sh").external_attr >> 16) == 0o755
    infozip = subprocess.run(["unzip", "-t", str(tmp_path / "one.zip")], capture_output=True, text=True)
    assert infozip.returncode == 0 and "No errors detected" in infozip.stdout

    assert kaapcli("zip", tree, "-o", tmp_path / "dcm.zip", "--include", "*.dcm,*.json",
                   "--exclude", "deep/*,series/deep/*").returncode == 0
    assert zipfile.ZipFile(tmp_path / "dcm.zip").namelist() == ["meta.json", "series/a.dcm"]


def test_unzip_round_trip(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    assert kaapcli("zip", tree, "-o", tmp_path / "a.zip", "-q").returncode == 0
    (tmp_path / "zips").mkdir()
    (tmp_path / "a.zip").rename(tmp_path / "zips" / "a.zip")
    (tmp_path / "zips" / "readme.txt").write_text("not an archive: skipped")
    proc = kaapcli("unzip", tmp_path / "zips", "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    assert sorted(proc.stdout.split()) == sorted(str(p) for p in out.rglob("*") if p.is_file()
                                                 and ".kaapcli" not in p.parts)
    for rel in ("meta.json", "series/a.dcm", "series/deep/b.dcm", "run.sh"):
        assert (out / rel).read_bytes() == (tree / rel).read_bytes()


@pytest.mark.parametrize("name", ["../escape.txt", "/tmp/absolute.txt", "a/../../escape.txt", "C:/windows.txt"])
def test_unzip_refuses_zip_slip(tmp_path: Path, name: str) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("fine.txt", "harmless")
        info = zipfile.ZipInfo("placeholder")
        info.filename = name  # ZipInfo() strips a leading '/'; set the raw name like a hostile tool would
        zf.writestr(info, "payload")
    out = tmp_path / "sub" / "out"
    proc = kaapcli("unzip", archive, "-o", out)
    assert proc.returncode == 65
    assert "refused" in proc.stderr and repr(name) in proc.stderr and "Traceback" not in proc.stderr
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name in ("fine.txt", "escape.txt",
                                                                             "absolute.txt", "windows.txt")]
    assert not Path("/tmp/absolute.txt").exists()


def test_unzip_refuses_symlink_entries(tmp_path: Path) -> None:
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("etc-link")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc")
        zf.writestr("etc-link/passwd", "overwrite through the link")
    proc = kaapcli("unzip", archive, "-o", tmp_path / "out")
    assert proc.returncode == 65
    assert "'etc-link' is a symbolic link; refused" in proc.stderr
    assert not (tmp_path / "out" / "etc-link").exists()


def test_unzip_reports_corrupt_archives(tmp_path: Path) -> None:
    archive = tmp_path / "crc.zip"
    payload = b"A" * 1000
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("first.txt", b"intact")
        zf.writestr("second.txt", payload)
    data = bytearray(archive.read_bytes())
    data[data.index(payload) + 500] ^= 0xFF  # damage the stored bytes, not the headers
    archive.write_bytes(bytes(data))
    proc = kaapcli("unzip", archive, "-o", tmp_path / "out")
    assert proc.returncode == 65
    assert "corrupt zip archive: Bad CRC-32 for file 'second.txt'" in proc.stderr
    # A failed archive extracts nothing, not even the intact entries before the damage (no half-done item).
    assert not (tmp_path / "out" / "first.txt").exists() and not (tmp_path / "out" / "second.txt").exists()
    assert not (tmp_path / "out").exists()  # nothing at all: not a hidden temporary file, not an empty OUT

    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(bytes(data[: len(data) // 2]))
    proc = kaapcli("unzip", truncated, "-o", tmp_path / "out2")
    assert proc.returncode == 65
    assert f"{truncated}: corrupt zip archive" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- split

@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight patients with two series each."""
    out = tmp_path_factory.mktemp("cohort")
    proc = kaapcli("mock", "-o", out, "--studies", "8", "--series", "2", "--slices", "2", "--rows", "16",
                   "--columns", "16", "--seed", "11", "-q")
    assert proc.returncode == 0, proc.stderr
    return out


def read_split(out: Path) -> tuple[list[str], list[str]]:
    return (out / "train.txt").read_text().split(), (out / "test.txt").read_text().split()


def test_split_is_deterministic_and_leakage_free(tmp_path: Path, cohort: Path) -> None:
    proc = kaapcli("split", cohort, "-o", tmp_path / "a", "--train", "0.75", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(tmp_path / "a" / "train.txt"), str(tmp_path / "a" / "test.txt")]
    train, test = read_split(tmp_path / "a")
    assert len(train) + len(test) == 16 and not set(train) & set(test)
    assert len(train) == 12  # 6 of 8 patients, two series each

    assert kaapcli("split", cohort, "-o", tmp_path / "j", "--train", "0.75", "--to", "json").returncode == 0
    info = json.loads((tmp_path / "j" / "split.json").read_text())
    patients = {side: {s["patient"] for s in info[side]} for side in ("train", "test")}
    assert not patients["train"] & patients["test"] and len(patients["test"]) == 2
    assert sorted(s["series"] for s in info["train"]) == sorted(train)

    assert kaapcli("split", cohort, "-o", tmp_path / "b", "--train", "0.75", "--seed", "1", "-q").returncode == 0
    assert read_split(tmp_path / "b") == (train, test)


def test_assign_depends_on_seed_only_per_group() -> None:
    keys = [f"patient:P{i}" for i in range(20)]
    splits = {seed: assign(keys, 0.8, seed) for seed in range(5)}
    assert all(len(train) == 16 and len(test) == 4 for train, test in splits.values())
    assert len({frozenset(test) for _, test in splits.values()}) > 1  # the seed matters
    assert assign(list(reversed(keys)), 0.8, 3) == splits[3]  # input order does not
    assert assign(keys[:2], 0.99, 0) != (set(keys[:2]), set())  # both sides get a group when 0 < train < 1


def test_split_by_series_and_edge_fractions(tmp_path: Path, cohort: Path) -> None:
    assert kaapcli("split", cohort, "-o", tmp_path / "s", "--by", "series", "--train", "0.5", "-q").returncode == 0
    train, test = read_split(tmp_path / "s")
    assert (len(train), len(test)) == (8, 8)
    assert kaapcli("split", cohort, "-o", tmp_path / "all", "--train", "1", "-q").returncode == 0
    assert read_split(tmp_path / "all")[1] == []
    assert kaapcli("split", cohort, "-o", tmp_path / "bad", "--train", "1.5").returncode == 2
    assert kaapcli("split", tmp_path / "all", "-o", tmp_path / "none").returncode == 66  # no DICOM there


def test_split_tags_the_index(tmp_path: Path, cohort: Path) -> None:
    db = tmp_path / "index.db"
    assert kaapcli("index", cohort, "--index", db, "-q").returncode == 0
    proc = kaapcli("split", cohort, "-o", tmp_path / "s", "--index", db, "--train", "0.75")
    assert proc.returncode == 0, proc.stderr
    train, test = read_split(tmp_path / "s")

    def tagged(tag: str) -> set[str]:
        result = kaapcli("search", f"Tags:{tag}", "--index", db)
        assert result.returncode == 0, result.stderr
        return {json.loads(line)["0020000E SeriesInstanceUID_keyword"] for line in result.stdout.splitlines()}

    assert tagged("train") == set(train) and tagged("test") == set(test)


# --------------------------------------------------------------------------- clean

def age(path: Path, days: float) -> None:
    stamp = time.time() - days * 86400
    os.utime(path, (stamp, stamp), follow_symlinks=False)


def test_clean_dry_run_then_removal(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("must survive")
    for name in ("old", "recent", "old-but-touched"):
        (root / name / "batch").mkdir(parents=True)
        (root / name / "batch" / "f.dcm").write_text(name)
    (root / "old" / "link-out").symlink_to(outside)  # a link inside a run: removed, never followed
    (root / "link-run").symlink_to(outside)  # a link as a run folder: never a run
    (root / "file.txt").write_text("not a run folder")
    for path in [*root.rglob("*"), outside, outside / "keep.txt"]:
        age(path, 90)
    age(root / "recent" / "batch" / "f.dcm", 1)
    age(root / "recent", 1)
    age(root / "old-but-touched" / "batch" / "f.dcm", 10)  # the newest file decides, however deep

    dry = kaapcli("clean", root, "--older-than", "60d", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.split() == [str(root.resolve() / "old")]
    assert (root / "old").exists()

    real = kaapcli("clean", root, "--older-than", "60d")
    assert real.returncode == 0, real.stderr
    assert real.stdout.split() == [str(root.resolve() / "old")]
    assert sorted(p.name for p in root.iterdir()) == ["file.txt", "link-run", "old-but-touched", "recent"]
    assert (outside / "keep.txt").read_text() == "must survive"

    assert kaapcli("clean", root, "--older-than", "5d").stdout.split() == [str(root.resolve() / "old-but-touched")]


def test_clean_refuses_dangerous_roots_and_bad_periods(tmp_path: Path) -> None:
    for root in ("/", str(Path.home())):
        proc = kaapcli("clean", root, "--older-than", "1d", "--dry-run")
        assert proc.returncode == 2 and "refusing" in proc.stderr
    proc = kaapcli("clean", tmp_path, "--older-than", "3 months")
    assert proc.returncode == 2 and "--older-than" in proc.stderr
    assert kaapcli("clean", tmp_path / "missing", "--older-than", "1d").returncode == 66
