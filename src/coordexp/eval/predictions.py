"""Predictions, typed: one `Prediction` per image is what rollouts produce, what evaluation,
monitor dumps and the predictions file read, and what a pred JSONL line holds. Box scores come
from the token log-probabilities (AP ranks by them; constant scores only when asked for).

Pred JSONL line: {"images": [path], "width": W, "height": H,
                  "objects": [{"desc": str, "score": float, "bbox_2d": [x1, y1, x2, y2] pixels}],
                  "raw_text": str (optional), "parse_*": counters (optional)}.
Without "objects" the "raw_text" is parsed (bins -> pixels of the GT image); box scores then
come from "token_pieces" + "token_logprobs", or from constant_score when that is asked for.
Lines are untrusted input: every problem is a UserError naming the file and line.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coordexp.codec import CoordCodec
from coordexp.data.records import Record, iter_jsonl
from coordexp.errors import UserError
from coordexp.parsing import (
    REASONS,
    ObjectTokens,
    ParseResult,
    parse_coordjson,
    parse_coordjson_tokens,
)

PARSE_COUNTERS = ("parse_invalid_rollout", "parse_truncated", "parse_dropped_invalid",
                  "parse_dropped_ambiguous") + tuple(f"parse_dropped_{r}" for r in REASONS)
_CODEC = CoordCodec()


@dataclass(frozen=True)
class Prediction:
    """One image's predicted objects in emission order."""

    image: str
    width: int
    height: int
    descs: list[str]
    boxes_px: np.ndarray  # [P, 4] xyxy
    scores: np.ndarray  # [P]
    parse: dict[str, int]  # PARSE_COUNTERS of this image
    raw_text: str | None = None
    boxes_bins: np.ndarray | None = None  # [P, 4] as the model wrote them, when parsed here

    def to_line(self) -> dict:
        """The pred JSONL line."""
        objects = [{"desc": d, "score": float(s), "bbox_2d": b}
                   for d, s, b in zip(self.descs, self.scores, self.boxes_px.tolist(),
                                      strict=True)]
        line = {"images": [self.image], "width": self.width, "height": self.height,
                "objects": objects}
        return line | ({"raw_text": self.raw_text} if self.raw_text is not None else {}) | \
            self.parse


def parse_counts(r: ParseResult) -> dict[str, int]:
    """PARSE_COUNTERS of one parse."""
    counts = {"parse_invalid_rollout": int(r.invalid_rollout), "parse_truncated": int(r.truncated),
              "parse_dropped_invalid": r.dropped_invalid,
              "parse_dropped_ambiguous": r.dropped_ambiguous}
    return counts | {f"parse_dropped_{k}": v for k, v in r.dropped_by_reason.items()}


def from_parse(gt: Record, result: ParseResult, scores: list[float],
               raw_text: str | None) -> Prediction:
    """A Prediction from parsed model output: bins -> pixels of the record's image."""
    bins = np.asarray([o["bbox_2d"] for o in result.objects], dtype=np.int64).reshape(-1, 4)
    boxes = [_CODEC.box_bins_to_px(b, gt.width, gt.height) for b in bins.tolist()]
    return Prediction(gt.image, gt.width, gt.height, [o["desc"] for o in result.objects],
                      _boxes(boxes), np.asarray(scores, dtype=np.float64), parse_counts(result),
                      raw_text, bins)


def cap_predictions(preds: list[Prediction | None],
                    cap: int) -> tuple[list[Prediction | None], int]:
    """Each image's `cap` highest-scoring objects (ties: emission order), kept in emission
    order, and how many objects the cap dropped over all images. Bounds the work per image."""
    out, dropped = [], 0
    for p in preds:
        if p is None or len(p.descs) <= cap:
            out.append(p)
            continue
        keep = np.sort(np.argsort(-p.scores, kind="stable")[:cap])  # [cap]
        dropped += len(p.descs) - cap
        out.append(dataclasses.replace(
            p, descs=[p.descs[i] for i in keep.tolist()], boxes_px=p.boxes_px[keep],
            scores=p.scores[keep],
            boxes_bins=None if p.boxes_bins is None else p.boxes_bins[keep]))
    return out, dropped


def box_scores(token_logprobs: Sequence[float] | np.ndarray, tokens: Sequence[ObjectTokens],
               *, desc_weight: float = 0.0) -> list[float]:
    """One score per object: the geometric mean of its 4 coord-token probabilities, fused as
    (1 - desc_weight) * geom + desc_weight * mean(desc-token probabilities) when desc_weight > 0.

    token_logprobs [T]: log-probability of each generated token (natural log);
    tokens: from parse_coordjson_tokens (indices into token_logprobs).
    """
    if not 0.0 <= desc_weight <= 1.0:
        raise ValueError(f"desc_weight must be in [0, 1], got {desc_weight}")
    logp = np.asarray(token_logprobs, dtype=np.float64)  # [T]
    scores = []
    for t in tokens:
        geom = float(np.exp(logp[t.coords].mean()))
        if desc_weight > 0 and t.desc:
            desc = float(np.exp(logp[t.desc]).mean())
            geom = (1.0 - desc_weight) * geom + desc_weight * desc
        scores.append(geom)
    return scores


# -- reading pred JSONL lines ---------------------------------------------------------------
def read_prediction_lines(path: str | Path) -> list[tuple[object, str]]:
    """Decoded JSON lines with their "file:line"; blank lines skipped."""
    return list(iter_jsonl(path))


def align_lines(gt_records: list[Record], lines: list[tuple[object, str]],
                source: str) -> list[tuple[object, str]]:
    """For every GT record, its pred line (None if absent) and where that came from."""
    index = {}
    for i, r in enumerate(gt_records):
        if r.image in index:
            raise UserError(f"ground truth lists image {r.image!r} twice (records "
                            f"{index[r.image] + 1} and {i + 1}); images must be unique")
        index[r.image] = i
    keys = [_image_key(obj, where) for obj, where in lines]
    if not any(k in index for k in keys):
        first = f" (first: {keys[0]!r})" if keys else ""
        raise UserError(f"{source}: none of its {len(keys)} records names an image of the "
                        f"ground truth{first}; write image paths exactly as the GT file does")
    aligned: list[tuple[object, str]] = [(None, "")] * len(gt_records)
    for key, (obj, where) in zip(keys, lines, strict=True):
        if key not in index:
            raise UserError(f"{where}: image {key!r} is not in the ground truth")
        if aligned[index[key]][0] is not None:
            raise UserError(f"{where}: image {key!r} already has predictions at "
                            f"{aligned[index[key]][1]}")
        aligned[index[key]] = (obj, where)
    return aligned


def _image_key(obj: object, where: str) -> str:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: a prediction record must be a JSON object")
    images = obj.get("images")
    if not (isinstance(images, list) and len(images) == 1 and isinstance(images[0], str)):
        raise UserError(f"{where}: 'images' must be a list with exactly one path")
    return images[0]


def read_prediction(obj: dict, where: str, gt: Record, *, constant_score: float | None,
                    desc_weight: float, field_order: str) -> Prediction:
    """One validated pred line -> Prediction (pixel boxes of the GT image)."""
    for key, size in (("width", gt.width), ("height", gt.height)):
        if key in obj and obj[key] != size:
            raise UserError(f"{where}: {key} {obj[key]!r} differs from the ground truth's "
                            f"{size} for {gt.image!r}; boxes must be pixels of the same image")
    if "objects" in obj:
        return _read_objects(obj, where, gt, constant_score)
    if "raw_text" in obj:
        return _parse_raw_text(obj, where, gt, constant_score, desc_weight, field_order)
    raise UserError(f"{where}: needs 'objects' (pixel boxes with scores) or 'raw_text'")


def _read_objects(obj: dict, where: str, gt: Record, constant_score: float | None) -> Prediction:
    objects = obj["objects"]
    if not isinstance(objects, list):
        raise UserError(f"{where}: 'objects' must be a list")
    need_score = constant_score is None
    for i, o in enumerate(objects):
        problem = _object_problem(o, need_score)
        if problem is not None:
            raise UserError(f"{where}: object {i}: {problem}")
    boxes = _boxes([o["bbox_2d"] for o in objects])
    scores = np.asarray([o["score"] for o in objects] if need_score
                        else [constant_score] * len(objects), dtype=np.float64)
    parse = {}
    for key in PARSE_COUNTERS:
        value = obj.get(key, 0)
        if not (isinstance(value, int) and value >= 0):
            raise UserError(f"{where}: {key!r} must be a count, got {value!r}")
        parse[key] = int(value)
    return Prediction(gt.image, gt.width, gt.height, [o["desc"] for o in objects], boxes,
                      scores, parse)


def _object_problem(o: object, need_score: bool) -> str | None:
    """What is wrong with one predicted object, None if nothing."""
    if not (isinstance(o, dict) and isinstance(o.get("desc"), str)):
        return "needs a string 'desc'"
    box = o.get("bbox_2d")
    if not (isinstance(box, list | tuple) and len(box) == 4 and all(map(_is_number, box))):
        return "'bbox_2d' must be 4 finite pixel numbers [x1, y1, x2, y2]"
    if need_score and not _is_number(o.get("score")):
        return ("needs a finite number 'score' (AP ranks by it); to rank by emission order "
                "instead, evaluate with constant_score=1.0")
    if need_score and not 0.0 <= o["score"] <= 1.0:  # scores rank: a 1.2 is a caller's bug
        return f"score {o['score']} is outside [0, 1]"
    return None


def _parse_raw_text(obj: dict, where: str, gt: Record, constant_score: float | None,
                    desc_weight: float, field_order: str) -> Prediction:
    text, pieces, logprobs = obj["raw_text"], obj.get("token_pieces"), obj.get("token_logprobs")
    if not isinstance(text, str):
        raise UserError(f"{where}: 'raw_text' must be a string")
    if pieces is None and constant_score is None:
        raise UserError(f"{where}: 'raw_text' alone gives no box scores; add 'token_pieces' and "
                        "'token_logprobs', or evaluate with constant_score=1.0")
    if pieces is None:
        result = parse_coordjson(text, field_order=field_order)
    else:
        _check_tokens(pieces, logprobs, text, where)
        result = parse_coordjson_tokens(pieces, field_order=field_order)
    scores = ([constant_score] * len(result.objects) if constant_score is not None
              else box_scores(logprobs, result.tokens, desc_weight=desc_weight))
    return from_parse(gt, result, scores, text)


def _check_tokens(pieces: object, logprobs: object, text: str, where: str) -> None:
    if not (isinstance(pieces, list) and all(isinstance(p, str) for p in pieces)):
        raise UserError(f"{where}: 'token_pieces' must be a list of strings")
    if not (isinstance(logprobs, list) and len(logprobs) == len(pieces)
            and all(map(_is_number, logprobs))):
        raise UserError(f"{where}: 'token_logprobs' must be one number per token piece")
    if "".join(pieces) != text:
        raise UserError(f"{where}: 'token_pieces' do not concatenate to 'raw_text'")


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _boxes(rows: list) -> np.ndarray:
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)  # [N, 4]
