"""Trainer commands of ``cxr-triage`` (extra ``train``): data, train, register, evaluate, promote.

Each command imports torch (or the trainer) inside its body, so the serving install's CLI
starts without them and says which extra is missing when one is needed.
"""

import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from cxr_triage.config import Settings, TrainerSettings
from cxr_triage.errors import CxrError

console = Console(stderr=True, soft_wrap=True)
report_out = Console(soft_wrap=True, highlight=False)  # results a script may read: stdout
RepoOption = Annotated[Path | None, typer.Option(help="model repository (CXR_MODEL_REPO)")]
DataOption = Annotated[
    Path, typer.Option("--data", help="dataset folder (ChestX-ray14, CheXpert or feedback)")
]
SplitOption = Annotated[
    str | None,
    typer.Option(
        help="split: test | train_val (ChestX-ray14), valid | train (CheXpert); default the held-out one"
    ),
]


def _repo(model_repo: Path | None) -> Path:
    return Settings.model_validate({"model_repo": model_repo} if model_repo else {}).model_repo


def _run(what: Callable[[], Any]) -> Any:
    """Call the trainer; CxrError / missing data -> one red line and exit 2, never a traceback."""
    try:
        return what()
    except ImportError as exc:
        console.print(f"[red]this command needs the train extra[/]: pip install 'cxr-triage[train]' ({exc})")
        raise typer.Exit(2) from exc
    except (CxrError, FileNotFoundError, ValueError) as exc:
        code = exc.code if isinstance(exc, CxrError) else type(exc).__name__
        console.print(Text.assemble(("error", "bold red"), f" ({code}): {exc}"))
        raise typer.Exit(2) from exc


def _setup_logging() -> None:
    import logging
    import sys

    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):  # the exporter's pass-by-pass chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)


def register_commands(app: typer.Typer) -> None:
    """Add the trainer's commands to the main CLI."""
    for command in (synth_data, train, register, evaluate, promote, rollback, import_weights, retrain):
        app.command(command.__name__.replace("_", "-"))(command)
    from cxr_triage.cli_gzsl import app as gzsl_app  # light: its commands import the trainer

    app.add_typer(gzsl_app, name="gzsl")


def synth_data(
    out: Annotated[Path, typer.Argument(help="folder to write (ChestX-ray14 layout)")],
    patients: Annotated[int, typer.Option(help="number of phantom patients")] = 400,
    size: Annotated[int, typer.Option(help="image side in pixels")] = 256,
    seed: int = 0,
) -> None:
    """Write SYNTHETIC phantom radiographs in the ChestX-ray14 layout (tests, demos; not clinical)."""

    def go() -> Any:
        from cxr_triage.train.datasets import load_chestxray14
        from cxr_triage.train.synthetic import generate

        generate(out, patients=patients, size=size, seed=seed)
        return load_chestxray14(out)

    data = _run(go)
    console.print(
        f"[bold yellow]SYNTHETIC[/] phantoms (not clinical data): {len(data)} images of "
        f"{len(data.patients())} patients in {out}"
    )


def train(
    model: Annotated[str, typer.Argument(help="model_repo model to train")],
    data: Annotated[list[Path], typer.Option("--data", help="dataset folder; repeat to combine")],
    epochs: Annotated[int | None, typer.Option(help="exactly this many epochs")] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    accumulate: Annotated[int | None, typer.Option(help="micro-batches per optimizer step")] = None,
    lr: Annotated[float | None, typer.Option(help="peak learning rate")] = None,
    precision: Annotated[str | None, typer.Option(help="auto | fp32 | bf16 | fp16")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    val_fraction: Annotated[float | None, typer.Option(help="patients held out for validation")] = None,
    uncertainty: Annotated[str | None, typer.Option(help="CheXpert uncertain: ones | zeros | ignore")] = None,
    augment: Annotated[bool | None, typer.Option(help="random affine + intensity jitter")] = None,
    lora_rank: Annotated[
        int | None, typer.Option(help="LoRA adapters of this rank; 0 trains every weight")
    ] = None,
    grad_checkpointing: Annotated[
        bool | None, typer.Option(help="recompute activations in backward (less memory)")
    ] = None,
    init: Annotated[Path | None, typer.Option(help="weights to start from")] = None,
    init_kind: Annotated[str | None, typer.Option(help="torch | torchxrayvision | gzsl")] = None,
    config: Annotated[Path | None, typer.Option(help="a run's config.yaml to start from")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="run folder (default runs/<model>-<time>)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --run-dir after its last epoch")] = False,
    register_version: Annotated[
        bool, typer.Option("--register", help="register the best epoch as a new model_repo version")
    ] = False,
    progress: Annotated[bool, typer.Option(help="progress bar")] = True,
    nproc_per_node: Annotated[
        int, typer.Option(help="processes per machine: >1 runs DDP under torchrun (one per GPU, or CPU/gloo)")
    ] = 1,
    nnodes: Annotated[int, typer.Option(help="machines taking part (each runs this same command)")] = 1,
    node_rank: Annotated[int | None, typer.Option(help="this machine's rank (static rendezvous)")] = None,
    rdzv_endpoint: Annotated[
        str | None, typer.Option(help="host:port of the rendezvous, the same on every machine")
    ] = None,
    model_repo: RepoOption = None,
) -> None:
    """Train MODEL (DenseNet-121, ViT-B/16… as its config.yaml says) on labelled radiographs."""
    _setup_logging()
    repo = _repo(model_repo)
    launch = TrainerSettings()
    if (nproc_per_node > 1 or nnodes > 1) and not launch.under_torchrun:
        where = run_dir or Path("runs") / f"{model}-{datetime.now():%Y%m%d-%H%M%S}"
        raise typer.Exit(_torchrun(nproc_per_node, nnodes, node_rank, rdzv_endpoint, where))
    overrides = {
        "epochs": epochs,
        "batch_size": batch_size,
        "accumulate": accumulate,
        "lr": lr,
        "precision": precision,
        "seed": seed,
        "val_fraction": val_fraction,
        "uncertainty": uncertainty,
        "augment": augment,
        "lora_rank": lora_rank,
        "grad_checkpointing": grad_checkpointing,
        "init": str(init) if init else None,
        "init_kind": init_kind,
    }

    def go() -> Any:
        import yaml

        from cxr_triage.train.config import TrainConfig
        from cxr_triage.train.export import read_config
        from cxr_triage.train.trainer import train as run_training

        base = yaml.safe_load(config.read_text()) if config else {}
        fields = base | {"model": model, "data": [str(d) for d in data]}
        fields |= {k: v for k, v in overrides.items() if v is not None}
        cfg = TrainConfig.model_validate(fields)
        where = run_dir or Path("runs") / f"{model}-{datetime.now():%Y%m%d-%H%M%S}"
        result = run_training(cfg, read_config(repo, model), where, resume=resume, progress=progress)
        exported = None
        if register_version and launch.rank == 0:
            from cxr_triage.train.registry import register_run

            exported = register_run(result.run_dir, repo)
        return result, exported

    result, exported = _run(go)
    if launch.rank != 0:
        return  # rank 0 reports
    auroc = result.best_val_mean_auroc
    console.print(
        f"{result.epochs_run} epochs in {result.run_dir}; best epoch {result.best_epoch}, "
        f"validation mean AUROC {'n/a' if auroc is None else f'{auroc:.3f}'}"
    )
    if exported is not None:
        console.print(f"registered {model} version {exported.version} (not served until promoted)")


def _torchrun(nproc: int, nnodes: int, node_rank: int | None, endpoint: str | None, run_dir: Path) -> int:
    """Run this same `train` command under torchrun (``torch.distributed.run``); return its exit code.

    The run folder is fixed here, so every rank writes to (and rank 0 owns) the same one.
    """
    if nnodes > 1 and not endpoint:
        console.print("[red]--nnodes > 1 needs --rdzv-endpoint host:port (the same on every machine)[/]")
        return 2
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--nnodes={nnodes}",
    ]
    if nnodes == 1 and not endpoint:
        launcher.append("--standalone")
    else:
        launcher += ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id=cxr-{run_dir.name}"]
        if node_rank is not None:
            launcher.append(f"--node-rank={node_rank}")
    skip = {"--nproc-per-node", "--nnodes", "--node-rank", "--rdzv-endpoint", "--run-dir"}
    args, argv = [], sys.argv[1:]
    i = 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        if name in skip:
            i += 1 if "=" in argv[i] else 2
            continue
        args.append(argv[i])
        i += 1
    command = [*launcher, "-m", "cxr_triage", *args, "--run-dir", str(run_dir)]
    console.print(f"torchrun: {nproc} process(es) x {nnodes} node(s), run folder {run_dir}")
    return subprocess.call(command)


def register(
    run: Annotated[Path, typer.Argument(help="a finished run folder")],
    model_repo: RepoOption = None,
) -> None:
    """Register a run's best epoch as a new version, with operating points from its validation split."""
    _setup_logging()

    def go() -> Any:
        from cxr_triage.train.registry import register_run

        return register_run(run, _repo(model_repo))

    result = _run(go)
    console.print(f"registered version {result.version} at {result.path} (not served until promoted)")


def evaluate(
    model: Annotated[str, typer.Argument(help="model_repo model")],
    data: DataOption,
    split: SplitOption = None,
    version: Annotated[str | None, typer.Option(help="version or `latest` (default: the served one)")] = None,
    out: Annotated[
        Path | None, typer.Option(help="report folder (default reports/<model>-v<version>)")
    ] = None,
    bootstrap: Annotated[int, typer.Option(help="bootstrap resamples for the 95% intervals")] = 1000,
    model_repo: RepoOption = None,
) -> None:
    """Evaluate a version's engine: AUROC [95% CI], sens/spec/PPV/NPV/F1, ROC and calibration plots."""

    def go() -> Any:
        from cxr_triage.train.datasets import load_dataset
        from cxr_triage.train.evaluate import OperatingPoint, evaluate, write_report
        from cxr_triage.train.scoring import default_split, describe, find_version, score_version

        repo = _repo(model_repo)
        config, entry = find_version(repo, model, version)
        split_ = split or default_split(data, "test")
        dataset = load_dataset(data, split=split_)
        scored = score_version(entry, config, dataset)
        report = evaluate(
            scored.targets,
            scored.mask,
            scored.scores,
            config.labels,
            entry.metadata.thresholds_for(config),
            bootstrap=bootstrap,
            dataset=describe(dataset, split_),
            model=f"{model} version {entry.version} ({entry.metadata.weights})",
        )
        points = {k: OperatingPoint.model_validate(v) for k, v in entry.metadata.operating_points.items()}
        folder = out or Path("reports") / f"{model}-v{entry.version}"
        files = write_report(report, folder, scored.targets, scored.mask, scored.scores, points or None)
        _track_evaluation(model, entry, report, files, split_)
        return report, folder

    report, folder = _run(go)
    report_out.print(report.summary(), markup=False)
    console.print(f"report: {folder}/report.md")


def _track_evaluation(model: str, entry: Any, report: Any, files: dict[str, Path], split: str | None) -> None:
    """The evaluation as an MLflow run, in the store the version was trained in when known."""
    from cxr_triage.train.tracking import Tracker

    record = getattr(entry.metadata, "mlflow", None) or {}
    tags = {"kind": "evaluate", "model": model, "model_repo_version": entry.version}
    name = f"evaluate-v{entry.version}"
    tracker = Tracker.start(f"cxr-triage/{model}", name, Path("runs"), tags, record.get("tracking_uri"))
    tracker.params(
        {"version": entry.version, "dataset": report.dataset, "split": split, "bootstrap": report.bootstrap}
    )
    per_label = {f"auroc/{k}": m.auroc for k, m in report.per_label.items()}
    tracker.metrics({"mean_auroc": report.mean_auroc, "brier": report.brier, "ece": report.ece} | per_label)
    tracker.artifacts(files.values(), "report")
    tracker.finish()


def promote(
    model: Annotated[str, typer.Argument(help="model_repo model")],
    version: Annotated[str, typer.Argument(help="candidate version (or `latest`)")],
    data: DataOption,
    split: SplitOption = None,
    canary: Annotated[
        float | None, typer.Option(help="serve the candidate to this fraction of jobs first (0-1)")
    ] = None,
    model_repo: RepoOption = None,
) -> None:
    """Promote VERSION through the gate: not worse than the served version on the same held-out set."""

    def go() -> Any:
        from cxr_triage.train.datasets import load_dataset
        from cxr_triage.train.promote import promote as run_promotion
        from cxr_triage.train.scoring import default_split

        split_ = split or default_split(data, "test")
        dataset = load_dataset(data, split=split_)
        return run_promotion(_repo(model_repo), model, version, dataset, split_, canary)

    gate = _run(go)
    report_out.print(gate.summary(), markup=False)
    where = f"as a canary for {canary:.0%} of jobs" if canary else "as the served version"
    console.print(
        f"{model} version {gate.candidate} promoted {where}; running servers pick it up on their next poll"
    )


def rollback(
    model: Annotated[str, typer.Argument(help="model_repo model")],
    version: Annotated[str, typer.Argument(help="version to serve again")],
    model_repo: RepoOption = None,
) -> None:
    """Serve an earlier version again now (no gate) and drop any canary."""

    def go() -> Any:
        from cxr_triage.train.promote import rollback as run_rollback

        return run_rollback(_repo(model_repo), model, version)

    _run(go)
    console.print(f"{model} version {version} serves again")


def import_weights(
    kind: Annotated[str, typer.Argument(help="torchxrayvision | gzsl")],
    weights: Annotated[Path, typer.Argument(help="the state dict / checkpoint file you already have")],
    model: Annotated[str, typer.Option(help="model_repo model to import into")],
    model_repo: RepoOption = None,
) -> None:
    """Import weights you already have (no download): a torchxrayvision DenseNet becomes a version;
    a CXR-ML-GZSL checkpoint's image encoder becomes an --init for `cxr-triage train`."""

    def go() -> Any:
        import tempfile

        import torch

        from cxr_triage.train.export import export_model, read_config
        from cxr_triage.train.importers import import_gzsl_checkpoint, import_torchxrayvision

        repo = _repo(model_repo)
        if kind == "gzsl":
            return import_gzsl_checkpoint(weights)
        if kind != "torchxrayvision":
            raise ValueError("kind must be torchxrayvision or gzsl")
        state, report = import_torchxrayvision(weights, read_config(repo, model))
        # The engine outputs plain sigmoids; torchxrayvision's own operating points (op_threshs)
        # are on that scale, so they become this version's thresholds.
        extra = {"thresholds": report.source_thresholds()} if report.source_thresholds() else {}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "imported.pt"
            torch.save(state, path)
            data = "torchxrayvision weights (imported)"
            return export_model(repo, model, path, "imported", data=data, extra=extra), report

    outcome = _run(go)
    if kind == "gzsl":
        console.print(
            f"CXR-ML-GZSL {outcome.architecture} checkpoint read (image encoder {outcome.feature_dim}-d, "
            f"projections {outcome.image_sizes}); it initialises training: cxr-triage train {model} "
            f"--data DIR --init {weights} --init-kind gzsl"
        )
        return
    result, report = outcome
    console.print(f"imported into {model} version {result.version} ({report}); not served until promoted")


def retrain(
    feedback: Annotated[Path, typer.Option(help="a `cxr-triage feedback export` folder")],
    base: Annotated[Path | None, typer.Option(help="a base dataset to train on as well")] = None,
    holdout: Annotated[
        Path | None, typer.Option(help="held-out set for the gate (default: --base's test split)")
    ] = None,
    model: Annotated[str | None, typer.Option(help="model (default: the default model)")] = None,
    epochs: Annotated[int, typer.Option(help="fine-tuning epochs")] = 3,
    lr: Annotated[float, typer.Option(help="fine-tuning learning rate")] = 1e-4,
    canary: Annotated[float | None, typer.Option(help="promote as a canary for this fraction")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="run folder")] = None,
    progress: Annotated[bool, typer.Option(help="progress bar")] = True,
    model_repo: RepoOption = None,
) -> None:
    """Fine-tune the served version on radiologists' labels, evaluate, register, promote through the gate."""
    _setup_logging()

    def go() -> Any:
        from cxr_triage.train.retrain import retrain as run_retrain

        return run_retrain(
            _repo(model_repo), feedback, base, holdout, model, epochs, lr, canary, run_dir, progress
        )

    outcome = _run(go)
    report_out.print(outcome.summary(), markup=False)
    if not outcome.promoted:
        raise typer.Exit(1)
