"""Rollouts on tiny models: batching, stopping, raw log-probs, the CoordJSON grammar,
predictions."""


import numpy as np
import pytest
import torch
from PIL import Image

from coordexp.codec import CoordCodec
from coordexp.config import Config, EvalConfig, RolloutConfig
from coordexp.data.collate import load_image
from coordexp.data.records import Record, read_records
from coordexp.data.render import render_record
from coordexp.eval.predictions import box_scores
from coordexp.grammar import coordjson_grammar, decode_pieces, token_table
from coordexp.model.qwen_vl import load_vlm
from coordexp.parsing import parse_coordjson, parse_coordjson_tokens
from coordexp.predict import predict_records, prediction
from coordexp.rollout import generate_rollouts, prompt_batch

FIELD_ORDERS = ("desc_first", "geometry_first")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Decode steps of a tiny model are too small to share across threads; on a busy 2-core
    machine a second thread made them up to 50x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vlm(tiny_dir):
    model, processor, _ = load_vlm(tiny_dir / "qwen2_5_vl")
    return model, processor


@pytest.fixture(scope="module")
def mixed_records(tmp_path_factory):
    """Noise images of different sizes, so prompts differ in length and get left-padded."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    records = []
    for i, (w, h) in enumerate([(112, 112), (140, 84), (84, 140), (112, 56)]):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
        records.append(Record(f"{i}.png", w, h, (), root))
    return records


def rollouts(vlm, records, **cfg):
    model, processor = vlm
    return generate_rollouts(model, processor, records, RolloutConfig(**cfg), progress=False)


def walk_grammar(grammar, ids: list[int]) -> int:
    """The grammar state after ids, -1 as soon as one is not allowed."""
    state = 0
    for i in ids:
        state = int(grammar.next_state[state, i])
        if state < 0:
            return -1
    return state


@pytest.mark.parametrize(("family", "constrained"), [("qwen2_5_vl", False), ("qwen2_5_vl", True),
                                                     ("qwen3_vl", True)])
def test_batched_rollouts_equal_per_sample(tiny_dir, mixed_records, family, constrained):
    model, processor, _ = load_vlm(tiny_dir / family)
    cfg = dict(max_new_tokens=16, constrained=constrained)
    batched = rollouts((model, processor), mixed_records, batch_size=4, **cfg)
    single = rollouts((model, processor), mixed_records, batch_size=1, **cfg)
    for b, s in zip(batched, single, strict=True):
        assert b.token_ids == s.token_ids and b.text == s.text
        torch.testing.assert_close(b.token_logprobs, s.token_logprobs, atol=1e-4, rtol=0)


def test_pieces_concatenate_to_text_and_match_tokenizer_decode(vlm, mixed_records):
    tokenizer = vlm[1].tokenizer
    for ro in rollouts(vlm, mixed_records, max_new_tokens=24, constrained=True):
        assert "".join(ro.pieces) == ro.text
        assert len(ro.pieces) == len(ro.token_ids) == len(ro.token_logprobs)
        assert ro.text == tokenizer.decode(ro.token_ids, skip_special_tokens=False)


def test_pieces_complete_utf8_split_across_tokens(tiny_tokenizer):
    text = '{"desc": "grüne Äpfel § 猫"}'
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = decode_pieces(ids, token_table(tiny_tokenizer))
    assert len(ids) > 10 and "".join(pieces) == text  # byte-level: multibyte chars span tokens
    assert "\ufffd" not in "".join(pieces)


def test_rollout_stops_at_end_of_turn_and_drops_the_padding(vlm, mixed_records):
    """Row 0 is pushed to end its turn at the 3rd step; row 1 runs to the budget."""
    model, processor = vlm
    end_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    calls = []

    def push_row0(module, args, logits):
        calls.append(1)
        if len(calls) >= 3:
            logits[0, -1, end_id] += 1e4
        return logits

    handle = model.lm_head.register_forward_hook(push_row0)
    try:
        model.train()
        ro = rollouts(vlm, mixed_records[:2], batch_size=2, max_new_tokens=12)
        assert model.training  # the caller's mode is restored
    finally:
        handle.remove()
        model.eval()
    assert len(ro[0].token_ids) == 2 and not ro[0].hit_max_new_tokens
    assert end_id not in ro[0].token_ids and "<|im_end|>" not in ro[0].text
    assert len(ro[1].token_ids) == 12 and ro[1].hit_max_new_tokens


@pytest.mark.parametrize("field_order", FIELD_ORDERS)
def test_grammar_accepts_every_rendered_answer(tiny_tokenizer, synth_dir, field_order):
    grammar = coordjson_grammar(tiny_tokenizer, field_order, 2048)
    end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    records = read_records(synth_dir / "train.jsonl")
    answers = [render_record(r, CoordCodec(), field_order) for r in records]
    answers.append('{"objects": []}')
    answers.append(answers[0].replace('"desc": "', '"desc": "grüne \\"Äpfel\\" ', 1))
    for answer in answers:
        ids = tiny_tokenizer(answer, add_special_tokens=False)["input_ids"]
        assert walk_grammar(grammar, ids + [end]) == grammar.final, answer


@pytest.mark.parametrize("bad", [
    '{"objects": [{"desc": "", "bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>, <|coord_4|>]}',
    '{"objects": [{"desc": "a", "bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>]}',
    '{"objects": [{"desc": "a", "bbox_2d": [1, 2, 3, 4]}]}',
    '{"objects": [{"desc": "a\nb"',
    '{"objects": [], "extra": 1}',
    '{"objects": [{"desc": "a", "bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>, <|coord_4|>'
    ']}, ]}',
    '{"objects": []}<|im_start|>',
])
def test_grammar_rejects_malformed_answers(tiny_tokenizer, bad):
    grammar = coordjson_grammar(tiny_tokenizer, "desc_first", 2048)
    assert walk_grammar(grammar, tiny_tokenizer(bad, add_special_tokens=False)["input_ids"]) < 0


def test_grammar_refuses_a_coord_literal_spelled_in_pieces(tiny_tokenizer):
    grammar = coordjson_grammar(tiny_tokenizer, "desc_first", 2048)
    prefix = tiny_tokenizer('{"objects": [{"desc": "a", "bbox_2d": [',
                            add_special_tokens=False)["input_ids"]
    spelled = [tiny_tokenizer.convert_tokens_to_ids(c) for c in "<|coord_5|>"[:2]]
    assert walk_grammar(grammar, prefix) > 0 and walk_grammar(grammar, prefix + spelled) < 0


@pytest.mark.parametrize("field_order", FIELD_ORDERS)
def test_grammar_makes_untrained_rollouts_parseable(vlm, mixed_records, field_order):
    """Sampling explores the grammar more than greedy (which may close the array at once)."""
    model, processor = vlm
    cfg = RolloutConfig(max_new_tokens=40, constrained=True, do_sample=True)
    constrained = generate_rollouts(model, processor, mixed_records, cfg, progress=False,
                                    field_order=field_order, seed=0)
    kept = 0
    for ro in constrained:
        for result in (parse_coordjson(ro.text, field_order=field_order),
                       parse_coordjson_tokens(ro.pieces, field_order=field_order)):
            assert not result.invalid_rollout and result.dropped_invalid == 0
            assert result.dropped_ambiguous == 0
        kept += len(result.objects)
    assert kept > 0
    free = rollouts(vlm, mixed_records, max_new_tokens=40, do_sample=True)
    assert any(parse_coordjson(ro.text, field_order=field_order).invalid_rollout for ro in free)


@pytest.mark.parametrize("cfg", [dict(), dict(constrained=True, do_sample=True, temperature=0.7,
                                              top_p=0.9, repetition_penalty=1.3)])
def test_logprobs_are_raw_and_match_teacher_forcing(vlm, mixed_records, cfg):
    model, processor = vlm
    record = mixed_records[1]
    ro = generate_rollouts(model, processor, [record], RolloutConfig(max_new_tokens=20, **cfg),
                           progress=False, seed=3)[0]
    inputs = prompt_batch(processor, [load_image(record)], model.device, model.dtype)
    p, new = inputs["input_ids"].shape[1], torch.tensor([ro.token_ids])
    inputs["input_ids"] = torch.cat([inputs["input_ids"], new], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], 0 * new], 1)
    with torch.no_grad():
        logits = model(**inputs).logits[0, p - 1:-1].float()  # [T, V]
    expected = logits.log_softmax(-1).gather(1, new.T)[:, 0]
    got = torch.tensor(ro.token_logprobs)
    assert (got <= 0).all()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(vlm, mixed_records):
    model, processor = vlm
    cfg = RolloutConfig(max_new_tokens=12, do_sample=True, temperature=1.5)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a, b = (generate_rollouts(model, processor, mixed_records[:2], cfg, progress=False, seed=5)
            for _ in range(2))
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert torch.equal(torch.get_rng_state(), state)


def test_predictions_carry_pixel_boxes_and_token_scores(vlm, mixed_records):
    model, processor = vlm
    cfg = Config(rollout=RolloutConfig(max_new_tokens=32, constrained=True, do_sample=True))
    preds = [p.to_line() for p in predict_records(model, processor, mixed_records, cfg,
                                                  progress=False)]
    ro = generate_rollouts(model, processor, mixed_records, cfg.rollout, progress=False,
                           seed=cfg.training.seed)
    assert sum(len(p["objects"]) for p in preds) > 0
    constant = Config(rollout=cfg.rollout, eval=EvalConfig(score="constant"))
    for rec, pred, r in zip(mixed_records, preds, ro, strict=True):
        parsed = parse_coordjson_tokens(r.pieces)
        assert pred["raw_text"] == r.text and not pred["parse_invalid_rollout"]
        assert [o["score"] for o in pred["objects"]] == box_scores(r.token_logprobs, parsed.tokens)
        assert [o["bbox_2d"] for o in pred["objects"]] == [
            CoordCodec().box_bins_to_px(o["bbox_2d"], rec.width, rec.height)
            for o in parsed.objects]
        assert all(o["score"] == 1.0 for o in prediction(rec, r, constant).to_line()["objects"])
