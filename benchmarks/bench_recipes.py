"""Training recipes side by side on the built-in phantom: the README's main job (15 epochs on
the 8 mm grid, liver and both lungs) as it is, with the stock twin of the network (`--arch
stock`: the same topology from stock layers, no recompute: what effseg's layers must not lose
Dice against), with `--deep-supervision`, and with `--augment all`, for several seeds (a seed
also picks the validation cases). Reports the
validation Dice per label in the source geometry (the run's `validation/evaluation.csv`) and
the training time, per run and as means over the seeds; writes JSON.

    python benchmarks/bench_recipes.py [--seeds 0 1 2] [--epochs 15] [--recipes ...] [--out FILE]
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, write_json  # noqa: E402

from effseg.pipeline.train import TrainConfig, train  # noqa: E402

LABELS = ["liver", "lung_left", "lung_right"]
RECIPES = {"plain": {}, "stock twin": {"arch": "stock"},
           "deep supervision": {"deep_supervision": True}, "augment all": {"augment": "all"}}


def validation_dice(run: Path) -> dict:
    with open(run / "validation" / "evaluation.csv") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    return {r[1]: float(r[header.index("dice")]) for r in rows[1:] if r[0] == "mean"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--out", default="benchmarks/out/recipes.json")
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name in args.recipes:
                out = Path(tmp) / f"{name.replace(' ', '_')}-{seed}"
                started = time.perf_counter()
                train(TrainConfig(out=str(out), labels=LABELS, spacing=[8.0], epochs=args.epochs,
                                  lr=3e-3, seed=seed, device="cpu", **RECIPES[name]))
                dice = validation_dice(out)
                runs.append({"recipe": name, "seed": seed, "dice": dice,
                             "seconds": time.perf_counter() - started})
                print(f"{name:<18} seed {seed}: " + "  ".join(
                    f"{k} {dice[k]:.4f}" for k in LABELS), flush=True)
    means = {}
    for name in args.recipes:
        mine = [r for r in runs if r["recipe"] == name]
        means[name] = {k: sum(r["dice"][k] for r in mine) / len(mine) for k in LABELS}
        print(f"{name:<18} mean over {len(mine)} seed(s): " + "  ".join(
            f"{k} {means[name][k]:.3f}" for k in LABELS))
    write_json(args.out, {"machine": machine(), "epochs": args.epochs, "labels": LABELS,
                          "runs": runs, "means": means})


if __name__ == "__main__":
    main()
