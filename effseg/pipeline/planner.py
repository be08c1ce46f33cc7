"""Memory planning for whole-volume training: from a short calibration on small inputs, predict
the peak memory of a training step at a target volume, the largest volume that trains within a
budget, and which levels of a FullVolumeFCN must recompute to fit.

The peak of a step grows linearly with the number of voxels for a fixed network (every
activation, workspace and gradient is proportional to the volume; parameters and optimizer
state are the constant). The planner measures `effseg.memory.step_peak` at three volumes with
the target's aspect ratio, fits peak = a + b * voxels by least squares and extrapolates.
Calibration volumes are the target's half and its 0.75 and 0.5 multiples, capped (`cap_voxels`)
so that calibration stays short.

Algorithm switches: on CPUs ATen sends a convolution of a small input (batch 1, float32) to its
reference kernel (`slow_conv3d`, whose im2col scratch costs 27 input channels per voxel) and a
larger one to oneDNN, so the cost per voxel of a step changes where a level's convolution
crosses that size, and a line through volumes on one side mispredicts the other. The planner
asks ATen which backend every convolution of the network would get (`conv_backends`, no
computation) at the two finest levels at the target and at each calibration volume, and a fit
whose calibration volumes disagree with the target is flagged (`Fit.same_backends`, hence not
`linear`): `choose` never picks it and `effseg plan` says why. Before giving up, calibration
tries a finer ladder of volumes up to the cap and uses those in the target's regime, if at least
two of them span 15% of the voxels. The recomputing finest level's choice to write its input
gradient in slabs (made on the same backend rule) counts as part of the regime.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..memory import step_peak
from ..models.fcn import DEFAULT_CHANNELS, DEFAULT_STRIDES, FullVolumeFCN
from ..models._shape import as_strides, total_stride

UNITS = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}


def parse_bytes(text: str) -> int:
    """'80GB', '512 MB', '1.5GB' or a plain number of bytes (binary units: 1 GB = 2**30)."""
    t = str(text).strip().upper().replace(" ", "").replace("IB", "B")
    for unit in sorted(UNITS, key=len, reverse=True):
        if t.endswith(unit):
            number = t[: -len(unit)]
            break
    else:
        unit, number = "B", t
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"effseg: cannot read a memory size from {text!r} (e.g. '80GB')")
    if value <= 0:
        raise ValueError(f"effseg: a memory budget must be positive, got {text!r}")
    return int(value * UNITS[unit])


@dataclass
class Fit:
    """peak(voxels) = intercept + slope * voxels, from (voxels, peak bytes) points."""

    intercept: float
    slope: float
    points: list[tuple[int, int]]
    # Whether every calibration volume ran each convolution on the backend the target will.
    same_backends: bool = True

    @classmethod
    def of(cls, points: Sequence[tuple[int, int]], same_backends: bool = True) -> "Fit":
        n = len(points)
        mx = sum(v for v, _ in points) / n
        my = sum(p for _, p in points) / n
        sxx = sum((v - mx) ** 2 for v, _ in points)
        slope = sum((v - mx) * (p - my) for v, p in points) / sxx
        return cls(my - slope * mx, slope, list(points), same_backends)

    @property
    def linear(self) -> bool:
        """Whether the line can be trusted: the measured peaks grow with the volume, and the
        calibration volumes ran on the target's convolution backends (no algorithm switch
        between them and the target)."""
        peaks = [p for _, p in sorted(self.points)]
        return (self.same_backends and self.slope > 0
                and all(b >= a for a, b in zip(peaks, peaks[1:])))

    def predict(self, voxels: int) -> float:
        return self.intercept + self.slope * voxels

    def max_voxels(self, budget: int) -> int:
        return max(0, int((budget - self.intercept) / self.slope)) if self.slope > 0 else 0


@dataclass
class ModelConfig:
    in_channels: int = 1
    out_channels: int = 2
    channels: tuple[int, ...] = DEFAULT_CHANNELS
    strides: tuple = DEFAULT_STRIDES
    norm: str = "batch"
    act: object = ("leaky_relu", {"negative_slope": 0.01})

    def build(self, recompute) -> FullVolumeFCN:
        return FullVolumeFCN(3, self.in_channels, self.out_channels, self.channels, self.strides,
                             norm=self.norm, act=self.act, recompute=recompute)


def scaled_shape(shape: Sequence[int], voxels: float, multiple: Sequence[int]) -> tuple:
    """`shape` scaled uniformly to about `voxels`, rounded down to multiples (at least one)."""
    f = (voxels / math.prod(shape)) ** (1 / 3)
    return tuple(max(m, int(n * f) // m * m) for n, m in zip(shape, multiple))


@dataclass
class Option:
    recompute: tuple[bool, ...]
    fit: Fit
    predicted: float

    @property
    def label(self) -> str:
        if all(self.recompute):
            return "recompute all levels"
        if not any(self.recompute):
            return "recompute none"
        k = sum(self.recompute)
        return f"recompute levels 0-{k - 1} (finest {k})"


@dataclass
class Plan:
    shape: tuple[int, int, int]
    budget: int
    options: list[Option] = field(default_factory=list)
    chosen: Option | None = None
    largest_shape: tuple[int, int, int] | None = None
    largest_predicted: float | None = None


def conv_backends(config: ModelConfig, shape: Sequence[int], device: torch.device,
                  amp: torch.dtype | None = None, batch: int = 1, recompute=True) -> tuple:
    """The backend ATen would pick for each convolution of a FullVolumeFCN training step on
    an input of `shape` at the two finest levels, which hold most of the step's voxels and so
    decide its cost per voxel (encoder units, upsampling into them, skip fusion as the decoder
    runs it, decoder units, head), asked with memoryless stand-in tensors: nothing is
    computed. Where the finest level recomputes (`recompute`, as `ModelConfig.build` takes it),
    also whether its lean decoder writes its input gradient in slabs (`slab_rows`: on a CPU
    only where the whole convolution runs on oneDNN), which changes the step's memory per voxel
    as much as a backend does."""
    from ..ops.folded_up import slab_rows
    from ..ops.recompute import conv_backend
    dtype = amp or torch.float32
    like = torch.empty((), dtype=dtype, device=device)
    strides = as_strides(config.strides, len(config.channels))
    k = 3
    sizes, cur = [], tuple(int(n) for n in shape)
    for s in strides:
        cur = tuple(-(-n // f) for n, f in zip(cur, s))
        sizes.append(cur)
    chans = config.channels
    out = []
    cin = config.in_channels
    fine = min(2, len(chans))
    for i, (c, s, size) in enumerate(zip(chans[:fine], strides, sizes)):
        prev = tuple(shape) if i == 0 else sizes[i - 1]
        out.append(conv_backend((batch, cin) + prev, like, (c, cin, k, k, k), s, (1, 1, 1)))
        out.append(conv_backend((batch, c) + size, like, (c, c, k, k, k), (1, 1, 1), (1, 1, 1)))
        cin = c
    for i in range(min(fine, len(chans) - 1)):
        c, size, up = chans[i], sizes[i], strides[i + 1]
        out.append(conv_backend((batch, chans[i + 1]) + sizes[i + 1], like,
                                (chans[i + 1], c) + up, up, (0, 0, 0), transposed=True))
        halves = [conv_backend((batch, c) + size, like, (c, c, k, k, k), (1, 1, 1), (1, 1, 1))]
        whole = conv_backend((batch, 2 * c) + size, like, (c, 2 * c, k, k, k), (1, 1, 1),
                             (1, 1, 1))
        # the decoder concatenates where the whole would run on oneDNN and a half would not
        out.append(whole if device.type == "cpu" and whole == int(torch._C._ConvBackend.Mkldnn)
                   else halves[0])
        out.append(halves[0])
    out.append(conv_backend((batch, chans[0]) + tuple(shape), like,
                            (config.out_channels, chans[0], 1, 1, 1), (1, 1, 1), (0, 0, 0)))
    finest = recompute if isinstance(recompute, bool) else bool(recompute and recompute[0])
    if finest:
        out.append(slab_rows((batch, chans[0]) + tuple(shape), like, (chans[0], chans[0], k, k, k),
                             (1, 1, 1)) is not None)
    return tuple(out)


def calibrate(config: ModelConfig, recompute, shape: Sequence[int], device: torch.device,
              amp: torch.dtype | None = None, cap_voxels: int | None = None,
              batch: int = 1) -> Fit:
    """Fits peak(voxels) for one configuration from three small training steps; flagged
    (`same_backends`) where a calibration volume runs a convolution of the two finest levels on
    another backend than the target will (module docstring)."""
    multiple = total_stride(as_strides(config.strides, len(config.channels)))
    target = math.prod(shape)
    cap = cap_voxels or (160 ** 3 if device.type == "cuda" else 96 ** 3)
    want = conv_backends(config, shape, device, amp, batch, recompute)

    def backends(s):
        return conv_backends(config, s, device, amp, batch, recompute)

    top = min(target / 2, cap)
    shapes = sorted({scaled_shape(shape, top * frac, multiple) for frac in (0.5, 0.75, 1.0)})
    if len(shapes) < 2:
        raise ValueError(f"effseg: {tuple(shape)} is too small to calibrate on smaller volumes "
                         f"(multiples of the total stride {multiple})")
    same = all(backends(s) == want for s in shapes)
    if not same:
        # calibrate in the target's regime where one exists below `top`: the volumes of a
        # finer ladder that agree with the target, if at least two of them span 15% of voxels
        ladder = sorted({scaled_shape(shape, top * frac, multiple)
                         for frac in (0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)})
        agree = [s for s in ladder if backends(s) == want]
        if len(agree) >= 2 and math.prod(agree[-1]) >= 1.15 * math.prod(agree[0]):
            shapes, same = sorted({agree[0], agree[len(agree) // 2], agree[-1]}), True
    peaks = measure_steps(config, recompute, shapes, device, amp, batch)
    return Fit.of([(math.prod(s), p) for s, p in zip(shapes, peaks)], same)


def measure_step(config: ModelConfig, recompute, shape: Sequence[int], device: torch.device,
                 amp: torch.dtype | None = None, batch: int = 1) -> int:
    """Peak bytes of one training step (after a warm-up step) at `shape`. On CPU it runs in a
    fresh process: the RSS of a long-lived process depends on what it freed before (memory glibc
    kept is reused without growing the RSS), which would make small steps look cheaper."""
    return measure_steps(config, recompute, [shape], device, amp, batch)[0]


def measure_steps(config: ModelConfig, recompute, shapes: Sequence[Sequence[int]],
                  device: torch.device, amp: torch.dtype | None = None,
                  batch: int = 1) -> list[int]:
    """`measure_step` at each of `shapes`. On CPU the fresh processes run at the same time:
    each one's peak RSS is its own, so they share only the wall time (most of which is
    importing torch)."""
    if device.type != "cpu":
        return [_measure_here(config, recompute, s, device, amp, batch) for s in shapes]
    code = "import sys; from effseg.pipeline.planner import _worker; _worker(sys.argv[1])"
    procs = []
    try:
        for shape in shapes:
            job = {"config": asdict(config), "recompute": recompute, "shape": list(shape),
                   "amp": None if amp is None else str(amp).split(".")[-1], "batch": batch}
            procs.append(subprocess.Popen([sys.executable, "-c", code, json.dumps(job)],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        peaks = []
        for shape, proc in zip(shapes, procs):
            out, err = proc.communicate()
            if proc.returncode != 0:
                tail = "\n".join(err.strip().splitlines()[-8:])
                raise RuntimeError(f"effseg: the calibration step at {tuple(shape)} failed in "
                                   f"its process (exit code {proc.returncode}):\n{tail}")
            peaks.append(int(out.strip().splitlines()[-1]))
        return peaks
    finally:
        for proc in procs:  # the others, where one failed (or Ctrl-C)
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _measure_here(config, recompute, shape, device, amp, batch) -> int:
    torch.manual_seed(0)
    model = config.build(recompute).to(device)
    x = torch.randn((batch, config.in_channels) + tuple(shape), device=device)
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        step_peak(model, x)  # warm-up: algorithm choice, allocator
        return step_peak(model, x)


def _worker(job_json: str) -> None:
    job = json.loads(job_json)
    cfg = job["config"]
    cfg["channels"] = tuple(cfg["channels"])
    cfg["strides"] = tuple(tuple(s) if isinstance(s, list) else s for s in cfg["strides"])
    cfg["act"] = tuple(cfg["act"]) if isinstance(cfg["act"], list) else cfg["act"]
    recompute = job["recompute"]
    recompute = tuple(recompute) if isinstance(recompute, list) else recompute
    amp = getattr(torch, job["amp"]) if job["amp"] else None
    print(_measure_here(ModelConfig(**cfg), recompute, job["shape"], torch.device("cpu"), amp,
                        job["batch"]))


def choose(options: Sequence[Option], budget: int) -> Option | None:
    """The first option (least recomputation) whose calibration is linear and whose prediction
    fits, or None."""
    return next((o for o in options if o.fit.linear and o.predicted <= budget), None)


def plan(config: ModelConfig, budget: int, shape: Sequence[int], device: torch.device,
         amp: torch.dtype | None = None, cap_voxels: int | None = None) -> Plan:
    """Predicts the peak at `shape` with 0, 1, ..., all levels recomputing (finest first: they
    hold the most voxels), picks the first that fits `budget` (options whose calibration is not
    linear are never chosen), and the largest volume of the target's aspect ratio that trains
    with every level recomputing. See the module docstring."""
    levels = len(config.channels)
    shape = tuple(int(n) for n in shape)
    result = Plan(shape, budget)
    voxels = math.prod(shape)
    for k in range(levels + 1):
        recompute = tuple(i < k for i in range(levels))
        fit = calibrate(config, recompute, shape, device, amp, cap_voxels)
        result.options.append(Option(recompute, fit, fit.predict(voxels)))
    result.chosen = choose(result.options, budget)
    full = result.options[-1].fit
    multiple = total_stride(as_strides(config.strides, levels))
    result.largest_shape = scaled_shape(shape, full.max_voxels(budget), multiple)
    result.largest_predicted = full.predict(math.prod(result.largest_shape))
    return result
