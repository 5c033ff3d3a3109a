"""Object storage (S3 / MinIO) through the minio client: put, get, ls, rm with ``s3://bucket/prefix`` addresses.

Keys mirror paths relative to the directory given (``put DIR s3://b/p`` stores ``DIR/a/x.dcm`` as
``p/a/x.dcm``; ``get s3://b/p -o OUT`` writes it back to ``OUT/a/x.dcm``).  Transfers run in threads.
An object whose size and ETag equal the local file's is skipped: the ETag is the MD5 of a
single-part upload, or the MD5 of the part MD5s plus ``-N`` for a multipart one, which kaapcli
reproduces because it uploads with a fixed :data:`PART_SIZE`.  Downloads land atomically (fsio).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal, TypeVar

from kaapcli.core import fsio
from kaapcli.exitcodes import ConfigError, KaapcliError, NoInputError, UnavailableError, UsageError

PART_SIZE = 16 * 1024 * 1024
CHUNK = 1024 * 1024
DEFAULT_WORKERS = 8
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed entry times: the same files give the same archive (and ETag)
T = TypeVar("T")
Status = Literal["ok", "skipped", "failed"]


@dataclass(frozen=True)
class Settings:
    endpoint: str  # http(s)://host:port
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    region: str = "us-east-1"


@dataclass
class Transfer:
    """One object moved (or skipped because unchanged, or failed with a one-line reason)."""

    key: str
    path: str
    status: Status
    nbytes: int = 0
    message: str = ""


def resolve_settings(endpoint: str | None, access_key: str | None, secret_key: str | None,
                     profile: dict[str, Any] | None) -> Settings:
    """Options (and KAAPCLI_S3_* variables, applied by the CLI) over an ``[s3.NAME]`` profile."""
    profile = profile or {}
    endpoint = endpoint or profile.get("endpoint")
    if not endpoint:
        raise ConfigError("no S3 endpoint", hint="give --endpoint URL, set KAAPCLI_S3_ENDPOINT or use --s3 NAME")
    if "://" not in endpoint:
        endpoint = f"https://{endpoint}"
    return Settings(endpoint, access_key or profile.get("access_key"), secret_key or profile.get("secret_key"),
                    profile.get("region", "us-east-1"))


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` → (bucket, prefix without leading or trailing slashes)."""
    if not url.startswith("s3://"):
        raise UsageError(f"{url!r}: expected an s3://bucket/prefix address")
    bucket, _, prefix = url[5:].partition("/")
    return bucket, prefix.strip("/")


def join(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def local_etag(path: Path, part_size: int = PART_SIZE) -> str:
    """The ETag S3 gives this file when uploaded with ``part_size`` parts."""
    size = path.stat().st_size
    digests = []
    with open(path, "rb") as fh:
        if size <= part_size:
            md5 = hashlib.md5(usedforsecurity=False)
            for block in iter(lambda: fh.read(CHUNK), b""):
                md5.update(block)
            return md5.hexdigest()
        while True:
            part = fh.read(part_size)
            if not part:
                break
            digests.append(hashlib.md5(part, usedforsecurity=False).digest())
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


def safe_relative(key: str, prefix: str) -> PurePosixPath | None:
    """The local relative path of a key under a prefix, or None when it would escape the output."""
    rel = key[len(prefix):].lstrip("/") if prefix and key.startswith(prefix) else key
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or any(part in ("..", ".", "") for part in rel.split("/")):
        return None
    return path


def zip_inputs(roots: Iterable[Path], dest: Path) -> int:
    """A deterministic zip of files (by name) and directories (by path relative to the directory)."""
    count = 0
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as archive:
        for local, rel in sorted(plan_put(roots, ""), key=lambda pair: pair[1]):
            info = zipfile.ZipInfo(rel, ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with open(local, "rb") as src, archive.open(info, "w") as out:
                for block in iter(lambda: src.read(CHUNK), b""):
                    out.write(block)
            count += 1
    return count


def plan_put(roots: Iterable[Path], prefix: str) -> list[tuple[Path, str]]:
    """(local file, key) for every file of the inputs; a missing input is NoInputError."""
    plan: list[tuple[Path, str]] = []
    for root in roots:
        if root.is_dir():
            plan.extend((f, join(prefix, f.relative_to(root).as_posix())) for f in fsio.walk_files(root))
        elif root.is_file():
            plan.append((root, join(prefix, root.name)))
        else:
            raise NoInputError(f"{root}: no such file or directory")
    return plan


class Store:
    """One S3 endpoint.  Every method maps transport failures to UnavailableError naming the endpoint."""

    def __init__(self, settings: Settings, workers: int = DEFAULT_WORKERS):
        import urllib3
        from minio import Minio

        self.settings = settings
        self.workers = max(1, workers)
        scheme, _, host = settings.endpoint.partition("://")
        http = urllib3.PoolManager(
            maxsize=self.workers, timeout=urllib3.Timeout(connect=5, read=120),
            retries=urllib3.Retry(total=2, connect=1, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]))
        self.client = Minio(host.rstrip("/"), access_key=settings.access_key, secret_key=settings.secret_key,
                            secure=scheme == "https", region=settings.region, http_client=http)

    # -- plumbing
    def call(self, fn: Callable[[], T], what: str = "") -> T:
        import urllib3
        from minio.error import MinioException, S3Error

        endpoint = self.settings.endpoint
        try:
            return fn()
        except S3Error as exc:
            if exc.code in ("NoSuchBucket", "NoSuchKey"):
                raise NoInputError(f"{what or endpoint}: {exc.code}: {exc.message}") from exc
            if exc.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise UnavailableError(f"S3 {endpoint} refused access: {exc.code}",
                                       hint="check --access-key/--secret-key or the [s3.NAME] profile") from exc
            raise KaapcliError(f"{what or endpoint}: S3 error {exc.code}: {exc.message}") from exc
        except ValueError as exc:  # the client's own checks: bucket names, object names
            raise UsageError(f"{what or endpoint}: {exc}") from exc
        except (urllib3.exceptions.HTTPError, OSError, MinioException) as exc:
            text = str(exc)
            errno_text = re.search(r"\[Errno -?\d+\] [^'\")]+", text)  # urllib3 buries it in a long repr
            reason = errno_text[0] if errno_text else (text.splitlines()[0][:200] if text else type(exc).__name__)
            if isinstance(exc, OSError) and not isinstance(exc, ConnectionError) and exc.filename:
                raise  # a local file problem, not the endpoint
            raise UnavailableError(f"S3 endpoint {endpoint} unreachable: {reason}",
                                   hint="check --endpoint, the network and that the object store is running") from exc

    def _parallel(self, jobs: list[Any], fn: Callable[[Any], Transfer]) -> Iterator[Transfer]:
        """Run transfers in threads; an unreachable endpoint aborts the whole operation."""
        with cf.ThreadPoolExecutor(self.workers) as pool:
            futures = [pool.submit(fn, job) for job in jobs]
            try:
                for fut in cf.as_completed(futures):
                    yield fut.result()
            except UnavailableError:
                for fut in futures:
                    fut.cancel()
                raise

    # -- operations
    def ensure_bucket(self, bucket: str) -> None:
        if not self.call(lambda: self.client.bucket_exists(bucket)):
            from minio.error import S3Error

            try:
                self.call(lambda: self.client.make_bucket(bucket))
            except KaapcliError as exc:
                if not isinstance(exc.__cause__, S3Error) or exc.__cause__.code not in (
                        "BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def remote(self, bucket: str, key: str) -> tuple[int, str] | None:
        """(size, etag) of an object, or None when it does not exist."""
        from minio.error import S3Error

        def stat() -> tuple[int, str] | None:
            try:
                info = self.client.stat_object(bucket, key)
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                    return None
                raise
            return int(info.size or 0), (info.etag or "").strip('"')

        return self.call(stat, f"s3://{bucket}/{key}")

    def put(self, plan: list[tuple[Path, str]], bucket: str, *, force: bool = False) -> Iterator[Transfer]:
        self.ensure_bucket(bucket)

        def one(job: tuple[Path, str]) -> Transfer:
            path, key = job
            url = f"s3://{bucket}/{key}"
            try:
                size = path.stat().st_size
                if not force and self.remote(bucket, key) == (size, local_etag(path)):
                    return Transfer(url, str(path), "skipped", message="unchanged")
                self.call(lambda: self.client.fput_object(bucket, key, str(path), part_size=PART_SIZE), url)
                return Transfer(url, str(path), "ok", size)
            except UnavailableError:
                raise
            except KaapcliError as exc:
                return Transfer(url, str(path), "failed", message=f"{path}: {exc.message}")
            except OSError as exc:
                return Transfer(url, str(path), "failed", message=f"{path}: cannot read: {exc.strerror}")

        yield from self._parallel(plan, one)

    def put_zip(self, roots: list[Path], bucket: str, key: str, *, force: bool = False) -> Iterator[Transfer]:
        plan_put(roots, "")  # a missing input fails before anything is built
        with tempfile.TemporaryDirectory(prefix="kaapcli-zip-") as tmp:
            archive = Path(tmp) / PurePosixPath(key).name
            zip_inputs(roots, archive)
            yield from self.put([(archive, key)], bucket, force=force)

    def objects(self, bucket: str, prefix: str) -> list[Any]:
        """Objects under a prefix, recursively (S3 prefix semantics: ``a/b`` also matches ``a/bc``)."""
        return self.call(lambda: list(self.client.list_objects(bucket, prefix=prefix or None, recursive=True)),
                         f"s3://{bucket}/{prefix}")

    def tree(self, bucket: str, prefix: str) -> tuple[str, list[Any]]:
        """The object at ``prefix`` itself, or else everything under ``prefix/``: (base prefix, objects)."""
        found = [o for o in self.objects(bucket, prefix) if o.object_name == prefix]
        if prefix and found:
            return prefix.rpartition("/")[0], found
        return prefix, [o for o in self.objects(bucket, f"{prefix}/" if prefix else "") if not o.is_dir]

    def get(self, bucket: str, prefix: str, out: Path, *, force: bool = False) -> Iterator[Transfer]:
        base, objects = self.tree(bucket, prefix)
        if not objects:
            raise NoInputError(f"s3://{bucket}/{prefix}: no such object or prefix")

        def one(obj: Any) -> Transfer:
            key = obj.object_name
            url = f"s3://{bucket}/{key}"
            rel = safe_relative(key, base)
            if rel is None:
                return Transfer(url, "", "failed", message=f"{url}: key would write outside {out}; not downloaded")
            dest = out / rel
            etag = (obj.etag or "").strip('"')
            try:
                if not force and dest.is_file() and dest.stat().st_size == obj.size and local_etag(dest) == etag:
                    return Transfer(url, str(dest), "skipped", message="unchanged")
                nbytes = self.call(lambda: self._download(bucket, key, dest), url)
                return Transfer(url, str(dest), "ok", nbytes)
            except UnavailableError:
                raise
            except KaapcliError as exc:
                return Transfer(url, str(dest), "failed", message=exc.message)

        yield from self._parallel(objects, one)

    def _download(self, bucket: str, key: str, dest: Path) -> int:
        response = self.client.get_object(bucket, key)
        nbytes = 0
        try:
            with fsio.atomic_write(dest) as fh:
                for block in response.stream(CHUNK):
                    fh.write(block)
                    nbytes += len(block)
        finally:
            response.close()
            response.release_conn()
        return nbytes

    def remove(self, bucket: str, prefix: str, *, recursive: bool) -> list[str]:
        """Delete the object at ``prefix`` (or, with ``recursive``, everything under ``prefix/``)."""
        from minio.deleteobjects import DeleteObject

        if recursive:
            keys = [o.object_name for o in self.tree(bucket, prefix)[1]]
        else:
            keys = [prefix] if prefix and self.remote(bucket, prefix) is not None else []
        if not keys:
            hint = "" if recursive else "use --recursive to remove everything under a prefix"
            raise NoInputError(f"s3://{bucket}/{prefix}: no such object", hint=hint)
        errors = self.call(lambda: list(self.client.remove_objects(bucket, (DeleteObject(k) for k in keys))))
        if errors:
            raise KaapcliError(f"s3://{bucket}: {len(errors)} objects not removed: {errors[0].message}")
        return keys

    def buckets(self) -> list[str]:
        return [b.name for b in self.call(self.client.list_buckets)]

