"""The `appliance` command: serve, keys, export, models.

Heavy imports (the server stack, and torch/optimum for export) happen inside the commands.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from appliance.config import ConfigError, Settings, load_settings
from appliance.jobs.cli import batch_app

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
keys_app = typer.Typer(
    no_args_is_help=True, help="Manage API keys (stored hashed in the keys file)."
)
models_app = typer.Typer(no_args_is_help=True, help="Inspect exported models.")
app.add_typer(keys_app, name="keys")
app.add_typer(models_app, name="models")
app.add_typer(batch_app, name="batch")
cluster_app = typer.Typer(no_args_is_help=True, help="Cluster mode (PostgreSQL + Redis).")
app.add_typer(cluster_app, name="cluster")

# Commands that write state (keys, usage log, response cache, jobs, saved classifiers) make
# it readable by the owner only: it holds key hashes and users' inputs. Exports and bundles
# keep the caller's umask, since a models folder may be shared read-only with other users.
STATE_COMMANDS = {"serve", "keys", "batch"}


@app.callback()
def _private_state(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand in STATE_COMMANDS:
        os.umask(0o077)


ConfigOpt = Annotated[
    Optional[Path],  # noqa: UP045 - typer needs Optional on 3.10
    typer.Option("--config", "-c", help="config.toml to read (default: ./config.toml if present)."),
]


def settings_or_exit(config: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(
            config, overrides={k: v for k, v in overrides.items() if v is not None}
        )
    except ConfigError as exc:
        typer.secho(f"config error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None


@app.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[Optional[str], typer.Option(help="Address to bind.")] = None,  # noqa: UP045
    port: Annotated[Optional[int], typer.Option(help="Port to bind.")] = None,  # noqa: UP045
    workers: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="Processes serving the port, each with its share of the cores."),
    ] = None,
) -> None:
    """Serve every model in the models directory over HTTP."""
    flags = {"host": host, "port": port, "workers": workers}
    server_flags = {k: v for k, v in flags.items() if v is not None}
    settings = settings_or_exit(config, server=server_flags or None)
    from appliance.logs import configure_logging

    configure_logging(settings.server.log_level, settings.server.log_format)
    if settings.server.workers > 1:
        # The supervisor never imports the server stack: the workers do, each its own.
        from appliance.workers.supervisor import Supervisor

        raise typer.Exit(Supervisor(settings).run())
    from appliance.server import run

    run(settings)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="A name to recognise the key by.")],
    scopes: Annotated[str, typer.Option(help="Comma-separated: predict, jobs, admin.")] = "predict",
    models: Annotated[str, typer.Option(help="Comma-separated model slugs, or *.")] = "*",
    config: ConfigOpt = None,
) -> None:
    """Create a key. The secret is printed once, alone on the last line."""
    from appliance.backends import key_store
    from appliance.gateway.keys import KeyStoreError

    settings = settings_or_exit(config)
    try:
        with key_store(settings) as store:
            key, secret = store.create(
                name,
                [s.strip() for s in scopes.split(",") if s.strip()],
                models=[m.strip() for m in models.split(",") if m.strip()],
            )
    except KeyStoreError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(
        f"created key {key.id} ({key.name}, scopes: {','.join(key.scopes)}); "
        "the secret is shown only now:"
    )
    typer.echo(secret)


@keys_app.command("list")
def keys_list(config: ConfigOpt = None) -> None:
    """List keys (never their secrets)."""
    from appliance.backends import key_store

    settings = settings_or_exit(config)
    with key_store(settings) as store:
        for key in store.list():
            typer.echo(json.dumps(key.public()))


@keys_app.command("revoke")
def keys_revoke(key_id: str, config: ConfigOpt = None) -> None:
    """Revoke a key by id; a running server refuses it within a second."""
    from appliance.backends import key_store
    from appliance.gateway.keys import KeyStoreError

    settings = settings_or_exit(config)
    try:
        with key_store(settings) as store:
            store.revoke(key_id)
    except KeyStoreError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"revoked {key_id}")


@keys_app.command("set-limits")
def keys_set_limits(
    key_id: str,
    rpm: Annotated[
        int | None, typer.Option("--requests-per-minute", help="Requests per minute.")
    ] = None,  # noqa: UP045
    tpm: Annotated[
        int | None, typer.Option("--tokens-per-minute", help="Tokens per minute.")
    ] = None,  # noqa: UP045
    quota: Annotated[
        int | None, typer.Option("--token-quota", help="Total tokens (balance).")
    ] = None,  # noqa: UP045
    config: ConfigOpt = None,
) -> None:
    """Change a key's rate limits or token quota; a running server applies them at once."""
    from appliance.backends import key_store
    from appliance.gateway.keys import KeyStoreError

    fields = {
        name: value
        for name, value in (
            ("requests_per_minute", rpm),
            ("tokens_per_minute", tpm),
            ("token_quota", quota),
        )
        if value is not None
    }
    if not fields:
        typer.secho(
            "nothing to change: give --requests-per-minute, --tokens-per-minute or --token-quota",
            err=True,
        )
        raise typer.Exit(2)
    settings = settings_or_exit(config)
    try:
        with key_store(settings) as store:
            key = store.update(key_id, **fields)
    except KeyStoreError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(key.public()))


@models_app.command("list")
def models_list(config: ConfigOpt = None) -> None:
    """Exported models found in the models directory."""
    from appliance.models.manifest import ManifestError, read_manifest

    settings = settings_or_exit(config)
    root = settings.models_path
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        try:
            m = read_manifest(folder)
            typer.echo(f"{m.slug:32} {m.task:24} {m.size_bytes / 1e6:8.1f} MB")
        except ManifestError as exc:
            typer.echo(f"{folder.name:32} BROKEN: {exc}")


@models_app.command("verify")
def models_verify(config: ConfigOpt = None) -> None:
    """Check every model's files against the sha256 in its manifest."""
    from appliance.models.manifest import ManifestError, read_manifest, verify

    settings = settings_or_exit(config)
    root = settings.models_path
    bad = 0
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        try:
            verify(folder, read_manifest(folder))
            typer.echo(f"ok     {folder.name}")
        except ManifestError as exc:
            bad += 1
            typer.echo(f"FAILED {folder.name}: {exc}")
    raise typer.Exit(1 if bad else 0)


@app.command()
def export(
    source: Annotated[Path, typer.Argument(help="A local Hugging Face checkpoint folder.")],
    task: Annotated[
        str,
        typer.Option(
            help="feature-extraction, text-classification, zero-shot-classification, "
            "question-answering, text-generation, summarisation, zero-shot-image-classification, "
            "image-classification, text-ranking or custom."
        ),
    ],
    name: Annotated[Optional[str], typer.Option(help="Slug of the exported model.")] = None,  # noqa: UP045
    out: Annotated[Optional[Path], typer.Option(help="Models directory to write into.")] = None,  # noqa: UP045
    preset: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            help="Quantisation preset: avx512_vnni, avx512, avx2, arm64 (default: this CPU's)."
        ),
    ] = None,
    min_cosine: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="Refuse below this INT8-vs-PyTorch cosine (default: the task's own)."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Write the model even if validation fails.")] = False,
    gguf_file: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="text-generation: a GGUF file inside SOURCE to dequantise and export."),
    ] = None,
    precision: Annotated[
        str, typer.Option(help="int8 (CPU serving, default) or fp16 (GPU serving with CUDA).")
    ] = "int8",
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Check the checkpoint and show the plan; write nothing."),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="On failure, print the full traceback.")
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", help="Show torch/transformers warnings (hidden by default)."),
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Export a checkpoint to INT8 ONNX, validate it against PyTorch, write it with a manifest."""
    settings = settings_or_exit(config)
    try:
        from exporters.export import ExportError, export_model, plan_export
    except ImportError as exc:
        typer.secho(
            f"the exporter needs the export extra (pip install '.[export]'): {exc}",
            fg="red",
            err=True,
        )
        raise typer.Exit(2) from None
    if dry_run:
        try:
            plan = plan_export(source, task, preset)
        except ExportError as exc:
            typer.secho(f"export would fail: {exc}", fg="red", err=True)
            raise typer.Exit(1) from None
        for key, value in plan.items():
            typer.echo(f"{key:16} {value}")
        typer.echo(f"would write {(out or settings.models_path) / (name or source.name)}")
        return
    if not verbose:
        _quiet_third_party()
    try:
        manifest = export_model(
            source,
            task,
            slug=name,
            out_dir=out or settings.models_path,
            preset=preset,
            min_cosine=min_cosine,
            force=force,
            precision=precision,
            options={"gguf_file": gguf_file} if gguf_file else {},
        )
    except ExportError as exc:
        typer.secho(f"export failed: {exc}", fg="red", err=True)
        raise typer.Exit(1) from None
    except Exception as exc:  # transformers/torch/onnx raise anything for a bad checkpoint
        if debug:
            import traceback

            traceback.print_exc()
        cause = (str(exc).strip().splitlines() or [""])[0]
        typer.secho(
            f"export failed: {type(exc).__name__}: {cause} — check that {source} is a complete "
            f"Hugging Face checkpoint for {task}"
            + ("" if debug else " (--debug shows the traceback)"),
            fg="red",
            err=True,
        )
        raise typer.Exit(1) from None
    typer.echo(f"wrote {(out or settings.models_path) / manifest.slug}")


def _quiet_third_party() -> None:
    """Hide the export's third-party chatter (tracer warnings, legacy-tokenizer and
    tied-weight notices): they are not the user's to act on; --verbose shows them."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    for name in ("transformers", "torch", "onnxruntime", "onnx", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass


@app.command()
def bundle(
    out: Annotated[Path, typer.Argument(help="The bundle to write (.tar or .tar.gz).")],
    platform: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Target platform tag for the wheels, e.g. manylinux2014_aarch64."),
    ] = None,
    python_version: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Target Python version for the wheels, e.g. 3.11."),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Pack wheels, models, config and an offline install script for an air-gapped site."""
    from appliance.bundle import BundleError, make_bundle

    settings = settings_or_exit(config)
    try:
        make_bundle(
            out,
            models_dir=settings.models_path,
            source=Path(__file__).resolve().parent.parent,
            platform=platform,
            python_version=python_version,
            log=typer.echo,
        )
    except BundleError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from None


@app.command("export-defaults")
def export_defaults(
    out: Annotated[Optional[Path], typer.Option(help="Models directory to write into.")] = None,  # noqa: UP045
    config: ConfigOpt = None,
) -> None:
    """Export the default models (from their PyPI packages) that are not exported yet."""
    settings = settings_or_exit(config)
    from exporters.defaults import export_missing_defaults

    export_missing_defaults(out or settings.models_path)


@app.command()
def bench(
    systems: Annotated[
        str,
        typer.Option(
            help="Comma-separated subset of: appliance, torch, infinity, engine, batch-run, "
            "cluster (PostgreSQL + Redis against a single box)."
        ),
    ] = "appliance,torch,infinity,engine,cluster",
    quick: Annotated[bool, typer.Option(help="A short run: fewer points, 3 s each.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Results folder.")] = None,  # noqa: UP045
    models_dir: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Use models already exported there (default: export the default)."),
    ] = None,
    model: Annotated[str, typer.Option(help="Slug of the embedding model.")] = "all-minilm-l6-v2",
    loadgen: Annotated[str, typer.Option(help="auto (wrk if it can be had), wrk or httpx.")] = (
        "auto"
    ),
    duration: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="Seconds per point (default 8, --quick 3)."),
    ] = None,
    concurrency: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Comma-separated levels (default 1,8,32,128; --quick 1,32)."),
    ] = None,
    sizes: Annotated[
        Optional[bool],  # noqa: UP045
        typer.Option(help="Measure a fresh serving venv (default: yes, not under --quick)."),
    ] = None,
) -> None:
    """Benchmark the appliance against PyTorch fp32, infinity-emb and the raw INT8 engine."""
    from benchmarks.cli import bench_command

    bench_command(
        systems=systems,
        quick=quick,
        out=out,
        models_dir=models_dir,
        model=model,
        loadgen=loadgen,
        duration=duration,
        concurrency=concurrency,
        sizes=sizes,
    )


if __name__ == "__main__":  # python -m appliance.cli
    app(sys.argv[1:], prog_name="appliance")


@cluster_app.command("import")
def cluster_import(
    data_dir: Annotated[Path, typer.Argument(help="A single box's data_dir.")],
    config: ConfigOpt = None,
) -> None:
    """Copy a single box's keys, classifiers, usage and spend into cluster.database_url."""
    settings = settings_or_exit(config)
    if not settings.cluster.database_url:
        typer.secho("set cluster.database_url (APPLIANCE_CLUSTER__DATABASE_URL)", err=True)
        raise typer.Exit(2)
    if not data_dir.is_dir():
        typer.secho(f"{data_dir} is not a folder", err=True)
        raise typer.Exit(2)
    from appliance.cluster.importer import AlreadyImported, import_data_dir
    from appliance.cluster.setup import open_database

    db = open_database(settings)
    try:
        done = import_data_dir(db, data_dir, settings.auth.keys_file)
    except AlreadyImported as exc:
        typer.secho(str(exc), err=True)
        raise typer.Exit(1) from None
    finally:
        db.close()
    typer.echo(json.dumps(done.__dict__))
