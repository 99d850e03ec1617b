"""`appliance batch`: async batch jobs of a running server, over its HTTP API.

    appliance batch submit FILE --endpoint /v1/classify [--model M] [--classifier C] [--wait]
    appliance batch status ID
    appliance batch results ID > out.ndjson
    appliance batch list | start ID | delete ID
    appliance batch run FILE --endpoint /v1/classify --out RESULTS [--ray auto]   (no server)

The server is --url (default: APPLIANCE_URL, else the host and port of the config); the key is
--key (default: APPLIANCE_KEY, else data_dir/admin.key of the config). Messages go to stderr;
stdout carries only the job id (submit), JSON (status, list) or the results.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer

from appliance.config import ConfigError, load_settings

if TYPE_CHECKING:
    import httpx

batch_app = typer.Typer(
    no_args_is_help=True, help="Async batch jobs: upload NDJSON, run it, fetch the results."
)

UPLOAD_BLOCK = 1 << 20
FINISHED = ("completed", "failed", "cancelled")

UrlOpt = Annotated[
    Optional[str],  # noqa: UP045 - typer needs Optional on 3.10
    typer.Option(
        "--url", envvar="APPLIANCE_URL", help="The server (default: from the config's host/port)."
    ),
]
KeyOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option(
        "--key", envvar="APPLIANCE_KEY", help="API key (default: data_dir/admin.key of the config)."
    ),
]
ConfigOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option("--config", "-c", help="config.toml to read (default: ./config.toml if present)."),
]


def fail(message: str) -> NoReturn:
    typer.secho(message, fg="red", err=True)
    raise typer.Exit(1)


class Server:
    """The server's batch API, as one key sees it."""

    def __init__(self, url: str | None, key: str | None, config: Path | None) -> None:
        import httpx

        settings = None
        if url is None or key is None:
            try:
                settings = load_settings(config)
            except ConfigError as exc:
                typer.secho(f"config error: {exc}", fg="red", err=True)
                raise typer.Exit(2) from None
        if url is None:
            assert settings is not None
            host = settings.server.host
            host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
            url = f"http://{host}:{settings.server.port}"
        if key is None:
            assert settings is not None
            path = settings.data_path / "admin.key"
            try:
                key = path.read_text().strip()
            except OSError:
                fail(f"no API key: give --key, set APPLIANCE_KEY, or create {path}")
        self.client = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(60.0, write=None),  # an upload may wait on a slow disk
        )

    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        import httpx

        try:
            r = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            fail(f"{self.client.base_url}: {exc}")
        return self.checked(r)

    @staticmethod
    def checked(r: httpx.Response) -> dict[str, Any]:
        try:
            body = r.json()
        except ValueError:
            body = {"message": r.text}
        if r.status_code >= 400:
            fail(f"HTTP {r.status_code}: {body.get('message', body)}")
        return body  # type: ignore[no-any-return]


def _blocks(path: Path, bar: Any) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while block := fh.read(UPLOAD_BLOCK):
            bar.update(len(block))
            yield block


def _wait(server: Server, job: dict[str, Any]) -> dict[str, Any]:
    with typer.progressbar(
        length=job["total"], label=f"job {job['id']}", file=sys.stderr, show_pos=True
    ) as bar:
        shown = 0
        while job["status"] not in FINISHED:
            time.sleep(0.5)
            job = server.call("GET", f"/v1/batch/{job['id']}")
            bar.update(job["done"] - shown)
            shown = job["done"]
    return job


@batch_app.command()
def submit(
    file: Annotated[
        Path, typer.Argument(help="NDJSON: one request body of the endpoint per line.")
    ],
    endpoint: Annotated[
        str, typer.Option(help="The endpoint each line is for, e.g. /v1/classify.")
    ],
    model: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Default model for lines that name none."),
    ] = None,
    classifier: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Default saved classifier (classify and tag endpoints)."),
    ] = None,
    start: Annotated[bool, typer.Option(help="Start the job once uploaded.")] = True,
    wait: Annotated[bool, typer.Option(help="Wait for the job, with a progress bar.")] = False,
    url: UrlOpt = None,
    key: KeyOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Upload FILE as a job and start it; prints the job id alone on the last line.

    The file is streamed (any size up to the server's jobs.max_upload_bytes). --wait follows
    the job to its end with a progress bar and exits 1 if it fails."""
    import httpx

    if not file.is_file():
        fail(f"no such file: {file}")
    server = Server(url, key, config)
    size = file.stat().st_size
    params = {
        k: v
        for k, v in {"endpoint": endpoint, "model": model, "classifier": classifier}.items()
        if v
    }
    headers = {"Content-Type": "application/x-ndjson", "Content-Length": str(size)}
    with typer.progressbar(length=size, label="upload", file=sys.stderr) as bar:
        try:
            r = server.client.post(
                "/v1/batch", params=params, content=_blocks(file, bar), headers=headers
            )
        except httpx.HTTPError as exc:
            fail(f"upload failed: {exc}")
    job = server.checked(r)
    typer.echo(f"job {job['id']}: {job['total']} lines for {job['endpoint']}", err=True)
    if start:
        job = server.call("POST", f"/v1/batch/{job['id']}/start")
    if wait and start:
        job = _wait(server, job)
        typer.echo(
            f"job {job['id']} {job['status']}: {job['succeeded']} ok, {job['failed']} failed",
            err=True,
        )
    typer.echo(job["id"])
    if job["status"] in ("failed", "cancelled"):
        raise typer.Exit(1)


@batch_app.command()
def status(job_id: str, url: UrlOpt = None, key: KeyOpt = None, config: ConfigOpt = None) -> None:
    """The job's status, counts, progress and ETA, as JSON."""
    typer.echo(json.dumps(Server(url, key, config).call("GET", f"/v1/batch/{job_id}"), indent=2))


@batch_app.command("list")
def list_jobs(url: UrlOpt = None, key: KeyOpt = None, config: ConfigOpt = None) -> None:
    """The key's jobs (an admin key: every job), one JSON object per line."""
    for job in Server(url, key, config).call("GET", "/v1/batch")["data"]:
        typer.echo(json.dumps(job))


@batch_app.command("start")
def start_job(
    job_id: str, url: UrlOpt = None, key: KeyOpt = None, config: ConfigOpt = None
) -> None:
    """Start a created job, or resume a failed one."""
    job = Server(url, key, config).call("POST", f"/v1/batch/{job_id}/start")
    typer.echo(json.dumps(job))


@batch_app.command("delete")
def delete_job(
    job_id: str, url: UrlOpt = None, key: KeyOpt = None, config: ConfigOpt = None
) -> None:
    """Cancel the job if it runs and delete its files."""
    typer.echo(json.dumps(Server(url, key, config).call("DELETE", f"/v1/batch/{job_id}")))


@batch_app.command()
def results(
    job_id: str,
    output: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--output", "-o", help="Write here instead of stdout."),
    ] = None,
    url: UrlOpt = None,
    key: KeyOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Stream the results: NDJSON, one line per input line, in order.

    While the job runs: the lines done so far."""
    import httpx

    server = Server(url, key, config)
    sink = open(output, "wb") if output else sys.stdout.buffer  # noqa: SIM115
    try:
        with server.client.stream("GET", f"/v1/batch/{job_id}/results") as r:
            if r.status_code >= 400:
                r.read()
                server.checked(r)
            for block in r.iter_bytes():
                sink.write(block)
    except httpx.HTTPError as exc:
        fail(f"download failed: {exc}")
    finally:
        sink.flush()
        if output:
            sink.close()


@batch_app.command("run")
def run_file(
    file: Annotated[
        Path, typer.Argument(help="NDJSON: one request body of the endpoint per line.")
    ],
    endpoint: Annotated[
        str, typer.Option(help="The endpoint each line is for, e.g. /v1/classify.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the result lines go.")],
    model: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Default model for lines that name none."),
    ] = None,
    classifier: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Default saved classifier (classify and tag endpoints)."),
    ] = None,
    ray: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--ray",
            help="Run on Ray Data: a cluster address, 'auto' (the running cluster) or 'local' "
            "(start one here). Needs the ray extra.",
        ),
    ] = None,
    actors: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=1, help="Ray: answering actors (default: the cluster's CPUs)."),
    ] = None,
    cpus_per_actor: Annotated[
        int, typer.Option(min=1, help="Ray: CPUs (and model sessions) per actor.")
    ] = 1,
    key: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--key",
            envvar="APPLIANCE_KEY",
            help="Run as this API key (its models) and charge its usage and quota.",
        ),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Answer FILE without a server, in this process or on Ray; the results are the batch
    jobs' result lines, in input order. A summary goes to stderr as JSON."""
    from appliance.backends import open_backends
    from appliance.gateway.usage import UsageLog
    from appliance.jobs.endpoints import JOB_ENDPOINTS
    from appliance.jobs.offline import RunSpec, run_in_process, run_on_ray

    try:
        settings = load_settings(config)
    except ConfigError as exc:
        fail(str(exc))
    if endpoint not in JOB_ENDPOINTS:
        fail(f"unknown endpoint {endpoint}; one of: {', '.join(sorted(JOB_ENDPOINTS))}")
    if not file.is_file():
        fail(f"no such file: {file}")
    spec = RunSpec(settings, endpoint, model, classifier)
    usage: UsageLog | None = None
    backends = None
    if key:
        # The server's own key store and usage log: the files, or PostgreSQL (and Redis for
        # the quota) in cluster mode, so the run is charged where the key's usage lives.
        backends = open_backends(settings)
        backends.start()
        found = backends.keys.authenticate(key)
        if found is None or not found.allows_scope("jobs"):
            backends.stop()
            fail("the key is unknown, revoked, expired, or lacks the jobs scope")
        spec = RunSpec(settings, endpoint, model, classifier, found)
        usage = backends.usage
        usage.start()
    partial = out.with_name(out.name + ".partial")
    try:
        with open(partial, "wb") as sink:
            if ray is None:
                summary = run_in_process(file, sink, spec, usage)
            else:
                try:
                    import ray as _  # noqa: F401
                except ImportError:
                    fail("--ray needs the ray extra: pip install 'appliance[ray]'")
                summary = run_on_ray(
                    file,
                    sink,
                    spec,
                    usage,
                    address=ray,
                    actors=actors,
                    cpus_per_actor=cpus_per_actor,
                )
        partial.replace(out)
    finally:
        if usage is not None:
            usage.stop()
        if backends is not None:
            backends.stop()
    rate = summary.lines / summary.seconds if summary.seconds else 0.0
    report = {
        "lines": summary.lines,
        "failed": summary.failed,
        "tokens": summary.tokens,
        "seconds": round(summary.seconds, 3),
        "lines_per_second": round(rate, 1),
        "stopped": summary.stopped,
    }
    typer.echo(json.dumps(report), err=True)
    if summary.stopped:
        raise typer.Exit(1)
