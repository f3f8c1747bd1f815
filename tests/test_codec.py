import pytest

from coordexp.codec import CoordCodec
from coordexp.errors import UserError

codec = CoordCodec()


@pytest.mark.parametrize("size", [2, 17, 112, 224, 640, 1999])
def test_pixel_round_trip_within_half_a_bin(size):
    points = [0, 0.3, 1, size / 3, size / 2 + 0.25, size - 1.5, size - 1]
    for x in [p for p in points if 0 <= p <= size - 1]:
        k = codec.px_to_bin(x, size)
        back = codec.bin_to_px(k, size)
        assert abs(back - x) <= 0.5 * (size - 1) / 999 + 1e-9


@pytest.mark.parametrize("size", [112, 224, 1000])
def test_edges_map_to_first_and_last_bin(size):
    assert codec.px_to_bin(0, size) == 0
    assert codec.px_to_bin(size - 1, size) == 999
    assert codec.bin_to_px(0, size) == 0
    assert codec.bin_to_px(999, size) == size - 1


def test_norm_bin_conversions():
    assert codec.bin_to_norm(0) == 0.0 and codec.bin_to_norm(999) == 1.0
    assert codec.norm_to_bin(0.5) == 500  # round(499.5) is banker's 500 -> pinned
    assert codec.norm_to_bin(-0.2) == 0 and codec.norm_to_bin(1.7) == 999


def test_box_rounding_is_outward():
    # 224 px: one pixel = 999/223 = 4.48 bins; 10.2 px -> 45.69 bins
    bins = codec.box_px_to_bins([10.2, 10.2, 20.2, 20.2], 224, 224)
    exact = [v * 999 / 223 for v in (10.2, 10.2, 20.2, 20.2)]
    assert bins == [45, 45, 91, 91]
    assert bins[0] <= exact[0] and bins[2] >= exact[2]


def test_box_on_exact_bins_is_unchanged():
    box_bins = [10, 20, 300, 999]
    px = codec.box_bins_to_px(box_bins, 640, 480)
    assert codec.box_px_to_bins(px, 640, 480) == box_bins


@pytest.mark.parametrize("box", [[5, 5, 5, 5], [0, 0, 0, 0], [223, 223, 223, 223],
                                 [100.1, 50, 100.15, 50.01]])
def test_degenerate_boxes_are_nudged(box):
    x1, y1, x2, y2 = codec.box_px_to_bins(box, 224, 224)
    assert 0 <= x1 < x2 <= 999 and 0 <= y1 < y2 <= 999


def test_tokens():
    toks = codec.tokens()
    assert len(toks) == 1000 and len(set(toks)) == 1000
    assert toks[0] == "<|coord_0|>" and toks[999] == "<|coord_999|>"
    assert codec.parse_token("<|coord_17|>") == 17
    assert codec.parse_token("<|coord_1000|>") is None
    assert codec.parse_token("<|coord_17|> ") is None
    with pytest.raises(ValueError):
        codec.token(1000)


class FakeTokenizer:
    unk_token_id = 0

    def __init__(self, mapping):
        self.mapping = mapping

    def convert_tokens_to_ids(self, tokens):
        return [self.mapping.get(t, 0) for t in tokens]


def test_token_ids_fail_loudly_when_missing():
    mapping = {t: i + 10 for i, t in enumerate(codec.tokens()[:999])}
    with pytest.raises(UserError, match="lacks 1 coord tokens"):
        codec.token_ids(FakeTokenizer(mapping))


def test_token_ids_fail_loudly_when_shared():
    mapping = {t: 10 + min(i, 500) for i, t in enumerate(codec.tokens())}
    with pytest.raises(UserError, match="two coord tokens to one id"):
        codec.token_ids(FakeTokenizer(mapping))
