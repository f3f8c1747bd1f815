"""Hungarian matching of predicted to ground-truth boxes with candidate pruning and an IoU gate.

Used identically by Channel B (which preds are supervised) and by evaluation (F1). A batch of
images is matched in one vectorised pass over all their (pred, GT) pairs; only images where
some box has several feasible partners go to the Hungarian solver.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment


@dataclass(frozen=True)
class MatchConfig:
    """The matching knobs (config section `match`): one definition for Channel B, in-training
    evaluation and `coordexp eval`."""

    candidate_top_k: int = 10  # GT candidates kept per prediction, by IoU
    iou_gate: float = 0.3  # least IoU of a matched pair
    fp_cost: float = 1.0  # cost of an unmatched prediction
    fn_cost: float = 1.0  # cost of an unmatched GT object


_DEFAULT = MatchConfig()


@dataclass(frozen=True)
class Match:
    """pairs (pred_i, gt_j) sorted by pred index, with matched_ious in the same order."""

    pairs: list[tuple[int, int]]
    fp_indices: list[int]
    fn_indices: list[int]
    gating_rejections: int  # candidate pairs whose IoU fell below the gate
    matched_ious: list[float]


@dataclass(frozen=True)
class PairTable:
    """Every (pred, GT) pair of a batch of images, flattened image by image, pred-major:
    pair n is (pred[n], gt[n]) of image[n], indices local to that image. N = sum P_i * G_i."""

    num_pred: np.ndarray  # [I]
    num_gt: np.ndarray  # [I]
    image: np.ndarray  # [N]
    pred: np.ndarray  # [N]
    gt: np.ndarray  # [N]
    iou: np.ndarray  # [N]
    candidate: np.ndarray  # [N] bool: gt is among pred's candidate_top_k


def pairwise_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact IoU of every pair: [P, 4], [G, 4] xyxy -> [P, G]; an inverted side counts as empty."""
    return _iou(a[:, None, :], b[None, :, :])


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise IoU of broadcastable [..., 4] xyxy boxes."""
    w = np.maximum(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0)
    h = np.maximum(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0)
    inter = w * h
    union = _area(a) + _area(b) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _area(boxes: np.ndarray) -> np.ndarray:
    return (np.maximum(boxes[..., 2] - boxes[..., 0], 0)
            * np.maximum(boxes[..., 3] - boxes[..., 1], 0))


def build_pair_table(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray],
                     candidate_top_k: int) -> PairTable:
    """IoU and candidates of every pair: preds[i] [P_i, 4], gts[i] [G_i, 4] xyxy, one space.

    A pred's candidates are its top_k GT by IoU (ties by GT index), or by centre distance
    when all its IoUs are 0.
    """
    pred_all, num_pred, pred_off = _stack(preds)  # [sum P, 4], [I], [I]
    gt_all, num_gt, gt_off = _stack(gts)
    per_image = num_pred * num_gt  # [I]
    image = np.repeat(np.arange(len(num_pred)), per_image)  # [N]
    k = np.arange(len(image)) - np.repeat(np.cumsum(per_image) - per_image, per_image)
    pred, gt = k // num_gt[image], k % num_gt[image]  # [N], [N]
    a, b = pred_all[pred_off[image] + pred], gt_all[gt_off[image] + gt]  # [N, 4], [N, 4]
    iou = _iou(a, b)
    return PairTable(num_pred, num_gt, image, pred, gt, iou,
                     _top_k(pred_off[image] + pred, gt, iou, a, b, candidate_top_k))


def _stack(boxes: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arrays = [np.asarray(x, dtype=np.float64).reshape(-1, 4) for x in boxes]
    counts = np.array([len(x) for x in arrays], dtype=np.int64)
    stacked = np.concatenate(arrays) if arrays else np.zeros((0, 4))
    return stacked, counts, np.cumsum(counts) - counts


def _top_k(owner: np.ndarray, gt: np.ndarray, iou: np.ndarray, a: np.ndarray, b: np.ndarray,
           top_k: int) -> np.ndarray:
    """[N] bool: pair ranks within the first top_k of its pred (owner = global pred id)."""
    if len(owner) == 0:
        return np.zeros(0, dtype=bool)
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])  # owner is non-decreasing
    best = np.repeat(np.maximum.reduceat(iou, starts), np.diff(np.r_[starts, len(owner)]))
    centre_d2 = (((a[:, :2] + a[:, 2:]) - (b[:, :2] + b[:, 2:])) ** 2).sum(1)  # (2 x offset)^2
    key = np.where(best > 0, -iou, centre_d2)  # [N], smaller ranks first
    order = np.lexsort((gt, key, owner))  # by pred, then key, then GT index
    first = np.searchsorted(owner[order], owner[order])  # where each pred's run starts
    rank = np.empty(len(owner), dtype=np.int64)
    rank[order] = np.arange(len(owner)) - first
    return rank < top_k


def match_pair_table(table: PairTable, *, iou_gate: float, fp_cost: float,
                     fn_cost: float) -> list[Match]:
    """One Match per image: minimum cost with 1 - IoU per pair, fp_cost per unmatched pred,
    fn_cost per unmatched GT; pairs outside the candidates or below the gate are infeasible."""
    direct, solved, rejections = _assign(table, iou_gate, fp_cost, fn_cost)
    ends = np.cumsum(np.bincount(table.image[direct], minlength=len(table.num_pred))).tolist()
    pred, gt, iou = (table.pred[direct].tolist(), table.gt[direct].tolist(),
                     table.iou[direct].tolist())
    num_pred, num_gt = table.num_pred.tolist(), table.num_gt.tolist()
    first_pair = _first_pair(table).tolist()
    matches, start = [], 0
    for i, end in enumerate(ends):
        if i in solved:
            pairs = solved[i]
            ious = [float(table.iou[first_pair[i] + a * num_gt[i] + b]) for a, b in pairs]
        else:
            pairs = list(zip(pred[start:end], gt[start:end], strict=True))
            ious = iou[start:end]
        start = end
        matches.append(_make_match(pairs, ious, num_pred[i], num_gt[i], int(rejections[i])))
    return matches


def count_matches(table: PairTable, *, iou_gate: float, fp_cost: float,
                  fn_cost: float) -> np.ndarray:
    """[I] how many pairs match_pair_table would match in each image, without building Matches."""
    direct, solved, _ = _assign(table, iou_gate, fp_cost, fn_cost)
    counts = np.bincount(table.image[direct], minlength=len(table.num_pred))
    for i, pairs in solved.items():
        counts[i] = len(pairs)
    return counts


def _assign(table: PairTable, iou_gate: float, fp_cost: float, fn_cost: float
            ) -> tuple[np.ndarray, dict[int, list[tuple[int, int]]], np.ndarray]:
    """[N] pairs matched directly (images where no box has two feasible partners: each
    feasible pair is matched iff that is cheaper), the solved pairs of the other images, and
    [I] gating rejections."""
    feasible = table.candidate & (table.iou >= iou_gate)  # [N]
    tangled = _tangled_images(table, feasible)  # [I] bool
    direct = feasible & ~tangled[table.image] & (1.0 - table.iou < fp_cost + fn_cost)
    rejections = np.bincount(table.image[table.candidate & ~feasible],
                             minlength=len(table.num_pred))
    pair_cost = np.where(feasible, 1.0 - table.iou, np.inf)  # [N]
    first_pair = _first_pair(table)
    solved = {}
    for i in np.flatnonzero(tangled).tolist():
        shape = (int(table.num_pred[i]), int(table.num_gt[i]))
        block = pair_cost[first_pair[i]: first_pair[i] + shape[0] * shape[1]].reshape(shape)
        solved[i] = _solve_image(block, fp_cost, fn_cost)
    return direct, solved, rejections


def _first_pair(table: PairTable) -> np.ndarray:
    """[I] index of each image's first pair in the table."""
    per_image = table.num_pred * table.num_gt
    return np.cumsum(per_image) - per_image


def _tangled_images(table: PairTable, feasible: np.ndarray) -> np.ndarray:
    """[I] bool: images where some pred or GT has more than one feasible partner."""
    pred_id = (np.cumsum(table.num_pred) - table.num_pred)[table.image] + table.pred  # [N]
    gt_id = (np.cumsum(table.num_gt) - table.num_gt)[table.image] + table.gt  # [N]
    per_pred = np.bincount(pred_id[feasible], minlength=int(table.num_pred.sum()))
    per_gt = np.bincount(gt_id[feasible], minlength=int(table.num_gt.sum()))
    crowded = feasible & ((per_pred[pred_id] > 1) | (per_gt[gt_id] > 1))
    tangled = np.zeros(len(table.num_pred), dtype=bool)
    tangled[table.image[crowded]] = True
    return tangled


def _solve_image(pair_cost: np.ndarray, fp_cost: float,
                 fn_cost: float) -> list[tuple[int, int]]:
    """Hungarian on the square dummy-augmented matrix [[pair | fp], [fn | 0]] of one image
    (pair_cost [P, G], inf = infeasible), restricted to the preds and GT that have a feasible
    pair: the others can only be FP / FN."""
    ok = pair_cost < np.inf  # [P, G]
    rows, cols = np.flatnonzero(ok.any(1)), np.flatnonzero(ok.any(0))
    p, g = len(rows), len(cols)
    cost = np.zeros((p + g, g + p))  # [p + g, g + p]
    cost[:p, :g] = pair_cost[np.ix_(rows, cols)]
    cost[:p, g:] = fp_cost  # pred left unmatched
    cost[p:, :g] = fn_cost  # GT left unmatched
    r, c = linear_sum_assignment(cost)
    real = (r < p) & (c < g)
    return list(zip(rows[r[real]].tolist(), cols[c[real]].tolist(), strict=True))


def _make_match(pairs: list[tuple[int, int]], ious: list[float], num_pred: int, num_gt: int,
                rejections: int) -> Match:
    matched_pred = {i for i, _ in pairs}
    matched_gt = {j for _, j in pairs}
    return Match(pairs, [i for i in range(num_pred) if i not in matched_pred],
                 [j for j in range(num_gt) if j not in matched_gt], rejections, ious)


def match_boxes_batched(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], *,
                        candidate_top_k: int = _DEFAULT.candidate_top_k,
                        iou_gate: float = _DEFAULT.iou_gate, fp_cost: float = _DEFAULT.fp_cost,
                        fn_cost: float = _DEFAULT.fn_cost) -> list[Match]:
    """match_boxes for many images at once: preds[i] [P_i, 4] against gts[i] [G_i, 4]."""
    table = build_pair_table(preds, gts, candidate_top_k)
    return match_pair_table(table, iou_gate=iou_gate, fp_cost=fp_cost, fn_cost=fn_cost)


def match_boxes(pred: np.ndarray, gt: np.ndarray, *,
                candidate_top_k: int = _DEFAULT.candidate_top_k,
                iou_gate: float = _DEFAULT.iou_gate, fp_cost: float = _DEFAULT.fp_cost,
                fn_cost: float = _DEFAULT.fn_cost) -> Match:
    """Minimum-cost 1:1 matching of pred [P, 4] to gt [G, 4] (xyxy, any one space): a pair
    costs 1 - IoU, an unmatched pred fp_cost, an unmatched GT fn_cost; pairs outside the
    pred's candidate_top_k or with IoU below iou_gate are infeasible."""
    return match_boxes_batched([pred], [gt], candidate_top_k=candidate_top_k, iou_gate=iou_gate,
                               fp_cost=fp_cost, fn_cost=fn_cost)[0]
