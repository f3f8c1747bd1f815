import json

import pytest
from PIL import Image

from coordexp.data.records import read_records, write_records
from coordexp.errors import UserError


@pytest.fixture()
def folder(tmp_path):
    Image.new("RGB", (100, 50)).save(tmp_path / "a.png")
    return tmp_path


def good(**over):
    rec = {"images": ["a.png"], "width": 100, "height": 50,
           "objects": [{"desc": "cat", "bbox_2d": [1, 2, 30, 40]}]}
    rec.update(over)
    return rec


def write_lines(folder, lines):
    path = folder / "d.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


CASES = {
    "bad_json": ('{"images": ["a.png"], "width": 100', "malformed JSON"),
    "missing_key": ({"images": ["a.png"], "width": 100, "objects": []}, "missing key"),
    "width_not_positive": (good(width=0), "'width' must be a positive integer"),
    "height_not_int": (good(height="50"), "'height' must be a positive integer"),
    "box_outside": (good(objects=[{"desc": "cat", "bbox_2d": [1, 2, 130, 40]}]), "outside"),
    "box_negative": (good(objects=[{"desc": "cat", "bbox_2d": [-1, 2, 30, 40]}]), "outside"),
    "x2_le_x1": (good(objects=[{"desc": "cat", "bbox_2d": [30, 2, 30, 40]}]), "x2<=x1"),
    "desc_empty": (good(objects=[{"desc": " ", "bbox_2d": [1, 2, 30, 40]}]), "non-empty"),
    "desc_newline": (good(objects=[{"desc": "a\nb", "bbox_2d": [1, 2, 30, 40]}]), "newline"),
    "bad_coord_token": (good(objects=[{"desc": "c", "bbox_2d": ["<|coord_1|>"] * 3 +
                                       ["<|coord_1000|>"]}]), "invalid coord token"),
    "missing_image": (good(images=["nope.png"]), "not found"),
    "second_geometry": (good(objects=[{"desc": "c", "bbox_2d": [1, 2, 30, 40],
                                       "poly": [1, 2, 30, 2, 30, 40]}]), "unknown key 'poly'"),
    "mask_rle": (good(objects=[{"desc": "c", "bbox_2d": [1, 2, 30, 40], "mask_rle": "x"}]),
                 "object 0: unknown key 'mask_rle'"),
    "difficult_not_bool": (good(objects=[{"desc": "c", "bbox_2d": [1, 2, 30, 40],
                                          "difficult": 1}]), "'difficult' must be true or false"),
}


@pytest.mark.parametrize("bad,message", CASES.values(), ids=CASES.keys())
def test_each_error_names_file_and_line(folder, bad, message):
    path = write_lines(folder, [good(), good(), bad])
    with pytest.raises(UserError, match=message) as info:
        read_records(path)
    assert f"{path}:3" in str(info.value)


def test_coord_token_boxes_are_accepted_as_bins(folder):
    toks = ["<|coord_0|>", "<|coord_0|>", "<|coord_999|>", "<|coord_999|>"]
    path = write_lines(folder, [good(objects=[{"desc": "cat", "bbox_2d": toks}])])
    (rec,) = read_records(path)
    assert rec.objects[0].box_px == (0.0, 0.0, 99.0, 49.0)


def test_write_then_read_is_identity_and_keeps_extra_keys(folder):
    path = write_lines(folder, [good(image_id=7), good()])
    records = read_records(path)
    out = folder / "copy.jsonl"
    write_records(out, records)
    assert read_records(out) == records
    assert json.loads(out.read_text().splitlines()[0])["image_id"] == 7


def test_difficult_flag_round_trips_and_is_written_only_when_set(folder):
    objs = [{"desc": "cat", "bbox_2d": [1, 2, 30, 40], "difficult": True},
            {"desc": "dog", "bbox_2d": [1, 2, 30, 40], "difficult": False}]
    records = read_records(write_lines(folder, [good(objects=objs)]))
    assert [o.difficult for o in records[0].objects] == [True, False]
    write_records(folder / "copy.jsonl", records)
    line = json.loads((folder / "copy.jsonl").read_text())
    assert line["objects"] == [objs[0], {"desc": "dog", "bbox_2d": [1, 2, 30, 40]}]


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_records(tmp_path / "none.jsonl")
