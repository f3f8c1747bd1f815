"""Channel B: rollout -> parse -> match -> the supervised answer, its masks and targets, and a
whole Channel-B step on the tiny model."""

import pytest
import torch
from PIL import Image

from coordexp.codec import CoordCodec
from coordexp.config import (
    ChannelBConfig,
    Config,
    RolloutConfig,
    ScheduleConfig,
    Stage2ABConfig,
)
from coordexp.data.collate import COORD, DESC, DESC_VALUE_RE, STRUCT, Collator
from coordexp.data.records import DetObject, Record
from coordexp.data.render import render_object
from coordexp.diagnostics import finalize_stats
from coordexp.grammar import decode_pieces, token_table
from coordexp.model.qwen_vl import build_image_processor, build_processor
from coordexp.model.tiny import TinySpec, build_tiny_model
from coordexp.rollout import Rollout
from coordexp.train import stage2
from coordexp.train.channel_b import build_target, encode_targets, rollout_stats
from coordexp.train.stage2 import Stage2Step, channel_b_step

CODEC = CoordCodec()
# a 1000 x 1000 image: pixel coordinates are bins (round(999 x / 999) = x)
GT = {"A": ("red circle", [100, 100, 200, 200]), "B": ("blue square", [300, 300, 400, 400]),
      "C": ("green diamond", [500, 100, 600, 200])}  # canonical (y1, x1) order: A, C, B


def obj(desc: str, bins: list[int]) -> str:
    return render_object(desc, bins, CODEC, "desc_first")


A, B, C = (obj(*GT[k]) for k in "ABC")
A_NEAR = obj("red circle", [105, 98, 210, 205])  # matches A (IoU ~0.8), other bins
FP = obj("purple triangle", [900, 900, 950, 950])  # far from every GT
BROKEN = '{"desc": "orange", "bbox_2d": [<|coord_1|>, <|coord_2|>]}'  # wrong arity: dropped


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("chb")
    Image.new("RGB", (1000, 1000), (30, 30, 30)).save(root / "img.png")
    return root


@pytest.fixture(scope="module")
def record(image_root):
    objects = tuple(DetObject(d, tuple(float(v) for v in b)) for d, b in GT.values())
    return Record("img.png", 1000, 1000, objects, image_root)


@pytest.fixture(scope="module")
def collator(tiny_tokenizer):
    small = build_image_processor("qwen2_5_vl", max_pixels=112 * 112)  # few image tokens
    return Collator(build_processor("qwen2_5_vl", tiny_tokenizer, small))


def rollout_of(text: str, tokenizer, hit_max: bool = False) -> Rollout:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = decode_pieces(ids, token_table(tokenizer))
    return Rollout("".join(pieces), ids, [0.0] * len(ids), pieces, hit_max)


def config(multiplier: float = 1.0, desc_weight: float = 1.0) -> Config:
    s = Stage2ABConfig(desc_ce_weight=desc_weight,
                       channel_b=ChannelBConfig(drop_invalid_struct_ce_multiplier=multiplier))
    return Config(stage2_ab=s, rollout=RolloutConfig(max_new_tokens=8, batch_size=2))


# -- the appended text ------------------------------------------------------------------------
@pytest.mark.parametrize(("rollout", "expected"), [
    ('{"objects": []}', f'{{"objects": [{A}, {C}, {B}]}}'),  # empty: every GT appended
    (f'{{"objects": [{A_NEAR}, {FP}]}}', f'{{"objects": [{A_NEAR}, {FP}, {C}, {B}]}}'),
    (f'{{"objects": [{A}, {C}, {B}]}}', f'{{"objects": [{A}, {C}, {B}]}}'),  # nothing missed
    (f'{{"objects": [{A_NEAR}, {{"desc": "gre', f'{{"objects": [{A_NEAR}, {C}, {B}]}}'),
    (f'{{"objects": [{B}, {BROKEN}]}}', f'{{"objects": [{B}, {A}, {C}]}}'),  # drop cut away
    ("I see three shapes.", f'{{"objects": [{A}, {C}, {B}]}}'),  # invalid: the fallback
    (f'Sure: {{"objects": [{C}]}}', f'Sure: {{"objects": [{C}, {A}, {B}]}}'),  # junk kept
])
def test_appended_text_is_exact(rollout, expected, record, collator):
    target = build_target(rollout_of(rollout, collator.tokenizer), record, collator, config())
    assert target.text == expected
    assert target.ids[-1] == collator.end_id


def test_kept_prefix_tokens_are_the_generated_ones(record, collator):
    rollout = rollout_of(f'{{"objects": [{A_NEAR}, {FP}]}}', collator.tokenizer)
    target = build_target(rollout, record, collator, config())
    cut = len(rollout.text) - len("]}")
    whole = next(i for i in range(len(rollout.pieces) + 1)
                 if sum(map(len, rollout.pieces[:i + 1])) > cut)
    assert target.ids[:whole] == rollout.token_ids[:whole]
    # the cut splits the generated `]}]}` token: its kept part is re-tokenized, not dropped
    assert collator.tokenizer.decode(target.ids[:-1]) == target.text


def test_counters_of_an_invalid_and_a_truncated_rollout(record, collator):
    invalid = build_target(rollout_of("no json", collator.tokenizer), record, collator, config())
    assert invalid.counts["invalid_rollout"] == 1 and invalid.counts["fn_appended"] == 3
    truncated = build_target(rollout_of(f'{{"objects": [{A}, {{"de', collator.tokenizer, True),
                             record, collator, config())
    assert truncated.counts["truncated"] == 1 and truncated.counts["matched"] == 1


# -- masks ------------------------------------------------------------------------------------
def token_spans(target, tokenizer):
    """(start, end) of every answer token in target.text; the end-of-turn token last."""
    pieces = decode_pieces(target.ids[:-1], token_table(tokenizer))
    assert "".join(pieces) == target.text
    spans, pos = [], 0
    for p in pieces:
        spans.append((pos, pos + len(p)))
        pos += len(p)
    return spans


FP2 = obj("yellow star", [700, 800, 750, 850])  # another false positive
# token class -> (type, CE weight, target bin: "gt" = the matched / appended GT object's bin)
EXPECTED = {
    "container": (0, 0.0, -1),  # the rollout's own `{"objects": [`
    "matched_struct": (STRUCT, 1.0, -1),  # keys and punctuation of the matched object
    "matched_desc": (0, 0.0, -1),  # its desc: no CE on a prediction's wording
    "matched_coord": (COORD, 0.0, "gt"),  # its 4 slots, towards the matched GT's bins
    "separator": (0, 0.0, -1),  # a `, ` alone between two kept objects
    "false_positive": (0, 0.0, -1),  # FP objects, and tokens merged into them: neutral
    "dropped": (0, 0.0, -1),  # a dropped (wrong-arity) object between kept ones
    "appended_struct": (STRUCT, 2.0, -1),  # the multiplier (a drop happened), applied once
    "appended_desc": (DESC, 0.5, -1),  # desc_ce_weight
    "appended_coord": (COORD, 0.0, "gt"),
    "end_of_turn": (STRUCT, 2.0, -1),
}


def token_class(span, piece, regions, tail_descs, is_last) -> str:
    """The class of one answer token from the regions its characters fall in."""
    if is_last:
        return "end_of_turn"
    coord = CODEC.parse_token(piece) is not None
    if "tail" in regions:
        if coord:
            return "appended_coord"
        desc = any(span[0] < e and span[1] > s for s, e in tail_descs)
        return "appended_desc" if desc else "appended_struct"
    if regions == {"matched"} and coord:
        return "matched_coord"
    if "matched_desc" in regions:
        return "matched_desc"
    if "matched" in regions and regions <= {"matched", "separator"}:
        return "matched_struct"
    for name in ("false_positive", "dropped", "separator", "container"):
        if name in regions:
            return name
    raise AssertionError(f"unclassified token {piece!r} in {regions}")


def test_masks_of_every_token_class(record, collator):
    """Every token of a rollout with a matched object, a separator, a false positive, a
    dropped object between kept ones and a truncated tail, checked against EXPECTED."""
    text = f'{{"objects": [{A_NEAR}, {FP}, {BROKEN}, {FP2}, {{"desc": "tru'
    target = build_target(rollout_of(text, collator.tokenizer), record, collator,
                          config(multiplier=2.0, desc_weight=0.5))
    prefix_end = text.index(FP2) + len(FP2)  # the last kept object
    assert target.text == text[:prefix_end] + f", {C}, {B}]}}"
    region = ["tail"] * len(target.text)
    marks = [("container", 0, text.index(A_NEAR)), ("matched", text.index(A_NEAR), len(A_NEAR)),
             ("matched_desc", text.index("red circle"), len("red circle")),
             ("separator", text.index(A_NEAR) + len(A_NEAR), 2),
             ("false_positive", text.index(FP), len(FP) + 2),
             ("dropped", text.index(BROKEN), len(BROKEN) + 2),
             ("false_positive", text.index(FP2), len(FP2))]
    for name, start, size in marks:
        region[start:start + size] = [name] * size
    tail_descs = [m.span(1) for m in DESC_VALUE_RE.finditer(target.text, prefix_end)]
    appended = iter(GT["C"][1] + GT["B"][1])
    matched = iter(GT["A"][1])
    spans = token_spans(target, collator.tokenizer) + [(len(target.text),) * 2]
    seen = set()
    for i, (s, e) in enumerate(spans):
        piece = target.text[s:e]
        name = token_class((s, e), piece, set(region[s:e]), tail_descs, i == len(spans) - 1)
        kind, weight, bin_ = EXPECTED[name]
        if bin_ == "gt":
            bin_ = next(matched if name == "matched_coord" else appended)
        got = (target.types[i], target.weights[i], target.target_bins[i])
        assert got == (kind, weight, bin_), (i, piece, name)
        seen.add(name)
    assert next(matched, None) is None and next(appended, None) is None  # every slot seen
    # the separator and the container may merge into neighbouring tokens in this BPE
    assert set(EXPECTED) - seen <= {"separator", "container"}


def test_without_drops_the_tail_weight_is_one(record, collator):
    target = build_target(rollout_of('{"objects": [', collator.tokenizer), record, collator,
                          config(multiplier=3.0))
    assert {w for w, k in zip(target.weights, target.types, strict=True) if k == STRUCT} == {1.0}


def test_encoded_batch_supervises_exactly_the_target_slots(record, collator):
    rollouts = [f'{{"objects": [{A_NEAR}, {FP}]}}', "garbage"]
    targets = [build_target(rollout_of(t, collator.tokenizer), record, collator, config())
               for t in rollouts]
    batch, weights = encode_targets(collator, [record, record], targets)
    expected = GT["A"][1] + GT["C"][1] + GT["B"][1] + GT["A"][1] + GT["C"][1] + GT["B"][1]
    assert batch.coord_bins.tolist() == expected
    ids = batch.inputs["input_ids"][batch.coord_b, batch.coord_t]
    assert all(CODEC.parse_token(collator.tokenizer.convert_ids_to_tokens(i)) is not None
               for i in ids.tolist())
    assert bool((weights[batch.coord_b, batch.coord_t] == 0).all())
    assert bool((weights[batch.token_type == 0] == 0).all())
    fp_bins = batch.inputs["input_ids"][0] == collator.tokenizer.convert_tokens_to_ids(
        CODEC.token(900))
    assert fp_bins.sum() == 2 and bool((batch.token_type[0][fp_bins] == 0).all())


def test_ambiguous_objects_are_counted_once(record, collator):
    """A coord literal split over two tokens: dropped as ambiguous, counted once as invalid."""
    tok = collator.tokenizer
    text = f'{{"objects": [{A}]}}'
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pieces = decode_pieces(ids, token_table(tok))
    k = pieces.index(CODEC.token(200))
    pieces[k:k + 1] = ["<|coord_", "200|>"]
    ids[k:k + 1] = tok("<|coord_", add_special_tokens=False)["input_ids"][:1] * 2
    target = build_target(Rollout(text, ids, [0.0] * len(ids), pieces, False), record,
                          collator, config())
    values = finalize_stats(rollout_stats([target], seconds=1.0))
    assert values["rollout/parse_dropped_invalid_per_sample"] == 1
    assert values["rollout/parse_dropped_ambiguous_per_sample"] == 1


def test_rollout_metrics_are_ratios_of_sums(record, collator):
    texts = [f'{{"objects": [{A_NEAR}, {FP}]}}', f'{{"objects": [{A}, {C}, {B}]}}']
    targets = [build_target(rollout_of(t, collator.tokenizer), record, collator, config())
               for t in texts]
    halves = [rollout_stats([t], 0.5) for t in targets]
    values = finalize_stats({k: halves[0][k] + halves[1][k] for k in halves[0]})
    assert values["rollout/precision"] == pytest.approx(4 / 5)  # matched 1 + 3 of 2 + 3 preds
    assert values["rollout/recall"] == pytest.approx(4 / 6)
    assert values["rollout/f1"] == pytest.approx(2 * 0.8 * (4 / 6) / (0.8 + 4 / 6))
    assert values["rollout/fn_appended_per_sample"] == pytest.approx(1.0)
    assert values["rollout/gen_tokens_per_s"] == pytest.approx(
        sum(t.counts["gen_tokens"] for t in targets) / 1.0)


# -- a whole step on the tiny model --------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return build_tiny_model(tiny_tokenizer, TinySpec(family="qwen2_5_vl"))


def test_channel_b_step_trains_matched_and_appended_objects(model, record, collator,
                                                            monkeypatch):
    texts = [f'{{"objects": [{A_NEAR}, {FP}]}}', "garbage"]
    monkeypatch.setattr(stage2, "generate_rollouts", lambda *a, **k: [
        rollout_of(t, collator.tokenizer) for t in texts])
    coord_ids = torch.tensor(CODEC.token_ids(collator.tokenizer))
    model.zero_grad(set_to_none=True)
    out = channel_b_step(model, collator, [record, record], config(), coord_ids, seed=1)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    values = finalize_stats(out.stats)
    assert values["coord_diag/coord_tokens"] == 24  # (1 matched + 2 appended) + 3 appended
    assert values["rollout/parse_invalid_rollout_rate"] == 0.5
    assert values["loss/text_gate"] > 0 and "loss/desc_ce" in values
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_real_rollouts_feed_a_step_and_the_schedule_routes_channels(model, record, collator):
    """b_ratio 0.5: step 0 is Channel A, step 1 Channel B with the tiny model's own rollouts."""
    cfg = Config(stage2_ab=Stage2ABConfig(schedule=ScheduleConfig(b_ratio=0.5)),
                 rollout=RolloutConfig(max_new_tokens=6, batch_size=2))
    step_fn = Stage2Step(model, collator, cfg, torch.tensor(CODEC.token_ids(collator.tokenizer)))
    with torch.no_grad():
        a, b = step_fn([record, record], 0), step_fn([record, record], 1)
    assert finalize_stats(a.stats)["stage2/channel_a"] == 1.0
    assert not any(k.startswith("rollout/") for k in a.stats)
    values = finalize_stats(b.stats)
    assert values["stage2/channel_b"] == 1.0 and values["stage2_ab/b_ratio_realized"] == 0.5
    assert values["rollout/gen_new_tokens_mean"] <= 6
    assert torch.isfinite(b.loss)


@pytest.mark.parametrize(("rollout", "expected"), [
    ('{"objects": []}', '{"objects": []}'),
    (f'{{"objects": [{FP}]}}', f'{{"objects": [{FP}]}}'),  # a false positive, nothing missed
])
def test_image_without_objects(rollout, expected, record, collator):
    empty = Record(record.image, record.width, record.height, (), record.root)
    target = build_target(rollout_of(rollout, collator.tokenizer), empty, collator, config())
    assert target.text == expected
    assert COORD not in target.types and target.counts["gt"] == 0
    closure = len(collator.answer_tokens("]}")[0])  # `]}` and the end of turn
    assert target.types[-closure:] == [STRUCT] * closure
    assert set(target.types[:-closure]) == {0}  # nothing else is supervised
