import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordexp.codec import CoordCodec
from coordexp.data.render import render_answer
from coordexp.parsing import REASONS, parse_coordjson, parse_coordjson_tokens

CODEC = CoordCodec()
BOX = "[<|coord_10|>, <|coord_20|>, <|coord_300|>, <|coord_400|>]"


def obj(desc="cat", box=BOX, extra=""):
    return '{"desc": ' + json.dumps(desc) + ', "bbox_2d": ' + box + extra + "}"


def wrap(*objects):
    return '{"objects": [' + ", ".join(objects) + "]}"


# id: (text, field_order, kept descs, nonzero drop reasons, truncated, invalid_rollout)
EDGE_CASES = {
    "two_valid": (wrap(obj("cat"), obj("dog")), "desc_first", ["cat", "dog"], {}, False, False),
    "empty_list": ('{"objects": []}', "desc_first", [], {}, False, False),
    "desc_whitespace_stripped": (wrap(obj("  cat "), obj("dog\t"), obj(" traffic light")),
                                 "desc_first", ["cat", "dog", "traffic light"], {}, False, False),
    "geometry_first_valid": (
        '{"objects": [{"bbox_2d": ' + BOX + ', "desc": "cat"}]}', "geometry_first",
        ["cat"], {}, False, False),
    "wrong_arity_three_coords": (
        wrap(obj(box="[<|coord_1|>, <|coord_2|>, <|coord_3|>]"), obj("dog")), "desc_first",
        ["dog"], {"wrong_arity": 1}, False, False),
    "wrong_arity_five_coords": (
        wrap(obj(box="[<|coord_1|>, <|coord_2|>, <|coord_3|>, <|coord_4|>, <|coord_5|>]")),
        "desc_first", [], {"wrong_arity": 1}, False, False),
    "wrong_arity_plain_digits": (
        wrap(obj(box="[10, 20, 300, 400]")), "desc_first", [], {"wrong_arity": 1}, False, False),
    "wrong_arity_coord_1000": (
        wrap(obj(box="[<|coord_1|>, <|coord_2|>, <|coord_1000|>, <|coord_4|>]")), "desc_first",
        [], {"wrong_arity": 1}, False, False),
    "wrong_arity_quoted_coord": (
        wrap(obj(box='["<|coord_1|>", <|coord_2|>, <|coord_3|>, <|coord_4|>]')), "desc_first",
        [], {"wrong_arity": 1}, False, False),
    "wrong_arity_not_an_array": (
        wrap(obj(box='"a box"')), "desc_first", [], {"wrong_arity": 1}, False, False),
    "missing_desc_absent": (
        wrap('{"bbox_2d": ' + BOX + "}", obj("dog")), "desc_first", ["dog"],
        {"missing_desc": 1}, False, False),
    "missing_desc_blank": (wrap(obj("   ")), "desc_first", [], {"missing_desc": 1}, False, False),
    "missing_desc_not_a_string": (
        wrap('{"desc": 7, "bbox_2d": ' + BOX + "}"), "desc_first", [], {"missing_desc": 1},
        False, False),
    "missing_desc_twice": (
        wrap('{"desc": "a", "desc": "b", "bbox_2d": ' + BOX + "}"), "desc_first", [],
        {"missing_desc": 1}, False, False),
    "unexpected_keys_extra_key": (
        wrap(obj(extra=', "score": 0.9')), "desc_first", [], {"unexpected_keys": 1}, False, False),
    "unexpected_keys_poly": (
        wrap('{"desc": "cat", "poly": ' + BOX + "}"), "desc_first", [], {"unexpected_keys": 1},
        False, False),
    "unexpected_keys_two_boxes": (
        wrap(obj(extra=', "bbox_2d": ' + BOX)), "desc_first", [], {"unexpected_keys": 1},
        False, False),
    "order_violation_desc_first": (
        wrap('{"bbox_2d": ' + BOX + ', "desc": "cat"}', obj("dog")), "desc_first", ["dog"],
        {"order_violation": 1}, False, False),
    "order_violation_geometry_first": (
        wrap(obj("cat")), "geometry_first", [], {"order_violation": 1}, False, False),
    "other_missing_colon": (
        wrap('{"desc" "cat", "bbox_2d": ' + BOX + "}", obj("dog")), "desc_first", ["dog"],
        {"other": 1}, False, False),
    "other_missing_member_comma": (
        wrap('{"desc": "cat" "bbox_2d": ' + BOX + "}"), "desc_first", [], {"other": 1},
        False, False),
    "several_violations_keys_win": (
        wrap('{"bbox_2d": [<|coord_1|>], "desc": "", "score": 1}'), "desc_first", [],
        {"unexpected_keys": 1}, False, False),
    "several_violations_desc_beats_arity": (
        wrap('{"desc": "", "bbox_2d": [1, 2]}'), "desc_first", [], {"missing_desc": 1},
        False, False),
    "several_violations_arity_beats_order": (
        wrap('{"bbox_2d": [1, 2, 3, 4], "desc": "cat"}'), "desc_first", [], {"wrong_arity": 1},
        False, False),
    "truncated_tail": (
        '{"objects": [' + obj("cat") + ', {"desc": "cu', "desc_first", ["cat"], {}, True, False),
    "truncated_inside_coords": (
        '{"objects": [' + obj("cat") + ', {"desc": "cup", "bbox_2d": [<|coord_1|>, <|co',
        "desc_first", ["cat"], {}, True, False),
    "truncated_after_comma": (
        '{"objects": [' + obj("cat") + ", ", "desc_first", ["cat"], {}, True, False),
    "truncated_before_final_brace": (
        '{"objects": [' + obj("cat") + "]", "desc_first", ["cat"], {}, True, False),
    "junk_before_container": (
        'Sure! Here: ```json\n{"a": [1]} ' + wrap(obj("cat")) + "```", "desc_first", ["cat"],
        {}, False, False),
    "second_top_level_key": (
        '{"objects": [' + obj("cat") + '], "count": 1}', "desc_first", ["cat"], {"other": 1},
        False, False),
    "non_object_element": (wrap(obj("cat"), "5", obj("dog")), "desc_first", ["cat"],
                           {"other": 2}, False, False),
    "missing_object_separator": (
        '{"objects": [' + obj("cat") + " " + obj("dog") + "]}", "desc_first", ["cat"],
        {"other": 2}, False, False),
    "missing_separator_then_more_objects": (
        '{"objects": [' + obj("cat") + " " + obj("dog") + ", " + obj("cup") + ', [{"x": 1}], '
        + obj("hat") + "]}", "desc_first", ["cat"], {"other": 4}, False, False),
    "missing_separator_then_truncated": (
        '{"objects": [' + obj("cat") + " " + obj("dog") + ', {"desc": "cu', "desc_first",
        ["cat"], {"other": 2}, False, False),
    "braces_and_quotes_in_desc": (
        wrap(obj('a "b" {c} [d] \\ e'), obj("}{")), "desc_first", ['a "b" {c} [d] \\ e', "}{"],
        {}, False, False),
    "braces_in_dropped_desc": (
        wrap(obj("}", box="[<|coord_1|>]"), obj("dog")), "desc_first", ["dog"],
        {"wrong_arity": 1}, False, False),
    "unicode_and_whitespace": (
        '{ "objects" :\n[ {"desc":"café",\n"bbox_2d":[ <|coord_1|>,<|coord_2|> ,<|coord_3|>,'
        "<|coord_4|>] } ] }", "desc_first", ["café"], {}, False, False),
    "end_of_turn_after_answer": (
        wrap(obj("cat")) + "<|im_end|>" + wrap(obj("dog")), "desc_first", ["cat"], {}, False,
        False),
    "end_of_turn_inside_object": (
        '{"objects": [' + obj("cat") + ', {"desc": "do<|im_end|>g", "bbox_2d": ' + BOX + "}]}",
        "desc_first", ["cat"], {}, True, False),
    "endoftext_marker": (
        '{"objects": [' + obj("cat") + "<|endoftext|>, " + obj("dog") + "]}", "desc_first",
        ["cat"], {}, True, False),
    "no_container": ("I see a cat at the top left.", "desc_first", [], {}, False, True),
    "objects_not_a_list": ('{"objects": {"desc": "cat"}}', "desc_first", [], {}, False, True),
    "empty_text": ("", "desc_first", [], {}, False, True),
}


@pytest.mark.parametrize("case", list(EDGE_CASES.values()), ids=list(EDGE_CASES))
def test_parser_edge_matrix(case):
    text, order, descs, reasons, truncated, invalid = case
    r = parse_coordjson(text, field_order=order)
    assert [o["desc"] for o in r.objects] == descs
    assert {k: v for k, v in r.dropped_by_reason.items() if v} == reasons
    assert r.dropped_invalid == sum(reasons.values())
    assert r.dropped_ambiguous == 0
    assert (r.truncated, r.invalid_rollout) == (truncated, invalid)
    assert all(o["bbox_2d"] == [10, 20, 300, 400] or len(o["bbox_2d"]) == 4 for o in r.objects)
    _check_prefix(text, r, order)


def _check_prefix(text, r, order):
    """The append-ready prefix ends in `[` or the last kept `}` and reparses to the same kept."""
    if r.invalid_rollout:
        assert r.prefix_end is None and r.objects == []
        return
    prefix = text[: r.prefix_end]
    if r.spans:
        assert r.prefix_end == r.spans[-1].object[1] and prefix.endswith("}")
    else:
        assert prefix.endswith("[")
    again = parse_coordjson(prefix + "]}", field_order=order)
    assert again.objects == r.objects and not again.truncated and not again.invalid_rollout


def test_kept_object_values_and_spans():
    text = "xx " + wrap(obj('a "q"'), obj("cat", box="[<|coord_0|>, <|coord_1|>, "
                                              "<|coord_998|>, <|coord_999|>]"))
    r = parse_coordjson(text)
    assert r.objects == [{"desc": 'a "q"', "bbox_2d": [10, 20, 300, 400]},
                         {"desc": "cat", "bbox_2d": [0, 1, 998, 999]}]
    first, second = r.spans
    assert text[slice(*first.desc)] == 'a \\"q\\"'
    assert [text[slice(*s)] for s in second.coords] == [CODEC.token(k) for k in (0, 1, 998, 999)]
    assert text[slice(*second.object)].startswith("{") and text[slice(*second.object)][-1] == "}"


def test_prefix_skips_trailing_dropped_objects():
    text = wrap(obj("cat"), obj("dog", box="[1, 2, 3, 4]"))
    r = parse_coordjson(text)
    assert text[: r.prefix_end] == '{"objects": [' + obj("cat")


@pytest.mark.parametrize("order", ["desc_first", "geometry_first"])
def test_rendered_answers_round_trip(order):
    objects = [("red circle", [1, 2, 30, 40]), ('say "hi" {x}', [0, 0, 999, 999]),
               ("b/c", [5, 6, 7, 8])]
    r = parse_coordjson(render_answer(objects, CODEC, order), field_order=order)
    assert [(o["desc"], o["bbox_2d"]) for o in r.objects] == objects
    assert r.dropped_invalid == 0 and not r.truncated


def test_unknown_field_order_is_a_programming_error():
    with pytest.raises(ValueError, match="field_order"):
        parse_coordjson("{}", field_order="sideways")


# -- token-aligned variant ------------------------------------------------------------------

def split_pieces(text):
    """Each coord literal one token, everything else one char per token."""
    return re.findall(r"<\|coord_\d+\|>|.", text, re.S)


def test_tokens_give_coord_and_desc_indices():
    text = wrap(obj("cat"), obj("dog"))
    pieces = split_pieces(text)
    r = parse_coordjson_tokens(pieces)
    assert [o["desc"] for o in r.objects] == ["cat", "dog"]
    for t, o in zip(r.tokens, r.objects, strict=True):
        assert [CODEC.parse_token(pieces[i]) for i in t.coords] == o["bbox_2d"]
        assert "".join(pieces[i] for i in t.desc) == o["desc"]


def test_coord_literal_split_over_tokens_is_ambiguous():
    text = wrap(obj("cat"), obj("dog"))
    pieces = split_pieces(text)
    last = max(i for i, p in enumerate(pieces) if p.startswith("<|coord_"))
    pieces[last: last + 1] = ["<|coord_", pieces[last][len("<|coord_"):]]  # the dog's last coord
    r = parse_coordjson_tokens(pieces)
    assert [o["desc"] for o in r.objects] == ["cat"]
    assert (r.dropped_invalid, r.dropped_ambiguous, r.dropped_by_reason["wrong_arity"]) == (1, 1, 1)
    assert r.prefix_end == r.spans[0].object[1]  # the prefix moved back to the cat


def test_all_ambiguous_moves_prefix_to_array_open():
    text = wrap(obj("cat"))
    pieces = [text]  # one token for everything: no coord literal is its own token
    r = parse_coordjson_tokens(pieces)
    assert r.objects == [] and r.dropped_ambiguous == 1
    assert text[: r.prefix_end] == '{"objects": ['


# -- properties -----------------------------------------------------------------------------

DESCS = st.text(alphabet=st.sampled_from(list('ab {}[]"\\:,é<|>_')), min_size=1, max_size=8)
BINS = st.lists(st.integers(0, CODEC.max_bin), min_size=4, max_size=4)
KINDS = ("valid", "wrong_arity", "missing_desc", "unexpected_keys", "order_violation", "other")


def render_kind(kind, desc, bins):
    """One complete object of the given kind (desc made non-blank so only `kind` applies)."""
    d = json.dumps("x" + desc, ensure_ascii=False)
    box = "[" + ", ".join(CODEC.token(k) for k in bins) + "]"
    return {
        "valid": '{"desc": ' + d + ', "bbox_2d": ' + box + "}",
        "wrong_arity": '{"desc": ' + d + ', "bbox_2d": [' + ", ".join(map(str, bins)) + "]}",
        "missing_desc": '{"desc": "", "bbox_2d": ' + box + "}",
        "unexpected_keys": '{"desc": ' + d + ', "bbox_2d": ' + box + ', "x": {"y": [1]}}',
        "order_violation": '{"bbox_2d": ' + box + ', "desc": ' + d + "}",
        "other": '{"desc": ' + d + ' "bbox_2d": ' + box + "}",
    }[kind]


ROLLOUTS = st.tuples(
    st.text(alphabet="ab \n`:[]", max_size=10),  # junk before the container
    st.lists(st.tuples(st.sampled_from(KINDS), DESCS, BINS), max_size=6),
    st.floats(0, 1.2),  # where to cut (>= 1: not cut)
)


def build_rollout(junk, objects):
    texts = [render_kind(k, d, b) for k, d, b in objects]
    head = junk + '{"objects": ['
    ends, pos = [], len(head)
    for i, t in enumerate(texts):
        pos += len(t)
        ends.append(pos)
        pos += 2 if i + 1 < len(texts) else 0
    return head + ", ".join(texts) + "]}", ends


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ROLLOUTS)
def test_every_complete_object_is_kept_or_counted(rollout):
    junk, objects, cut_at = rollout
    full, ends = build_rollout(junk, objects)
    text = full[: int(cut_at * len(full))] if cut_at < 1 else full
    complete = [kind for kind, end in zip([o[0] for o in objects], ends, strict=True)
                if end <= len(text)]
    r = parse_coordjson(text)
    if r.invalid_rollout:  # cut before the container opened
        assert len(text) < len(junk) + len('{"objects": [') and not complete
        return
    assert len(r.objects) + r.dropped_invalid == len(complete)
    for reason in REASONS:
        assert r.dropped_by_reason[reason] == complete.count(reason)
    assert len(r.objects) == complete.count("valid")
    assert r.truncated == (len(text) < len(full))
    _check_prefix(text, r, "desc_first")


MUTATION = st.lists(st.tuples(st.floats(0, 1), st.integers(0, 4),
                              st.text(alphabet='{}[]",: <|>coord_9\\', max_size=4)), max_size=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ROLLOUTS, MUTATION, st.lists(st.integers(1, 6), min_size=1, max_size=8))
def test_mutated_rollouts_never_raise_and_stay_consistent(rollout, mutations, piece_sizes):
    junk, objects, _ = rollout
    text, _ = build_rollout(junk, objects)
    for where, n_delete, insert in mutations:
        i = int(where * len(text))
        text = text[:i] + insert + text[i + n_delete:]
    r = parse_coordjson(text)
    assert sum(r.dropped_by_reason.values()) == r.dropped_invalid
    assert len(r.spans) == len(r.objects)
    for o, s in zip(r.objects, r.spans, strict=True):
        assert o["desc"].strip() and all(0 <= k <= CODEC.max_bin for k in o["bbox_2d"])
        assert [CODEC.parse_token(text[slice(*c)]) for c in s.coords] == o["bbox_2d"]
    _check_prefix(text, r, "desc_first")
    pieces = chunk(text, piece_sizes)
    t = parse_coordjson_tokens(pieces)
    assert len(t.objects) + t.dropped_invalid == len(r.objects) + r.dropped_invalid
    assert t.objects == [o for o in r.objects if o in t.objects]


def chunk(text, sizes):
    pieces, i, k = [], 0, 0
    while i < len(text):
        pieces.append(text[i: i + sizes[k % len(sizes)]])
        i += sizes[k % len(sizes)]
        k += 1
    return pieces
