"""``kaapcli s3 put|get|ls|rm``: files to and from S3 / MinIO (Kaapana's MinIO buckets)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kaapcli.cli.common import Format, OutDir, Reporter, Sink

if TYPE_CHECKING:
    from kaapcli.core.s3 import Store, Transfer

s3_app = typer.Typer(help="Copy files to and from S3/MinIO (s3://bucket/prefix addresses).", no_args_is_help=True)

PANEL = "Object store"
EndpointOpt = Annotated[str | None, typer.Option(
    "--endpoint", envvar="KAAPCLI_S3_ENDPOINT", show_default=False, rich_help_panel=PANEL,
    help="http(s)://host:port of the S3/MinIO server.")]
AccessOpt = Annotated[str | None, typer.Option(
    "--access-key", envvar="KAAPCLI_S3_ACCESS_KEY", show_default=False, rich_help_panel=PANEL, help="Access key.")]
SecretOpt = Annotated[str | None, typer.Option(
    "--secret-key", envvar="KAAPCLI_S3_SECRET_KEY", show_default=False, show_envvar=True, rich_help_panel=PANEL,
    help="Secret key (prefer the environment variable: command lines are visible to other users).")]
ProfileOpt = Annotated[str | None, typer.Option(
    "--s3", show_default=False, rich_help_panel=PANEL,
    help="An [s3.NAME] config profile (endpoint, access_key, secret_key or secret_key_env).")]
WorkersOpt = Annotated[int, typer.Option("--workers", "-w", min=1, help="Parallel transfers (threads).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Transfer even when the other side is unchanged.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary on stderr.")]
FormatOpt = Annotated[Format, typer.Option("--format", help="stdout: paths/URLs written, or one JSON record "
                                                            "per object.")]


def _store(ctx: typer.Context, endpoint: str | None, access_key: str | None, secret_key: str | None,
           profile: str | None, workers: int = 8) -> Store:
    from kaapcli.core.s3 import Store, resolve_settings
    from kaapcli.exitcodes import ConfigError

    prof = None
    if profile:
        prof = ctx.find_root().obj.profile("s3", profile)
        if prof is None:
            raise ConfigError(f"no [s3.{profile}] profile in the config file")
    return Store(resolve_settings(endpoint, access_key, secret_key, prof), workers)


def _run(label: str, transfers: Any, fmt: Format, quiet: bool, output: str) -> None:
    """Render transfers: outputs on stdout, errors and a summary on stderr; exit 1 when some failed."""
    start = time.perf_counter()
    counts = {"ok": 0, "skipped": 0, "failed": 0}
    nbytes = 0
    with Reporter(label, quiet) as reporter:
        sink = Sink(fmt, reporter)
        t: Transfer
        for t in transfers:
            reporter.advance()
            counts[t.status] += 1
            nbytes += t.nbytes
            if t.status == "failed":
                reporter.error(t.message)
            if fmt is Format.jsonl:
                sink.record({"input": t.path if output == "key" else t.key,
                             "outputs": [] if t.status == "failed" else [t.key if output == "key" else t.path],
                             "status": t.status, "message": t.message})
            elif t.status != "failed":
                sink.write_line(t.key if output == "key" else t.path)
        seconds = time.perf_counter() - start
        reporter.info(f"{sum(counts.values())} objects, {nbytes / 1e6:.0f} MB, {seconds:.1f} s, "
                      f"{nbytes / 1e6 / seconds if seconds else 0:.0f} MB/s, {counts['skipped']} unchanged, "
                      f"{counts['failed']} failed")
    if counts["failed"]:
        raise typer.Exit(1)


@s3_app.command("put")
def put(
    ctx: typer.Context,
    inputs: Annotated[list[Path], typer.Argument(help="Files and directories to upload.", show_default=False)],
    dest: Annotated[str, typer.Argument(help="s3://bucket/prefix", show_default=False)],
    zip_: Annotated[bool, typer.Option("--zip", help="Upload one zip archive of all inputs (DEST ending in .zip "
                                                     "is the key, else PREFIX/<first input name>.zip).")] = False,
    endpoint: EndpointOpt = None, access_key: AccessOpt = None, secret_key: SecretOpt = None,
    s3: ProfileOpt = None, workers: WorkersOpt = 8, force: ForceOpt = False, format: FormatOpt = Format.paths,
    quiet: QuietOpt = False,
) -> None:
    """Upload files; a directory's files keep their paths relative to it under the prefix.

    The bucket is created when missing.  Objects with the same size and ETag (MD5) are skipped.
    Prints the s3:// URL of every object uploaded or already up to date.
    """
    from kaapcli.core.s3 import join, parse_url, plan_put

    bucket, prefix = parse_url(dest)
    store = _store(ctx, endpoint, access_key, secret_key, s3, workers)
    if zip_:
        key = prefix if prefix.endswith(".zip") else join(prefix, f"{inputs[0].resolve().name}.zip")
        transfers = store.put_zip(inputs, bucket, key, force=force)
    else:
        transfers = store.put(plan_put(inputs, prefix), bucket, force=force)
    _run("put", transfers, format, quiet, "key")


@s3_app.command("get")
def get(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="s3://bucket/key or s3://bucket/prefix", show_default=False)],
    out: OutDir,
    endpoint: EndpointOpt = None, access_key: AccessOpt = None, secret_key: SecretOpt = None,
    s3: ProfileOpt = None, workers: WorkersOpt = 8, force: ForceOpt = False, format: FormatOpt = Format.paths,
    quiet: QuietOpt = False,
) -> None:
    """Download one object, or every object under a prefix to OUT/<path below the prefix>.

    Files are written atomically; local files with the object's size and MD5 are left alone.
    Prints the local path of every file written or already up to date.
    """
    from kaapcli.core.s3 import parse_url

    bucket, prefix = parse_url(source)
    store = _store(ctx, endpoint, access_key, secret_key, s3, workers)
    _run("get", store.get(bucket, prefix, out, force=force), format, quiet, "path")


@s3_app.command("ls")
def ls(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="s3://bucket/prefix, or s3:// for the buckets.")] = "s3://",
    long: Annotated[bool, typer.Option("--long", help="JSON Lines with key, size, etag, last_modified.")
                    ] = False,
    endpoint: EndpointOpt = None, access_key: AccessOpt = None, secret_key: SecretOpt = None,
    s3: ProfileOpt = None,
) -> None:
    """List objects under a prefix (recursively, S3 prefix matching) as s3:// URLs, or the buckets."""
    from kaapcli.core.s3 import parse_url

    bucket, prefix = parse_url(target)
    store = _store(ctx, endpoint, access_key, secret_key, s3)
    sink = Sink(Format.jsonl)
    if not bucket:
        for name in store.buckets():
            sink.write_line(f"s3://{name}")
        return
    for obj in store.objects(bucket, prefix):
        url = f"s3://{bucket}/{obj.object_name}"
        if long:
            sink.record({"key": obj.object_name, "url": url, "size": obj.size, "etag": (obj.etag or "").strip('"'),
                         "last_modified": obj.last_modified.isoformat() if obj.last_modified else None})
        else:
            sink.write_line(url)


@s3_app.command("rm")
def rm(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="s3://bucket/key (or a prefix with --recursive)",
                                          show_default=False)],
    recursive: Annotated[bool, typer.Option("--recursive", "-R", help="Remove every object under the prefix.")
                         ] = False,
    endpoint: EndpointOpt = None, access_key: AccessOpt = None, secret_key: SecretOpt = None,
    s3: ProfileOpt = None, quiet: QuietOpt = False,
) -> None:
    """Remove an object, or with --recursive every object under a prefix; prints the removed URLs."""
    from kaapcli.core.s3 import parse_url

    bucket, prefix = parse_url(target)
    store = _store(ctx, endpoint, access_key, secret_key, s3)
    keys = store.remove(bucket, prefix, recursive=recursive)
    sink = Sink(Format.paths)
    for key in keys:
        sink.write_line(f"s3://{bucket}/{key}")
    with Reporter("rm", quiet) as reporter:
        reporter.info(f"{len(keys)} objects removed")


def register(app: typer.Typer) -> None:
    app.add_typer(s3_app, name="s3")
