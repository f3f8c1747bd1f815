"""Duplicates: the clean-prefix Channel-B target and its unlikelihood events on hand-written
rollouts, the unlikelihood term against a hand computation, weight 0 as the plain Channel B,
and the duplicate statistics and guarded view on hand-built predictions."""

import dataclasses
import random

import numpy as np
import pytest
import torch
from PIL import Image

from coordexp.codec import CoordCodec
from coordexp.config import Config, RolloutConfig, Stage2ABConfig, load_config
from coordexp.data.collate import COORD, STRUCT, Collator
from coordexp.data.records import DetObject, Record
from coordexp.data.render import render_object
from coordexp.data.synthetic import CROWDED, DENSE, PRESETS, _crowded_shelf, make_scene
from coordexp.diagnostics import finalize_stats
from coordexp.errors import UserError
from coordexp.eval import EvalOptions, evaluate_predictions
from coordexp.eval.duplicates import (
    duplicate_clusters,
    duplicate_metrics,
    guard_prediction,
    suppressed_indices,
)
from coordexp.eval.predictions import PARSE_COUNTERS, Prediction
from coordexp.grammar import decode_pieces, token_table
from coordexp.lmhead import HiddenHead, LogitsHead, Rows, vocab_logsumexp
from coordexp.model.qwen_vl import build_image_processor, build_processor
from coordexp.model.tiny import TinySpec, build_tiny_model
from coordexp.report.analysis import duplicate_table
from coordexp.rollout import Rollout
from coordexp.train import stage2
from coordexp.train.channel_b import Unlikely, build_target
from coordexp.train.stage2 import channel_b_step
from coordexp.train.terms import unlikelihood

CODEC = CoordCodec()
GT = {"A": ("red circle", [100, 100, 200, 200]), "B": ("blue square", [300, 300, 400, 400]),
      "C": ("green diamond", [500, 100, 600, 200])}  # canonical (y1, x1) order: A, C, B


def obj(desc: str, bins: list[int]) -> str:
    return render_object(desc, bins, CODEC, "desc_first")


A, B, C = (obj(*GT[k]) for k in "ABC")
A_DUP = obj("red circle", [101, 100, 200, 201])  # IoU 0.98 with A
A_DUP2 = obj("red circle", [100, 101, 201, 200])  # IoU 0.98 with A
A_FAR = obj("red circle", [110, 110, 210, 210])  # IoU 0.68 with A: a false positive, kept


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    root = tmp_path_factory.mktemp("dups")
    Image.new("RGB", (1000, 1000), (30, 30, 30)).save(root / "img.png")
    objects = tuple(DetObject(d, tuple(float(v) for v in b)) for d, b in GT.values())
    return Record("img.png", 1000, 1000, objects, root)


@pytest.fixture(scope="module")
def collator(tiny_tokenizer):
    small = build_image_processor("qwen2_5_vl", max_pixels=112 * 112)
    return Collator(build_processor("qwen2_5_vl", tiny_tokenizer, small))


def rollout_of(text: str, tokenizer) -> Rollout:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = decode_pieces(ids, token_table(tokenizer))
    return Rollout("".join(pieces), ids, [0.0] * len(ids), pieces, False)


def config(weight: float, span: str = "token", of: str = "matched") -> Config:
    return Config(stage2_ab=Stage2ABConfig(duplicate_ul_weight=weight, duplicate_ul_span=span,
                                           duplicate_of=of),
                  rollout=RolloutConfig(max_new_tokens=8, batch_size=2))


def token_id(tokenizer, piece: str) -> int:
    (tid,) = tokenizer(piece, add_special_tokens=False)["input_ids"]
    return tid


HEAD_C = ']}, {"desc": "green diamond", "bbox_2d": ['  # one token of the tiny BPE
HEAD_B = ']}, {"desc": "blue square", "bbox_2d": ['
HEAD_A = ']}, {"desc": "red circle", "bbox_2d": ['


# -- the clean prefix ---------------------------------------------------------------------------
# rollout, the same rollout without its duplicates, duplicates removed, divergence events as
# (the clean answer token at the position, the token penalised there)
CASES = {
    "right_after_original": (f'{{"objects": [{A}, {A_DUP}, {C}, {B}]}}',
                             f'{{"objects": [{A}, {C}, {B}]}}', 1, [(HEAD_C, HEAD_A)]),
    "after_other_objects": (f'{{"objects": [{A}, {C}, {A_DUP}, {B}]}}',
                            f'{{"objects": [{A}, {C}, {B}]}}', 1, [(HEAD_B, HEAD_A)]),
    # the last complete object before truncation: the clean answer closes the array there
    "last_before_truncation": (f'{{"objects": [{A}, {C}, {B}, {A_DUP}, {{"desc": "gr',
                               f'{{"objects": [{A}, {C}, {B}, {{"desc": "gr', 1,
                               [("]}", ', {"')]),  # continuing where it should close
    # two duplicates at one junction depart at the same token: one event
    "two_duplicates_together": (f'{{"objects": [{A}, {A_DUP}, {A_DUP2}, {C}, {B}]}}',
                                f'{{"objects": [{A}, {C}, {B}]}}', 2, [(HEAD_C, HEAD_A)]),
    "two_duplicates_apart": (f'{{"objects": [{A}, {A_DUP}, {C}, {A_DUP2}, {B}]}}',
                             f'{{"objects": [{A}, {C}, {B}]}}', 2,
                             [(HEAD_C, HEAD_A), (HEAD_B, HEAD_A)]),
    # a duplicate whose missed objects are appended after it
    "last_with_missed_objects": (f'{{"objects": [{A}, {A_DUP}]}}', f'{{"objects": [{A}]}}', 1,
                                 [('green diamond", "bbox_2d": [', 'red circle", "bbox_2d": [')]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_clean_prefix_text_masks_and_divergence(case, record, collator):
    rollout, without, removed, events = CASES[case]
    tok = collator.tokenizer
    clean = build_target(rollout_of(rollout, tok), record, collator, config(1.0))
    # the clean answer is token for token the answer of the rollout that never had them
    plain = build_target(rollout_of(without, tok), record, collator, config(1.0))
    assert clean.text == plain.text
    assert (clean.ids, clean.types, clean.weights, clean.target_bins) == \
        (plain.ids, plain.types, plain.weights, plain.target_bins)
    assert plain.unlikely == [] and plain.counts["duplicates_removed"] == 0
    assert clean.counts["duplicates_removed"] == removed
    assert clean.counts["matched"] == plain.counts["matched"]
    got = [(tok.decode([clean.ids[u.position]]), tok.decode([u.token])) for u in clean.unlikely]
    assert got == [(at, said) for at, said in events]
    assert clean.counts["duplicate_ul_tokens"] == len(events)


def test_divergence_positions_are_exact(record, collator):
    """The penalised position is the clean header of C right after A, and the token is the
    generated header of the duplicate: the one that follows A in the rollout."""
    tok = collator.tokenizer
    rollout = rollout_of(f'{{"objects": [{A}, {A_DUP}, {C}, {B}]}}', tok)
    target = build_target(rollout, record, collator, config(1.0))
    after_a = rollout.pieces.index(HEAD_A)  # the token that opens the duplicate
    assert target.ids[:after_a] == rollout.token_ids[:after_a]  # the context: as generated
    assert target.unlikely == [Unlikely(after_a, rollout.token_ids[after_a])]
    assert target.ids[after_a] == token_id(tok, HEAD_C)
    assert target.types[after_a] == 0  # the merged header holds C's desc: no CE
    # tokens of the duplicate never appear in the answer
    assert CODEC.token(101) not in tok.convert_ids_to_tokens(target.ids)


def test_masks_of_the_clean_answer_are_exact(record, collator):
    """Every matched object's struct tokens get CE and its coord slots the GT bins; the
    closure is supervised; the removed duplicate's tokens are gone."""
    tok = collator.tokenizer
    target = build_target(rollout_of(f'{{"objects": [{A}, {C}, {A_DUP}, {B}]}}', tok), record,
                          collator, config(1.0))
    pieces = tok.convert_ids_to_tokens(target.ids)
    coords = [(i, CODEC.parse_token(p)) for i, p in enumerate(pieces)
              if CODEC.parse_token(p) is not None]
    assert [target.types[i] for i, _ in coords] == [COORD] * 12
    assert [target.target_bins[i] for i, _ in coords] == GT["A"][1] + GT["C"][1] + GT["B"][1]
    assert [b for _, b in coords] == GT["A"][1] + GT["C"][1] + GT["B"][1]
    text_types = [t for t, p in zip(target.types, pieces, strict=True)
                  if CODEC.parse_token(p) is None]
    # per object: its header (merged with the previous `]}, ` and holding its desc) is not
    # supervised, the 3 `, ` between its slots are; then the closure and end of turn
    assert text_types[:12] == [0, STRUCT, STRUCT, STRUCT] * 3
    assert set(text_types[12:]) == {STRUCT} and len(text_types) > 13
    assert {w for w, t in zip(target.weights, target.types, strict=True) if t == STRUCT} == {1.0}


def test_far_copies_stay_false_positives(record, collator):
    """IoU 0.68 < duplicate_iou: not a duplicate, so the prefix keeps it (neutral)."""
    text = f'{{"objects": [{A}, {A_FAR}, {C}, {B}]}}'
    target = build_target(rollout_of(text, collator.tokenizer), record, collator, config(1.0))
    assert target.text == text and target.unlikely == []
    assert target.counts["duplicates_removed"] == 0


E = obj("red circle", [700, 700, 800, 800])  # no object there: a false positive
E_DUP = obj("red circle", [701, 700, 800, 801])  # IoU 0.98 with E


@pytest.mark.parametrize("of", ["matched", "any"])
def test_repeats_of_a_false_positive_leave_only_with_duplicate_of_any(of, record, collator):
    tok = collator.tokenizer
    text = f'{{"objects": [{A}, {E}, {E_DUP}, {C}, {B}]}}'
    target = build_target(rollout_of(text, tok), record, collator, config(1.0, of=of))
    if of == "matched":  # E is matched to nothing, so its repeat is an ordinary FP
        assert target.text == text and target.unlikely == []
        return
    plain = build_target(rollout_of(f'{{"objects": [{A}, {E}, {C}, {B}]}}', tok), record,
                         collator, config(1.0, of=of))
    assert (target.text, target.ids, target.types, target.target_bins) == \
        (plain.text, plain.ids, plain.types, plain.target_bins)
    assert target.counts["duplicates_removed"] == 1
    assert [(tok.decode([target.ids[u.position]]), tok.decode([u.token]))
            for u in target.unlikely] == [(HEAD_C, HEAD_A)]


def test_weight_zero_keeps_the_prefix_as_generated(record, collator):
    text = f'{{"objects": [{A}, {A_DUP}, {C}, {B}]}}'
    rollout = rollout_of(text, collator.tokenizer)
    target = build_target(rollout, record, collator, config(0.0))
    assert target.text == text and target.unlikely == []
    # every generated token up to the closing `]}]}`, which the cut after B's `}` splits
    assert target.ids[:len(rollout.token_ids) - 1] == rollout.token_ids[:-1]
    dup = rollout.pieces.index(CODEC.token(101))
    assert target.types[dup] == 0  # the duplicate is an ordinary neutral false positive
    assert target.counts["duplicates_removed"] == 0


# -- duplicate_ul_span: box ----------------------------------------------------------------------
D = obj("red circle", [100, 300, 200, 400])  # A's twin below it: a header like A's


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    root = tmp_path_factory.mktemp("twins")
    Image.new("RGB", (1000, 1000), (30, 30, 30)).save(root / "img.png")
    objects = tuple(DetObject("red circle", tuple(map(float, b)))
                    for b in ([100, 100, 200, 200], [100, 300, 200, 400]))
    return Record("img.png", 1000, 1000, objects, root)


@pytest.mark.parametrize(("dup", "bin_said", "span"), [
    # x1 101 against the clean 100: radius (1 - 0.9) x A's width 100 = 10 bins, 91..111, less
    # the clean bin and what lies beyond it: 101..111
    ([101, 100, 200, 201], 101, (101, 111)),
    # the same x1 as D, so it departs at y1, 101 against the clean 300 (outside): 91..111
    ([100, 101, 201, 200], 101, (91, 111)),
])
def test_box_span_covers_the_bins_that_keep_the_box_a_duplicate(dup, bin_said, span, twins,
                                                                 collator):
    tok = collator.tokenizer
    rollout = rollout_of(f'{{"objects": [{A}, {obj("red circle", dup)}, {D}]}}', tok)
    (plain,) = build_target(rollout, twins, collator, config(1.0)).unlikely
    (box,) = build_target(rollout, twins, collator, config(1.0, "box")).unlikely
    assert plain.span is None and plain.token == token_id(tok, CODEC.token(bin_said))
    assert (box.position, box.token) == (plain.position, plain.token)
    assert box.span == tuple(token_id(tok, CODEC.token(k)) for k in span)


def test_box_span_leaves_a_header_divergence_one_token(record, collator):
    rollout = rollout_of(f'{{"objects": [{A}, {A_DUP}, {C}, {B}]}}', collator.tokenizer)
    (event,) = build_target(rollout, record, collator, config(1.0, "box")).unlikely
    assert event.span is None and collator.tokenizer.decode([event.token]) == HEAD_A


@pytest.mark.parametrize("key", ["duplicate_ul_span", "duplicate_of"])
def test_unknown_duplicate_choices_are_refused(key):
    with pytest.raises(UserError, match=key):
        load_config(None, ["model.init_tiny=qwen3_vl", "data.train=train.jsonl",
                           f"stage2_ab.{key}=bins"])


# -- the unlikelihood term -------------------------------------------------------------------
def test_unlikelihood_value_and_gradient_match_a_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    logits[1, 2, 4] = 30.0  # p(token) ~ 1 - 1e-12: still finite
    logits.requires_grad_(True)
    at, tokens = Rows(torch.tensor([0, 1, 1]), torch.tensor([2, 3, 4])), torch.tensor([5, 4, 0])
    head = LogitsHead(logits, torch.arange(3))
    value = unlikelihood(head, at, tokens, head.vocab_lse(at))
    value.backward()
    rows = logits.detach()[at.b, at.t - 1]  # [U, V]: the rows before each position
    onehot = torch.nn.functional.one_hot(tokens, 7).bool()
    # 1 - p_u = sum_{v != u} e^z_v / sum_v e^z_v, so -log(1 - p_u) = lse(z) - lse(z without u)
    per_row = rows.logsumexp(-1) - rows.masked_fill(onehot, -torch.inf).logsumexp(-1)
    torch.testing.assert_close(value.double(), per_row.mean(), rtol=1e-6, atol=0)
    # dL/dz_v = p_u (delta_uv - p_v) / (1 - p_u) / U at each row
    probs = torch.softmax(rows, -1)
    p, one_minus_p = probs[torch.arange(3), tokens], torch.exp(-per_row)
    delta = torch.where(onehot, one_minus_p[:, None], -probs)  # 1 - p_u without cancelling
    grad_rows = p[:, None] * delta / one_minus_p[:, None] / 3
    expected_grad = torch.zeros_like(logits)
    expected_grad[at.b, at.t - 1] = grad_rows
    torch.testing.assert_close(logits.grad, expected_grad, rtol=1e-6, atol=1e-9)
    assert torch.isfinite(value)


def test_unlikelihood_of_a_token_range_is_minus_log_one_minus_its_mass():
    torch.manual_seed(2)
    logits = torch.randn(1, 3, 9, dtype=torch.float64, requires_grad=True)
    at, spans = Rows(torch.tensor([0, 0]), torch.tensor([1, 2])), torch.tensor([[2, 5], [8, 8]])
    head = LogitsHead(logits, torch.arange(9))
    value = unlikelihood(head, at, spans, head.vocab_lse(at))
    probs = torch.softmax(logits.detach()[0, :2], -1)  # [2, V]: the rows before each position
    mass = torch.stack([probs[0, 2:6].sum(), probs[1, 8]])
    torch.testing.assert_close(value.detach(), -torch.log1p(-mass).mean())
    value.backward()  # dL/dz_v = (p_v [v in span] - mass p_v) / (1 - mass) / U
    inside = torch.zeros(2, 9, dtype=torch.bool)
    inside[0, 2:6], inside[1, 8] = True, True
    want = (probs * inside - mass[:, None] * probs) / (1 - mass[:, None]) / 2
    torch.testing.assert_close(logits.grad[0, :2], want)


def test_unlikelihood_without_events_is_zero():
    head = LogitsHead(torch.zeros(1, 3, 5), torch.arange(2))
    empty = Rows(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert unlikelihood(head, empty, torch.zeros(0, dtype=torch.long), torch.zeros(0)) == 0


# -- whole steps ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return build_tiny_model(tiny_tokenizer, TinySpec(family="qwen2_5_vl"))


def step(model, collator, record, texts, cfg, monkeypatch):
    monkeypatch.setattr(stage2, "generate_rollouts", lambda *a, **k: [
        rollout_of(t, collator.tokenizer) for t in texts])
    coord_ids = torch.tensor(CODEC.token_ids(collator.tokenizer))
    model.zero_grad(set_to_none=True)
    out = channel_b_step(model, collator, [record] * len(texts), cfg, coord_ids, seed=1)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_weight_zero_is_the_plain_channel_b_step(model, record, collator, monkeypatch):
    """Weight 0: no term, no removal. Weight > 0 on duplicate-free rollouts: the same loss and
    gradients bit for bit, since the clean prefix then is the generated prefix."""
    texts = [f'{{"objects": [{A}, {A_FAR}]}}', "garbage"]
    off, g_off = step(model, collator, record, texts, config(0.0), monkeypatch)
    on, g_on = step(model, collator, record, texts, config(0.5), monkeypatch)
    assert "loss/duplicate_ul" not in off.stats
    assert finalize_stats(on.stats).get("loss/duplicate_ul") is None  # no events: (0, 0)
    assert torch.equal(off.loss, on.loss)
    assert g_off.keys() == g_on.keys()
    assert all(torch.equal(g_off[k], g_on[k]) for k in g_off)


def test_weighted_unlikelihood_enters_the_loss_once(model, record, collator, monkeypatch):
    texts = [f'{{"objects": [{A}, {A_DUP}, {C}, {B}]}}']
    base, _ = step(model, collator, record, texts, config(0.0), monkeypatch)
    one, _ = step(model, collator, record, texts, config(1.0), monkeypatch)
    three, _ = step(model, collator, record, texts, config(3.0), monkeypatch)
    ul = finalize_stats(one.stats)["loss/duplicate_ul"]
    assert ul > 0 and one.stats["loss/duplicate_ul"][1] == 1  # one event
    assert finalize_stats(one.stats)["rollout/duplicates_removed"] == 1
    assert finalize_stats(base.stats)["rollout/duplicates_removed"] == 0
    # the clean answer differs from the weight-0 one, so compare weight 3 with weight 1
    assert (three.loss - one.loss).item() == pytest.approx(2 * ul, abs=1e-5)  # float32 loss


# -- duplicate statistics and the guarded view --------------------------------------------------
def prediction(descs, boxes, scores, hit_max=0) -> Prediction:
    parse = dict.fromkeys(PARSE_COUNTERS, 0) | {"rollout_hit_max_new_tokens": hit_max}
    return Prediction("img.png", 1000, 1000, list(descs),
                      np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                      np.asarray(scores, dtype=np.float64), parse)


BOOK = [10, 10, 50, 100]
BOOKS = [BOOK, [10, 10, 50, 101], [11, 10, 50, 100],  # a cluster of 3 (chain-linked)
         [60, 10, 100, 100], [60, 10, 100, 101],  # a cluster of 2
         [200, 10, 240, 100]]  # alone
SCORES = [0.5, 0.9, 0.7, 0.8, 0.8, 0.6]


def test_clusters_and_the_suppressed_set():
    pred = prediction(["book"] * 6 + ["cup"], BOOKS + [BOOK], SCORES + [0.99])
    assert duplicate_clusters(pred.boxes_px, pred.descs, 0.9) == [[0, 1, 2], [3, 4]]
    # the best of each cluster stays: 1 (0.9) and 3 (0.8, earlier of a tie); the cup has
    # another desc, so it is no duplicate of book 0
    assert suppressed_indices(pred) == [0, 2, 4]
    guarded = guard_prediction(pred)
    assert guarded.descs == ["book"] * 3 + ["cup"]
    assert guarded.scores.tolist() == [0.9, 0.8, 0.6, 0.99]


def test_chain_links_join_one_cluster():
    """a~b and b~c but not a~c: one connected component."""
    boxes = [[0, 0, 100, 100], [0, 0, 100, 108], [0, 0, 100, 117]]
    pred = prediction(["x"] * 3, boxes, [0.1, 0.2, 0.3])
    assert duplicate_clusters(pred.boxes_px, pred.descs, 0.9) == [[0, 1, 2]]
    assert suppressed_indices(pred) == [0, 1]


def test_duplicate_metrics_are_sums_over_images():
    books = prediction(["book"] * 6, BOOKS, SCORES, hit_max=1)
    single = prediction(["cup"], [BOOK], [1.0])
    m = duplicate_metrics([books, single, None], 0.9)
    pairs = 3 + 1  # (0,1) (0,2) (1,2) and (3,4)
    assert m == {"dup_pairs_per_image": pairs / 3, "dup_pairs_per_pred": pairs / 7,
                 "dup_share": 3 / 7, "dup_clusters_per_image": 2 / 3,
                 "dup_max_cluster_size": 3, "dup_hit_max_new_tokens_rate": 1 / 3}


def test_guarded_metrics_are_the_metrics_of_the_guarded_predictions(tmp_path):
    gt = Record("img.png", 1000, 1000, tuple(DetObject("book", tuple(map(float, b)))
                                            for b in (BOOK, [60, 10, 100, 100])), tmp_path)
    pred = prediction(["book"] * 6, BOOKS, SCORES)
    opts = EvalOptions(semantic=False)
    ev = evaluate_predictions([gt], [pred], opts)
    direct = evaluate_predictions([gt], [guard_prediction(pred)], opts, guard=False).metrics
    assert ev.guarded == {k: direct[k] for k in ev.guarded}
    assert ev.guarded["pred_objects"] == 3 and ev.metrics["pred_objects"] == 6
    assert ev.guarded["precision"] == pytest.approx(2 / 3)  # 2 books matched of 3 kept
    assert ev.metrics["precision"] == pytest.approx(2 / 6)
    assert ev.guarded["recall"] == ev.metrics["recall"] == 1.0
    assert ev.duplicates["dup_share"] == pytest.approx(3 / 6)


# -- the crowded task ------------------------------------------------------------------------------
def test_crowded_scenes_hold_shelves_of_one_class():
    shelves = 0
    for seed in range(20):
        _, objects = make_scene(seed, CROWDED)
        counts = {}
        for o in objects:
            counts[o.desc] = counts.get(o.desc, 0) + 1
        shelves += max(counts.values()) >= 4
        for o in objects:  # inside the image, never degenerate
            x1, y1, x2, y2 = o.box_px
            assert 0 <= x1 < x2 < CROWDED.image_size and 0 <= y1 < y2 < CROWDED.image_size
    assert shelves >= 12  # crowded_share 0.8 of 20 scenes, give or take the draw


@pytest.mark.parametrize("rows", [1, 4])
def test_dense_shelves_stay_inside_the_image(rows):
    """A shelf wider than the image gets more rows, or leaves the rest as free objects: every
    box valid, the scene's object count as drawn."""
    spec = dataclasses.replace(DENSE, min_objects=30, max_objects=40, shelf_rows=rows)
    for seed in range(30):
        _, objects = make_scene(seed, spec)
        assert 30 <= len(objects) <= 40
        for o in objects:
            x1, y1, x2, y2 = o.box_px
            assert 0 <= x1 < x2 < spec.image_size and 0 <= y1 < y2 < spec.image_size, (seed, o)


def test_books_shelves_stand_on_one_line_with_ragged_tops():
    """--preset books: the crowded preset's shelf with tops dropped, bottoms kept, so the
    (y1, x1) answer order jumps along a row; every box stays valid."""
    jumps, spec = 0, PRESETS["books"]
    for seed in range(20):
        books = _crowded_shelf(random.Random(seed), spec, 12)
        even = _crowded_shelf(random.Random(seed), CROWDED, 12)
        assert [(d, b[0], b[2], b[3]) for d, b in books] == [(d, b[0], b[2], b[3])
                                                             for d, b in even]
        assert all(e[1] <= b[1] < b[3] for (_, b), (_, e) in zip(books, even, strict=True))
        rows: dict[int, list] = {}
        for _, box in books:
            rows.setdefault(box[3], []).append(box)
        for row in rows.values():
            order = [b[0] for b in sorted(row, key=lambda b: (b[1], b[0]))]
            jumps += order != sorted(order)
    assert jumps >= 15  # most rows are no longer listed left to right
    for seed in range(20):
        for o in make_scene(seed, spec)[1]:
            x1, y1, x2, y2 = o.box_px
            assert 0 <= x1 < x2 < spec.image_size and 0 <= y1 < y2 < spec.image_size
    with pytest.raises(UserError, match="shelf_ragged"):
        dataclasses.replace(spec, shelf_ragged=1.0).check()


def test_chunked_lse_without_a_token_matches_the_full_logits():
    """HiddenHead's chunked sum leaves each row's token out exactly as a masked full row does,
    in value and gradient, whichever chunk the token falls in."""
    torch.manual_seed(1)
    hidden = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
    at, tokens = Rows(torch.zeros(4, dtype=torch.long), torch.tensor([1, 2, 3, 4])), \
        torch.tensor([0, 5, 36, 17])
    got = vocab_logsumexp(HiddenHead(hidden, weight, torch.arange(3)).rows(at), weight,
                                 chunk_size=5, exclude=tokens)
    full = LogitsHead(hidden @ weight.T, torch.arange(3))
    want = full.vocab_lse_without(at, tokens)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    g1 = torch.autograd.grad(got.sum(), (hidden, weight))
    g2 = torch.autograd.grad(want.sum(), (hidden, weight))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_chunked_lse_without_token_ranges_matches_slicing_them_out():
    """Inclusive id ranges left out (inside a chunk, across chunks, a single id, the last ids):
    the chunked sum and the full-logits head both equal the lse of the row with them cut."""
    torch.manual_seed(3)
    hidden = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
    at = Rows(torch.zeros(4, dtype=torch.long), torch.tensor([1, 2, 3, 4]))
    spans = torch.tensor([[1, 3], [3, 12], [20, 20], [30, 36]])
    got = vocab_logsumexp(HiddenHead(hidden, weight, torch.arange(3)).rows(at), weight,
                          chunk_size=5, exclude=spans)
    full = LogitsHead(hidden @ weight.T, torch.arange(3)).vocab_lse_without(at, spans)
    z = (hidden @ weight.T)[0, :4]  # [4, 37]: the rows before each position
    want = torch.stack([torch.cat([z[i, :lo], z[i, hi + 1:]]).logsumexp(-1)
                        for i, (lo, hi) in enumerate(spans.tolist())])
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(full, want)
    g1 = torch.autograd.grad(got.sum(), (hidden, weight))
    g2 = torch.autograd.grad(want.sum(), (hidden, weight))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-6)


def test_report_tabulates_duplicates_of_the_eval_steps_that_logged_them():
    rows = [{"step": 10, "kind": "eval", "rollout/f1": 0.5},
            {"step": 20, "kind": "eval", "rollout/f1": 0.6, "rollout/dup_share": 0.25,
             "rollout/guarded/f1": 0.7, "rollout/dup_max_cluster_size": 3.0}]
    (row,) = duplicate_table(rows)
    assert row["step"] == 20 and row["rollout/dup_share"] == 0.25
    assert row["rollout/guarded/f1"] == 0.7 and row["rollout/dup_max_cluster_size"] == 3
    assert row["rollout/guarded/AP50"] is None  # not logged: shown as missing, not zero


def test_random_rollouts_keep_the_clean_answer_consistent(record, collator):
    """Shuffled objects, copies near and far, truncations: the answer decodes to its text,
    removed copies are gone from it, and every event penalises a token other than the one
    the clean answer has there."""
    import random

    rng = random.Random(0)
    tok = collator.tokenizer
    pool = [A, B, C, A_DUP, A_DUP2, A_FAR, obj("blue square", [301, 300, 400, 401])]
    for _ in range(25):
        objects = rng.sample(pool, rng.randint(1, len(pool)))
        text = '{"objects": [' + ", ".join(objects) + "]}"
        text = text[: rng.randint(len(text) // 2, len(text))]
        target = build_target(rollout_of(text, tok), record, collator, config(1.0))
        assert tok.decode(target.ids[:-1]) == target.text
        assert len(target.types) == len(target.ids) == len(target.target_bins)
        kept = target.text.count('"desc"')
        assert kept == target.counts["pred"] - target.counts["duplicates_removed"] + \
            target.counts["fn_appended"]
        for u in target.unlikely:
            assert 0 < u.position < len(target.ids) and u.token != target.ids[u.position]


def test_packed_channel_b_penalises_the_same_tokens(model, record, collator, monkeypatch):
    """training.packing=static: the unlikelihood events move with their samples' tokens."""
    texts = [f'{{"objects": [{A}, {A_DUP}, {C}, {B}]}}', f'{{"objects": [{A}, {C}, {A_DUP}]}}']
    padded, _ = step(model, collator, record, texts, config(1.0), monkeypatch)
    cfg = config(1.0)
    packed_cfg = dataclasses.replace(cfg, training=dataclasses.replace(
        cfg.training, packing="static", packing_length=4096))
    packed, _ = step(model, collator, record, texts, packed_cfg, monkeypatch)
    assert packed.stats["loss/duplicate_ul"][1] == padded.stats["loss/duplicate_ul"][1] == 2
    torch.testing.assert_close(packed.stats["loss/duplicate_ul"],
                               padded.stats["loss/duplicate_ul"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.99])
def test_windowed_duplicate_pairs_equal_the_dense_pairs(threshold):
    """The x1-window search finds exactly the pairs of the full P x P IoU matrix."""
    from coordexp.boxes import box_iou
    from coordexp.eval.duplicates import duplicate_pairs

    rng = np.random.default_rng(3)
    base = rng.uniform(0, 300, (40, 2))
    boxes = np.concatenate([base, base + rng.uniform(5, 60, (40, 2))], 1)
    boxes = np.concatenate([boxes, boxes[rng.integers(0, 40, 60)] + rng.normal(0, 2, (60, 4))])
    boxes[-3:] = boxes[-6:-3]  # exact copies: IoU 1
    descs = [str(d) for d in rng.integers(0, 3, len(boxes))]
    descs[-3:] = descs[-6:-3]
    iou = box_iou(torch.as_tensor(boxes), torch.as_tensor(boxes)).numpy()
    same = np.array(descs)[:, None] == np.array(descs)[None, :]
    dense = np.argwhere(np.triu(same & (iou >= threshold), k=1))
    assert len(dense) > 0
    assert duplicate_pairs(boxes, descs, threshold).tolist() == dense.tolist()
