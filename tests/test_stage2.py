"""Channel A of Stage 2: the soft self-context loop, its losses, and fast == reference.

Model-level checks run the tiny models in float64: the CIoU of a random model's near-degenerate
expected boxes amplifies float32 rounding about 1000-fold, which would hide a real mismatch
behind a loose tolerance. In float64 fast and reference agree to ~1e-8 relative.
"""

import dataclasses
import json
import math
import weakref
from pathlib import Path

import pytest
import torch

from coordexp.codec import CoordCodec
from coordexp.config import Config, CoordSoftCEW1Config, Stage2ABConfig, load_config
from coordexp.data.collate import COORD, STRUCT, Batch, Collator
from coordexp.data.records import Record, read_records
from coordexp.data.synthetic import SynthSpec, make_scene
from coordexp.diagnostics import finalize_stats
from coordexp.lmhead import Rows
from coordexp.model.qwen_vl import build_processor
from coordexp.model.tiny import TinySpec, build_tiny_model
from coordexp.train.channel_a import context_embeddings, soft_context_forward
from coordexp.train.loop import train
from coordexp.train.stage1 import stage1_step
from coordexp.train.stage2 import channel_a_step

SEED_OBJECTIVE = dict(bbox_smoothl1_weight=2.0, bbox_ciou_weight=0.2, coord_gate_weight=1.0,
                      text_gate_weight=0.1, coord_ce_weight=0.05)
SEED_COORD = CoordSoftCEW1Config(soft_ce_weight=0.1, w1_weight=0.1, target_truncate=8)


def a_config(**stage2) -> Config:
    return Config(stage2_ab=Stage2ABConfig(**(SEED_OBJECTIVE | stage2)),
                  coord_soft_ce_w1=SEED_COORD)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def setup(request, tiny_tokenizer, synth_dir, tmp_path_factory):
    """(model in float64, collator, coord ids, batches by image mode)."""
    family = request.param
    model = build_tiny_model(tiny_tokenizer, TinySpec(family=family)).double()
    collator = Collator(build_processor(family, tiny_tokenizer))
    coord_ids = torch.tensor(CoordCodec().token_ids(tiny_tokenizer))
    records = read_records(synth_dir / "train.jsonl")
    first = next(r for r in records if len(r.objects) >= 2)
    pair = [first, next(r for r in records if len(r.objects) > len(first.objects))]  # padding
    big = _big_image_record(tmp_path_factory.mktemp("big"))
    empty = dataclasses.replace(pair[0], objects=())
    batches = {"same": collator(pair), "mixed": collator([pair[0], big]),
               "one_empty": collator([empty, pair[1]]), "all_empty": collator([empty, empty])}
    batches["none"] = without_images(batches["same"], model.config.image_token_id)
    for batch in batches.values():
        if "pixel_values" in batch.inputs:
            batch.inputs["pixel_values"] = batch.inputs["pixel_values"].double()
    return model, collator, coord_ids, batches


def _big_image_record(root) -> Record:
    """A larger image: its many image rows reach past the other sample's first coord slot, so
    the shared prefix ends inside this sample's image (Qwen3-VL deepstack rows get split)."""
    image, objects = make_scene(7, SynthSpec(image_size=224, min_objects=3, max_objects=3))
    image.save(root / "big.png")
    return Record("big.png", 224, 224, tuple(objects), root)


def without_images(batch: Batch, image_token_id: int) -> Batch:
    """The same batch as text only: image placeholder columns dropped, no pixels."""
    ids = batch.inputs["input_ids"]
    keep = ids[0] != image_token_id
    assert bool(((ids == image_token_id) == ~keep).all()), "rows must share their image columns"
    token_type = batch.token_type[:, keep]
    coord_b, coord_t = (token_type == COORD).nonzero(as_tuple=True)
    inputs = {"input_ids": ids[:, keep], "attention_mask": batch.inputs["attention_mask"][:, keep],
              "mm_token_type_ids": torch.zeros_like(ids[:, keep])}
    return Batch(inputs, batch.labels[:, keep], token_type, coord_b, coord_t, batch.coord_bins,
                 batch.prompt_lens - int((~keep).sum()), batch.sample_ids)


def run_step(model, batch, coord_ids, cfg):
    """Loss, finalized stats and every parameter gradient of one Channel-A step."""
    model.zero_grad(set_to_none=True)
    out = channel_a_step(model, batch, cfg, coord_ids)
    out.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), finalize_stats(out.stats), grads


@pytest.mark.parametrize("images", ["same", "mixed", "none"])
@pytest.mark.parametrize("grad_mode", ["unroll", "em_detach"])
@pytest.mark.parametrize("n", [2, 3])
def test_fast_equals_reference_losses_and_every_gradient(setup, n, grad_mode, images):
    model, _, coord_ids, batches = setup
    batch = batches[images]
    results = [run_step(model, batch, coord_ids, a_config(n_softctx_iter=n, channel_a_impl=impl,
                                                          softctx_grad_mode=grad_mode))
               for impl in ("fast", "reference")]
    (loss_f, stats_f, grads_f), (loss_r, stats_r, grads_r) = results
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-10, atol=1e-10)
    assert stats_f.keys() == stats_r.keys()
    for key in stats_r:
        assert stats_f[key] == pytest.approx(stats_r[key], rel=1e-8, abs=1e-8), key
    used = {k for k, _ in model.named_parameters() if images != "none" or ".visual." not in k}
    assert grads_f.keys() == grads_r.keys() == used
    for key, ref in grads_r.items():  # float32 RMSNorm inside: ~4e-8 of each tensor's scale
        scale = float(ref.abs().max())
        torch.testing.assert_close(grads_f[key], ref, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("images", ["one_empty", "all_empty"])
def test_fast_equals_reference_with_empty_samples(setup, images):
    """A sample without objects is shorter than the shared prefix (padding inside it); a batch
    without any coord slot runs one pass and logs no coord terms."""
    model, _, coord_ids, batches = setup
    (loss_f, stats_f, grads_f), (loss_r, stats_r, grads_r) = [
        run_step(model, batches[images], coord_ids, a_config(channel_a_impl=impl))
        for impl in ("fast", "reference")]
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-10, atol=1e-10)
    assert stats_f.keys() == stats_r.keys()
    assert ("loss/coord_soft_ce" in stats_f) == (images == "one_empty")
    for key, ref in grads_r.items():
        torch.testing.assert_close(grads_f[key], ref, rtol=1e-5,
                                   atol=1e-6 * float(ref.abs().max()))


def test_fast_equals_reference_at_other_temperatures(setup):
    """coord_soft_ce_w1.temperature != 1 takes the coord lse out of the joint LM-head call,
    softctx_temperature != coord temperature gives coord_diag its own lse."""
    model, _, coord_ids, batches = setup
    c = dataclasses.replace(SEED_COORD, temperature=0.7)
    (loss_f, stats_f, grads_f), (loss_r, stats_r, grads_r) = [
        run_step(model, batches["same"], coord_ids, Config(
            coord_soft_ce_w1=c, stage2_ab=Stage2ABConfig(**(SEED_OBJECTIVE | dict(
                channel_a_impl=impl, softctx_temperature=1.3)))))
        for impl in ("fast", "reference")]
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-10, atol=1e-10)
    for key in stats_r:
        assert stats_f[key] == pytest.approx(stats_r[key], rel=1e-8, abs=1e-8), key
    for key, ref in grads_r.items():
        torch.testing.assert_close(grads_f[key], ref, rtol=1e-5,
                                   atol=1e-6 * float(ref.abs().max()))
    base = run_step(model, batches["same"], coord_ids, a_config())[1]
    assert stats_f["loss/coord_gate"] != pytest.approx(base["loss/coord_gate"])


def test_mixed_batch_prefix_ends_inside_an_image(setup):
    model, _, _, batches = setup
    batch = batches["mixed"]
    image_cols = (batch.inputs["input_ids"] == model.config.image_token_id).nonzero()[:, 1]
    assert int(batch.coord_t.min()) < int(image_cols.max())


def test_one_pass_equals_the_stage1_step(setup):
    model, _, coord_ids, batches = setup
    c = dataclasses.replace(SEED_COORD, ce_weight=0.05, gate_weight=1.0,
                            bbox_smoothl1_weight=2.0, bbox_ciou_weight=0.2)
    stage1_cfg = Config(coord_soft_ce_w1=c)
    stage2_cfg = a_config(n_softctx_iter=1, text_gate_weight=0.0)
    model.zero_grad(set_to_none=True)
    out1 = stage1_step(model, batches["same"], stage1_cfg, coord_ids)
    out1.loss.backward()
    grads1 = {k: p.grad.clone() for k, p in model.named_parameters()}
    loss2, stats2, grads2 = run_step(model, batches["same"], coord_ids, stage2_cfg)
    stats1 = finalize_stats(out1.stats)
    torch.testing.assert_close(loss2, out1.loss.detach())
    for key, value in stats1.items():
        assert stats2[key] == pytest.approx(value, rel=1e-9), key
    for key, grad in grads1.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(grads2[key], grad, rtol=1e-5, atol=1e-6 * scale)


def test_token_ce_reads_only_a1_logits(setup):
    """The anchor CE, struct and desc CE are identical for n = 1, 2, 3 (both paths), while
    the final-pass terms change with n."""
    model, _, coord_ids, batches = setup
    anchors, soft_ce = [], []
    with torch.no_grad():
        for n in (1, 2, 3):
            for impl in ("fast", "reference"):
                cfg = a_config(n_softctx_iter=n, channel_a_impl=impl, coord_ctx_embed_mode="soft")
                stats = finalize_stats(channel_a_step(model, batches["same"], cfg,
                                                      coord_ids).stats)
                anchors.append([stats[k] for k in ("loss/token_ce_anchor", "loss/struct_ce",
                                                   "loss/desc_ce")])
                soft_ce.append(stats["loss/coord_soft_ce"])
    for other in anchors[1:]:
        assert other == pytest.approx(anchors[0], rel=1e-12)
    assert soft_ce[0] != pytest.approx(soft_ce[2], rel=1e-9)  # n=1 vs n=2: final logits differ


def _record_decoder_inputs(model):
    """Capture inputs_embeds of every decoder call."""
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].detach().clone()),
        with_kwargs=True)
    return seen, hook


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_st_pass_sees_exactly_hard_embeddings_and_untouched_other_rows(setup, impl):
    model, _, coord_ids, batches = setup
    batch = batches["same"]
    cfg = a_config(n_softctx_iter=2, channel_a_impl=impl, coord_ctx_embed_mode="st")
    seen, hook = _record_decoder_inputs(model)
    try:
        out = soft_context_forward(model, batch, coord_ids, cfg.stage2_ab)
    finally:
        hook.remove()
    table = model.get_input_embeddings()(coord_ids).detach()
    hard = table[out.first_coord_logits.argmax(-1)]  # [N, D]
    assert torch.equal(out.replacements[0].detach(), hard)
    first, second = (seen[0], seen[1]) if impl == "reference" else (seen[1], seen[2])
    start = batch.inputs["input_ids"].shape[1] - first.shape[1]  # 0, or the prefix length
    slots = torch.zeros(first.shape[:2], dtype=torch.bool)
    slots[batch.coord_b, batch.coord_t - start] = True
    assert torch.equal(second[slots], hard)
    assert torch.equal(second[~slots], first[~slots])
    if impl == "reference":  # the model itself spliced the image features into these rows
        image_rows = batch.inputs["input_ids"] == model.config.image_token_id
        assert image_rows.any() and torch.equal(second[image_rows], first[image_rows])
        placeholder = model.get_input_embeddings().weight[model.config.image_token_id]
        assert not torch.equal(first[image_rows][0], placeholder.detach())


def test_soft_and_hard_context_embeddings():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    table = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    probs = torch.softmax(logits / 2.0, -1)
    torch.testing.assert_close(context_embeddings(logits, table, "soft", 2.0), probs @ table)
    assert torch.equal(context_embeddings(logits, table, "hard", 2.0), table[[1, 0]])
    assert torch.equal(context_embeddings(logits, table, "st", 2.0), table[[1, 0]])


def test_st_context_backpropagates_the_soft_gradient():
    logits = torch.tensor([[0.0, 3.0, 1.0]], requires_grad=True)
    table = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    (g_st,) = torch.autograd.grad(context_embeddings(logits, table, "st", 1.0).sum(), logits)
    (g_soft,) = torch.autograd.grad(context_embeddings(logits, table, "soft", 1.0).sum(), logits)
    torch.testing.assert_close(g_st, g_soft)


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_em_detach_keeps_a1_ce_gradient_and_blocks_the_replacement_gradient(setup, impl):
    model, _, coord_ids, batches = setup
    batch = batches["same"]
    for mode, connected in (("em_detach", False), ("unroll", True)):
        cfg = a_config(n_softctx_iter=3, softctx_grad_mode=mode, channel_a_impl=impl)
        out = soft_context_forward(model, batch, coord_ids, cfg.stage2_ab)
        assert all(r.requires_grad == connected for r in out.replacements)
        final_coord = out.final.coord_logits(Rows(batch.coord_b, batch.coord_t))
        assert final_coord.requires_grad  # the last pass always has a graph
        a1_coord, reached = out.first_coord_logits, False  # what built the replacements
        if a1_coord.requires_grad:
            (grad,) = torch.autograd.grad(final_coord.logsumexp(-1).sum(), a1_coord,
                                          allow_unused=True, retain_graph=True)
            reached = grad is not None and bool(grad.abs().sum() > 0)
        assert reached == connected
        text_t = (batch.token_type[0] == STRUCT).nonzero()[:, 0]
        a1_ce = out.first.vocab_lse(Rows(torch.zeros_like(text_t), text_t)).sum()
        weight = model.model.language_model.layers[0].mlp.up_proj.weight
        (ce_grad,) = torch.autograd.grad(a1_ce, weight)
        assert ce_grad.abs().sum() > 0


def test_step_logs_every_channel_a_name(setup):
    model, _, coord_ids, batches = setup
    with torch.no_grad():
        stats = channel_a_step(model, batches["same"], a_config(), coord_ids).stats
    expected = {"loss", "loss/token_ce", "loss/token_ce_anchor", "loss/struct_ce",
                "loss/desc_ce", "loss/token_ce_self_context", "loss/bbox_smoothl1",
                "loss/bbox_ciou", "loss/geo", "loss/coord_token_ce", "loss/coord_soft_ce",
                "loss/coord_w1", "loss/coord_gate", "loss/text_gate", "loss/coord_reg",
                "coord_diag/p_gt_mean", "coord_diag/acc_top5", "coord_diag/margin_mean",
                "coord_diag/expected_bin_mae", "coord_diag/expected_bin_abs_err_p90",
                "coord_diag/coord_vocab_mass_mean", "coord_diag/coord_tokens"}
    assert expected <= set(stats)
    values = finalize_stats(stats)
    assert values["loss/text_gate"] > 0  # computed, not a constant 0 (upstream's bug)
    w = a_config().stage2_ab
    geo = w.bbox_smoothl1_weight * values["loss/bbox_smoothl1"] + \
        w.bbox_ciou_weight * values["loss/bbox_ciou"]
    assert values["loss/geo"] == pytest.approx(geo)
    token_ce = values["loss/token_ce_anchor"] + w.fmt_struct_ce_weight * \
        values["loss/token_ce_self_context"]
    assert values["loss/token_ce"] == pytest.approx(token_ce)
    assert values["loss"] == pytest.approx(token_ce + geo + values["loss/coord_reg"])


# -- two processes --------------------------------------------------------------------------

def _train_rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "logging.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


@pytest.mark.slow
def test_two_processes_run_the_same_channel_and_match_one(synth_dir, tmp_path, torchrun_train):
    """b_ratio 0.5 over 2 steps (A, B): under torchrun both ranks take the same channel
    (a split would log channel_b 0.5) and every metric equals the one-process reduction."""
    common = ["model.init_tiny=qwen2_5_vl", "training.stage=stage2_ab", "training.max_steps=2",
              f"data.train={synth_dir / 'train.jsonl'}", "training.per_device_batch_size=2",
              "training.effective_batch_size=4", "training.save_steps=3",
              "training.warmup_ratio=0", "stage2_ab.schedule.b_ratio=0.5",
              "stage2_ab.text_gate_weight=0.1", "rollout.max_new_tokens=12"]
    ddp_dir = torchrun_train(common, tmp_path / "ddp")
    single = train(load_config(None, common + [f"training.output_dir={tmp_path / 'one'}"]))
    ddp_rows, one_rows = _train_rows(ddp_dir), _train_rows(single)
    assert [r["stage2/channel_b"] for r in ddp_rows] == [0.0, 1.0]
    assert [r["stage2/channel_a"] for r in ddp_rows] == [1.0, 0.0]
    assert any(k.startswith("rollout/") for k in ddp_rows[1])
    for a, b in zip(ddp_rows, one_rows, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - {"step", "kind", "time", "rollout/gen_tokens_per_s"}:
            if isinstance(a[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


# -- the tiny twins of the seed recipes --------------------------------------------------------
TRAIN_NAMES = (
    "loss/token_ce", "loss/token_ce_anchor", "loss/struct_ce", "loss/desc_ce",
    "loss/token_ce_self_context", "loss/bbox_smoothl1", "loss/bbox_ciou", "loss/geo",
    "loss/coord_token_ce", "loss/coord_soft_ce", "loss/coord_w1", "loss/coord_gate",
    "loss/text_gate", "loss/coord_reg", "loss", "grad_norm", "learning_rate",
    "coord_diag/p_gt_mean", "coord_diag/acc_top5", "coord_diag/margin_mean",
    "coord_diag/expected_bin_mae", "coord_diag/expected_bin_abs_err_p90",
    "coord_diag/coord_vocab_mass_mean", "coord_diag/coord_tokens", "stage2/channel_a",
    "stage2/channel_b", "stage2_ab/b_ratio_realized")
EVAL_NAMES = (
    "rollout/mAP", "rollout/AP50", "rollout/AP75", "rollout/f1", "rollout/precision",
    "rollout/recall", "rollout/pred_objects", "rollout/gt_objects_total", "rollout/matched",
    "rollout/fp_total", "rollout/fn_total", "rollout/gating_rejections",
    "rollout/matched_maskiou_mean", "rollout/parse_dropped_invalid",
    "rollout/parse_dropped_ambiguous", "rollout/parse_truncated_rate",
    "rollout/sample_valid_pred_rate")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def stage1_checkpoint(synth_dir, tmp_path_factory):
    """A (briefly trained) Stage-1 checkpoint of the demo's model family."""
    out = tmp_path_factory.mktemp("stage1")
    run = train(load_config(None, [
        "model.init_tiny=qwen3_vl", "model.coord_embed_init=ordinal", "training.max_steps=2",
        "training.save_steps=2", "training.effective_batch_size=4",
        "training.per_device_batch_size=4", f"data.train={synth_dir / 'train.jsonl'}",
        f"training.output_dir={out}"]))
    return run / "checkpoints" / "step_000002"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["desc_first_a_only", "ab_mixed"])
def test_tiny_twin_runs_from_a_stage1_checkpoint(name, stage1_checkpoint, synth_dir, tmp_path):
    cfg = load_config(CONFIGS / "tiny" / f"{name}.yaml", [
        f"model.path={stage1_checkpoint}", f"data.train={synth_dir / 'train.jsonl'}",
        f"data.val={synth_dir / 'val.jsonl'}", f"training.output_dir={tmp_path}",
        "training.max_steps=3", "data.val_limit=4", "rollout.max_new_tokens=32"])
    run = train(cfg)
    rows = [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    eval_rows = [r for r in rows if r["kind"] == "eval"]
    assert set(TRAIN_NAMES) <= set().union(*train_rows)  # over the run: A and B steps differ
    assert set(EVAL_NAMES) <= set(eval_rows[-1])
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    assert [r["stage2/channel_b"] for r in train_rows] == (
        [0.0, 0.0, 0.0] if name == "desc_first_a_only" else [0.0, 1.0, 1.0])
    dump = json.loads((run / "monitor_dumps" / "step_000003.json").read_text())
    assert dump["global_step"] == 3 and dump["samples"]


def saved_for_backward(step) -> tuple[torch.Tensor, int]:
    """step()'s loss and the bytes autograd keeps for its backward, one count per storage.

    Tensors saved by graph branches freed before backward (detached ones) are not kept."""
    saved = []

    def pack(t):
        saved.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    kept = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in (ref() for ref in saved) if t is not None}
    return loss, sum(kept.values())


def test_recompute_keeps_less_and_changes_nothing(setup):
    """softctx_recompute reruns the non-final suffix passes in backward: the same losses and
    gradients, and one suffix pass's activations less kept per pass that carries grad and is
    not the last (n - 1 of them in unroll; A1 alone in em_detach, whose middle pass has none)."""
    model, _, coord_ids, batches = setup
    dropped = {}
    for n, grad_mode in ((2, "unroll"), (3, "unroll"), (3, "em_detach")):
        results = []
        for recompute in (False, True):
            cfg = a_config(n_softctx_iter=n, softctx_grad_mode=grad_mode,
                           softctx_recompute=recompute)
            model.zero_grad(set_to_none=True)
            loss, saved = saved_for_backward(
                lambda cfg=cfg: channel_a_step(model, batches["mixed"], cfg, coord_ids).loss)
            loss.backward()
            results.append((loss.detach(), saved, [p.grad.clone() for p in model.parameters()]))
        (loss_k, saved_k, grads_k), (loss_r, saved_r, grads_r) = results
        torch.testing.assert_close(loss_r, loss_k, rtol=0, atol=0)
        for grad_r, grad_k in zip(grads_r, grads_k, strict=True):
            torch.testing.assert_close(grad_r, grad_k, rtol=1e-12, atol=1e-12)
        dropped[n, grad_mode] = saved_k - saved_r
    one_pass = dropped[2, "unroll"]
    assert one_pass > 0
    assert dropped[3, "unroll"] == pytest.approx(2 * one_pass, rel=0.02)
    assert dropped[3, "em_detach"] == pytest.approx(one_pass, rel=0.02)
