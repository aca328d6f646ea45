"""``cxr-triage gzsl …``: compositional phantoms, training, evaluation, registration.

Imported when the CLI starts, so nothing heavy at module level: torch, the trainer and the
text encoder are imported inside the commands (extra ``train``).
"""

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from cxr_triage.cli_train import RepoOption, _repo, _run, _setup_logging, console, report_out

app = typer.Typer(
    help="CXR-ML-GZSL zero-shot findings (Hayat et al. 2021): synth-data, train, evaluate, register.",
    no_args_is_help=True,
)
DEFAULT_MODEL = "gzsl-densenet121"


@app.command("synth-data")
def synth_data(
    out: Annotated[Path, typer.Argument(help="folder to write (train_val/, test/, gzsl_labels.json)")],
    patients: Annotated[int, typer.Option(help="phantom patients (one image each)")] = 1200,
    size: Annotated[int, typer.Option(help="image side in pixels")] = 64,
    prevalence: Annotated[float, typer.Option(help="probability of each finding per image")] = 0.12,
    seed: int = 0,
) -> None:
    """Write SYNTHETIC compositional phantoms: 16 '<side> <zone> <type>' findings, 4 of them unseen."""

    def go() -> Any:
        from cxr_triage.train.gzsl.synthetic import generate

        return generate(out, patients=patients, size=size, prevalence=prevalence, seed=seed)

    summary = _run(go)
    console.print(
        f"[bold yellow]SYNTHETIC[/] compositional phantoms (not clinical data): "
        f"{summary['train_val_images']} train/val and {summary['test_images']} test images in {out}"
    )


@app.command()
def train(
    data: Annotated[Path, typer.Option("--data", help="ChestX-ray14 folder, or `gzsl synth-data` output")],
    run_dir: Annotated[Path | None, typer.Option(help="run folder (default runs/gzsl-<time>)")] = None,
    config: Annotated[Path | None, typer.Option(help="a run's config.yaml to start from")] = None,
    epochs: Annotated[int | None, typer.Option(help="at most this many epochs (paper: 100)")] = None,
    batch_size: Annotated[int | None, typer.Option(help="paper: 16")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate (paper: 1e-4)")] = None,
    image_size: Annotated[int | None, typer.Option(help="model input side in pixels (224)")] = None,
    margin: Annotated[float | None, typer.Option(help="δ of the ranking loss (paper: 0.5)")] = None,
    gamma_align: Annotated[float | None, typer.Option(help="γ1 (paper: 0.1)")] = None,
    gamma_con: Annotated[float | None, typer.Option(help="γ2 (paper: 0.1)")] = None,
    align_warmup_epochs: Annotated[
        int | None, typer.Option(help="γ1 = 0 for the first N epochs (encoders trained from scratch)")
    ] = None,
    early_stop_patience: Annotated[
        int | None, typer.Option(help="stop after N epochs without progress")
    ] = None,
    text_encoder: Annotated[
        str | None, typer.Option(help="all-MiniLM-L6-v2 (default) or a local HF model folder (e.g. BioBERT)")
    ] = None,
    unseen: Annotated[
        list[str] | None,
        typer.Option("--unseen", help="an unseen label; repeat (default: the dataset's / paper's)"),
    ] = None,
    descriptions: Annotated[
        bool, typer.Option(help="embed '<name>: <description>' where the dataset describes a label")
    ] = False,
    augment: Annotated[bool | None, typer.Option(help="small affine + intensity jitter")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    progress: Annotated[bool, typer.Option(help="progress bar")] = True,
) -> None:
    """Train CXR-ML-GZSL on the seen findings (L_rank + γ1·L_align + γ2·L_con)."""
    _setup_logging()
    overrides = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "image_size": image_size,
        "margin": margin,
        "gamma_align": gamma_align,
        "gamma_con": gamma_con,
        "align_warmup_epochs": align_warmup_epochs,
        "early_stop_patience": early_stop_patience,
        "text_encoder": text_encoder,
        "augment": augment,
        "seed": seed,
    }

    def go() -> Any:
        import yaml

        from cxr_triage.train.gzsl.config import GzslConfig
        from cxr_triage.train.gzsl.split import label_split_for
        from cxr_triage.train.gzsl.trainer import train as run_training

        split = label_split_for(data, unseen or None)
        base = yaml.safe_load(config.read_text()) if config else {}
        fields = {"labels": list(split.labels), "unseen": list(split.unseen)} | base
        fields |= {"data": str(data)}
        if unseen:
            fields["unseen"] = list(unseen)
        if descriptions:
            fields["descriptions"] = split.descriptions
        fields |= {k: v for k, v in overrides.items() if v is not None}
        cfg = GzslConfig.model_validate(fields)
        where = run_dir or Path("runs") / f"gzsl-{datetime.now():%Y%m%d-%H%M%S}"
        return run_training(cfg, where, progress=progress)

    result = _run(go)
    auroc = result.best_val_seen_auroc
    console.print(
        f"{result.epochs_run} epochs in {result.run_dir}; best epoch {result.best_epoch}, "
        f"validation seen AUROC {'n/a' if auroc is None else f'{auroc:.3f}'}"
    )


@app.command()
def evaluate(
    source: Annotated[
        Path, typer.Argument(help="a run folder (PyTorch) or a registered version folder (ONNX)")
    ],
    data: Annotated[Path | None, typer.Option("--data", help="dataset folder (default: the run's)")] = None,
    bootstrap: Annotated[int, typer.Option(help="bootstrap resamples for the 95% intervals")] = 1000,
    out: Annotated[Path | None, typer.Option(help="write the report as JSON here")] = None,
) -> None:
    """AUROC per label, seen / unseen / harmonic means [95% CI], and P/R/F1 at top-2 and top-3."""

    def go() -> Any:
        from cxr_triage.train.gzsl.evaluate import evaluate_source

        return evaluate_source(source, data, bootstrap)

    report = _run(go)
    report_out.print(report.summary(), markup=False)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report.model_dump_json(indent=2) + "\n")
        console.print(f"report: {out}")


@app.command()
def register(
    run: Annotated[Path, typer.Argument(help="a finished `gzsl train` run folder")],
    model: Annotated[str, typer.Option(help="model name: the version goes to <model-repo>/<model>/<N>/")] = (
        DEFAULT_MODEL
    ),
    bootstrap: Annotated[
        int, typer.Option(help="resamples for the test metrics' intervals (0: none)")
    ] = 1000,
    evaluate_test: Annotated[
        bool, typer.Option("--evaluate/--no-evaluate", help="put the test split's metrics into metadata.json")
    ] = True,
    model_repo: RepoOption = None,
    target_sensitivity: Annotated[
        float, typer.Option(help="seen labels' operating points: this sensitivity on validation")
    ] = 0.95,
    critical: Annotated[
        list[str] | None,
        typer.Option(help="label that makes a study critical when positive (repeat; new config only)"),
    ] = None,
) -> None:
    """Export the run's best weights (image + text ONNX, tokenizer, label latents) as a new version;
    write the model's config.yaml when the model is new, so the server serves it."""
    _setup_logging()

    def go() -> Any:
        from cxr_triage.train.gzsl.export import export_run
        from cxr_triage.train.gzsl.trainer import evaluate_run

        metrics = None
        if evaluate_test:
            report = evaluate_run(run, bootstrap=bootstrap)
            metrics = {"test": report.model_dump(mode="json", exclude={"auroc_ci95"})}
        model_dir = _repo(model_repo) / model
        result = export_run(run, model_dir, metrics, target_sensitivity=target_sensitivity)
        config_path = model_dir / "config.yaml"
        if not config_path.is_file():  # a new model: the config that serves it (edit it at will)
            import yaml

            from cxr_triage.train.gzsl.config import GzslConfig
            from cxr_triage.train.gzsl.export import model_config

            cfg = GzslConfig.read(run / "config.yaml")
            config_path.write_text(yaml.safe_dump(model_config(cfg, model, critical or ()), sort_keys=False))
            console.print(f"wrote {config_path}: `make serve` serves {model} beside the other models")
        return result

    result = _run(go)
    console.print(
        f"registered {model} version {result.version} at {result.path} "
        f"(worst ONNX-vs-PyTorch difference {max(result.parity.values()):.1e})"
    )


@app.command("operating-point")
def operating_point(
    model: Annotated[str, typer.Argument(help="the served gzsl model")],
    finding: Annotated[str, typer.Argument(help="a finding added to it at run time")],
    data: Annotated[
        Path, typer.Option("--data", help="labelled images (feedback export, ChestX-ray14, CheXpert)")
    ],
    server: Annotated[str, typer.Option(help="the running service")] = "http://127.0.0.1:8000",
    split: Annotated[str | None, typer.Option(help="dataset split (default: the layout's default)")] = None,
    target_sensitivity: Annotated[float, typer.Option(min=0.01, max=1.0)] = 0.95,
    api_key: Annotated[
        str | None, typer.Option(envvar="CXR_API_KEY", help="if the service asks for one")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="measure and print, set nothing")] = False,
) -> None:
    """Measure an added finding's operating point on labelled images, scored by the service, and set it."""

    def go() -> Any:
        from cxr_triage.train.gzsl.calibrate import measure

        return measure(server, model, finding, data, split, target_sensitivity, api_key, apply=not dry_run)

    measured = _run(go)
    b = measured.body
    report_out.print(
        f"{model} version {measured.version}, {finding}: AUROC {measured.auroc:.3f} on "
        f"{b['positives']} positive / {b['negatives']} negative images; threshold {measured.threshold:.4g} "
        f"(sensitivity {b['sensitivity']:.3f}, specificity {b['specificity']:.3f})"
        + (" - not set (--dry-run)" if dry_run else " - set on the service"),
        markup=False,
    )
