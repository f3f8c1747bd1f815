"""LoRA / DoRA through PEFT: only adapters and the coord rows train (tied and untied heads),
the fast Channel A equals the reference on them, per-layer checkpointing changes nothing, and
adapter checkpoints load, merge to a plain model with the same logits and infer the same."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

from coordexp.cli import main
from coordexp.codec import CoordCodec
from coordexp.config import Config, CoordSoftCEW1Config, ModelConfig, Stage2ABConfig, load_config
from coordexp.data.collate import Collator
from coordexp.data.records import read_records
from coordexp.model.qwen_vl import build_processor, load_vlm, save_vlm
from coordexp.model.tiny import TinySpec, build_tiny_model
from coordexp.model.tuning import apply_tuning, hf_model, lora_targets, save_adapter
from coordexp.train.engine import enable_checkpointing
from coordexp.train.loop import train
from coordexp.train.stage1 import stage1_step
from coordexp.train.stage2 import channel_a_step

A_CONFIG = dict(bbox_smoothl1_weight=2.0, bbox_ciou_weight=0.2, coord_gate_weight=1.0,
                text_gate_weight=0.1, coord_ce_weight=0.05)
COORD = CoordSoftCEW1Config(soft_ce_weight=0.1, w1_weight=0.1, target_truncate=8)


def adapted(tok, family: str, tuning: str, tied: bool = True, base_dir=None):
    """A tiny model under LoRA/DoRA with its adapter weights moved off their identity start
    (LoRA B = 0 would make every adapter check trivially true)."""
    model = build_tiny_model(tok, TinySpec(family=family, tie_word_embeddings=tied))
    ids = CoordCodec().token_ids(tok)
    peft_model = apply_tuning(model, ModelConfig(tuning=tuning), ids, base_dir or ".")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return peft_model


@pytest.fixture(scope="module")
def batch_of(tiny_tokenizer, synth_dir):
    records = read_records(synth_dir / "train.jsonl")
    pair = [r for r in records if len(r.objects) >= 2][:2]

    def make(family: str, dtype=torch.float32):
        batch = Collator(build_processor(family, tiny_tokenizer))(pair)
        batch.inputs["pixel_values"] = batch.inputs["pixel_values"].to(dtype)
        return batch

    return make


@pytest.mark.parametrize("tied", [True, False])
def test_only_adapters_and_coord_rows_train(tiny_tokenizer, batch_of, tied):
    model = adapted(tiny_tokenizer, "qwen3_vl", "dora", tied)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    assert sum("trainable_tokens_delta" in n for n in trainable) == (1 if tied else 2)
    hf = hf_model(model)
    targets = lora_targets(hf, ("llm", "vit", "aligner"))
    assert any(".visual.blocks." in t for t in targets) and any("merger" in t for t in targets)
    assert not any(t.startswith("lm_head") for t in targets)
    base_emb = hf.get_input_embeddings().token_adapter.base_layer.weight.clone()
    coord_ids = torch.tensor(CoordCodec().token_ids(tiny_tokenizer))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    stage1_step(hf, batch_of("qwen3_vl"), Config(), coord_ids).loss.backward()
    opt.step()
    merged = model.merge_and_unload()
    emb, head = merged.get_input_embeddings().weight, merged.get_output_embeddings().weight
    others = torch.ones(len(emb), dtype=torch.bool)
    others[coord_ids] = False
    torch.testing.assert_close(emb[others], base_emb[others], rtol=0, atol=0)
    assert not torch.equal(emb[coord_ids], base_emb[coord_ids])
    assert (head is emb) == tied
    if not tied:
        assert not torch.equal(head[coord_ids], emb[coord_ids])


def run_channel_a(hf, batch, coord_ids, cfg, params):
    for p in params.values():
        p.grad = None
    out = channel_a_step(hf, batch, cfg, coord_ids)
    out.loss.backward()
    return out.loss.detach(), {k: p.grad.clone() for k, p in params.items() if p.grad is not None}


@pytest.mark.parametrize("tied", [True, False])
def test_fast_channel_a_equals_reference_under_dora(tiny_tokenizer, batch_of, tied):
    model = adapted(tiny_tokenizer, "qwen3_vl", "dora", tied).double()
    hf, batch = hf_model(model), batch_of("qwen3_vl", torch.float64)
    coord_ids = torch.tensor(CoordCodec().token_ids(tiny_tokenizer))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    (loss_f, grads_f), (loss_r, grads_r) = [
        run_channel_a(hf, batch, coord_ids, Config(coord_soft_ce_w1=COORD, stage2_ab=Stage2ABConfig(
            **A_CONFIG, n_softctx_iter=2, channel_a_impl=impl)), params)
        for impl in ("fast", "reference")]
    torch.testing.assert_close(loss_f, loss_r, rtol=1e-10, atol=1e-10)
    assert grads_f.keys() == grads_r.keys() == params.keys()
    for key, ref in grads_r.items():
        torch.testing.assert_close(grads_f[key], ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("step", ["stage1", "fast_a", "fast_a_recompute"])
@pytest.mark.parametrize("tuning", ["full", "lora"])
def test_gradient_checkpointing_changes_no_loss_or_gradient(tiny_tokenizer, batch_of, step,
                                                            tuning):
    coord_ids = torch.tensor(CoordCodec().token_ids(tiny_tokenizer))
    batch = batch_of("qwen3_vl", torch.float64)
    cfg = Config(coord_soft_ce_w1=COORD, stage2_ab=Stage2ABConfig(
        **A_CONFIG, n_softctx_iter=2, softctx_recompute=step == "fast_a_recompute"))
    results = []
    for checkpointed in (False, True):
        model = adapted(tiny_tokenizer, "qwen3_vl", tuning) if tuning != "full" else \
            build_tiny_model(tiny_tokenizer, TinySpec(family="qwen3_vl"))
        model = model.double().train()
        if checkpointed:
            enable_checkpointing(model)
        hf = hf_model(model)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if step == "stage1":
            out = stage1_step(hf, batch, cfg, coord_ids)
            out.loss.backward()
            results.append((out.loss.detach(), {k: p.grad for k, p in params.items()}))
        else:
            results.append(run_channel_a(hf, batch, coord_ids, cfg, params))
    (loss_off, grads_off), (loss_on, grads_on) = results
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-10, atol=1e-10)
    assert grads_on.keys() == grads_off.keys()
    for key, ref in grads_off.items():
        torch.testing.assert_close(grads_on[key], ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family,tuning,tied", [("qwen3_vl", "dora", True),
                                                ("qwen2_5_vl", "lora", False)])
def test_merged_model_equals_adapter_model(tiny_tokenizer, batch_of, tmp_path, family, tuning,
                                           tied):
    base_dir, ckpt, merged_dir = tmp_path / "base", tmp_path / "ckpt", tmp_path / "merged"
    processor = build_processor(family, tiny_tokenizer)
    save_vlm(build_tiny_model(tiny_tokenizer, TinySpec(family=family, tie_word_embeddings=tied)),
             processor, base_dir)
    model = adapted(tiny_tokenizer, family, tuning, tied, base_dir).eval()
    save_adapter(model, ckpt)
    processor.save_pretrained(ckpt)
    assert main(["model", "merge", "--src", str(ckpt), "--dst", str(merged_dir)]) == 0
    plain = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()  # transformers alone
    inputs = batch_of(family).inputs
    with torch.no_grad():
        want, got = model(**inputs).logits, plain(**inputs).logits
    assert float((want - got).abs().max()) <= 1e-5
    with torch.no_grad():  # the adapter changed the model
        base = AutoModelForImageTextToText.from_pretrained(base_dir).eval()(**inputs).logits
    assert float((want - base).abs().max()) > 1e-3
    loaded, _, _ = load_vlm(ckpt)  # model.path / infer read the adapter directly
    with torch.no_grad():
        assert float((loaded(**inputs).logits - want).abs().max()) <= 1e-5


def test_lora_run_checkpoints_hold_only_the_adapter_and_resume_exactly(synth_dir, tmp_path):
    common = ["model.init_tiny=qwen3_vl", "model.tuning=lora", "model.lora.r=4",
              f"data.train={synth_dir / 'train.jsonl'}", "training.max_steps=4",
              "training.save_steps=2", "training.effective_batch_size=2",
              "training.per_device_batch_size=2", "training.learning_rate=3e-3",
              "training.warmup_ratio=0"]
    run = train(load_config(None, common + [f"training.output_dir={tmp_path / 'a'}"]))
    ckpt = run / "checkpoints" / "step_000004"
    assert (ckpt / "adapter_model.safetensors").is_file()
    assert not (ckpt / "model.safetensors").exists()
    full = (run / "init_model" / "model.safetensors").stat().st_size
    assert (ckpt / "adapter_model.safetensors").stat().st_size < 0.2 * full
    # resume from step 2 into a fresh run directory copy: the same trajectory
    import shutil

    copy = tmp_path / "b" / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step_000004")
    train(load_config(None, common + [f"training.output_dir={tmp_path / 'b'}"]), resume="latest")
    losses = [[r["loss"] for r in map(json.loads, (d / "logging.jsonl").read_text().splitlines())]
              for d in (run, copy)]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    # Stage 2 starts from the adapter checkpoint directly (merged into its base on load)
    stage2 = train(load_config(None, [
        f"model.path={ckpt}", "model.tuning=dora", "model.lora.r=4", "training.stage=stage2_ab",
        f"data.train={synth_dir / 'train.jsonl'}", "training.max_steps=1",
        "training.effective_batch_size=2", "training.per_device_batch_size=2",
        f"training.output_dir={tmp_path / 'c'}"]))
    assert (stage2 / "checkpoints" / "step_000001" / "adapter_model.safetensors").is_file()


def test_infer_writes_the_same_predictions_from_adapter_and_merged(tiny_tokenizer, synth_dir,
                                                                   tmp_path):
    base_dir, ckpt, merged_dir = tmp_path / "base", tmp_path / "ckpt", tmp_path / "merged"
    processor = build_processor("qwen3_vl", tiny_tokenizer)
    save_vlm(build_tiny_model(tiny_tokenizer, TinySpec(family="qwen3_vl")), processor, base_dir)
    model = adapted(tiny_tokenizer, "qwen3_vl", "dora", True, base_dir)
    save_adapter(model, ckpt)
    processor.save_pretrained(ckpt)
    assert main(["model", "merge", "--src", str(ckpt), "--dst", str(merged_dir)]) == 0
    outs = []
    for name, model_dir in (("a", ckpt), ("m", merged_dir)):
        out = tmp_path / f"{name}.jsonl"
        assert main(["infer", "--model", str(model_dir), "--data", str(synth_dir / "val.jsonl"),
                     "--out", str(out), "--max-new-tokens", "24"]) == 0
        outs.append(out.read_text())
    assert outs[0] == outs[1]
    assert sum(len(json.loads(line)["raw_text"]) for line in outs[0].splitlines()) > 0


def test_merge_of_a_missing_or_baseless_checkpoint_is_a_user_error(tmp_path, capsys):
    assert main(["model", "merge", "--src", str(tmp_path / "nope"), "--dst",
                 str(tmp_path / "out")]) == 2
    assert "nope" in capsys.readouterr().err
    (tmp_path / "orphan").mkdir()
    (tmp_path / "orphan" / "adapter_config.json").write_text("{}")
    assert main(["model", "merge", "--src", str(tmp_path / "orphan"), "--dst",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "base_model_name_or_path" in err and "Traceback" not in err


@pytest.mark.parametrize("override,key", [
    ("model.tuning=qlora", "model.tuning"),
    ("model.lora.targets=[llm,lm_head]", "model.lora.targets"),
    ("model.lora.targets=llm", "model.lora.targets"),
    ("model.lora.r=0", "model.lora.r"),
    ("training.distributed=deepspeed", "training.distributed")])
def test_tuning_config_errors_exit_2_naming_the_key(tmp_path, capsys, override, key):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  init_tiny: qwen2_5_vl\ndata:\n  train: x.jsonl\n")
    assert main(["train", str(cfg), override]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err
