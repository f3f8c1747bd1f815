import pytest
import torch
import transformers as T

from coordexp.codec import CoordCodec
from coordexp.data.collate import COORD, DESC, IGNORE, STRUCT, Collator
from coordexp.data.records import read_records
from coordexp.data.render import render_record
from coordexp.model.qwen_vl import load_vlm
from coordexp.model.tiny import TinySpec, build_tiny_model
from coordexp.model.tokenizer import add_coord_tokens, resize_for_tokenizer

codec = CoordCodec()


def test_tokenizer_grows_by_exactly_1000_distinct_ids(tiny_tokenizer):
    fresh = T.PreTrainedTokenizerFast(tokenizer_object=_without_coords(tiny_tokenizer))
    before = len(fresh)
    ids = add_coord_tokens(fresh)
    assert len(fresh) == before + 1000 and len(set(ids)) == 1000
    assert add_coord_tokens(fresh) == ids  # idempotent


def _without_coords(tok):
    import json

    from tokenizers import Tokenizer

    data = json.loads(tok.backend_tokenizer.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"]
                            if not t["content"].startswith("<|coord_")]
    return Tokenizer.from_str(json.dumps(data))


@pytest.mark.parametrize("tied", [True, False])
def test_resize_keeps_tying_as_it_was(tiny_tokenizer, tied):
    fresh = T.PreTrainedTokenizerFast(tokenizer_object=_without_coords(tiny_tokenizer))
    model = build_tiny_model(fresh, TinySpec(tie_word_embeddings=tied))
    add_coord_tokens(fresh)
    resize_for_tokenizer(model, fresh)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] >= len(fresh) and head.shape[0] == emb.shape[0]
    assert (emb is head) == tied


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_tiny_model_save_reload_gives_same_logits(tiny_dir, synth_dir, family):
    model, processor, fam = load_vlm(tiny_dir / family)
    assert fam == family
    model2, _, _ = load_vlm(tiny_dir / family)
    batch = Collator(processor)(read_records(synth_dir / "train.jsonl")[:2])
    with torch.no_grad():
        torch.testing.assert_close(model(**batch.inputs).logits, model2(**batch.inputs).logits,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_collate_batch_runs_forward_and_backward(tiny_dir, synth_dir, family):
    model, processor, _ = load_vlm(tiny_dir / family)
    records = read_records(synth_dir / "train.jsonl")[:3]
    batch = Collator(processor)(records)
    ids, types = batch.inputs["input_ids"], batch.token_type
    # every object contributes 4 coord slots whose targets are the rendered bins
    assert len(batch.coord_bins) == 4 * sum(len(r.objects) for r in records)
    for b, rec in enumerate(records):
        answer = processor.tokenizer.decode(ids[b][types[b] > 0][:-1])
        assert answer == render_record(rec, codec)
        assert ids[b][types[b] > 0][-1] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert set(types.unique().tolist()) == {0, STRUCT, DESC, COORD}
    assert (batch.labels[types == 0] == IGNORE).all()
    logits = model(**batch.inputs).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                             batch.labels[:, 1:].flatten(), ignore_index=IGNORE)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_init_tiny_cli_writes_a_reloadable_checkpoint(tmp_path):
    from coordexp.cli import main

    assert main(["model", "init-tiny", "--out", str(tmp_path / "m"), "--family", "qwen3_vl"]) == 0
    model = T.AutoModelForImageTextToText.from_pretrained(tmp_path / "m")
    assert model.config.model_type == "qwen3_vl"
    codec.token_ids(T.AutoTokenizer.from_pretrained(tmp_path / "m"))
