"""Full fine-tuning vs LoRA (and gradient checkpointing) for ViT-B/16 and ViT-L/16: trainable
parameters, peak memory and step time, measured side by side in one run.

Each configuration trains a few steps in its own process (so peak memory is its own): peak CUDA
allocation on a GPU, peak resident set on a CPU. Run from the repository root::

    .venv/bin/python benchmarks/bench_lora.py [--size 64] [--batch 4] [--steps 3] [--models ARCH ...]

Writes ``benchmarks/results/lora-<machine>-<UTC date>.md`` and ``lora-latest.md``.
"""

import argparse
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import machine_rows, machine_tag

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = {
    "full": {"lora_rank": 0, "grad_checkpointing": False},
    "full + checkpointing": {"lora_rank": 0, "grad_checkpointing": True},
    "LoRA r8 (qkv)": {"lora_rank": 8, "grad_checkpointing": False},
    "LoRA r8 + checkpointing": {"lora_rank": 8, "grad_checkpointing": True},
}


def child(arch: str, size: int, batch: int, steps: int, rank: int, ckpt: bool) -> dict[str, float | str]:
    """Train ``steps`` steps in this process; called in a fresh process per configuration."""
    import resource
    import time

    import timm
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = timm.create_model(arch, pretrained=False, num_classes=14, img_size=size)
    if ckpt:
        net.set_grad_checkpointing(True)
    if rank:
        lora = LoraConfig(r=rank, lora_alpha=16, target_modules=["qkv"], modules_to_save=["head"])
        net = get_peft_model(net, lora)
    net = net.to(dev).train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.randint(0, 2, (batch, 14), device=dev).float()
    times = []
    for i in range(steps + 1):  # the first step warms up and is not timed
        t = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {
        "total": sum(p.numel() for p in net.parameters()),
        "trainable": sum(p.numel() for p in params),
        "peak_bytes": peak,
        "step_s": sorted(times)[len(times) // 2],
        "device": dev.type,
    }


def run(arch: str, size: int, batch: int, steps: int, rank: int, ckpt: bool) -> dict[str, Any]:
    argv = [
        sys.executable,
        __file__,
        "--child",
        arch,
        str(size),
        str(batch),
        str(steps),
        str(rank),
        str(int(ckpt)),
    ]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        a = sys.argv[2:]
        print(json.dumps(child(a[0], int(a[1]), int(a[2]), int(a[3]), int(a[4]), a[5] == "1")))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="image side (small on a CPU)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["vit_base_patch16_224", "vit_large_patch16_224"])
    args = parser.parse_args()
    load = os.getloadavg()[0]
    lines = [
        "# Full fine-tuning vs LoRA: trainable parameters, peak memory, step time",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC with `benchmarks/bench_lora.py --size {args.size} "
        f"--batch {args.batch} --steps {args.steps}`; each row is its own process. Peak memory is the "
        "peak CUDA allocation on a GPU, the peak resident set of the process on a CPU (it includes "
        "Python and torch themselves, ~0.4 GB). Step time is the median of the timed steps.",
        "",
        *[f"- {k}: {v}" for k, v in machine_rows(load)],
        "",
        "| model | configuration | trainable / total parameters | trainable % | peak memory | step |",
        "|---|---|---|---|---|---|",
    ]
    for arch in args.models:
        for name, cfg in CONFIGS.items():
            r = run(
                arch,
                args.size,
                args.batch,
                args.steps,
                int(cfg["lora_rank"]),
                bool(cfg["grad_checkpointing"]),
            )
            share = 100 * r["trainable"] / r["total"]
            lines.append(
                f"| {arch} | {name} | {r['trainable'] / 1e6:.2f} M / {r['total'] / 1e6:.1f} M "
                f"| {share:.2f}% | "
                f"{r['peak_bytes'] / 2**30:.2f} GiB | {r['step_s']:.2f} s ({r['device']}) |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"lora-{machine_tag()}-{datetime.now(UTC):%Y%m%d}.md").write_text(text)
    (RESULTS / "lora-latest.md").write_text(text)


if __name__ == "__main__":
    main()
