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

Clean prefix (`stage2_ab.duplicate_ul_weight` > 0; reference section 5.3, Appendix A): an
unmatched prediction with the desc of an earlier matched prediction (of any earlier one with
`stage2_ab.duplicate_of: any`) and IoU >= `stage2_ab.duplicate_iou` with it is a duplicate. It
leaves the prefix with the separator before it, so the positive prefix holds each object once,
and the first token at which the duplicate's text diverges from the clean answer gets an
unlikelihood term (`Unlikely`). At weight 0 the prefix is kept as generated.
"""

from __future__ import annotations

import dataclasses
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from coordexp.boxes import box_iou
from coordexp.config import Config
from coordexp.data.collate import COORD, DESC, STRUCT, Batch, Collator
from coordexp.data.records import Record
from coordexp.data.render import render_object, sorted_objects_bins
from coordexp.lmhead import Rows
from coordexp.matching import match_boxes
from coordexp.parsing import ObjectSpans, ParseResult, Span, parse_coordjson_tokens

if TYPE_CHECKING:
    from coordexp.rollout import Rollout

FALLBACK_PREFIX = '{"objects": ['  # what an invalid rollout is replaced by
NO_TARGET = -1
SEPARATOR_CHARS = ", \t\n\r"  # what may stand between two objects of the array


@dataclass(frozen=True)
class Unlikely:
    """An unlikelihood event: at answer token `position` (its context is the clean answer before
    it) the duplicate would have said `token` where the clean answer says another. `span`: the
    inclusive token-id range penalised together (`duplicate_ul_span: box`); None: the token."""

    position: int
    token: int
    span: tuple[int, int] | None = None


@dataclass
class SampleTarget:
    """One Channel-B answer, token by token (end of turn included)."""

    text: str  # the answer text without the end-of-turn token
    ids: list[int]
    types: list[int]  # 0 (no CE) / STRUCT / DESC / COORD (a supervised coord slot)
    weights: list[float]  # CE weight per token (0 for 0 and COORD)
    target_bins: list[int]  # GT bin of each supervised coord slot, NO_TARGET elsewhere
    counts: dict[str, int] = field(default_factory=dict)
    unlikely: list[Unlikely] = field(default_factory=list)  # clean prefix only


def append_fragment(prefix_has_objects: bool, missed: list[tuple[str, list[int]]], codec,
                    field_order: str) -> str:
    """What follows an append-ready prefix: `, ` only after a kept object and only when
    something is appended, the missed objects in the given order, then `]}`."""
    body = ", ".join(render_object(d, b, codec, field_order) for d, b in missed)
    return (", " if prefix_has_objects and missed else "") + body + "]}"


def prefix_tokens(rollout: Rollout, parse: ParseResult, tokenizer, removed: list[Span] = ()
                  ) -> tuple[str, list[tuple[int, int, int]]]:
    """The append-ready prefix without the `removed` char ranges: its text and (token id, char
    start, char end) per token.

    Rollout tokens that lie wholly in kept text are kept as generated; the kept characters
    between two such tokens (the part of a token the cut splits, e.g. a merged `}, {"`, or the
    text on both sides of a removed range) are re-tokenized together. An invalid rollout is
    replaced by FALLBACK_PREFIX.
    """
    if parse.invalid_rollout:
        enc = tokenizer(FALLBACK_PREFIX, add_special_tokens=False, return_offsets_mapping=True)
        return FALLBACK_PREFIX, [(t, s, e) for t, (s, e) in
                                 zip(enc["input_ids"], enc["offset_mapping"], strict=True)]
    original = "".join(rollout.pieces)
    kept = _complement(removed, parse.prefix_end)
    text = "".join(original[s:e] for s, e in kept)
    out, gap, pos = [], "", 0  # pos: clean offset where the pending gap starts
    for tid, start, end in _spans_of(rollout):  # tokens past the prefix add nothing
        if any(s <= start and end <= e for s, e in kept):  # wholly kept: as generated
            out += _tokenize_at(tokenizer, gap, pos)
            pos += len(gap)
            out.append((tid, pos, pos + end - start))
            gap, pos = "", pos + end - start
        else:
            gap += "".join(original[max(s, start): min(e, end)] for s, e in kept)
    return text, out + _tokenize_at(tokenizer, gap, pos)


def _spans_of(rollout: Rollout) -> list[tuple[int, int, int]]:
    ends = np.cumsum([len(p) for p in rollout.pieces]).tolist()  # [T] char end per token
    return [(tid, e - len(p), e) for tid, p, e in zip(rollout.token_ids, rollout.pieces, ends,
                                                      strict=True)]


def _tokenize_at(tokenizer, text: str, offset: int) -> list[tuple[int, int, int]]:
    if not text:
        return []
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [(tid, offset + s, offset + e)
            for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]


def _complement(removed: list[Span], end: int) -> list[Span]:
    """The kept ranges of [0, end) around sorted, disjoint removed ranges."""
    kept, pos = [], 0
    for s, e in removed:
        kept.append((pos, s))
        pos = e
    return [(s, e) for s, e in [*kept, (pos, end)] if e > s]


def _to_clean(offset: int, removed: list[Span]) -> int:
    """A kept char offset of the rollout -> its offset in the clean text."""
    return offset - sum(e - s for s, e in removed if e <= offset)


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
    Had the cup been a second cat at IoU >= duplicate_iou with the first (and
    duplicate_ul_weight > 0), `, {"desc": "cat", ...]}` would be cut out, the prefix would end
    after the first cat, and the token where `, {"desc": "cat"` departs from the clean
    `, {"desc": "dog"` (the duplicate's `cat`, at the position of the appended `dog`) would get
    the unlikelihood term.
    """
    codec, order, s = collator.codec, cfg.data.field_order, cfg.stage2_ab
    parse = parse_coordjson_tokens(rollout.pieces, field_order=order)
    gt = sorted_objects_bins(record, codec)  # [(desc, bins)] in the canonical order
    pred_bins = np.array([o["bbox_2d"] for o in parse.objects], dtype=float).reshape(-1, 4)
    gt_bins = np.array([b for _, b in gt], dtype=float).reshape(-1, 4)
    match = match_boxes(pred_bins, gt_bins, **dataclasses.asdict(cfg.match))
    dups = duplicates_of(parse, match.pairs, s.duplicate_iou, s.duplicate_of) \
        if s.duplicate_ul_weight > 0 else {}
    removed = [_duplicate_range(rollout.text, parse.spans[d].object) for d in sorted(dups)]
    text, prefix = prefix_tokens(rollout, parse, collator.tokenizer, removed)
    kept = [i for i in range(len(parse.objects)) if i not in dups]
    spans = [_clean_spans(parse.spans[i], removed) for i in kept]
    pairs = [(kept.index(p), g) for p, g in match.pairs]
    types, bins = _prefix_supervision(text, prefix, spans, pairs, gt)
    missed = [gt[j] for j in sorted(match.fn_indices)]
    fragment = append_fragment(bool(kept), missed, codec, order)
    tail_ids, tail_types = collator.answer_tokens(fragment)  # end of turn appended
    struct_w = s.channel_b.drop_invalid_struct_ce_multiplier if parse.dropped_invalid else 1.0
    tail_w = {0: 0.0, COORD: 0.0, STRUCT: struct_w, DESC: s.desc_ce_weight}
    ids = [tid for tid, _, _ in prefix] + tail_ids
    ends = [e for _, _, e in prefix] + [len(text) + e for e in
                                        _token_ends(collator.tokenizer, fragment)]
    unlikely: list[Unlikely] = []
    for (r0, _), d in zip(removed, sorted(dups), strict=True):
        found = _divergence(rollout.text[r0:], text + fragment, _to_clean(r0, removed), ids,
                            ends, collator.tokenizer)
        if found is None:
            continue
        event, at = found
        if s.duplicate_ul_span == "box":
            event = _box_span(event, r0 + at, parse, d, dups[d], ids, collator, s.duplicate_iou)
        if event not in unlikely:  # several duplicates departing alike give one event
            unlikely.append(event)
    counts = {"samples": 1, "gt": len(gt), "pred": len(parse.objects),
              "matched": len(match.pairs), "fn_appended": len(missed),
              "gating_rejections": match.gating_rejections,
              "invalid_rollout": int(parse.invalid_rollout), "truncated": int(parse.truncated),
              "dropped_invalid": parse.dropped_invalid,
              "dropped_ambiguous": parse.dropped_ambiguous,
              "gen_tokens": len(rollout.token_ids), "duplicates_removed": len(dups),
              "duplicate_ul_tokens": len(unlikely)}
    return SampleTarget(
        text + fragment, ids, types + tail_types,
        [float(t == STRUCT) for t in types] + [tail_w[t] for t in tail_types],
        bins + [int(collator.id_to_bin[i]) if t == COORD else NO_TARGET
                for i, t in zip(tail_ids, tail_types, strict=True)],
        counts, unlikely)


def duplicates_of(parse: ParseResult, pairs, iou_threshold: float,
                  of: str = "matched") -> dict[int, int]:
    """Unmatched prediction -> the earlier prediction it repeats: the same desc and box IoU >=
    iou_threshold (the most overlapping one if several). `of` "matched": only a matched
    prediction has duplicates; "any": any earlier prediction that is not itself a duplicate."""
    matched = {p for p, _ in pairs}
    originals = sorted(matched) if of == "matched" else range(len(parse.objects))
    if not originals:
        return {}
    boxes = torch.tensor([o["bbox_2d"] for o in parse.objects], dtype=torch.float64)  # [P, 4]
    iou = box_iou(boxes, boxes).numpy()  # [P, P]
    out: dict[int, int] = {}
    for j, o in enumerate(parse.objects):
        cands = [(iou[j, i], i) for i in originals if i < j and i not in out
                 and parse.objects[i]["desc"] == o["desc"] and iou[j, i] >= iou_threshold]
        if cands and j not in matched:
            out[j] = max(cands)[1]
    return out


def _duplicate_range(text: str, obj: Span) -> Span:
    """A duplicate's object with the separator before it (a duplicate is never first)."""
    start = obj[0]
    while start > 0 and text[start - 1] in SEPARATOR_CHARS:
        start -= 1
    return start, obj[1]


def _clean_spans(sp: ObjectSpans, removed: list[Span]) -> ObjectSpans:
    def move(span: Span) -> Span:
        return _to_clean(span[0], removed), _to_clean(span[1], removed)

    return ObjectSpans(move(sp.object), move(sp.desc), tuple(move(c) for c in sp.coords))


def _token_ends(tokenizer, fragment: str) -> list[int]:
    """Char end of each token of answer_tokens(fragment) in the fragment; the end of turn last,
    one past the text."""
    offsets = tokenizer(fragment, add_special_tokens=False, return_offsets_mapping=True)
    return [e for _, e in offsets["offset_mapping"]] + [len(fragment) + 1]


def _divergence(generated: str, answer: str, junction: int, ids: list[int], ends: list[int],
                tokenizer) -> tuple[Unlikely, int] | None:
    """Where the generated text from a removed duplicate's start departs from the clean answer
    from the same point: the answer token holding the first differing character, and the first
    token of the generated text read from that token's start (with that token's character
    offset in `generated`). None if the duplicate's text is all a prefix of the clean answer."""
    clean = answer[junction:]
    k = next((i for i, (a, b) in enumerate(zip(generated, clean, strict=False)) if a != b),
             min(len(generated), len(clean)))
    if k == len(generated):
        return None
    position = bisect_right(ends, junction + k)  # the first token ending after that char
    start = ends[position - 1] if position else 0
    rest = answer[start:junction] + generated[max(0, start - junction):]
    token = tokenizer(rest, add_special_tokens=False)["input_ids"][0]
    return (Unlikely(position, token), start - junction) if token != ids[position] else None


def _box_span(event: Unlikely, at: int, parse: ParseResult, dup: int, original: int,
              ids: list[int], collator: Collator, iou: float) -> Unlikely:
    """Widen a coord event to the bins that keep the duplicate a near-duplicate along that
    coordinate: within (1 - iou) x the original box's side (in bins) of the duplicate's bin,
    less the clean answer's own bin and what lies beyond it. A token that is not one of the
    duplicate's coords (rollout character offset `at`) stays a single-token event."""
    slots = [c[0] for c in parse.spans[dup].coords]
    bin_of = collator.id_to_bin
    if at not in slots or bin_of[event.token] < 0:
        return event
    slot, b = slots.index(at), int(bin_of[event.token])
    box = parse.objects[original]["bbox_2d"]
    radius = int(round((1 - iou) * abs(box[2 + slot % 2] - box[slot % 2]), 6))  # 9.999.. = 10
    lo, hi = max(0, b - radius), min(len(collator.coord_ids) - 1, b + radius)
    clean = int(bin_of[ids[event.position]])
    if clean >= 0 and lo <= clean <= hi:  # never penalise the clean answer's bin
        lo, hi = (clean + 1, hi) if clean < b else (lo, clean - 1)
    first, last = collator.coord_ids[lo], collator.coord_ids[hi]
    if last - first != hi - lo:  # coord ids not contiguous: the one token
        return event
    return dataclasses.replace(event, span=(first, last))


def _prefix_supervision(text: str, prefix, spans: list[ObjectSpans], pairs, gt
                        ) -> tuple[list[int], list[int]]:
    """Token types and coord targets in the prefix: only matched objects are supervised.
    spans: the kept objects' char spans in text; pairs: (kept index, GT index).

    A token gets struct CE iff all its characters belong to matched objects (or to the `, `
    between kept objects) and none to a matched desc value; so a token the BPE merged across
    a matched object and a false positive stays neutral.
    """
    allowed, desc, matched = (np.zeros(len(text), dtype=bool) for _ in range(3))
    for pred_i, _ in pairs:
        (o_start, o_end), (d_start, d_end) = spans[pred_i].object, spans[pred_i].desc
        allowed[o_start:o_end] = matched[o_start:o_end] = True
        desc[d_start:d_end] = True
    for left, right in zip(spans, spans[1:], strict=False):  # between kept objects
        gap = slice(left.object[1], right.object[0])
        if not text[gap].strip(SEPARATOR_CHARS):
            allowed[gap] = True
    starts = np.array([s for _, s, _ in prefix], dtype=int)
    ends = np.array([e for _, _, e in prefix], dtype=int)
    struct = ((_chars_in(matched, starts, ends) > 0)
              & (_chars_in(allowed, starts, ends) == ends - starts)
              & (_chars_in(desc, starts, ends) == 0))
    types, bins = [STRUCT if s else 0 for s in struct.tolist()], [NO_TARGET] * len(prefix)
    token_at = {(s, e): k for k, (_, s, e) in enumerate(prefix)}
    for pred_i, gt_j in pairs:
        for slot, span in enumerate(spans[pred_i].coords):  # atomic tokens, never re-cut
            k = token_at[span]
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


def unlikely_rows(batch: Batch, targets: list[SampleTarget]) -> tuple[Rows, torch.Tensor]:
    """The unlikelihood events of a batch: their rows (answer positions) and penalised token-id
    ranges [U, 2] (first, last; a single token is first == last)."""
    prompt_lens = batch.prompt_lens.tolist()
    events = torch.tensor([(b, prompt_lens[b] + u.position, *(u.span or (u.token, u.token)))
                           for b, t in enumerate(targets) for u in t.unlikely],
                          dtype=torch.long, device=batch.token_type.device).reshape(-1, 4)
    return Rows(events[:, 0], events[:, 1]), events[:, 2:]


def packed_rows(layout, at: Rows) -> Rows:
    """Rows of a right-padded batch -> the same tokens' rows in its packed layout
    (`coordexp.data.packing.Layout`: a sample keeps its offsets from its start)."""
    rank = torch.empty_like(layout.order)
    rank[layout.order] = torch.arange(len(layout.order), device=rank.device)
    seg = layout.segments[rank[at.b]]  # [U, 3] (row, start, length)
    return Rows(seg[:, 0], seg[:, 1] + at.t)


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
        "rollout/duplicates_removed": _pair(n["duplicates_removed"], n["samples"]),
        "rollout/duplicate_ul_tokens": _pair(n["duplicate_ul_tokens"], n["samples"]),
        "rollout/gen_tokens_per_s": _pair(n["gen_tokens"], seconds),
    }


def _pair(total: float, count: float) -> torch.Tensor:
    return torch.tensor([float(total), float(count)], dtype=torch.float64)
