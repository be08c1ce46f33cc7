"""A training run's per-epoch log: `metrics.jsonl`, `metrics.csv` and `curves.png` in RUN_DIR.

One record per finished epoch (a dict of primitives, kept in the checkpoint too, so a resumed run
rewrites exactly the epochs its checkpoint has seen):

    epoch, step (optimizer steps so far), lr, train_loss, dice {class: value}, mean_dice,
    val_source ("validation", or "train" when the run has no validation cases),
    peak_memory_bytes, memory ("cuda_max_allocated" or "peak_rss"), seconds

NaN (a class absent from both prediction and reference) is written as `null` in JSON and as an
empty field in CSV. Each file is rewritten whole through a temporary file and a rename, so a
reader never sees half a file. The plot uses matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

JSONL, CSV, PNG = "metrics.jsonl", "metrics.csv", "curves.png"


def _finite_or_none(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_log(run_dir: str | Path, history: Sequence[dict], classes: Sequence[str]) -> None:
    """Rewrite the three files from the records of every finished epoch."""
    run_dir = Path(run_dir)
    lines = []
    for record in history:
        clean = {k: _finite_or_none(v) for k, v in record.items() if k != "dice"}
        clean["dice"] = {k: _finite_or_none(v) for k, v in record["dice"].items()}
        lines.append(json.dumps(clean, allow_nan=False))
    _replace(run_dir / JSONL, "".join(line + "\n" for line in lines).encode())

    foreground = list(classes[1:])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["epoch", "step", "lr", "train_loss", "mean_dice",
                     *(f"dice_{c}" for c in foreground), "val_source", "peak_memory_mib",
                     "memory", "seconds"])
    for r in history:
        cells = [r["epoch"], r["step"], f"{r['lr']:.6g}", f"{r['train_loss']:.6f}",
                 _cell(r["mean_dice"]), *(_cell(r["dice"].get(c, math.nan)) for c in foreground),
                 r["val_source"], f"{r['peak_memory_bytes'] / 2**20:.1f}", r["memory"],
                 f"{r['seconds']:.2f}"]
        writer.writerow(cells)
    _replace(run_dir / CSV, out.getvalue().encode())

    _replace(run_dir / PNG, _plot(history, foreground))


def _cell(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.4f}"


def _plot(history: Sequence[dict], foreground: Sequence[str]) -> bytes:
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_dice, ax_mem) = plt.subplots(1, 3, figsize=(15, 4.2))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], marker=".")
    ax_loss.set(title="training loss (Dice + CE)", xlabel="epoch")
    for name in foreground:
        ax_dice.plot(epochs, [r["dice"].get(name, math.nan) for r in history], label=name,
                     lw=1)
    ax_dice.plot(epochs, [r["mean_dice"] for r in history], label="mean", color="black", lw=2)
    source = history[-1]["val_source"] if history else "validation"
    ax_dice.set(title=f"Dice ({source} cases, network grid)", xlabel="epoch", ylim=(0, 1))
    ax_dice.legend(fontsize=7, ncol=2)
    ax_mem.plot(epochs, [r["peak_memory_bytes"] / 2**30 for r in history], marker=".")
    kind = history[-1]["memory"] if history else ""
    ax_mem.set(title=f"peak memory per epoch ({kind})", xlabel="epoch", ylabel="GiB")
    for ax in (ax_loss, ax_dice, ax_mem):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
