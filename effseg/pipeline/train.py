"""Whole-volume training (`python -m effseg train`): every case goes through the network in one
piece, no patches, no sliding window.

A new run, in RUN_DIR (`--out`):
1. opens the dataset and validates every file (`NiftiDataset.validate`) before anything else, so
   a bad file stops the run before it starts, never half-way;
2. splits the cases: validation cases named explicitly, or a seeded fraction; with a single case
   there is nothing to hold out and the Dice is measured on the training case (logged as such);
3. writes `plans.json` (target spacing: given, or the training cases' median; CT normalization
   fitted on the training cases; classes and their dataset ids) and caches every case on the
   network grid in `preprocessed/` (`effseg.pipeline.preprocess`);
4. trains: each epoch visits the training cases in an order drawn from (seed, epoch); a batch of
   several volumes is padded to the largest (image at the normalized lower clip value, i.e. air;
   labels at the loss's ignore index); `--augment intensity|all` and `--mirror-axes` transform
   each volume on the device (`effseg.pipeline.augment`: rotations, zooms, mirroring, noise, brightness,
   contrast, gamma, drawn from (seed, epoch, case)); fused Dice (foreground classes, as nnU-Net)
   + CE loss (`DiceCELoss`), over every output of the network with `--deep-supervision`
   (`DeepSupervisionLoss`: weights 1, 1/2, 1/4, ... on labels sampled at each output's grid);
   AdamW or SGD (momentum 0.99, Nesterov) with a poly schedule,
   lr * (1 - step / steps)^0.9, stepped per batch; gradient norm clipped at 12; autocast in bf16
   or fp16 (fp16 with a gradient scaler);
5. after each epoch: Dice per class on the validation cases (network grid), the training loss and
   the peak memory of the epoch's training steps (CUDA max allocated, or the process's peak RSS)
   go to `metrics.jsonl`, `metrics.csv` and `curves.png` (`effseg.pipeline.train_log`); `last.pt` is
   written every epoch and `best.pt` when the mean Dice improves (the first epoch always);
6. when the last epoch is done, `best.pt` predicts the validation cases from their source files
   into `validation/{case}.nii.gz` (source geometry and label ids) and `effseg.pipeline.evaluate` scores
   them there (Dice and HD95 in mm, `validation/evaluation.csv`).

`--resume` continues RUN_DIR/last.pt exactly where it stopped, mid-epoch included: model,
optimizer, gradient scaler, schedule, the position in the epoch, and the python, numpy and torch
random states are restored, so with deterministic kernels (a CPU run at a fixed thread count;
cuDNN may pick other algorithms) the weights equal those of an uninterrupted run bit for bit.
The run's settings come from the checkpoint; only the device may change. Ctrl-C finishes the
current step, writes `last.pt` and returns (`interrupted`); a second Ctrl-C aborts at once,
leaving the last written `last.pt`.

Several processes (`torchrun --nproc_per_node=N -m effseg train ...`, or several nodes with
`--nnodes`/`--rdzv_endpoint`): data-parallel training with DDP (`effseg.pipeline.distributed`). Each epoch's
case order is split across the ranks (`--batch-size` volumes per rank and step); with
`--norm batch` the norms are synchronized (`InPlaceABNSync`: statistics of the global batch).
Rank 0 alone prepares the data, logs, validates (the validation cases are scored by all ranks,
each its share) and writes checkpoints; a Ctrl-C on any rank stops all of them after the same
step; `--resume` works the same (mid-epoch only with the same number of processes). Collectives
time out after `--dist-timeout` seconds, so a dead rank ends the run with an error, not a hang.

Checkpoints hold tensors and primitives only (read with `weights_only=True`): the model's state,
its configuration, and the plans predict needs (classes, dataset label ids, target spacing,
normalization). Refused, as `RunError`: a RUN_DIR that already holds a run (without `--resume`),
`--resume` without `last.pt`, unknown validation case names, no case left to train on, a loss that
is not finite (the run stops at the step where it diverged). Dataset problems raise the data
layer's `DataError`.
"""
from __future__ import annotations

import math
import random
import shutil
import signal
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import distributed
from .data import NiftiDataset, normalization_from_plans, normalization_to_plans, save_plans
from .augment import MODES as AUGMENT_MODES
from .augment import Augmentation, check_mirror_axes
from ..losses import DeepSupervisionLoss, DiceCELoss
from ..memory import cuda_peak_bytes, peak_rss_bytes, reset_peak_rss
from .metrics import class_dice
from .model_config import build_model, describe, model_config
from ..nn.sync import convert_sync
from ..ops.sync import CollectiveError
from .phantom_cache import phantom_dataset
from .precision import AMP_DTYPES, default_amp, default_device
from .preprocess import cache_paths, median_spacing, preprocess_cases
from .run_checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .train_log import write_log

LAST, BEST, PLANS = "last.pt", "best.pt", "plans.json"
CACHE, VALIDATION = "preprocessed", "validation"
DEFAULT_LR = {"adamw": 1e-3, "sgd": 1e-2}
WEIGHT_DECAY = 3e-5
CLIP_NORM = 12.0
POLY_POWER = 0.9
DIST_TIMEOUT = 600.0


class RunError(ValueError):
    """A training run cannot start or go on as asked; the message says why."""


@dataclass
class TrainConfig:
    """Settings of a run (primitives only: they are stored in its checkpoints)."""

    out: str
    data: str | None = None
    labels: list[str] | None = None
    spacing: list[float] | None = None
    epochs: int = 50
    lr: float | None = None
    optimizer: str = "adamw"
    batch_size: int = 1
    model: str = "small"
    arch: str = "fcn"
    channels: list[int] | None = None
    strides: list[int] | None = None
    norm: str = "instance"
    amp: str | None = None
    device: str | None = None
    val_fraction: float = 0.2
    val_cases: list[str] | None = None
    seed: int = 0
    augment: str = "off"
    mirror_axes: list[int] | None = None
    deep_supervision: bool = False


@dataclass
class RunResult:
    """What a call of `train` did."""

    run_dir: Path
    epochs_done: int
    interrupted: bool
    best_epoch: int | None
    best_dice: float | None
    history: list[dict] = field(default_factory=list)


def _say(message: str) -> None:
    tqdm.write(message)


def _checked(config: TrainConfig) -> TrainConfig:
    if config.epochs < 1:
        raise RunError(f"--epochs must be at least 1, got {config.epochs}")
    if config.batch_size < 1:
        raise RunError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.optimizer not in DEFAULT_LR:
        raise RunError(f"--optimizer must be one of {sorted(DEFAULT_LR)}, got "
                       f"{config.optimizer!r}")
    if config.amp is not None and config.amp not in AMP_DTYPES:
        raise RunError(f"--amp must be one of {sorted(AMP_DTYPES)}, got {config.amp!r}")
    if config.lr is not None and not (math.isfinite(config.lr) and config.lr > 0):
        raise RunError(f"--lr must be a positive number, got {config.lr}")
    if not 0.0 <= config.val_fraction < 1.0:
        raise RunError(f"--val-fraction must lie in [0, 1), got {config.val_fraction}")
    if config.seed < 0:
        raise RunError(f"--seed must be non-negative, got {config.seed}")
    if config.augment not in AUGMENT_MODES:
        raise RunError(f"--augment must be one of {list(AUGMENT_MODES)}, got {config.augment!r}")
    if config.mirror_axes is not None:
        try:
            config = replace(config, mirror_axes=list(check_mirror_axes(config.mirror_axes)))
        except ValueError as exc:
            raise RunError(f"--mirror-axes: {exc}") from exc
    if config.data is not None and not Path(config.data).is_dir():
        raise RunError(f"--data {config.data}: dataset folder not found")
    if config.spacing is not None:
        spacing = list(config.spacing) * 3 if len(config.spacing) == 1 else list(config.spacing)
        if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise RunError(f"--spacing must be one or three positive numbers, got "
                           f"{config.spacing}")
        config = replace(config, spacing=[float(s) for s in spacing])
    return config


def split_cases(cases: Sequence[str], val_fraction: float, val_cases: Sequence[str] | None,
                seed: int) -> tuple[list[str], list[str]]:
    """(training cases, validation cases): the named ones, or a seeded fraction (at least one
    when there are two cases or more and the fraction is not 0)."""
    cases = sorted(cases)
    if val_cases is not None:
        unknown = sorted(set(val_cases) - set(cases))
        if unknown:
            raise RunError(f"validation cases {unknown} are not training cases of the dataset "
                           f"({len(cases)} cases, e.g. {cases[:3]})")
        val = sorted(set(val_cases))
    else:
        count = round(val_fraction * len(cases))
        if val_fraction > 0 and len(cases) >= 2:
            count = min(max(count, 1), len(cases) - 1)
        order = np.random.default_rng(seed).permutation(len(cases))
        val = sorted(cases[i] for i in order[:count])
    train = [c for c in cases if c not in set(val)]
    if not train:
        raise RunError("no case is left for training once the validation cases are taken out")
    return train, val


def epoch_order(cases: Sequence[str], seed: int, epoch: int) -> list[str]:
    """The training cases in the order epoch `epoch` visits them (a function of seed and epoch
    alone, so a resumed epoch sees the same order)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(cases))
    return [cases[i] for i in order]


def load_batch(cache: Path, names: Sequence[str], fill: Sequence[float], ignore_index: int,
               label_dtype: np.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole volumes of `names` from the cache, padded at their far end to the largest extent of
    the batch: images with `fill` (one value per channel), labels with `ignore_index`."""
    images, labels = [], []
    for name in names:
        image_path, label_path = cache_paths(cache, name)
        images.append(np.load(image_path, mmap_mode="r"))
        labels.append(np.load(label_path, mmap_mode="r"))
    shape = tuple(max(a.shape[axis] for a in labels) for axis in range(3))
    image_batch = np.empty((len(names), len(fill), *shape), dtype=np.float32)
    image_batch[...] = np.asarray(fill, dtype=np.float32)[None, :, None, None, None]
    label_batch = np.full((len(names), *shape), ignore_index, dtype=label_dtype)
    for i, (image, label) in enumerate(zip(images, labels)):
        x, y, z = label.shape
        image_batch[i, :, :x, :y, :z] = image
        label_batch[i, :x, :y, :z] = label
    return torch.from_numpy(image_batch), torch.from_numpy(label_batch)


def train_step(model: torch.nn.Module, image: torch.Tensor, label: torch.Tensor,
               loss_fn: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, amp_dtype: torch.dtype | None) -> float:
    """One optimizer step on one batch; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(image.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(image)
    # The fused loss takes low-precision logits and accumulates in float32 itself.
    loss = loss_fn(logits, label)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise RunError(f"the loss is {value}: training diverged; lower --lr, or use --amp "
                       "bf16 or off")
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
    scaler.step(optimizer)
    scaler.update()
    return value


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


@torch.no_grad()
def validate(model: torch.nn.Module, cache: Path, cases: Sequence[str], num_classes: int,
             device: torch.device, amp_dtype: torch.dtype | None, stop) -> np.ndarray | None:
    """(cases, classes) Dice of the argmax on the network grid; None if a stop was requested."""
    model.eval()
    scores = [np.zeros((0, num_classes))]
    try:
        for name in cases:
            if stop.requested:
                return None
            image_path, label_path = cache_paths(cache, name)
            image = torch.from_numpy(np.load(image_path))[None].to(device)
            label = torch.from_numpy(np.load(label_path).astype(np.int64)).to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(image)
            scores.append(class_dice(logits.argmax(1)[0], label, num_classes).numpy()[None])
    finally:
        model.train()
    return np.concatenate(scores)


class _StopFlag:
    requested = False


@contextmanager
def _graceful_interrupt():
    """First Ctrl-C: set the flag (the loop stops after the current step and saves); second
    Ctrl-C: KeyboardInterrupt at once. Signal handlers exist only in the main thread."""
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True
        _say("\ninterrupted: finishing the current step, then saving last.pt "
             "(Ctrl-C again aborts without saving)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _prepare(config: TrainConfig, run_dir: Path) -> dict:
    """Validate the dataset, split it, fit the plans and fill the cache; returns the plans."""
    dataset = NiftiDataset(config.data, classes=config.labels)
    _say(f"validating {len(dataset)} training case(s) of {dataset.root} ...")
    dataset.validate()
    train_cases, val_cases = split_cases(dataset.cases, config.val_fraction, config.val_cases,
                                         config.seed)
    spacing = config.spacing or list(median_spacing(dataset, train_cases))
    (run_dir / PLANS).unlink(missing_ok=True)
    stats, shapes = preprocess_cases(dataset, train_cases, val_cases, spacing,
                                     run_dir / CACHE, config.seed)
    plans = normalization_to_plans({
        "dataset": str(dataset.root.resolve()), "channels": list(dataset.channels),
        "classes": list(dataset.classes), "label_ids": dataset.labels.source_ids.tolist(),
        "target_spacing": [float(s) for s in spacing], "train_cases": train_cases,
        "mirror_axes": list(config.mirror_axes or []),
        "val_cases": val_cases, "network_shapes": shapes}, stats)
    save_plans(plans, run_dir / PLANS)
    return plans


def _new_run(config: TrainConfig) -> tuple[TrainConfig, dict]:
    run_dir = Path(config.out)
    if (run_dir / LAST).exists():
        raise RunError(f"{run_dir} already holds a run ({LAST}); pass --resume to continue it, "
                       "or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.data is None:
        data = phantom_dataset()
        _say(f"no --data given: training on the built-in phantom dataset at {data}")
        config = replace(config, data=str(data))
    config = replace(config, data=str(Path(config.data).resolve()), out=str(run_dir.resolve()))
    return config, _prepare(config, run_dir)


def _validate_shared(net, cache, cases, num_classes, device, amp_dtype, stop, ranks):
    """`validate` with the cases dealt out to the ranks; every rank gets all scores, in case
    order, or None when a stop was requested on any rank."""
    mine = validate(net, cache, list(cases)[ranks.rank::ranks.world_size], num_classes, device,
                    amp_dtype, stop)
    parts = distributed.gather(mine, ranks)
    if any(p is None for p in parts):
        return None
    rows = [None] * len(cases)
    for r, part in enumerate(parts):
        rows[r::ranks.world_size] = list(part)
    return np.stack(rows)


def _start_run(config: TrainConfig, resume: bool, ranks) -> tuple[TrainConfig, dict, dict | None]:
    """(config, plans, checkpoint state): rank 0 opens or creates the run, the others receive
    its settings (a failure on rank 0 is raised on every rank)."""
    outcome = None
    if ranks.is_main:
        try:
            outcome = _open_run(config, resume)
        except Exception as exc:
            # The others must not wait for settings that will never come.
            distributed.broadcast(RunError(f"rank 0 could not open the run: {exc}"), ranks)
            raise
    outcome = distributed.broadcast(outcome, ranks)
    if isinstance(outcome, RunError):
        raise outcome
    config, plans, has_state = outcome
    state = load_checkpoint(Path(config.out) / LAST) if has_state else None
    return config, plans, state


def _open_run(config: TrainConfig, resume: bool) -> tuple[TrainConfig, dict, bool]:
    run_dir = Path(config.out)
    if not resume:
        return (*_new_run(config), False)
    if not (run_dir / LAST).is_file():
        raise RunError(f"nothing to resume: {run_dir / LAST} does not exist")
    state = load_checkpoint(run_dir / LAST)
    # Settings added after a checkpoint was written take their defaults (all "off").
    stored = {f.name: state["config"].get(f.name, f.default) for f in fields(TrainConfig)
              if f.name in state["config"] or f.default is not MISSING}
    config = replace(TrainConfig(**stored), out=str(run_dir.resolve()),
                     device=config.device or stored["device"])
    return config, state["plans"], True


def train(config: TrainConfig, resume: bool = False,
          dist_timeout: float = DIST_TIMEOUT) -> RunResult:
    """Run (or, with `resume`, continue) a training run; see the module docstring. Under
    torchrun each process calls this; `dist_timeout` (seconds) bounds every collective."""
    config = _checked(config)
    run_dir = Path(config.out)
    created = not run_dir.exists()
    ranks, device_name = distributed.start(config.device, dist_timeout)
    try:
        return _train(config, resume, ranks, device_name)
    except (CollectiveError, torch.distributed.DistBackendError) as exc:
        raise RunError(
            f"rank {ranks.rank}: a collective with the other ranks failed (a rank exited, or "
            f"did not answer within --dist-timeout {dist_timeout:g} s): {exc}") from exc
    except Exception:
        # A run that failed before it saved anything leaves no folder of its making behind.
        if created and ranks.is_main and not (run_dir / LAST).exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        distributed.finish(ranks)


def _train(config: TrainConfig, resume: bool, ranks, device_name: str | None) -> RunResult:
    """The run, top-down: open it, build what trains, then epochs until done or stopped."""
    config, plans, state = _start_run(config, resume, ranks)
    _check_resumable(state, Path(config.out), ranks)
    session = _Session(config, plans, state, ranks, device_name)
    if session.finished():
        session.say(f"{session.run_dir} finished all {config.epochs} epochs already")
        return session.result(False)
    session.announce(resume)
    with _graceful_interrupt() as stop:
        for epoch in range(session.progress["epoch"], config.epochs):
            scores = session.train_epoch(epoch, stop)
            if scores is None:
                return session.stopped(f"stopped at epoch {epoch + 1}, step "
                                       f"{session.progress['step_in_epoch']}", save=True)
            session.end_epoch(epoch, scores)
            if distributed.any_rank(stop.requested, ranks, session.device):
                return session.stopped(f"stopped after epoch {epoch + 1}", save=False)
    session.finish()
    return session.result(False)


def _check_resumable(state: dict | None, run_dir: Path, ranks) -> None:
    if state is None:
        return
    stored_world = state["progress"].get("world_size", 1)
    if state["progress"]["step_in_epoch"] and stored_world != ranks.world_size:
        raise RunError(
            f"{run_dir / LAST} stopped mid-epoch in a run of {stored_world} process(es); "
            f"resume it with {stored_world} (now {ranks.world_size}), or from an epoch end")


class _Session:
    """One process's part of a run: the network, its optimizer and schedule, the data, and the
    progress that a checkpoint keeps (restored from `state` when resuming)."""

    def __init__(self, config: TrainConfig, plans: dict, state: dict | None, ranks,
                 device_name: str | None) -> None:
        self.ranks = ranks
        self.say = _say if ranks.is_main else (lambda message: None)
        self.run_dir = Path(config.out)
        self.plans = plans
        if not ranks.distributed:
            device_name = config.device  # a resumed run's stored device, unless given anew
        self.device = torch.device(device_name) if device_name else default_device()
        self.config = config = replace(config, amp=config.amp or default_amp(self.device))
        self.amp_dtype = AMP_DTYPES[config.amp]
        self.lr = config.lr or DEFAULT_LR[config.optimizer]
        self._data(plans)
        self._network(config, plans)
        self._progress(state)

    def _data(self, plans: dict) -> None:
        self.classes = plans["classes"]
        self.train_cases, self.val_cases = plans["train_cases"], plans["val_cases"]
        self.cache = self.run_dir / CACHE
        stats = normalization_from_plans(plans, self.run_dir / PLANS)
        self.fill = [(s.lower - s.mean) / max(s.std, 1e-8) for s in stats]
        self.ignore_index = 255 if len(self.classes) < 255 else -1
        self.label_dtype = np.dtype(np.uint8 if len(self.classes) < 255 else np.int32)
        self.augmentation = Augmentation(tuple(plans["target_spacing"]), tuple(self.fill),
                                         self.ignore_index, self.config.augment,
                                         tuple(self.config.mirror_axes or ()))
        self.case_index = {name: i for i, name in enumerate(self.train_cases)}

    def _network(self, config: TrainConfig, plans: dict) -> None:
        """The network (seeded), optimizer, poly schedule, loss scaler and loss."""
        random.seed(config.seed)
        np.random.seed(config.seed)
        torch.manual_seed(config.seed)
        try:
            self.arch = model_config(config.model, config.arch, len(plans["channels"]),
                                     len(self.classes), config.channels, config.strides,
                                     config.norm, config.deep_supervision)
        except ValueError as exc:
            raise RunError(str(exc)) from exc
        self.net = build_model(self.arch).to(self.device)
        self.optimizer = _optimizer(config.optimizer, self.net, self.lr)
        steps_per_epoch = math.ceil(len(distributed.shard(self.train_cases, self.ranks))
                                    / config.batch_size)
        total_steps = config.epochs * steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: (1.0 - min(step, total_steps) / total_steps) ** POLY_POWER)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self.loss_fn = DeepSupervisionLoss(
            DiceCELoss(include_background=False, ignore_index=self.ignore_index),
            self.net.output_strides()).to(self.device)

    def _progress(self, state: dict | None) -> None:
        """Progress and random state from the checkpoint, and the model the steps run: the
        network itself, or its DDP wrapper (batch norms synchronized) across processes."""
        self.progress = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "loss_sum": 0.0,
                         "loss_count": 0, "best_epoch": None, "best_dice": None, "history": []}
        if state is not None:
            self.net.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.progress = state["progress"]
            set_rng_state(state["rng"])
        self.progress["world_size"] = self.ranks.world_size
        if not self.ranks.is_main:
            # A checkpoint holds the loss sums of all ranks; rank 0 carries them on.
            self.progress.update(loss_sum=0.0, loss_count=0)
        self.model = self.net
        if self.ranks.distributed:
            if self.config.norm == "batch":
                # The same parameter tensors: the optimizer built above keeps working.
                self.net = convert_sync(self.net)
            self.model = DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def finished(self) -> bool:
        return self.progress["epoch"] >= self.config.epochs

    def announce(self, resume: bool) -> None:
        config, ranks = self.config, self.ranks
        where = f"{ranks.world_size} processes (DDP), " if ranks.distributed else ""
        mirror = f" mirror {config.mirror_axes}" if config.mirror_axes else ""
        self.say(f"{describe(self.arch)} on {where}{self.device}, amp {config.amp}, "
                 f"{config.optimizer} lr {self.lr:g}, batch {config.batch_size}, augment "
                 f"{config.augment}{mirror}; {len(self.train_cases)} training / "
                 f"{len(self.val_cases)} validation case(s); classes {self.classes[1:]}; "
                 f"spacing {self.plans['target_spacing']} mm; run {self.run_dir}")
        sided = [c for c in self.classes if any(w in c.lower() for w in ("left", "right"))]
        if 0 in (config.mirror_axes or []) and sided:
            self.say(f"warning: --mirror-axes includes 0 (left-right) while classes {sided} "
                     f"name a side: mirrored volumes teach the network the wrong side")
        if not self.val_cases:
            self.say("no validation cases: the Dice is measured on the training cases")
        if resume:
            self.say(f"resuming at epoch {self.progress['epoch'] + 1}, step "
                     f"{self.progress['step_in_epoch']}")

    def train_epoch(self, epoch: int, stop) -> np.ndarray | None:
        """The epoch's remaining steps, then the validation scores (cases x classes); None
        when a stop was requested on any rank."""
        config, progress, device = self.config, self.progress, self.device
        order = distributed.shard(epoch_order(self.train_cases, config.seed, epoch), self.ranks)
        batches = [order[i:i + config.batch_size]
                   for i in range(0, len(order), config.batch_size)]
        self.started = time.perf_counter()
        _reset_peak_memory(device)
        bar = tqdm(total=len(batches), initial=progress["step_in_epoch"],
                   disable=None if self.ranks.is_main else True,
                   desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False)
        stopping = False
        for names in batches[progress["step_in_epoch"]:]:
            loss = self._step(epoch, names)
            progress["loss_sum"] += loss
            progress["loss_count"] += 1
            progress["step_in_epoch"] += 1
            progress["global_step"] += 1
            bar.set_postfix(loss=f"{loss:.4f}", mem=f"{_peak_memory(device) / 2**30:.2f}GiB")
            bar.update()
            stopping = distributed.any_rank(stop.requested, self.ranks, device)
            if stopping:
                break
        bar.close()
        self.peak = distributed.max_over_ranks(_peak_memory(device), self.ranks, device)
        if stopping:
            return None
        return _validate_shared(self.net, self.cache, self.val_cases or self.train_cases,
                                len(self.classes), device, self.amp_dtype, stop, self.ranks)

    def _step(self, epoch: int, names: Sequence[str]) -> float:
        """One optimizer step on a batch of cases, augmented per case on the device."""
        image, label = load_batch(self.cache, names, self.fill, self.ignore_index,
                                  self.label_dtype)
        image, label = image.to(self.device), label.to(self.device)
        for i, name in enumerate(names if self.augmentation.active else ()):
            t = self.augmentation.draw(self.config.seed, epoch, self.case_index[name])
            image[i], label[i] = self.augmentation.apply(image[i], label[i], t)
        loss = train_step(self.model, image, label, self.loss_fn, self.optimizer, self.scaler,
                          self.amp_dtype)
        self.scheduler.step()
        return loss

    def end_epoch(self, epoch: int, scores: np.ndarray) -> None:
        """The epoch's record; best.pt when the mean Dice improved, last.pt, the log files."""
        progress = self.progress
        dice = {name: _nanmean(scores[:, k]) for k, name in enumerate(self.classes) if k}
        loss_sum, loss_count = self._pool_losses()
        record = {
            "epoch": epoch + 1, "step": progress["global_step"],
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / max(loss_count, 1),
            "dice": dice, "mean_dice": _nanmean(list(dice.values())),
            "val_source": "validation" if self.val_cases else "train",
            "peak_memory_bytes": int(self.peak),
            "memory": "cuda_max_allocated" if self.device.type == "cuda" else "peak_rss",
            "seconds": time.perf_counter() - self.started}
        progress["history"].append(record)
        progress.update(epoch=epoch + 1, step_in_epoch=0, loss_sum=0.0, loss_count=0)
        best, mean = progress["best_dice"], record["mean_dice"]
        if progress["best_epoch"] is None or (
                not math.isnan(mean) and (best is None or math.isnan(best) or mean > best)):
            progress.update(best_epoch=epoch + 1, best_dice=mean)
            self._save(self.run_dir / BEST, best=True)
        self._save(self.run_dir / LAST)
        if self.ranks.is_main:
            write_log(self.run_dir, progress["history"], self.classes)
        self.say(_epoch_line(record, self.config.epochs, progress["history"]))

    def stopped(self, when: str, save: bool) -> RunResult:
        """A requested stop: last.pt holds where the run is, for --resume (`save`: mid-epoch,
        so it is written now; an epoch end wrote it already)."""
        if save:
            self._pool_losses()
            self._save(self.run_dir / LAST)
        launcher = "torchrun ... -m effseg " if self.ranks.distributed else ""
        self.say(f"{when}; saved {self.run_dir / LAST}; continue with: {launcher}train --out "
                 f"{self.run_dir} --resume")
        return self.result(True)

    def finish(self) -> None:
        """The best checkpoint on the validation cases, in their source geometry."""
        self.say(f"done: best mean Dice {self.progress['best_dice']:.4f} at epoch "
                 f"{self.progress['best_epoch']} ({self.run_dir / BEST}); log in "
                 f"{self.run_dir / 'metrics.csv'} and {self.run_dir / 'curves.png'}")
        # Rank 0's best.pt is complete before any rank returns.
        distributed.barrier(self.ranks)
        if self.val_cases and self.ranks.is_main:
            _predict_validation(self.run_dir, self.plans, self.device, self.config.amp)

    def _snapshot(self, best: bool = False) -> dict:
        common = {"model": self.net.state_dict(), "model_config": self.arch,
                  "plans": self.plans}
        if best:
            record = self.progress["history"][-1]
            return {**common, "epoch": record["epoch"], "dice": record["dice"],
                    "mean_dice": record["mean_dice"]}
        return {**common, "config": asdict(self.config),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "progress": self.progress, "rng": rng_state()}

    def _save(self, path: Path, best: bool = False) -> None:
        if self.ranks.is_main:
            save_checkpoint(self._snapshot(best), path)

    def _pool_losses(self) -> tuple[float, float]:
        """The epoch's loss sums of all ranks, on rank 0 (zero elsewhere)."""
        progress, ranks = self.progress, self.ranks
        total = distributed.sum_over_ranks(progress["loss_sum"], ranks, self.device)
        count = distributed.sum_over_ranks(progress["loss_count"], ranks, self.device)
        progress.update(loss_sum=total if ranks.is_main else 0.0,
                        loss_count=int(count) if ranks.is_main else 0)
        return total, count

    def result(self, interrupted: bool) -> RunResult:
        p = self.progress
        return RunResult(self.run_dir, p["epoch"], interrupted, p["best_epoch"], p["best_dice"],
                         p["history"])


def _optimizer(name: str, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr, weight_decay=WEIGHT_DECAY)
    # nnU-Net's SGD: heavy Nesterov momentum.
    return torch.optim.SGD(model.parameters(), lr, momentum=0.99, nesterov=True,
                           weight_decay=WEIGHT_DECAY)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def _peak_memory(device: torch.device) -> int:
    """Peak bytes since `_reset_peak_memory`: CUDA allocated, or the process's resident set."""
    return cuda_peak_bytes(device) if device.type == "cuda" else peak_rss_bytes()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return (f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600
            else f"{seconds // 60}:{seconds % 60:02d}")


def _epoch_line(record: dict, epochs: int, history: Sequence[dict]) -> str:
    """The epoch's summary, with the run's elapsed time and an estimate of what remains (the
    mean epoch so far; epochs of an earlier, resumed session count too)."""
    dice = " ".join(f"{name} {value:.3f}" for name, value in record["dice"].items())
    elapsed = sum(r["seconds"] for r in history)
    remaining = elapsed / len(history) * (epochs - record["epoch"])
    return (f"epoch {record['epoch']}/{epochs}  loss {record['train_loss']:.4f}  "
            f"Dice ({record['val_source']} cases, network grid) {dice}  "
            f"mean {record['mean_dice']:.3f}  "
            f"peak {record['peak_memory_bytes'] / 2**30:.2f} GiB ({record['memory']})  "
            f"{record['seconds']:.1f} s; elapsed {_duration(elapsed)}, about "
            f"{_duration(remaining)} to go")


def _predict_validation(run_dir: Path, plans: dict, device: torch.device, amp: str) -> None:
    """best.pt on the validation cases' source files, scored against their label files."""
    from .evaluate import evaluate_files, format_table, write_csv
    from .predict import Predictor

    dataset = NiftiDataset(plans["dataset"], classes=plans["classes"][1:])
    predictor = Predictor.from_checkpoint(run_dir / BEST, device, amp)
    out = run_dir / VALIDATION
    pairs = []
    for name in plans["val_cases"]:
        written = predictor.predict_case(dataset.image_paths(name), out / f"{name}.nii.gz")
        pairs.append((name, written, dataset.label_path(name)))
    labels = dict(zip(plans["classes"][1:], plans["label_ids"][1:]))
    rows = evaluate_files(pairs, labels)
    write_csv(rows, out / "evaluation.csv")
    _say(f"validation cases predicted into {out} and scored in their source geometry (the "
         f"Dice above was on the network's grid), in {out / 'evaluation.csv'}:\n"
         f"{format_table(rows)}")
