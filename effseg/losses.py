"""Segmentation losses for whole volumes: a fused softmax + cross-entropy + soft-Dice loss.

`DiceCELoss` (and the function `dice_ce_loss`) takes logits (N, K, *spatial) and integer labels
(N, *spatial) and returns the scalar

    loss = lambda_ce * CE + lambda_dice * (1 - mean(dice))

with, for p = softmax(logits, dim=1) (computed per voxel with the maximum subtracted), y the
label of a voxel and w the class weights (ones when not given):

- CE = sum(w_y * -log p_y) / sum(w_y) over the voxels whose label is not `ignore_index`: the value
  of `torch.nn.functional.cross_entropy(logits, labels, weight, ignore_index=ignore_index)`.
- dice[n, k] = (2 I + smooth) / (P + G + smooth), per sample n and class k, with the sums over the
  voxels of sample n that are not ignored: I = sum p_k [y == k], P = sum p_k, G = sum [y == k].
  With `batch_dice=True` I, P and G are summed over the batch first (one dice per class).
  The mean runs over every sample (unless batch_dice) and every class, or every class but 0 with
  `include_background=False`. Class weights apply to CE only; CE always uses all classes.
- A term whose lambda is 0 is left out entirely (so an all-ignored batch, where CE is 0/0 = NaN
  as in torch, does not make a Dice-only loss NaN).

Memory: it never builds one-hot targets, and saves for backward only the logits, the labels, the
class weights and O(N*K) coefficients; backward recomputes the softmax from the logits.
Layouts: contiguous and channels-last logits are read in place (the kernels follow their
strides) and their gradient has the same layout; any other layout (a crop of a larger tensor,
permuted spatial axes) is copied once to a contiguous tensor in forward and again in backward,
each copy freed when the kernel returns. The
result is a 0-dim tensor in float32 (float64 for float64 logits), whatever the logits' dtype
(float64, float32, float16, bfloat16; low precision is accumulated in float32). Gradients flow to
the logits only.

What it refuses, with a ValueError or TypeError naming the argument:
- logits that are not floating point, not (N, K, *spatial) with N >= 1 and K >= 2, or empty;
- labels that are not int64, int32 or uint8, not of shape (N, *spatial), or on another device;
- labels outside [0, K) that are not `ignore_index`: a ValueError on the CPU; on CUDA the kernels
  count them and a device-side assertion (no host synchronization, so the loss can be captured
  in a CUDA graph) fails the next synchronizing call with "device-side assert triggered", as
  torch.nn.functional.cross_entropy does for such targets;
- class weights that are not a floating (K,) tensor on the logits' device; a negative smooth or
  lambda.
NaN or Inf in the logits of a voxel that is not ignored propagates to the loss and its gradients.

`dice_ce_reference` computes the same loss unfused, from F.softmax, F.one_hot and
F.cross_entropy: the test oracle.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .ops.dice_ce import dice_ce

LABEL_DTYPES = (torch.int64, torch.int32, torch.uint8)


def _ignore_is_representable(ignore_index: int, dtype: torch.dtype) -> bool:
    """Whether a label of this dtype can equal ignore_index (comparing a tensor with an integer
    it cannot represent wraps the integer around instead of returning False)."""
    info = torch.iinfo(dtype)
    return info.min <= ignore_index <= info.max


def check_labels(labels: torch.Tensor, K: int, ignore_index: int) -> None:
    """Raises ValueError if a label is outside [0, K) and not ignore_index.

    Only for labels in host memory: on a GPU reading the labels' range back would synchronize
    the host with the device on every call; there the fused op checks them on the device instead
    (a device-side assertion that fails the next synchronizing call, like cross_entropy's)."""
    if labels.device.type != "cpu":
        return
    lo, hi = torch.stack(torch.aminmax(labels)).tolist()
    if lo >= 0 and hi < K:
        return
    bad = (labels < 0) | (labels >= K)
    if _ignore_is_representable(ignore_index, labels.dtype):
        bad &= labels != ignore_index
    count = int(bad.sum())
    if count:
        example = int(labels[bad][0])
        raise ValueError(
            f"effseg: labels must be class indices in [0, {K}) or ignore_index ({ignore_index}); "
            f"{count} voxel(s) are not, e.g. {example}"
        )


def check_dice_ce_args(logits, labels, weight, ignore_index, smooth, lambda_ce,
                       lambda_dice) -> None:
    """Every check `dice_ce_loss` applies before calling the fused op."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"effseg: logits must be a tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(
            f"effseg: logits must be float64, float32, float16 or bfloat16, got {logits.dtype}"
        )
    if logits.dim() < 2:
        raise ValueError(
            f"effseg: logits must have shape (N, K, *spatial), got shape {tuple(logits.shape)}"
        )
    if logits.numel() == 0:
        raise ValueError(f"effseg: logits are empty (shape {tuple(logits.shape)})")
    K = logits.shape[1]
    if K < 2:
        raise ValueError(
            f"effseg: logits need K >= 2 classes along dim 1 (softmax over one class is "
            f"constant), got shape {tuple(logits.shape)}"
        )
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"effseg: labels must be a tensor, got {type(labels).__name__}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(
            f"effseg: labels must be integer class indices (int64, int32 or uint8), got "
            f"{labels.dtype}"
        )
    want = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(labels.shape) != want:
        raise ValueError(
            f"effseg: labels must have shape {want} (the logits' shape without the class "
            f"dimension), got {tuple(labels.shape)}"
        )
    if labels.device != logits.device:
        raise ValueError(f"effseg: labels are on {labels.device} but the logits are on "
                         f"{logits.device}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"effseg: weight must be a tensor or None, got "
                            f"{type(weight).__name__}")
        if not weight.is_floating_point():
            raise TypeError(f"effseg: weight must be floating point, got {weight.dtype}")
        if tuple(weight.shape) != (K,):
            raise ValueError(
                f"effseg: weight must have shape ({K},), one value per class, got "
                f"{tuple(weight.shape)}"
            )
        if weight.device != logits.device:
            raise ValueError(f"effseg: weight is on {weight.device} but the logits are on "
                             f"{logits.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"effseg: ignore_index must be an int, got {type(ignore_index).__name__}")
    for name, value in (("smooth", smooth), ("lambda_ce", lambda_ce),
                        ("lambda_dice", lambda_dice)):
        if not (math.isfinite(float(value)) and float(value) >= 0):
            raise ValueError(f"effseg: {name} must be a finite number >= 0, got {value}")
    check_labels(labels, K, ignore_index)


def dice_ce_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None,
                 ignore_index: int = -100, smooth: float = 1e-5, include_background: bool = True,
                 batch_dice: bool = False, lambda_ce: float = 1.0,
                 lambda_dice: float = 1.0) -> torch.Tensor:
    """The fused loss (see the module docstring for its definition)."""
    check_dice_ce_args(logits, labels, weight, ignore_index, smooth, lambda_ce, lambda_dice)
    return dice_ce(logits, labels, weight, int(ignore_index), float(smooth),
                   bool(include_background), bool(batch_dice), float(lambda_ce),
                   float(lambda_dice))


class DiceCELoss(torch.nn.Module):
    """lambda_ce * cross-entropy + lambda_dice * soft-Dice loss of softmax(logits) against integer
    labels, fused: no one-hot targets, no probabilities saved for backward (module docstring).

    `weight` (K,) is registered as a buffer, so it moves with the module (`.to(device)`).
    forward(logits (N, K, *spatial), labels (N, *spatial)) -> 0-dim loss.
    """

    weight: torch.Tensor | None

    def __init__(self, include_background: bool = True, weight: torch.Tensor | None = None,
                 ignore_index: int = -100, smooth: float = 1e-5, batch_dice: bool = False,
                 lambda_ce: float = 1.0, lambda_dice: float = 1.0) -> None:
        super().__init__()
        if weight is not None and not (isinstance(weight, torch.Tensor)
                                       and weight.is_floating_point() and weight.dim() == 1):
            raise TypeError("effseg: weight must be a floating-point (K,) tensor or None")
        self.register_buffer("weight", weight)
        self.include_background = bool(include_background)
        self.ignore_index = int(ignore_index)
        self.smooth = float(smooth)
        self.batch_dice = bool(batch_dice)
        self.lambda_ce = float(lambda_ce)
        self.lambda_dice = float(lambda_dice)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return dice_ce_loss(logits, labels, self.weight, self.ignore_index, self.smooth,
                            self.include_background, self.batch_dice, self.lambda_ce,
                            self.lambda_dice)

    def extra_repr(self) -> str:
        return (f"include_background={self.include_background}, ignore_index={self.ignore_index}, "
                f"smooth={self.smooth}, batch_dice={self.batch_dice}, "
                f"lambda_ce={self.lambda_ce}, lambda_dice={self.lambda_dice}")


class DeepSupervisionLoss(torch.nn.Module):
    """A loss over the outputs of a deep-supervised network, finest first: the weighted mean of
    `loss(output_k, labels_k)` with weights 1, 1/2, 1/4, ... (nnU-Net's), where labels_k are the
    labels sampled every `strides[k]` voxels (labels[:, ::s0, ::s1, ::s2], nearest: the voxel
    each coarse output sits on), which has the coarse output's shape ceil(n / s).

    `strides` come from the network (`FullVolumeFCN.output_strides()`); a single tensor (a
    network without deep supervision, or in eval mode) goes to `loss` with the full labels.
    Outputs go to `loss` as they are (the fused loss reads any layout).
    """

    def __init__(self, loss: torch.nn.Module, strides, weights=None) -> None:
        super().__init__()
        self.loss = loss
        self.strides = [tuple(int(v) for v in s) for s in strides]
        if not self.strides or any(len(s) != 3 or min(s) < 1 for s in self.strides):
            raise ValueError(f"effseg: strides must be a non-empty list of 3 positive ints per "
                             f"output, got {strides}")
        if weights is None:
            weights = [0.5 ** k for k in range(len(self.strides))]
        weights = [float(w) for w in weights]
        if len(weights) != len(self.strides) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"effseg: weights must be {len(self.strides)} non-negative numbers "
                             f"with a positive sum, got {weights}")
        total = sum(weights)
        self.weights = [w / total for w in weights]

    def forward(self, outputs, labels: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, labels)
        if len(outputs) != len(self.strides):
            raise ValueError(f"effseg: {len(outputs)} outputs for {len(self.strides)} strides")
        total = None
        for out, (a, b, c), w in zip(outputs, self.strides, self.weights):
            if not w:
                continue
            sub = labels if (a, b, c) == (1, 1, 1) else \
                labels[:, ::a, ::b, ::c].contiguous()
            term = w * self.loss(out, sub)
            total = term if total is None else total + term
        return total


def dice_ce_reference(logits: torch.Tensor, labels: torch.Tensor,
                      weight: torch.Tensor | None = None, ignore_index: int = -100,
                      smooth: float = 1e-5, include_background: bool = True,
                      batch_dice: bool = False, lambda_ce: float = 1.0,
                      lambda_dice: float = 1.0) -> torch.Tensor:
    """The same loss as `dice_ce_loss`, unfused, from stock ops (one-hot targets and the
    probabilities are materialized and kept for backward). Computed in the logits' dtype."""
    N, K = logits.shape[:2]
    x = logits.reshape(N, K, -1)
    y = labels.reshape(N, -1).long()
    keep = y != ignore_index
    loss = x.new_zeros(())
    if lambda_dice:
        p = F.softmax(x, dim=1)
        onehot = F.one_hot(torch.where(keep, y, 0), K).movedim(-1, 1).to(p.dtype)
        mask = keep.unsqueeze(1).to(p.dtype)
        onehot = onehot * mask
        dims = (0, 2) if batch_dice else (2,)
        inter = (p * onehot).sum(dims)
        prob = (p * mask).sum(dims)
        count = onehot.sum(dims)
        dice = (2 * inter + smooth) / (prob + count + smooth)
        dice = dice[..., 0 if include_background else 1:]
        loss = loss + lambda_dice * (1 - dice.mean())
    if lambda_ce:
        w = None if weight is None else weight.to(logits.dtype)
        loss = loss + lambda_ce * F.cross_entropy(x, y, weight=w, ignore_index=ignore_index)
    return loss
