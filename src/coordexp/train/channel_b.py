"""Channel B's targets: a rollout, parsed and matched to the ground truth, becomes one
teacher-forced answer with per-token supervision (reference section 4.5).

The answer is the rollout's append-ready prefix, kept token-identical, followed by the missed
ground-truth objects inside the same array, the closing `]}` and the end of turn:
- matched objects in the prefix: struct CE (desc and coord tokens excluded from CE); their
  4 coord slots go to the coord and box losses with the matched GT bins as targets;
- false positives, dropped objects, junk and the container opening: no supervision at all;
- appended objects: full CE (desc at `desc_ce_weight`), coord slots through the coord losses;
- the closure and end of turn: always supervised.
If the sample had dropped-invalid objects, the appended struct tokens are weighted by
`channel_b.drop_invalid_struct_ce_multiplier` (applied here, once).
"""

from __future__ import annotations

import dataclasses
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from coordexp.config import Config
from coordexp.data.collate import COORD, DESC, STRUCT, Batch, Collator
from coordexp.data.records import Record
from coordexp.data.render import render_object, sorted_objects_bins
from coordexp.matching import match_boxes
from coordexp.parsing import ParseResult, parse_coordjson_tokens

if TYPE_CHECKING:
    from coordexp.rollout import Rollout

FALLBACK_PREFIX = '{"objects": ['  # what an invalid rollout is replaced by
NO_TARGET = -1


@dataclass
class SampleTarget:
    """One Channel-B answer, token by token (end of turn included)."""

    text: str  # the answer text without the end-of-turn token
    ids: list[int]
    types: list[int]  # 0 (no CE) / STRUCT / DESC / COORD (a supervised coord slot)
    weights: list[float]  # CE weight per token (0 for 0 and COORD)
    target_bins: list[int]  # GT bin of each supervised coord slot, NO_TARGET elsewhere
    counts: dict[str, int] = field(default_factory=dict)


def append_fragment(prefix_has_objects: bool, missed: list[tuple[str, list[int]]], codec,
                    field_order: str) -> str:
    """What follows an append-ready prefix: `, ` only after a kept object and only when
    something is appended, the missed objects in the given order, then `]}`."""
    body = ", ".join(render_object(d, b, codec, field_order) for d, b in missed)
    return (", " if prefix_has_objects and missed else "") + body + "]}"


def prefix_tokens(rollout: Rollout, parse: ParseResult, tokenizer
                  ) -> tuple[str, list[tuple[int, int, int]]]:
    """The append-ready prefix: its text and (token id, char start, char end) per token.

    Whole rollout tokens are kept as generated; a last token that the cut splits (e.g. a
    merged `}, {"`) is replaced by the tokenization of its part before the cut. An invalid
    rollout is replaced by FALLBACK_PREFIX.
    """
    if parse.invalid_rollout:
        text, base, start, kept = FALLBACK_PREFIX, [], 0, FALLBACK_PREFIX
    else:
        text = "".join(rollout.pieces)[: parse.prefix_end]
        ends = np.cumsum([len(p) for p in rollout.pieces]).tolist()  # [T] char end per token
        whole = bisect_right(ends, parse.prefix_end)  # tokens ending at or before the cut
        start = ends[whole - 1] if whole else 0
        base = [(rollout.token_ids[i], ends[i] - len(rollout.pieces[i]), ends[i])
                for i in range(whole)]
        kept = text[start:]
    enc = tokenizer(kept, add_special_tokens=False, return_offsets_mapping=True)
    tail = [(tid, start + s, start + e)
            for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]
    return text, base + tail


def build_target(rollout: Rollout, record: Record, collator: Collator,
                 cfg: Config) -> SampleTarget:
    """Parse -> match -> the supervised answer for one rollout.

    Worked example (tiny BPE tokenizer, a 1000 px image, so pixels are bins). GT: cat
    [100, 100, 200, 200] and dog [500, 500, 600, 600]. Rollout: the cat near its GT, then a
    false-positive cup, then `]}`. Token, type (0 none / 1 struct / 2 desc / 3 coord), CE
    weight, target bin:

        '{"objects": [{"desc": "cat", "bbox_2d": ['   0  0.0   -1   merged into the container
        '<|coord_102|>'                                3  0.0  100   matched: GT bins
        ', '                                           1  1.0   -1   (x3, between the slots)
        '<|coord_99|>' '<|coord_198|>' '<|coord_201|>' 3  0.0  100 / 200 / 200
        ']}, {"desc": "cup", "bbox_2d": ['             0  0.0   -1   touches the FP: neutral
        '<|coord_900|>' ', ' ... '<|coord_950|>' ']}'  0  0.0   -1   the FP: no supervision
        ', {"' 'desc": "'                              1  1.0   -1   the missed dog, appended
        'dog", "bbox_2d": ['                           2  1.0   -1   desc_ce_weight
        '<|coord_500|>' ... '<|coord_600|>'            3  0.0  500 ... 600
        ']}]}' '<|im_end|>'                            1  1.0   -1   closure: always supervised

    The rollout's `]}]}` token is cut after the cup's `}`; its kept part is re-tokenized.
    """
    codec, order = collator.codec, cfg.data.field_order
    parse = parse_coordjson_tokens(rollout.pieces, field_order=order)
    gt = sorted_objects_bins(record, codec)  # [(desc, bins)] in the canonical order
    pred_bins = np.array([o["bbox_2d"] for o in parse.objects], dtype=float).reshape(-1, 4)
    gt_bins = np.array([b for _, b in gt], dtype=float).reshape(-1, 4)
    match = match_boxes(pred_bins, gt_bins, **dataclasses.asdict(cfg.match))
    text, prefix = prefix_tokens(rollout, parse, collator.tokenizer)
    types, bins = _prefix_supervision(text, prefix, parse, match.pairs, gt)
    missed = [gt[j] for j in sorted(match.fn_indices)]
    fragment = append_fragment(bool(parse.objects), missed, codec, order)
    tail_ids, tail_types = collator.answer_tokens(fragment)  # end of turn appended
    s = cfg.stage2_ab
    struct_w = s.channel_b.drop_invalid_struct_ce_multiplier if parse.dropped_invalid else 1.0
    tail_w = {0: 0.0, COORD: 0.0, STRUCT: struct_w, DESC: s.desc_ce_weight}
    ids = [tid for tid, _, _ in prefix] + tail_ids
    counts = {"samples": 1, "gt": len(gt), "pred": len(parse.objects),
              "matched": len(match.pairs), "fn_appended": len(missed),
              "gating_rejections": match.gating_rejections,
              "invalid_rollout": int(parse.invalid_rollout), "truncated": int(parse.truncated),
              "dropped_invalid": parse.dropped_invalid,
              "dropped_ambiguous": parse.dropped_ambiguous,
              "gen_tokens": len(rollout.token_ids)}
    return SampleTarget(
        text + fragment, ids, types + tail_types,
        [float(t == STRUCT) for t in types] + [tail_w[t] for t in tail_types],
        bins + [int(collator.id_to_bin[i]) if t == COORD else NO_TARGET
                for i, t in zip(tail_ids, tail_types, strict=True)],
        counts)


def _prefix_supervision(text: str, prefix, parse: ParseResult, pairs, gt
                        ) -> tuple[list[int], list[int]]:
    """Token types and coord targets in the prefix: only matched objects are supervised.

    A token gets struct CE iff all its characters belong to matched objects (or to the `, `
    between kept objects) and none to a matched desc value; so a token the BPE merged across
    a matched object and a false positive stays neutral.
    """
    allowed, desc, matched = (np.zeros(len(text), dtype=bool) for _ in range(3))
    for pred_i, _ in pairs:
        (o_start, o_end), (d_start, d_end) = parse.spans[pred_i].object, parse.spans[pred_i].desc
        allowed[o_start:o_end] = matched[o_start:o_end] = True
        desc[d_start:d_end] = True
    for left, right in zip(parse.spans, parse.spans[1:], strict=False):  # between kept objects
        gap = slice(left.object[1], right.object[0])
        if not text[gap].strip(", \t\n\r"):
            allowed[gap] = True
    starts = np.array([s for _, s, _ in prefix], dtype=int)
    ends = np.array([e for _, _, e in prefix], dtype=int)
    struct = ((_chars_in(matched, starts, ends) > 0)
              & (_chars_in(allowed, starts, ends) == ends - starts)
              & (_chars_in(desc, starts, ends) == 0))
    types, bins = [STRUCT if s else 0 for s in struct.tolist()], [NO_TARGET] * len(prefix)
    for pred_i, gt_j in pairs:
        for slot, k in enumerate(parse.tokens[pred_i].coords):  # atomic tokens, never re-cut
            types[k], bins[k] = COORD, gt[gt_j][1][slot]
    return types, bins


def _chars_in(mask: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """[T] how many characters of each token span [start, end) are set in mask [C]."""
    total = np.concatenate([[0], np.cumsum(mask)])
    return total[ends] - total[starts]


def encode_targets(collator: Collator, records: list[Record],
                   targets: list[SampleTarget]) -> tuple[Batch, torch.Tensor]:
    """Prompt + image + answer tokens -> a right-padded Batch whose coord slots are exactly
    the supervised ones (targets from the GT), and the CE weights [B, T]."""
    batch = collator.encode(records, [(t.ids, t.types) for t in targets])
    prompt_lens = batch.prompt_lens.tolist()
    weights = torch.zeros(batch.token_type.shape)
    bins = torch.full(batch.token_type.shape, NO_TARGET)
    for b, (p, target) in enumerate(zip(prompt_lens, targets, strict=True)):
        weights[b, p: p + len(target.ids)] = torch.tensor(target.weights)
        bins[b, p: p + len(target.ids)] = torch.tensor(target.target_bins)
    batch.coord_bins = bins[batch.coord_b, batch.coord_t]
    assert bool((batch.coord_bins >= 0).all()), "a supervised coord slot has no target"
    return batch, weights


def rollout_stats(targets: list[SampleTarget], seconds: float) -> dict[str, torch.Tensor]:
    """Channel-B rollout metrics as (sum, count) pairs; ratios form after aggregation."""
    n = {k: sum(t.counts[k] for t in targets) for k in targets[0].counts}
    per_sample = ("gt", "pred", "fn_appended", "gating_rejections", "dropped_invalid",
                  "dropped_ambiguous")
    names = {"gt": "gt_objects", "pred": "pred_objects", "dropped_invalid": "parse_dropped_invalid",
             "dropped_ambiguous": "parse_dropped_ambiguous"}
    stats = {f"rollout/{names.get(k, k)}_per_sample": _pair(n[k], n["samples"])
             for k in per_sample}
    return stats | {
        "rollout/precision": _pair(n["matched"], n["pred"]),
        "rollout/recall": _pair(n["matched"], n["gt"]),
        "rollout/f1": _pair(2 * n["matched"], n["pred"] + n["gt"]),  # 2PR / (P + R), micro
        "rollout/parse_invalid_rollout_rate": _pair(n["invalid_rollout"], n["samples"]),
        "rollout/parse_truncated_rate": _pair(n["truncated"], n["samples"]),
        "rollout/gen_new_tokens_mean": _pair(n["gen_tokens"], n["samples"]),
        "rollout/gen_tokens_per_s": _pair(n["gen_tokens"], seconds),
    }


def _pair(total: float, count: float) -> torch.Tensor:
    return torch.tensor([float(total), float(count)], dtype=torch.float64)
