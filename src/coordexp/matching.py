"""Hungarian matching of predicted to ground-truth boxes with candidate pruning and an IoU gate.

Used identically by Channel B (which preds are supervised) and by evaluation (F1). A batch of
images is matched in one vectorised pass over the candidate (pred, GT) pairs; only images where
some box has several feasible partners go to the solver (dense when small, else a sparse
assignment over the feasible pairs). Memory grows with the candidates kept
(P x candidate_top_k), never with P x G: pairs are scored PAIR_BUDGET at a time and only each
pred's candidates are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

PAIR_BUDGET = 1 << 18  # (pred, GT) pairs scored at once, whatever P x G is
DENSE_CELLS = 1 << 16  # a tangled image up to this many cells is solved dense, beyond sparsely


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
    """The candidate (pred, GT) pairs of a batch of images: each pred's candidate_top_k GT,
    image by image, pred-major, GT ascending; indices local to the image. N <= sum P_i * k."""

    num_pred: np.ndarray  # [I]
    num_gt: np.ndarray  # [I]
    image: np.ndarray  # [N]
    pred: np.ndarray  # [N]
    gt: np.ndarray  # [N]
    iou: np.ndarray  # [N]


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
    """IoU of every candidate pair: preds[i] [P_i, 4], gts[i] [G_i, 4] xyxy, one space.

    A pred's candidates are its top_k GT by IoU (ties by GT index), or by centre distance
    when all its IoUs are 0.
    """
    pred_all, num_pred, pred_off = _stack(preds)  # [sum P, 4], [I], [I]
    gt_all, num_gt, gt_off = _stack(gts)
    owner_image = np.repeat(np.arange(len(num_pred)), num_pred)  # [sum P]
    ends = np.cumsum(num_gt[owner_image])  # [sum P] pairs up to and including each pred
    parts, start = [], 0
    while start < len(owner_image):  # preds in runs of about PAIR_BUDGET pairs
        done = ends[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, done + PAIR_BUDGET, side="right")))
        ids = np.arange(start, stop)  # global pred ids
        width = num_gt[owner_image[ids]]
        owner = np.repeat(ids, width)  # [n]
        gt = np.arange(len(owner)) - np.repeat(np.cumsum(width) - width, width)  # [n]
        image = owner_image[owner]
        a, b = pred_all[owner], gt_all[gt_off[image] + gt]  # [n, 4], [n, 4]
        iou = _iou(a, b)
        keep = _top_k(owner, gt, iou, a, b, candidate_top_k)
        parts.append((image[keep], (owner - pred_off[image])[keep], gt[keep], iou[keep]))
        start = stop
    image, pred, gt, iou = (np.concatenate([p[f] for p in parts]) if parts else
                            np.zeros(0, dtype=np.float64 if f == 3 else np.int64)
                            for f in range(4))
    return PairTable(num_pred, num_gt, image, pred, gt, iou)


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
    chosen = np.sort(np.concatenate([np.flatnonzero(direct), *solved.values()]))  # [M]
    ends = np.cumsum(np.bincount(table.image[chosen], minlength=len(table.num_pred))).tolist()
    pred, gt = table.pred[chosen].tolist(), table.gt[chosen].tolist()
    iou = table.iou[chosen].tolist()
    num_pred, num_gt = table.num_pred.tolist(), table.num_gt.tolist()
    matches, start = [], 0
    for i, end in enumerate(ends):
        pairs = list(zip(pred[start:end], gt[start:end], strict=True))
        matches.append(_make_match(pairs, iou[start:end], num_pred[i], num_gt[i],
                                   int(rejections[i])))
        start = end
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
            ) -> tuple[np.ndarray, dict[int, np.ndarray], np.ndarray]:
    """[N] pairs matched directly (images where no box has two feasible partners: each
    feasible pair is matched iff that is cheaper), the matched pair indices of the other
    images, and [I] gating rejections."""
    feasible = table.iou >= iou_gate  # [N]
    tangled = _tangled_images(table, feasible)  # [I] bool
    direct = feasible & ~tangled[table.image] & (1.0 - table.iou < fp_cost + fn_cost)
    rejections = np.bincount(table.image[~feasible], minlength=len(table.num_pred))
    bounds = np.searchsorted(table.image, np.arange(len(table.num_pred) + 1))  # [I + 1]
    solved = {}
    for i in np.flatnonzero(tangled).tolist():
        pairs = bounds[i] + np.flatnonzero(feasible[bounds[i]: bounds[i + 1]])
        picked = _solve_image(table.pred[pairs], table.gt[pairs], 1.0 - table.iou[pairs],
                              fp_cost, fn_cost)
        solved[i] = pairs[picked]
    return direct, solved, rejections


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


def _solve_image(pred: np.ndarray, gt: np.ndarray, cost: np.ndarray, fp_cost: float,
                 fn_cost: float) -> np.ndarray:
    """Indices of the matched pairs among one image's feasible pairs (pred [n], gt [n], cost
    [n]), over the p preds and g GT that have a feasible pair (the others can only be FP / FN).

    The problem is the dummy-augmented [[pair | fp], [fn | 0]] assignment. Small ones are
    solved dense (scipy's Hungarian: fastest there); past DENSE_CELLS, sparsely over the
    feasible pairs, each pred with its own dummy column (fp_cost), each GT with its own dummy
    row (fn_cost), and a dummy row meeting a dummy column only where their real pair is
    feasible (cost 0): enough for every optimum of the dense problem, since an optimum's
    matched pairs free exactly those dummies.
    """
    rows, r = np.unique(pred, return_inverse=True)
    cols, c = np.unique(gt, return_inverse=True)
    p, g = len(rows), len(cols)
    if (p + g) ** 2 <= DENSE_CELLS:
        dense = np.full((p + g, g + p), np.inf)  # [p + g, g + p]
        dense[r, c] = cost
        dense[:p, g:] = fp_cost  # pred left unmatched
        dense[p:, :g] = fn_cost  # GT left unmatched
        dense[p:, g:] = 0.0
        mr, mc = linear_sum_assignment(dense)
    else:
        edge_row = np.concatenate([r, np.arange(p), p + np.arange(g), p + c])
        edge_col = np.concatenate([c, g + np.arange(p), np.arange(g), g + r])
        weight = np.concatenate([cost, np.full(p, fp_cost), np.full(g, fn_cost),
                                 np.zeros(len(r))])
        # + 1 on every edge: the solver needs non-zero weights, and every full matching has
        # p + g edges, so the offset changes no choice
        graph = csr_matrix((weight + 1.0, (edge_row, edge_col)), shape=(p + g, g + p))
        mr, mc = min_weight_full_bipartite_matching(graph)
    real = (mr < p) & (mc < g)
    key = r * g + c  # [n] unique per pair
    order = np.argsort(key)
    return order[np.searchsorted(key[order], mr[real] * g + mc[real])]


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
