"""The batch engine: inputs, sharding, up-to-date skipping, atomic writes, exit codes."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest

from kaapcli.core import batch, fsio
from kaapcli.core.batch import BaseOperator, BatchOptions, Context, Item, Outcome, run_batch
from kaapcli.exitcodes import CantCreateError, DataError, ExitCode, NoInputError, UsageError


class CopyOp(BaseOperator):
    """Copies each DICOM file to OUT/<name>; fails on files whose name contains 'bad'."""

    name = "copy"

    def __init__(self, tag: str = "a"):
        self.tag = tag

    def options(self) -> dict[str, str]:
        return {"tag": self.tag}

    def process(self, item: Item, ctx: Context) -> Outcome:
        assert ctx.out is not None
        src = item.paths[0]
        if "bad" in src.name:
            raise DataError("deliberately bad")
        dest = ctx.out / src.name
        fsio.write_bytes(dest, src.read_bytes())
        return Outcome(outputs=[dest])


class GroupOp(CopyOp):
    """Groups files by the first character of their name."""

    name = "group"
    grouped = True

    def group_key(self, path: Path) -> str | None:
        return path.name[0]

    def process(self, item: Item, ctx: Context) -> Outcome:
        assert ctx.out is not None
        dest = ctx.out / f"{item.key}.txt"
        fsio.write_bytes(dest, "\n".join(p.name for p in item.paths).encode())
        return Outcome(outputs=[dest])


def dicomish(path: Path, payload: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + payload)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "in"
    for i in range(30):
        dicomish(root / f"sub{i % 3}" / f"f{i:02d}.dcm", str(i).encode())
    (root / "notes.txt").write_text("not dicom")
    (root / ".hidden.dcm").write_bytes(b"\0" * 128 + b"DICM")
    return root


def test_collect_inputs_sorted_recursive_hidden_skipped_and_stdin(tree: Path) -> None:
    files = fsio.collect_inputs([str(tree)])
    assert files == sorted(files, key=lambda p: (str(p.parent), p.name))
    assert all(not p.name.startswith(".") for p in files)
    assert len(files) == 31
    from_stdin = fsio.collect_inputs(["-"], stdin=io.StringIO(f"{files[0]}\n\n{files[1]}\n{files[0]}\n"))
    assert from_stdin == files[:2]  # blank lines ignored, duplicates dropped
    with pytest.raises(NoInputError):
        fsio.collect_inputs([str(tree / "missing")])


def test_non_dicom_skipped_and_counted(tree: Path, tmp_path: Path) -> None:
    summary = run_batch(CopyOp(), fsio.collect_inputs([str(tree)]), tmp_path / "out", BatchOptions(workers=2))
    assert summary.count("ok") == 30
    assert summary.count("skipped", "not-input") == 1
    assert summary.exit_code == ExitCode.OK
    assert "1 not DICOM" in summary.line()


@pytest.mark.parametrize("workers", [1, 2])
def test_shards_partition_the_input_exactly(tree: Path, tmp_path: Path, workers: int) -> None:
    files = fsio.collect_inputs([str(tree)])
    seen: list[str] = []
    for i in range(3):
        s = run_batch(CopyOp(), files, tmp_path / f"out{i}", BatchOptions(workers=workers, shard=(i, 3)))
        seen += [r.input for r in s.results if r.status == "ok"]
    assert sorted(seen) == sorted(str(f) for f in files if f.suffix == ".dcm")
    assert len(seen) == len(set(seen))


def test_parse_shard() -> None:
    assert batch.parse_shard("1/4") == (0, 4)
    for bad in ("0/4", "5/4", "x", "1/0"):
        with pytest.raises(UsageError):
            batch.parse_shard(bad)


def test_rerun_skips_force_rebuilds_options_and_inputs_invalidate(tree: Path, tmp_path: Path) -> None:
    files = [f for f in fsio.collect_inputs([str(tree)]) if f.suffix == ".dcm"]
    out = tmp_path / "out"
    first = run_batch(CopyOp(), files, out, BatchOptions(workers=2))
    assert first.count("ok") == 30
    again = run_batch(CopyOp(), files, out, BatchOptions(workers=2))
    assert again.count("ok") == 0 and again.count("skipped", "up-to-date") == 30
    assert again.exit_code == ExitCode.OK
    assert all(r.outputs for r in again.results if r.reason == "up-to-date")
    forced = run_batch(CopyOp(), files, out, BatchOptions(workers=2, force=True))
    assert forced.count("ok") == 30
    other_options = run_batch(CopyOp(tag="b"), files, out, BatchOptions(workers=1))
    assert other_options.count("ok") == 30
    newer = time.time() + 10
    os.utime(files[0], (newer, newer))
    touched = run_batch(CopyOp(tag="b"), files, out, BatchOptions(workers=1))
    assert touched.count("ok") == 1
    os.utime(files[0], (newer - 3600, newer - 3600))
    (out / files[1].name).unlink()
    removed = run_batch(CopyOp(tag="b"), files, out, BatchOptions(workers=1))
    assert removed.count("ok") == 1


def test_dry_run_writes_nothing(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = run_batch(CopyOp(), fsio.collect_inputs([str(tree)]), out, BatchOptions(dry_run=True))
    assert summary.count("skipped", "dry-run") == 30
    assert not out.exists()


def test_failed_items_do_not_stop_the_batch_and_set_exit_codes(tree: Path, tmp_path: Path) -> None:
    bad = dicomish(tree / "bad.dcm")
    files = fsio.collect_inputs([str(tree)])
    summary = run_batch(CopyOp(), files, tmp_path / "out", BatchOptions(workers=2))
    failed = [r for r in summary.results if r.status == "failed"]
    assert len(failed) == 1 and failed[0].message == f"{bad}: deliberately bad"
    assert summary.count("ok") == 30
    assert summary.exit_code == ExitCode.ITEMS_FAILED
    only_bad = run_batch(CopyOp(), [bad], tmp_path / "out2", BatchOptions())
    assert only_bad.exit_code == ExitCode.DATAERR


def test_grouped_items_and_shards_keep_groups_together(tmp_path: Path) -> None:
    files = [dicomish(tmp_path / "in" / f"{c}{i}.dcm") for c in "abcde" for i in range(3)]
    keys: list[str] = []
    for i in range(2):
        s = run_batch(GroupOp(), files, tmp_path / "out", BatchOptions(workers=2, shard=(i, 2)))
        keys += [r.key for r in s.results if r.status == "ok"]
    assert sorted(keys) == list("abcde")
    assert (tmp_path / "out" / "a.txt").read_text() == "a0.dcm\na1.dcm\na2.dcm"


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    dest = tmp_path / "x.bin"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError), fsio.atomic_write(dest) as fh:
        fh.write(b"new partial")
        raise RuntimeError("boom")
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_unwritable_output_is_cantcreat(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CantCreateError):
        fsio.ensure_dir(blocker / "sub")


def test_safe_name_and_template() -> None:
    assert fsio.safe_name("../../etc/passwd") == "etc_passwd"
    assert fsio.safe_name("") == "unknown"
    assert fsio.render_template("{A}/{B}_{C}.dcm", {"A": "x/y", "B": "1.2"}) == Path("x_y/1.2_unknown.dcm")
