"""Autograd binding of the fused softmax + cross-entropy + soft-Dice loss ops.

Forward runs `dice_ce_forward` (one pass over the logits: per (sample, class) sums I, P, G and the
cross-entropy sums) and turns those O(N*K) sums into the loss here. For backward it saves only the
logits, the labels, the class weights and O(N*K) coefficients: no probabilities, no one-hot
targets. `dice_ce_backward` recomputes the softmax from the logits, voxel by voxel.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._library import op


def loss_and_coefficients(stats: torch.Tensor, ce: torch.Tensor, smooth: float,
                          include_background: bool, batch_dice: bool, lambda_ce: float,
                          lambda_dice: float):
    """The loss from the forward sums, and what backward needs: coef_dice (N, K, 2) holding
    (alpha, beta) with dLoss/dp_k = beta + [y == k] * alpha at every voxel of sample n, and the
    cross-entropy scale coef_ce = lambda_ce / sum(w_y).

    With dice_k = (2 I + s) / D and D = P + G + s,
    d dice_k / dp_k = 2 [y == k] / D - (2 I + s) / D^2 at every voxel that is not ignored;
    the Dice loss 1 - mean(dice) over M values scales that by -lambda_dice / M. A term whose lambda
    is 0 is left out, so an all-ignored batch (sum(w_y) = 0, CE = 0/0) cannot poison a Dice-only
    loss with NaN.
    """
    inter, prob, count = stats.unbind(-1)
    if batch_dice:
        inter, prob, count = (t.sum(0, keepdim=True) for t in (inter, prob, count))
    denom = prob + count + smooth
    numer = 2 * inter + smooth
    first = 0 if include_background else 1
    loss = stats.new_zeros(())
    coef_dice = stats.new_zeros(stats.shape[:2] + (2,))
    if lambda_dice:
        dice = (numer / denom)[:, first:]
        loss = loss + lambda_dice * (1 - dice.mean())
        scale = lambda_dice / dice.numel()
        coef_dice[:, first:, 0] = (-2 * scale / denom)[:, first:]
        coef_dice[:, first:, 1] = (scale * numer / denom.square())[:, first:]
    coef_ce = stats.new_zeros(())
    if lambda_ce:
        loss = loss + lambda_ce * (ce[0] / ce[1])
        coef_ce = lambda_ce / ce[1]
    return loss, coef_dice, coef_ce


class DiceCEFunction(torch.autograd.Function):
    """lambda_ce * CE + lambda_dice * (1 - mean Dice) of softmax(logits, 1) against integer labels;
    see effseg.losses for the definitions. Labels are trusted here: effseg.losses checks them."""

    @staticmethod
    def forward(ctx, logits, labels, weight, ignore_index, smooth, include_background, batch_dice,
                lambda_ce, lambda_dice):
        stats, ce = op("dice_ce_forward", logits.device)(logits, labels, weight, ignore_index)
        loss, coef_dice, coef_ce = loss_and_coefficients(
            stats, ce, smooth, include_background, batch_dice, lambda_ce, lambda_dice)
        ctx.save_for_backward(logits, labels, weight, coef_dice, coef_ce)
        ctx.ignore_index = ignore_index
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        logits, labels, weight, coef_dice, coef_ce = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = op("dice_ce_backward", logits.device)(
                grad_loss, logits, labels, weight, ctx.ignore_index, coef_dice, coef_ce)
        return grad, None, None, None, None, None, None, None, None


def dice_ce(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None,
            ignore_index: int, smooth: float, include_background: bool, batch_dice: bool,
            lambda_ce: float, lambda_dice: float) -> torch.Tensor:
    """Arguments are trusted here; effseg.losses checks them."""
    return DiceCEFunction.apply(logits, labels, weight, ignore_index, smooth, include_background,
                                batch_dice, lambda_ce, lambda_dice)
