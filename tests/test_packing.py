"""Padding-free packing: the pack plan, the packed layout, and packed == padded for the losses
and every gradient of Stage 1, Channel B and Channel A (n = 1) on both tiny model families.

Parity runs the tiny models in float64 (see test_stage2.py: CIoU of a random model amplifies
float32 rounding). The samples of one micro-batch have images of different sizes and one has
no objects; packed rows are checked with all samples in one row and spread over several rows
(row tails are padding segments of their own).
"""

import contextlib
import dataclasses
import json
import math
import shutil

import pytest
import torch

from coordexp.codec import CoordCodec
from coordexp.config import (
    Config,
    RolloutConfig,
    Stage2ABConfig,
    TrainingConfig,
    load_config,
    packing_notes,
)
from coordexp.data.collate import Collator
from coordexp.data.packing import pack_batch, plan_packs
from coordexp.data.records import Record, read_records
from coordexp.data.render import render_object, sorted_objects_bins
from coordexp.data.synthetic import SynthSpec, make_scene
from coordexp.diagnostics import finalize_stats
from coordexp.errors import UserError
from coordexp.grammar import decode_pieces, token_table
from coordexp.model.adapter import hidden_states, pack_rows, rope_position_ids
from coordexp.model.packed_attention import NAME, segment_bounds
from coordexp.model.qwen_vl import build_processor
from coordexp.model.tiny import TinySpec, build_tiny_model
from coordexp.rollout import Rollout, generate_rollouts
from coordexp.train import stage2
from coordexp.train.data_order import DataOrder
from coordexp.train.loop import train
from coordexp.train.stage1 import stage1_step
from coordexp.train.stage2 import channel_a_step, channel_b_step

CODEC = CoordCodec()


# -- the plan -----------------------------------------------------------------------------------
def test_plan_is_best_fit_decreasing_ordered_by_smallest_index():
    # 7 -> row a (room 1); 5 -> row b (3); 4 -> row c (4); 3 -> b, the fullest it fits (0);
    # 2 -> c (2): rows [2], [0, 1], [3, 4], listed by their smallest index
    assert plan_packs([5, 3, 7, 2, 4], 8) == [[0, 1], [2], [3, 4]]


def test_plan_never_splits_and_every_sample_appears_once():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 60, (300,), generator=g).tolist()
    packs = plan_packs(lengths, 128)
    assert sorted(i for p in packs for i in p) == list(range(300))
    assert all(sum(lengths[i] for i in p) <= 128 for p in packs)
    assert packs == plan_packs(lengths, 128)  # deterministic
    assert sum(lengths) / (128 * len(packs)) > 0.95  # near-full rows


def test_a_sample_longer_than_a_row_is_named_or_runs_alone():
    with pytest.raises(UserError, match=r"record 2 \(b.png\): 9 tokens.*packing_length \(8\)"):
        plan_packs([3, 9, 4], 8, names=["record 1 (a.png)", "record 2 (b.png)", "c"])
    assert plan_packs([3, 9, 4], 8, allow_single_long=True) == [[0, 2], [1]]


def test_segments_are_runs_of_consecutive_text_positions():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 0]])
    assert segment_bounds(positions) == [[(0, 3), (3, 5), (5, 6)], [(0, 5), (5, 6)]]
    left_padded = torch.tensor([[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]])  # generation's pads: 1
    assert segment_bounds(left_padded) is None


def test_data_order_permutes_packs_and_resumes_exactly():
    packs = [[0, 3], [1], [2, 4, 5], [6]]
    order = DataOrder(7, seed=3, per_device=1, packs=packs)
    epoch = [order.next_indices() for _ in range(4)]
    assert sorted(map(tuple, epoch)) == sorted(map(tuple, packs))
    state = order.state_dict()
    ahead = [order.next_indices() for _ in range(5)]
    again = DataOrder(7, seed=3, per_device=1, packs=packs)
    again.load_state_dict(state)
    assert [again.next_indices() for _ in range(5)] == ahead
    with pytest.raises(UserError, match="pack plan"):
        DataOrder(7, seed=3, per_device=1, packs=[[0, 1, 2, 3], [4, 5, 6]]).load_state_dict(state)
    with pytest.raises(UserError, match="pack plan"):
        DataOrder(7, seed=3, per_device=1).load_state_dict(state)


def test_packing_config_is_checked_and_channel_a_n2_is_named(synth_dir):
    base = ["model.init_tiny=qwen2_5_vl", f"data.train={synth_dir / 'train.jsonl'}"]
    with pytest.raises(UserError, match="per_device_batch_size=1"):
        load_config(None, [*base, "training.packing=static"])
    with pytest.raises(UserError, match="training.packing"):
        load_config(None, [*base, "training.packing=dynamic"])
    packed = [*base, "training.packing=static", "training.per_device_batch_size=1",
              "training.stage=stage2_ab"]
    assert "right-padded" in packing_notes(load_config(None, packed))[0]
    assert packing_notes(load_config(None, [*packed, "stage2_ab.n_softctx_iter=1"])) == []


# -- a micro-batch of unequal samples on both families ----------------------------------------
@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def setup(request, tiny_tokenizer, synth_dir, tmp_path_factory):
    """(float64 model, collator, coord ids, records: 112 px, 224 px, no objects, 112 px)."""
    family = request.param
    model = build_tiny_model(tiny_tokenizer, TinySpec(family=family)).double()
    collator = Collator(build_processor(family, tiny_tokenizer))
    records = read_records(synth_dir / "train.jsonl")
    root = tmp_path_factory.mktemp("big")
    image, objects = make_scene(7, SynthSpec(image_size=224, min_objects=3, max_objects=3))
    image.save(root / "big.png")
    big = Record("big.png", 224, 224, tuple(objects), root)
    empty = dataclasses.replace(records[0], objects=())
    coord_ids = torch.tensor(CODEC.token_ids(tiny_tokenizer))
    return model, collator, coord_ids, [records[0], big, empty, records[1]]


def encode(collator, records, answers=None):
    batch = collator(records) if answers is None else collator.encode(records, answers)
    batch.inputs["pixel_values"] = batch.inputs["pixel_values"].double()
    return batch


def row_length(batch, rows: str) -> int:
    """packing_length putting every sample in one row, or spreading them over several."""
    total = int(batch.inputs["attention_mask"].sum())
    return total if rows == "one" else math.ceil(0.6 * total)


def packed_config(length: int, **stage2_kw) -> Config:
    return Config(training=TrainingConfig(packing="static", packing_length=length,
                                          per_device_batch_size=1),
                  stage2_ab=Stage2ABConfig(**stage2_kw), rollout=RolloutConfig(max_new_tokens=8))


def run(model, step):
    model.zero_grad(set_to_none=True)
    out = step()
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), finalize_stats(out.stats), grads


def assert_same(packed, padded):
    (loss_p, stats_p, grads_p), (loss_r, stats_r, grads_r) = packed, padded
    torch.testing.assert_close(loss_p, loss_r, rtol=1e-12, atol=1e-12)
    assert stats_p.keys() == stats_r.keys()
    for key in stats_r.keys() - {"rollout/gen_tokens_per_s"}:  # a timing
        assert stats_p[key] == pytest.approx(stats_r[key], rel=1e-10, abs=1e-12), key
    assert grads_p.keys() == grads_r.keys() and any(".visual." in k for k in grads_r)
    for key, ref in grads_r.items():
        torch.testing.assert_close(grads_p[key], ref, rtol=1e-9,
                                   atol=1e-12 * float(ref.abs().max()))


def test_sample_length_is_the_encoded_length(setup):
    _, collator, _, records = setup
    batch = collator(records)
    assert [collator.sample_length(r) for r in records] == \
        batch.inputs["attention_mask"].sum(1).tolist()


@pytest.mark.parametrize("rows", ["one", "several"])
def test_packed_stage1_equals_padded_losses_and_every_gradient(setup, rows):
    model, collator, coord_ids, records = setup
    batch = encode(collator, records)
    cfg = packed_config(row_length(batch, rows))
    packed, _ = pack_rows(model, batch, cfg.training.packing_length)
    assert len(packed.segments) == 4 and packed.inputs["input_ids"].shape[0] == \
        (1 if rows == "one" else 2)
    assert_same(run(model, lambda: stage1_step(model, batch, cfg, coord_ids)),
                run(model, lambda: stage1_step(model, batch, Config(), coord_ids)))


@pytest.mark.parametrize("rows", ["one", "several"])
def test_packed_channel_a_one_pass_equals_padded(setup, rows):
    """n = 1: packed rows, one plain forward; padded: the fast path (prefix + suffix)."""
    model, collator, coord_ids, records = setup
    batch = encode(collator, records)
    kw = dict(n_softctx_iter=1, text_gate_weight=0.1, bbox_smoothl1_weight=2.0,
              coord_gate_weight=1.0)
    packed = packed_config(row_length(batch, rows), **kw)
    padded = Config(stage2_ab=Stage2ABConfig(**kw))
    assert_same(run(model, lambda: channel_a_step(model, batch, packed, coord_ids)),
                run(model, lambda: channel_a_step(model, batch, padded, coord_ids)))


def rollout_of(text: str, tokenizer) -> Rollout:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = decode_pieces(ids, token_table(tokenizer))
    return Rollout("".join(pieces), ids, [0.0] * len(ids), pieces, False)


@pytest.mark.parametrize("rows", ["one", "each_alone"])
def test_packed_channel_b_equals_padded(setup, rows, monkeypatch):
    """Rollouts: a matched object + a false positive, garbage (fallback prefix), an empty
    array for the empty image, nothing matched. Targets are packed after encoding."""
    model, collator, coord_ids, records = setup
    first = sorted_objects_bins(records[0], CODEC)[0]
    fp = render_object("purple triangle", [900, 900, 950, 950], CODEC, "desc_first")
    texts = [f'{{"objects": [{render_object(*first, CODEC, "desc_first")}, {fp}]}}',
             "garbage", '{"objects": []}', f'{{"objects": [{fp}]}}']
    monkeypatch.setattr(stage2, "generate_rollouts", lambda *a, **k: [
        rollout_of(t, collator.tokenizer) for t in texts])
    length = 10 ** 6 if rows == "one" else 1  # 1: every sample alone in its row
    kw = dict(desc_ce_weight=0.5, text_gate_weight=0.1, coord_gate_weight=1.0)

    def step(cfg):
        return lambda: channel_b_step(model, collator, records, cfg, coord_ids, seed=1)

    encode_targets = stage2.encode_targets

    def encode_double(*args):  # the float64 model reads float64 pixels
        batch, weights = encode_targets(*args)
        batch.inputs["pixel_values"] = batch.inputs["pixel_values"].double()
        return batch, weights

    monkeypatch.setattr(stage2, "encode_targets", encode_double)
    packed = run(model, step(packed_config(length, **kw)))
    padded = run(model, step(Config(stage2_ab=Stage2ABConfig(**kw),
                                    rollout=RolloutConfig(max_new_tokens=8))))
    assert packed[1]["rollout/parse_invalid_rollout_rate"] == 0.25
    assert_same(packed, padded)


# -- attention and positions --------------------------------------------------------------------
def test_position_ids_restart_per_sample(setup):
    model, collator, _, records = setup
    batch = encode(collator, records)
    rope = rope_position_ids(model, batch.inputs)  # [3, B, T]
    packed, layout = pack_rows(model, batch, row_length(batch, "several"))
    pos = packed.inputs["position_ids"]  # [4, R, L]
    assert pos.shape == (4, *packed.inputs["input_ids"].shape)
    for b, (r, start, n) in zip(layout.order.tolist(), packed.segments.tolist(), strict=True):
        cols = slice(start, start + n)
        assert pos[0, r, cols].tolist() == list(range(n))
        assert torch.equal(pos[1:, r, cols], rope[:, b, :n]) and pos[1:, r, start].eq(0).all()
        assert torch.equal(packed.inputs["input_ids"][r, cols], batch.inputs["input_ids"][b, :n])
    used = packed.segments[:, 2].sum().item()
    tails = pos.shape[1] * pos.shape[2] - used
    assert tails > 0 and int((packed.labels != -100).sum()) == int((batch.labels != -100).sum())


@contextlib.contextmanager
def attention(model, name: str):
    """The language decoder on `name` (sdpa: the block-diagonal mask; sdpa_packed: sdpa run
    per packed sample) for the block, then back to the per-sample path pack_rows selects."""
    model.model.language_model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.model.language_model.set_attn_implementation(NAME)


def test_per_sample_attention_equals_the_block_diagonal_mask(setup):
    model, collator, _, records = setup
    batch = encode(collator, records)
    packed, _ = pack_rows(model, batch, row_length(batch, "several"))
    assert model.model.language_model.config._attn_implementation == NAME
    with torch.no_grad():
        per_sample = hidden_states(model, packed.inputs)
        with attention(model, "sdpa"):
            masked = hidden_states(model, packed.inputs)
    torch.testing.assert_close(per_sample, masked, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["sdpa", NAME])
def test_perturbing_one_sample_leaves_the_others_logits_bitwise_unchanged(setup, impl):
    """Sample 1 (the big image) gets other pixels and another answer token. The others'
    logits in the packed row stay bitwise equal, with the block-diagonal mask and with sdpa
    per sample; with one causal span over the whole row (no restart in the text positions)
    the later samples' logits do change."""
    model, collator, _, records = setup
    batch = encode(collator, records)
    packed, _ = pack_rows(model, batch, row_length(batch, "one"))
    r, start, n = packed.segments[1].tolist()  # the big image's segment
    assert packed.sample_ids[1] == "big.png"
    other = packed.inputs | {"input_ids": packed.inputs["input_ids"].clone()}
    other["input_ids"][r, start + n - 3] += 1  # an answer token
    grid = packed.inputs["image_grid_thw"]
    first = int(grid[0].prod())
    pixels = packed.inputs["pixel_values"].clone()
    pixels[first: first + int(grid[1].prod())] += 0.5
    other["pixel_values"] = pixels

    def logits(inputs):
        with torch.no_grad():
            return model(**inputs, use_cache=False).logits[r]  # [L, V]

    one_span = packed.inputs["position_ids"].clone()
    one_span[0] = torch.arange(one_span.shape[-1])  # one sequence: attention crosses samples
    with attention(model, impl):
        base, moved = logits(packed.inputs), logits(other)
        crossed = logits(packed.inputs | {"position_ids": one_span})
    mine = torch.zeros(base.shape[0], dtype=torch.bool)
    mine[start: start + n] = True
    assert torch.equal(base[~mine], moved[~mine])
    assert not torch.equal(base[mine], moved[mine])
    assert not torch.equal(base[start + n:], crossed[start + n:])


def test_rollouts_after_packing_equal_those_on_stock_sdpa(setup):
    """In-training evaluation generates with the model pack_rows switched: its left-padded
    prefill (images of two sizes) keeps the padding mask, so rollouts do not change."""
    model, collator, _, records = setup
    cfg = RolloutConfig(max_new_tokens=6, batch_size=2)
    runs = {}
    for name in (NAME, "sdpa"):
        with attention(model, name):
            runs[name] = generate_rollouts(model, collator.processor, records[:2], cfg,
                                           progress=False)
    for a, b in zip(runs[NAME], runs["sdpa"], strict=True):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.token_logprobs),
                                   torch.tensor(b.token_logprobs))


def test_pack_batch_moves_images_with_their_samples(setup):
    """Rows in reverse sample order: pixels and grids follow; coord slots keep their bins."""
    model, collator, _, records = setup
    batch = encode(collator, records)
    packed, layout = pack_batch(batch, rope_position_ids(model, batch.inputs), [[3, 2], [1, 0]])
    assert layout.order.tolist() == [3, 2, 1, 0]
    assert torch.equal(packed.inputs["image_grid_thw"], batch.inputs["image_grid_thw"].flip(0))
    sizes = batch.inputs["image_grid_thw"].prod(-1).tolist()
    pixels = batch.inputs["pixel_values"].split(sizes)
    assert torch.equal(packed.inputs["pixel_values"], torch.cat(pixels[::-1]))
    ids = packed.inputs["input_ids"][packed.coord_b, packed.coord_t]
    assert torch.equal(collator.id_to_bin[ids], packed.coord_bins)
    assert sorted(packed.coord_bins.tolist()) == sorted(batch.coord_bins.tolist())


# -- the loop -----------------------------------------------------------------------------------
PACKED_RUN = ["model.init_tiny=qwen2_5_vl", "training.max_steps=6", "training.save_steps=3",
              "training.effective_batch_size=1", "training.per_device_batch_size=1",
              "training.packing=static", "training.packing_length=256",
              "training.learning_rate=3e-3", "training.warmup_ratio=0"]


def test_resume_after_kill_mid_epoch_with_packing_reproduces_the_trajectory(synth_dir, tmp_path):
    cfg = load_config(None, PACKED_RUN + [f"data.train={synth_dir / 'train.jsonl'}",
                                          f"training.output_dir={tmp_path / 'full'}"])
    run_dir = train(cfg)
    state = json.loads((run_dir / "checkpoints" / "step_000003" / "trainer_state.json")
                       .read_text())["data_order"]
    assert state["pos"] == 3 and "pack_plan" in state  # killed inside an epoch of 5 packs

    def losses(d):
        lines = (d / "logging.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]

    copy = tmp_path / "copy" / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "step_000006")  # killed after the step-3 save
    resumed = load_config(run_dir / "resolved_config.yaml",
                          [f"training.output_dir={tmp_path / 'copy'}"])
    train(resumed, resume="latest")
    assert len(losses(run_dir)) == 6 and losses(copy) == losses(run_dir)
