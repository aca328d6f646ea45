"""The ``cxr-triage`` command line. Thin: each command builds Settings and calls one entry point."""

import logging
import shutil
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.text import Text

from cxr_triage.cli_train import register_commands
from cxr_triage.config import Settings
from cxr_triage.errors import CxrError

app = typer.Typer(help="Chest X-ray triage service.", no_args_is_help=True, add_completion=False)
register_commands(app)
console = Console(stderr=True, soft_wrap=True)


def _settings(**overrides: object) -> Settings:
    return Settings.model_validate({k: v for k, v in overrides.items() if v is not None})


def _fail(exc: CxrError) -> None:
    console.print(Text.assemble(("error", "bold red"), f" ({exc.code}): {exc.message}"))
    raise typer.Exit(2)


def _logging(level: str, json_lines: bool = False) -> None:
    if json_lines:
        from cxr_triage.observability.logging import configure

        configure(level)
    else:
        log_format = "%(levelname)s %(name)s: %(message)s"
        logging.basicConfig(level=level.upper(), format=log_format, stream=sys.stderr)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="bind address (CXR_HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="port (CXR_PORT)")] = None,
    model_repo: Annotated[Path | None, typer.Option(help="model repository (CXR_MODEL_REPO)")] = None,
    build_default: Annotated[
        bool, typer.Option(help="export the default model first when it has no version (needs extra [train])")
    ] = False,
) -> None:
    """Start the service (LitServe, dynamic batching) on 127.0.0.1:8000 by default."""
    settings = _settings(host=host, port=port, model_repo=model_repo)
    _logging(settings.log_level, json_lines=True)
    metrics_dir = settings.prepare_process_environment()  # before any metric is created
    from cxr_triage.serving.app import build_service

    try:
        try:
            if build_default:
                _ensure_default_engine(settings)
            service = build_service(settings)
        except CxrError as exc:
            _fail(exc)
            return
        service.run()
    finally:
        if settings.metrics_dir is None:  # a temporary folder of this run: nothing reads it later
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _ensure_default_engine(settings: Settings) -> None:
    from cxr_triage.repository import ModelRepository

    repo = ModelRepository.load(settings.model_repo, settings.default_model, check_engines=False)
    entry = repo.get(None)
    if entry.versions:
        return
    console.print(f"{entry.name} has no version yet: exporting an untrained one (no weights are downloaded)")
    export(entry.name, model_repo=settings.model_repo)


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="model name, a folder of model_repo/")],
    weights: Annotated[
        Path | None, typer.Option(help="PyTorch state dict to export; none = untrained")
    ] = None,
    weights_kind: Annotated[
        str | None, typer.Option(help="provenance to record: trained | imported (default with --weights)")
    ] = None,
    data: Annotated[str | None, typer.Option(help="what the weights were trained on")] = None,
    model_repo: Annotated[Path | None, typer.Option(help="model repository (CXR_MODEL_REPO)")] = None,
    tolerance: Annotated[float, typer.Option(help="max |ONNX - PyTorch| accepted")] = 1e-4,
    quantize: Annotated[
        str | None, typer.Option(help="int8: a static-quantized copy of --from-version (CPU engines)")
    ] = None,
    from_version: Annotated[str | None, typer.Option(help="version to quantize (default: served)")] = None,
    calibration: Annotated[
        Path | None, typer.Option(help="images to calibrate int8 on (training data)")
    ] = None,
    holdout: Annotated[Path | None, typer.Option(help="held-out set for the int8 AUROC change")] = None,
) -> None:
    """Export MODEL to ONNX with timm, check it against PyTorch, register a new version."""
    settings = _settings(model_repo=model_repo)
    _logging("warning")
    if quantize is not None:
        _export_int8(settings.model_repo, model, quantize, from_version, calibration, holdout)
        return
    try:
        from cxr_triage.train.export import export_model
    except ImportError as exc:
        console.print(f"[red]export needs the train extra[/]: pip install 'cxr-triage[train]' ({exc})")
        raise typer.Exit(2) from exc
    if weights_kind not in (None, "trained", "imported"):
        console.print("--weights-kind must be trained or imported")
        raise typer.Exit(2)
    kind: Literal["trained", "imported"] | None = weights_kind  # type: ignore[assignment]
    try:
        with console.status(f"exporting {model} to ONNX and checking it against PyTorch…"):
            result = export_model(settings.model_repo, model, weights, kind, data, tolerance)
    except CxrError as exc:
        _fail(exc)
        return
    console.print(
        f"{model} version {result.version} ({result.weights}) at {result.path}; "
        f"max |ONNX - PyTorch| = {result.max_abs_diff:.2e} (tolerance {tolerance:.0e})"
    )
    if result.weights == "untrained":
        console.print("[bold yellow]untrained[/]: responses will say so; scores are meaningless")


def _export_int8(
    repo: Path, model: str, kind: str, version: str | None, calibration: Path | None, holdout: Path | None
) -> None:
    if kind != "int8" or calibration is None or holdout is None:
        console.print("--quantize int8 needs --calibration DIR (training images) and --holdout DIR")
        raise typer.Exit(2)
    from cxr_triage.train.datasets import load_dataset
    from cxr_triage.train.quantize import quantize_version
    from cxr_triage.train.scoring import default_split

    try:
        calib = load_dataset(calibration, default_split(calibration, "train"))
        held = load_dataset(holdout, default_split(holdout, "test"))
        with console.status(f"quantizing {model} to int8, then timing and scoring it against fp32…"):
            result = quantize_version(repo, model, version, calib, held)
    except CxrError as exc:
        _fail(exc)
        return
    s, a = result.speed, result.mean_auroc
    console.print(f"{model} version {result.version} (int8), img/s int8 vs fp32:")
    for batch in (1, 8):
        console.print(f"  batch {batch}: {s[f'int8_b{batch}']:.1f} vs {s[f'fp32_b{batch}']:.1f}")
    console.print(f"  mean AUROC int8 {a['int8']} vs fp32 {a['fp32']}; promoted only if faster and not worse")


@app.command("check-repo")
def check_repo(
    model_repo: Annotated[Path | None, typer.Option(help="model repository (CXR_MODEL_REPO)")] = None,
) -> None:
    """Validate model_repo/ as the server does at start-up; exit 2 with what to fix."""
    settings = _settings(model_repo=model_repo)
    from cxr_triage.repository import ModelRepository

    try:
        repo = ModelRepository.load(settings.model_repo, settings.default_model)
    except CxrError as exc:
        _fail(exc)
        return
    for entry in repo.models.values():
        served, canary = entry.served, entry.canary
        state = f"serves version {served.version} ({served.metadata.weights})" if served else "no version"
        if served is not None and served.metadata.data:
            state += f", data: {served.metadata.data}"
        if canary is not None and entry.serving is not None and entry.serving.canary is not None:
            state += f"; canary version {canary.version} at {entry.serving.canary.fraction:.0%}"
        if entry.latest is not None and served is not None and entry.latest.version != served.version:
            state += f"; latest registered: {entry.latest.version}"
        console.print(f"{entry.name}: {state}{'  (default)' if entry.name == repo.default_model else ''}")


feedback = typer.Typer(help="Radiologists' final labels.", no_args_is_help=True)
app.add_typer(feedback, name="feedback")


@feedback.command("export")
def feedback_export(
    out: Annotated[
        Path, typer.Option(help="folder for Data_Entry_2017.csv, feedback_labels.csv, reports.jsonl")
    ],
    model_repo: Annotated[Path | None, typer.Option(help="model repository (CXR_MODEL_REPO)")] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="whose labels are the columns (default: the default model); a zero-shot "
            "model adds a column per finding added to it at run time"
        ),
    ] = None,
) -> None:
    """Export stored reports (from CXR_REDIS_URL, or the embedded Redis under CXR_DATA_DIR)."""
    settings = _settings(model_repo=model_repo)
    from cxr_triage.feedback.export import export_feedback
    from cxr_triage.queue import JobQueue, connect
    from cxr_triage.queue.studies import StudyStore
    from cxr_triage.repository import ModelRepository

    try:
        repo = ModelRepository.load(settings.model_repo, settings.default_model, check_engines=False)
        handle = connect(settings)
    except CxrError as exc:
        _fail(exc)
        return
    from cxr_triage.queue.findings import FindingStore

    try:
        entry = repo.get(model)
    except CxrError as exc:
        _fail(exc)
        return
    client = handle.client()
    added = [f.label for v in entry.versions for f in FindingStore(client).list(entry.name, v)]
    labels = list(dict.fromkeys([*entry.config.labels, *added]))
    store = StudyStore(client, lambda name: repo.get(name).config.critical_findings)
    rows = export_feedback(store, labels, out, JobQueue(client, settings.max_wait_s))
    console.print(f"{rows} image rows from reported studies written to {out}")


pacs = typer.Typer(help="PACS integration (DICOMweb).", no_args_is_help=True)
app.add_typer(pacs, name="pacs")


@pacs.command("pull")
def pacs_pull(
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID to fetch from CXR_PACS_URL")],
    server: Annotated[str, typer.Option(help="the running cxr-triage")] = "http://127.0.0.1:8000",
) -> None:
    """Ask the running service to fetch a study from its PACS (WADO-RS) and score it."""
    import httpx

    response = httpx.post(f"{server}/v1/pacs/pull", json={"study_uid": study_uid}, timeout=300)
    if response.status_code != 202:
        console.print(Text(f"pull failed ({response.status_code}): {response.text}", style="red"))
        raise typer.Exit(2)
    body = response.json()
    for instance in body["instances"]:
        queued = "already queued" if instance.get("duplicate") else "queued"
        state = instance.get("error", {}).get("message") or queued
        console.print(f"{instance['instance_uid']}: {state}")
    console.print(f"status: {server}{body['status_url']}")


@app.command()
def backlog(
    folder: Annotated[
        Path | None, typer.Argument(help="folder of DICOM files (recursive); or use --qido")
    ] = None,
    qido: Annotated[
        str | None, typer.Option(help="DICOMweb root to search (QIDO-RS) and retrieve from (WADO-RS)")
    ] = None,
    modality: Annotated[
        str, typer.Option(help="modalities to score, comma-separated; 'any' for all")
    ] = "CR,DX",
    study_date: Annotated[
        str | None, typer.Option(help="QIDO StudyDate filter: YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
    ] = None,
    server: Annotated[str, typer.Option(help="the running cxr-triage (a replica or a load balancer)")] = (
        "http://127.0.0.1:8000"
    ),
    api_key: Annotated[
        str | None, typer.Option(envvar="CXR_API_KEY", show_default=False, help="sent as X-API-Key")
    ] = None,
    max_in_flight: Annotated[
        int,
        typer.Option(
            min=1,
            help="at most this many of its jobs unfinished at a time (see bench_backlog.py)",
        ),
    ] = 2,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="progress file to resume from (default: ./.cxr-backlog-HASH.jsonl, HASH of the source)"
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="send at most N items in this run")] = None,
    retry_failed: Annotated[
        bool, typer.Option(help="send items that failed in an earlier run again")
    ] = False,
    model: Annotated[str | None, typer.Option(help="model name (default: the service's default)")] = None,
    pacs_username: Annotated[
        str | None, typer.Option(envvar="CXR_PACS_USERNAME", help="basic auth for --qido")
    ] = None,
    pacs_password: Annotated[
        str | None, typer.Option(envvar="CXR_PACS_PASSWORD", show_default=False, help="basic auth for --qido")
    ] = None,
) -> None:
    """Score an archive (a DICOM folder or a QIDO-RS query) at backfill priority through a running
    service, resumably; live traffic keeps priority. Exit 0 all scored, 1 some failed, 2 usage."""
    from cxr_triage.backlog import Options, run_command

    options = Options(server, api_key, max_in_flight, limit, retry_failed, model)
    auth = (pacs_username, pacs_password or "") if pacs_username else None
    code = run_command(console, folder, qido, modality, study_date, checkpoint, options, auth)
    raise typer.Exit(code)
