"""``kaapcli s3`` against a real S3 HTTP server on loopback (moto's server), driven by the minio client."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, kaapcli

pytestmark = pytest.mark.network
SECRET = "not-a-real-secret-1234"


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto server did not start: {log.read_text()[-500:]}")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture()
def env(endpoint: str) -> dict[str, str]:
    return {"KAAPCLI_S3_ENDPOINT": endpoint, "KAAPCLI_S3_ACCESS_KEY": "testing", "KAAPCLI_S3_SECRET_KEY": SECRET}


def minio_client(endpoint: str):  # type: ignore[no-untyped-def]
    from minio import Minio

    return Minio(endpoint.split("://")[1], access_key="testing", secret_key=SECRET, secure=False, region="us-east-1")


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "a.txt": b"hello\n",
        "series/1.dcm": os.urandom(5000),
        "series/deep/2.dcm": os.urandom(70000),
        "big.bin": os.urandom(17 * 1024 * 1024),  # above the 16 MiB part size: a multipart upload
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / ".hidden").write_text("skipped like every walk")
    return files


def test_put_get_round_trip_is_byte_exact_and_skips_unchanged(tmp_path: Path, env: dict[str, str],
                                                             endpoint: str) -> None:
    files = make_tree(tmp_path / "data")
    proc = kaapcli("s3", "put", tmp_path / "data", "s3://round/pre/fix", env=env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split()) == sorted(f"s3://round/pre/fix/{rel}" for rel in files)
    objects = {o.object_name: o for o in minio_client(endpoint).list_objects("round", recursive=True)}
    assert set(objects) == {f"pre/fix/{rel}" for rel in files}  # keys mirror relative paths; bucket was created
    assert objects["pre/fix/big.bin"].etag.strip('"').endswith("-2")  # really multipart

    again = kaapcli("s3", "put", tmp_path / "data", "s3://round/pre/fix", env=env)
    assert again.returncode == 0 and "4 unchanged" in again.stderr
    (tmp_path / "data" / "a.txt").write_bytes(b"changed\n")
    files["a.txt"] = b"changed\n"
    changed = kaapcli("s3", "put", tmp_path / "data", "s3://round/pre/fix", "--format", "jsonl", env=env)
    import json

    statuses = {json.loads(line)["outputs"][0]: json.loads(line)["status"] for line in changed.stdout.splitlines()}
    assert statuses == {f"s3://round/pre/fix/{rel}": ("ok" if rel == "a.txt" else "skipped") for rel in files}

    proc = kaapcli("s3", "get", "s3://round/pre/fix", "-o", tmp_path / "back", env=env)
    assert proc.returncode == 0, proc.stderr
    for rel, data in files.items():
        assert (tmp_path / "back" / rel).read_bytes() == data, rel
    assert not list((tmp_path / "back").rglob(".*part"))  # no temporary files left
    again = kaapcli("s3", "get", "s3://round/pre/fix", "-o", tmp_path / "back", env=env)
    assert "4 unchanged" in again.stderr
    one = kaapcli("s3", "get", "s3://round/pre/fix/series/1.dcm", "-o", tmp_path / "one", env=env)
    assert one.stdout.strip() == str(tmp_path / "one" / "1.dcm")
    assert (tmp_path / "one" / "1.dcm").read_bytes() == files["series/1.dcm"]


def test_zip_ls_rm(tmp_path: Path, env: dict[str, str], endpoint: str) -> None:
    files = {"x/1.dcm": b"one", "x/2.dcm": b"two" * 1000, "y.json": b"{}"}
    for rel, data in files.items():
        (tmp_path / "case" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "case" / rel).write_bytes(data)
    proc = kaapcli("s3", "put", "--zip", tmp_path / "case", "s3://zips/run1", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["s3://zips/run1/case.zip"]
    blob = minio_client(endpoint).get_object("zips", "run1/case.zip").read()
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        assert {n: archive.read(n) for n in archive.namelist()} == files
    again = kaapcli("s3", "put", "--zip", tmp_path / "case", "s3://zips/run1", env=env)
    assert "1 unchanged" in again.stderr  # the archive is deterministic
    named = kaapcli("s3", "put", "--zip", tmp_path / "case", "s3://zips/named.zip", env=env)
    assert named.stdout.split() == ["s3://zips/named.zip"]

    listing = kaapcli("s3", "ls", "s3://zips", env=env)
    assert listing.stdout.split() == ["s3://zips/named.zip", "s3://zips/run1/case.zip"]
    long = kaapcli("s3", "ls", "--long", "s3://zips/run1", env=env)
    import json

    record = json.loads(long.stdout)
    assert record["size"] == len(blob) and record["etag"] == hashlib.md5(blob).hexdigest()
    assert "s3://zips" in kaapcli("s3", "ls", env=env).stdout.split()

    proc = kaapcli("s3", "rm", "s3://zips/run1", env=env)
    assert proc.returncode == 66 and "--recursive" in proc.stderr
    proc = kaapcli("s3", "rm", "-R", "s3://zips/run1", env=env)
    assert proc.returncode == 0 and proc.stdout.split() == ["s3://zips/run1/case.zip"]
    assert kaapcli("s3", "rm", "s3://zips/named.zip", env=env).returncode == 0
    assert kaapcli("s3", "ls", "s3://zips", env=env).stdout == ""
    assert kaapcli("s3", "get", "s3://zips/none", "-o", tmp_path / "o", env=env).returncode == 66


def test_keys_escaping_the_output_are_refused(tmp_path: Path, env: dict[str, str], endpoint: str) -> None:
    import boto3  # minio refuses to write such keys; other S3 clients do not

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key=SECRET,
                      region_name="us-east-1")
    s3.create_bucket(Bucket="evil")
    s3.put_object(Bucket="evil", Key="p/ok.txt", Body=b"ok")
    s3.put_object(Bucket="evil", Key="p/../../escape.txt", Body=b"x")
    assert "p/../../escape.txt" in [o.object_name for o in minio_client(endpoint).list_objects("evil", recursive=True)]
    proc = kaapcli("s3", "get", "s3://evil/p", "-o", tmp_path / "out", env=env)
    assert proc.returncode == 1
    assert "key would write outside" in proc.stderr
    assert (tmp_path / "out" / "ok.txt").read_bytes() == b"ok"
    assert not list(tmp_path.rglob("escape.txt"))


def test_profile_and_errors(tmp_path: Path, endpoint: str) -> None:
    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "kaapcli.toml").write_text(
        f'[s3.local]\nendpoint = "{endpoint}"\naccess_key = "testing"\nsecret_key_env = "MY_S3_SECRET"\n')
    proc = kaapcli("s3", "put", tmp_path / "f.txt", "s3://prof", "--s3", "local", cwd=tmp_path,
                   env={"MY_S3_SECRET": SECRET})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["s3://prof/f.txt"]

    dead = f"http://127.0.0.1:{free_port()}"
    proc = kaapcli("s3", "ls", "s3://prof", "--endpoint", dead, "--access-key", "a", "--secret-key", SECRET)
    assert proc.returncode == 69
    assert f"S3 endpoint {dead} unreachable" in proc.stderr
    assert SECRET not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
    proc = kaapcli("s3", "put", tmp_path / "f.txt", "s3://prof", "--endpoint", dead)
    assert proc.returncode == 69
    proc = kaapcli("s3", "ls", "s3://prof", env={"KAAPCLI_S3_ENDPOINT": ""}, cwd=tmp_path / "..")
    assert proc.returncode == 78 and "no S3 endpoint" in proc.stderr
    bad = kaapcli("s3", "put", tmp_path / "f.txt", "s3://x", "--endpoint", endpoint)
    assert bad.returncode == 2 and "invalid bucket name" in bad.stderr
    assert kaapcli("s3", "put", tmp_path / "nope", "s3://prof", "--endpoint", endpoint).returncode == 66
    assert kaapcli("s3", "ls", "bucket/x", "--endpoint", endpoint).returncode == 2
