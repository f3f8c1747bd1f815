from coordexp.codec import CoordCodec
from coordexp.data.records import DetObject, Record
from coordexp.data.render import build_messages, render_record

codec = CoordCodec()
# 1000 x 1000 image: pixel 999 -> bin 999, so pixel boxes are bins
RECORD = Record("x.png", 1000, 1000, (DetObject("dog", (500, 40, 600, 90)),
                                      DetObject('say "hi"', (10, 40, 20, 50)),
                                      DetObject("cat", (1, 2, 3, 4))))


def test_desc_first_golden():
    assert render_record(RECORD, codec, "desc_first") == (
        '{"objects": [{"desc": "cat", "bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>, '
        '<|coord_4|>]}, {"desc": "say \\"hi\\"", "bbox_2d": [<|coord_10|>, <|coord_40|>, '
        '<|coord_20|>, <|coord_50|>]}, {"desc": "dog", "bbox_2d": [<|coord_500|>, <|coord_40|>, '
        '<|coord_600|>, <|coord_90|>]}]}')


def test_geometry_first_golden():
    rec = Record("x.png", 1000, 1000, (DetObject("cat", (1, 2, 3, 4)),))
    assert render_record(rec, codec, "geometry_first") == (
        '{"objects": [{"bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>, <|coord_4|>], '
        '"desc": "cat"}]}')


def test_empty_record_renders_empty_list():
    assert render_record(Record("x.png", 10, 10, ()), codec) == '{"objects": []}'


def test_messages_hold_image_prompt_and_answer():
    msgs = build_messages("ANSWER")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[1]["content"][0] == {"type": "image"}
    assert msgs[2]["content"][0]["text"] == "ANSWER"
    assert len(build_messages()) == 2
