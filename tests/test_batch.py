"""The batch engine: inputs, sharding, up-to-date skipping, atomic writes, exit codes."""

from __future__ import annotations

import io
import json
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


def test_a_streamed_run_keeps_counts_not_results(tree: Path, tmp_path: Path) -> None:
    """What the CLI runs: every result goes to the callback, the summary only counts (a million-file run keeps no
    record per item), with the same counts, bytes and exit code as a run that keeps them."""
    dicomish(tree / "bad.dcm")
    seen: list[str] = []
    kept = run_batch(CopyOp(), fsio.iter_inputs([str(tree)]), tmp_path / "kept", BatchOptions(workers=2))
    streamed = run_batch(CopyOp(), fsio.iter_inputs([str(tree)]), tmp_path / "streamed", BatchOptions(workers=2),
                         on_result=lambda r: seen.append(r.status), keep_results=False)
    assert streamed.results == [] and len(seen) == len(kept.results) == 32
    for summary in (kept, streamed):
        assert (summary.count("ok"), summary.count("failed"), summary.count("skipped", "not-input")) == (30, 1, 1)
        assert summary.exit_code == ExitCode.ITEMS_FAILED
    assert streamed.nbytes == kept.nbytes and streamed.nfiles == kept.nfiles == 31
    assert streamed.line().replace(f"{streamed.seconds:.1f} s", "") == kept.line().replace(f"{kept.seconds:.1f} s", "")
    again = run_batch(CopyOp(), fsio.iter_inputs([str(tree)]), tmp_path / "streamed", BatchOptions(workers=2),
                      keep_results=False)
    assert again.count("skipped", "up-to-date") == 30 and again.exit_code == ExitCode.ITEMS_FAILED


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


# --------------------------------------------------------------------------- odd inputs, collisions, state (#15)

def test_inputs_are_regular_files_only_and_loops_never_hang(tmp_path: Path) -> None:
    import socket

    root = tmp_path / "in"
    good = dicomish(root / "a" / "good.dcm")
    os.mkfifo(root / "a" / "fifo.dcm")
    (root / "a" / "null.dcm").symlink_to("/dev/null")
    (root / "a" / "link.dcm").symlink_to(good)
    (root / "dangling.dcm").symlink_to(root / "nowhere")
    (root / "loop1.dcm").symlink_to(root / "loop2.dcm")
    (root / "loop2.dcm").symlink_to(root / "loop1.dcm")
    (root / "a" / "up").symlink_to("..")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock.dcm"))
        entries = list(fsio.iter_inputs([str(root)]))
    files = [e.path for e in entries if isinstance(e, fsio.InputFile)]
    assert files == [good, root / "a" / "link.dcm"]
    skipped = {e.path.name: e.reason for e in entries if isinstance(e, fsio.Unusable)}
    assert skipped == {"fifo.dcm": "a FIFO (named pipe)", "null.dcm": "symbolic link to a character device",
                       "up": "symbolic link to a directory (not followed)", "dangling.dcm": "dangling symbolic link",
                       "loop1.dcm": "symbolic link loop", "loop2.dcm": "symbolic link loop", "sock.dcm": "a socket"}
    assert not any(e.failed for e in entries if isinstance(e, fsio.Unusable))
    with pytest.raises(NoInputError, match="fifo.dcm: a FIFO"):
        fsio.check_named([str(root / "a" / "fifo.dcm")])
    fsio.check_not_inside([str(root / "loop1.dcm"), str(root)], tmp_path / "out")  # realpath never raises on loops
    with pytest.raises(UsageError):
        fsio.check_not_inside([str(root / "a")], root)


def test_paths_on_stdin_that_are_not_files_fail(tmp_path: Path) -> None:
    good = dicomish(tmp_path / "good.dcm")
    entries = list(fsio.iter_inputs(["-"], stdin=io.StringIO(f"{tmp_path / 'missing.dcm'}\n{good}\n")))
    assert [type(e).__name__ for e in entries] == ["Unusable", "InputFile"]
    assert entries[0].failed and entries[0].code == ExitCode.NOINPUT  # type: ignore[union-attr]


class CollideOp(BaseOperator):
    """Writes every input to OUT/<first letter>.bin: inputs sharing a first letter collide."""

    name = "collide"

    def process(self, item: Item, ctx: Context) -> Outcome:
        assert ctx.out is not None
        dest = ctx.out / f"{item.paths[0].name[0]}.bin"
        fsio.write_bytes(dest, item.paths[0].read_bytes())
        return Outcome(outputs=[dest])


@pytest.mark.parametrize("workers", [1, 2])
def test_two_inputs_writing_one_output_fail_the_second(tmp_path: Path, workers: int) -> None:
    files = [dicomish(tmp_path / "in" / f"{name}.dcm", payload) for name, payload in
             (("a1", b"first"), ("b1", b"b"), ("a2", b"second"), ("a3", b"first"))]
    out = tmp_path / "out"
    summary = run_batch(CollideOp(), files, out, BatchOptions(workers=workers))
    status = {Path(r.input).name: (r.status, r.message) for r in summary.results}
    assert status["a1.dcm"][0] == status["b1.dcm"][0] == "ok"
    assert status["a2.dcm"] == ("failed", f"{files[2]}: {out / 'a.bin'} is also the output of {files[0]}: not "
                                          f"overwritten (hint: {CollideOp.collision_hint})")
    assert status["a3.dcm"][0] == "ok"  # the same bytes: nothing is lost, both inputs are in the tree
    assert (out / "a.bin").read_bytes().endswith(b"first")
    assert sorted(p.name for p in out.iterdir()) == ["a.bin", "b.bin"]  # no temporary files left
    assert summary.exit_code == ExitCode.ITEMS_FAILED


class HalfOp(BaseOperator):
    """Writes two outputs per item, then fails on items named 'bad'."""

    name = "half"

    def process(self, item: Item, ctx: Context) -> Outcome:
        assert ctx.out is not None
        stem = item.paths[0].stem
        outputs = [fsio.write_bytes(ctx.out / f"{stem}.{n}", b"x") and ctx.out / f"{stem}.{n}" for n in (1, 2)]
        if "bad" in stem:
            raise DataError("failed after writing")
        return Outcome(outputs=outputs)


def test_a_failed_item_writes_nothing(tmp_path: Path) -> None:
    files = [dicomish(tmp_path / "in" / "ok.dcm"), dicomish(tmp_path / "in" / "bad.dcm")]
    summary = run_batch(HalfOp(), files, tmp_path / "out", BatchOptions(workers=2))
    assert [r.status for r in summary.results] == ["ok", "failed"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["ok.1", "ok.2"]


def test_manifest_lives_beside_the_output_and_names_no_input(tmp_path: Path) -> None:
    files = [dicomish(tmp_path / "DOE_JOHN_MRN12345" / f"f{i}.dcm", bytes([i])) for i in range(3)]
    out = tmp_path / "out"
    legacy = out / ".kaapcli" / "copy-all.json"  # where manifests lived before: migrated, then removed
    legacy.parent.mkdir(parents=True)
    fsio.write_bytes(out / files[0].name, files[0].read_bytes())
    legacy.write_text(json.dumps({str(files[0]): {"options": batch.options_fingerprint(CopyOp()),
                                                  "outputs": [str(out / files[0].name)]}}))
    first = run_batch(CopyOp(), files, out, BatchOptions(workers=1))
    assert first.count("skipped", "up-to-date") == 1 and first.count("ok") == 2
    assert sorted(p.name for p in out.iterdir()) == ["f0.dcm", "f1.dcm", "f2.dcm"]  # nothing hidden inside OUT
    state = tmp_path / ".out.kaapcli"
    assert sorted(p.name for p in state.iterdir()) == ["copy-all.json"]  # the journal was folded in
    assert "DOE_JOHN" not in (state / "copy-all.json").read_text()
    again = run_batch(CopyOp(), files, out, BatchOptions(workers=1))
    assert again.count("skipped", "up-to-date") == 3


def test_up_to_date_survives_a_crash_through_the_journal(tmp_path: Path) -> None:
    files = [dicomish(tmp_path / "in" / f"f{i}.dcm", bytes([i])) for i in range(4)]
    out = tmp_path / "out"
    manifest = batch.Manifest(out, "copy", None)
    for f in files[:2]:  # as a run would journal them, then die before it folds the journal in
        fsio.write_bytes(out / f.name, f.read_bytes())
        manifest.record(str(f), batch.options_fingerprint(CopyOp()), [str(out / f.name)])
    stray = out / f".f3.dcm.{fsio.RUN_TOKEN}-abcdef{fsio.TMP_SUFFIX}"
    stray.write_bytes(b"half")  # a temporary file of the dead run
    manifest._flush_journal(time.monotonic())  # as it is every JOURNAL_SECONDS
    os.close(manifest._journal)  # type: ignore[arg-type]  # the process died: no close()
    summary = run_batch(CopyOp(), files, out, BatchOptions(workers=1))
    assert summary.count("skipped", "up-to-date") == 2 and summary.count("ok") == 2
    assert not stray.exists()


class CrashOp(CopyOp):
    name = "crash"

    def process(self, item: Item, ctx: Context) -> Outcome:
        if "crash" in item.paths[0].name:
            os._exit(11)  # as a segfault in a library would end the worker
        return super().process(item, ctx)


def test_a_worker_that_dies_fails_only_its_item(tmp_path: Path) -> None:
    files = [dicomish(tmp_path / "in" / f"f{i}.dcm") for i in range(6)] + [dicomish(tmp_path / "in" / "crash.dcm")]
    summary = run_batch(CrashOp(), files, tmp_path / "out", BatchOptions(workers=2))
    failed = [r for r in summary.results if r.status == "failed"]
    assert [Path(r.input).name for r in failed] == ["crash.dcm"] and "worker process died" in failed[0].message
    assert summary.count("ok") == 6


def test_no_input_at_all_exits_66(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not DICOM")
    for files in ([], [tmp_path / "notes.txt"]):
        summary = run_batch(CopyOp(), files, tmp_path / "out", BatchOptions())
        assert summary.no_input and summary.exit_code == ExitCode.NOINPUT


def test_names_that_are_not_utf8_survive_the_manifest(tmp_path: Path) -> None:
    src = dicomish(tmp_path / "in" / os.fsdecode(b"caf\xe9.dcm"))
    out = tmp_path / "out"
    assert run_batch(CopyOp(), [src], out, BatchOptions()).count("ok") == 1
    again = run_batch(CopyOp(), [src], out, BatchOptions())
    assert again.count("skipped", "up-to-date") == 1
    assert os.fsencode(again.results[0].outputs[0]).endswith(b"caf\xe9.dcm")


def test_an_output_directory_inside_the_input_is_never_walked(tmp_path: Path) -> None:
    root = tmp_path / "in"
    files = [dicomish(root / "a" / f"f{i}.dcm", bytes([i])) for i in range(3)]
    out = root / "zz-out"  # made when the run starts, walked after a/ whose outputs it then holds
    summary = run_batch(CopyOp(), fsio.iter_inputs([str(root)], prune=[out]), out, BatchOptions(workers=1))
    assert sorted(Path(r.input).name for r in summary.results) == [f.name for f in files]
    again = list(fsio.iter_inputs(["-"], stdin=io.StringIO(f"{out / files[0].name}\n"), prune=[out]))
    assert len(again) == 1 and isinstance(again[0], fsio.Unusable) and again[0].kind == "not-input"
