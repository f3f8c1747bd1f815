"""Box geometry on xyxy tensors: area, IoU, generalised and complete IoU, canonicalisation.

Pairwise functions take [P, 4], [G, 4] and return [P, G]; `paired_*` functions take two [N, 4]
tensors of matched boxes and return [N]. Everything is vectorised and differentiable.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

EPS = 1e-7


def box_area(boxes_xyxy: Tensor) -> Tensor:
    """Area of [..., 4] boxes -> [...]; negative sides count as zero."""
    wh = (boxes_xyxy[..., 2:] - boxes_xyxy[..., :2]).clamp(min=0)  # [..., 2]
    return wh[..., 0] * wh[..., 1]


def canonicalize_boxes(boxes_xyxy: Tensor) -> Tensor:
    """Order each axis (min, max) and clamp to [0, 1]: [..., 4] norm boxes -> [..., 4]."""
    lo = torch.minimum(boxes_xyxy[..., :2], boxes_xyxy[..., 2:])  # [..., 2]
    hi = torch.maximum(boxes_xyxy[..., :2], boxes_xyxy[..., 2:])  # [..., 2]
    return torch.cat([lo, hi], dim=-1).clamp(0.0, 1.0)


def _inter_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Intersection and union areas of broadcastable [..., 4] boxes -> ([...], [...])."""
    lt = torch.maximum(a[..., :2], b[..., :2])  # [..., 2]
    rb = torch.minimum(a[..., 2:], b[..., 2:])  # [..., 2]
    inter = box_area(torch.cat([lt, rb], dim=-1))
    return inter, box_area(a) + box_area(b) - inter


def _enclosing_wh(a: Tensor, b: Tensor) -> Tensor:
    """Width and height of the smallest box enclosing both: [..., 4] -> [..., 2]."""
    lt = torch.minimum(a[..., :2], b[..., :2])
    rb = torch.maximum(a[..., 2:], b[..., 2:])
    return (rb - lt).clamp(min=0)


def _iou(a: Tensor, b: Tensor, eps: float) -> Tensor:
    inter, union = _inter_union(a, b)
    return inter / union.clamp(min=eps)


def _giou(a: Tensor, b: Tensor, eps: float) -> Tensor:
    inter, union = _inter_union(a, b)
    enclose = _enclosing_wh(a, b).prod(-1).clamp(min=eps)
    return inter / union.clamp(min=eps) - (enclose - union) / enclose


def _ciou(a: Tensor, b: Tensor, eps: float) -> Tensor:
    """Complete IoU (Zheng et al. 2020) of broadcastable [..., 4] boxes; `a` is the prediction."""
    iou = _iou(a, b, eps)
    centre_gap = (a[..., :2] + a[..., 2:] - b[..., :2] - b[..., 2:]) / 2  # [..., 2]
    rho2 = centre_gap.pow(2).sum(-1)
    c2 = _enclosing_wh(a, b).pow(2).sum(-1).clamp(min=eps)
    wh_a = (a[..., 2:] - a[..., :2]).clamp(min=eps)  # [..., 2]
    wh_b = (b[..., 2:] - b[..., :2]).clamp(min=eps)
    angle_a = torch.atan(wh_a[..., 0] / wh_a[..., 1])
    angle_b = torch.atan(wh_b[..., 0] / wh_b[..., 1])
    v = (4 / math.pi**2) * (angle_b - angle_a).pow(2)
    alpha = v / (1 - iou + v + eps)  # not detached, as in the reference objective
    return iou - rho2 / c2 - alpha * v


def box_iou(a: Tensor, b: Tensor, eps: float = EPS) -> Tensor:
    """IoU of every pair: [P, 4], [G, 4] xyxy -> [P, G]."""
    return _iou(a[:, None, :], b[None, :, :], eps)


def generalized_box_iou(a: Tensor, b: Tensor, eps: float = EPS) -> Tensor:
    """Generalised IoU of every pair: [P, 4], [G, 4] xyxy -> [P, G], in [-1, 1]."""
    return _giou(a[:, None, :], b[None, :, :], eps)


def complete_box_iou(a: Tensor, b: Tensor, eps: float = EPS) -> Tensor:
    """Complete IoU of every pair: [P, 4], [G, 4] xyxy -> [P, G], in [-1.5, 1]."""
    return _ciou(a[:, None, :], b[None, :, :], eps)


def paired_complete_box_iou(pred: Tensor, gt: Tensor, eps: float = EPS) -> Tensor:
    """Complete IoU of matched boxes: [N, 4], [N, 4] xyxy -> [N]."""
    return _ciou(pred, gt, eps)
