"""A hostile user's corpus: malformed inputs and damaged files for every command (data, eval,
train, infer, report, model). Each case must end with exit code 2 and exactly one stderr line
naming the culprit (file and line, key or flag), print no traceback, and leave every file that
existed before the command byte for byte as it was.

Most cases fail before any model work; the few under `MODEL_CASES` build a tiny model first."""

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from coordexp.cli import main

GOOD = {"images": ["a.png"], "width": 32, "height": 24,
        "objects": [{"desc": "cat", "bbox_2d": [1, 2, 20, 20]}]}
GOOD_B = GOOD | {"images": ["b.png"]}


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]  # "{w}" stands for the case's folder
    culprit: str  # must appear in the one stderr line ("{w}" too)
    files: tuple[tuple[str, str | bytes], ...] = ()  # (name, content) written before the run


def line(obj) -> str:
    return json.dumps(obj) + "\n"


def with_obj(**kw) -> dict:
    return GOOD | {"objects": [GOOD["objects"][0] | kw]}


def without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def png_bytes(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def make_world(w: Path) -> None:
    """A small valid set of inputs that every case starts from."""
    for name in ("a.png", "b.png"):
        Image.new("RGB", (32, 24), (40, 90, 200)).save(w / name)
    (w / "gt.jsonl").write_text(line(GOOD) + line(GOOD_B))
    for name in ("train.jsonl", "val.jsonl", "data.jsonl"):
        (w / name).write_text(line(GOOD) + line(GOOD_B))
    pred = {"images": ["a.png"], "width": 32, "height": 24,
            "objects": [{"desc": "cat", "score": 0.9, "bbox_2d": [1, 2, 20, 20]}]}
    (w / "pred.jsonl").write_text(line(pred) + line(pred | {"images": ["b.png"]}))
    (w / "cfg.yaml").write_text(
        f"model:\n  init_tiny: qwen2_5_vl\ndata:\n  train: {w}/train.jsonl\n"
        f"training:\n  output_dir: {w}/runs\n  effective_batch_size: 2\n"
        "  per_device_batch_size: 2\n  max_steps: 2\n")
    (w / "coco.json").write_text(json.dumps(COCO))
    run = w / "run"
    (run / "monitor_dumps").mkdir(parents=True)
    (run / "logging.jsonl").write_text(line({"step": 1, "kind": "train", "loss": 1.0}))
    (run / "run_metadata.json").write_text("{}")
    (run / "resolved_config.yaml").write_text("training:\n  max_steps: 2\n")
    (w / "a_file").write_text("not a folder\n")


COCO = {"images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 24}],
        "categories": [{"id": 3, "name": "cat"}],
        "annotations": [{"id": 7, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5]}]}


# -- records (ground truth, training, validation, inference inputs) ---------------------------
BAD_RECORDS = {
    "malformed_json": '{"images": [',
    "not_utf8": b'{"images": ["\xff\xfe.png"]}',
    "latin1_desc": json.dumps(with_obj(desc="caf\u00e9"), ensure_ascii=False).encode("latin-1"),
    "array": "[1, 2]",
    "string": '"a.png"',
    "number": "5",
    "null": "null",
    "missing_images": json.dumps(without(GOOD, "images")),
    "missing_width": json.dumps(without(GOOD, "width")),
    "missing_height": json.dumps(without(GOOD, "height")),
    "missing_objects": json.dumps(without(GOOD, "objects")),
    "images_a_string": json.dumps(GOOD | {"images": "a.png"}),
    "images_two_paths": json.dumps(GOOD | {"images": ["a.png", "b.png"]}),
    "images_a_number": json.dumps(GOOD | {"images": [5]}),
    "images_empty_path": json.dumps(GOOD | {"images": [""]}),
    "images_nul_byte": json.dumps(GOOD | {"images": ["a\u0000.png"]}),
    "width_zero": json.dumps(GOOD | {"width": 0}),
    "width_negative": json.dumps(GOOD | {"width": -32}),
    "width_string": json.dumps(GOOD | {"width": "32"}),
    "width_float": json.dumps(GOOD | {"width": 32.5}),
    "width_bool": json.dumps(GOOD | {"width": True}),
    "width_huge": json.dumps(GOOD | {"width": 10 ** 30}),
    "width_thousands_of_digits": json.dumps(GOOD).replace('"width": 32', '"width": ' + "9" * 5000),
    "objects_a_dict": json.dumps(GOOD | {"objects": {"desc": "cat"}}),
    "object_a_number": json.dumps(GOOD | {"objects": [5]}),
    "object_without_desc": json.dumps(GOOD | {"objects": [{"bbox_2d": [1, 2, 20, 20]}]}),
    "object_without_box": json.dumps(GOOD | {"objects": [{"desc": "cat"}]}),
    "desc_empty": json.dumps(with_obj(desc="")),
    "desc_blank": json.dumps(with_obj(desc="   ")),
    "desc_number": json.dumps(with_obj(desc=5)),
    "desc_newline": json.dumps(with_obj(desc="cat\ndog")),
    "desc_tab": json.dumps(with_obj(desc="cat\tdog")),
    "box_three_values": json.dumps(with_obj(bbox_2d=[1, 2, 20])),
    "box_null": json.dumps(with_obj(bbox_2d=None)),
    "box_string": json.dumps(with_obj(bbox_2d="1,2,20,20")),
    "box_bool": json.dumps(with_obj(bbox_2d=[True, 2, 20, 20])),
    "box_inverted": json.dumps(with_obj(bbox_2d=[20, 2, 1, 20])),
    "box_outside": json.dumps(with_obj(bbox_2d=[1, 2, 40, 20])),
    "box_negative": json.dumps(with_obj(bbox_2d=[-1, 2, 20, 20])),
    "box_nan": json.dumps(with_obj(bbox_2d=[1, 2, 20, 20])).replace("[1, 2", "[NaN, 2"),
    "box_infinity": json.dumps(with_obj(bbox_2d=[1, 2, 20, 20])).replace("20, 20]",
                                                                         "Infinity, 20]"),
    "box_overflowing_float": json.dumps(with_obj(bbox_2d=[1, 2, 20, 20])).replace("[1,", "[1e999,"),
    "box_thousands_of_digits": json.dumps(with_obj(bbox_2d=[1, 2, 20, 20])).replace(
        "[1,", "[" + "1" * 4400 + ","),
    "box_bad_coord_token": json.dumps(with_obj(bbox_2d=["<|coord_1|>", "<|coord_2|>",
                                                        "<|coord_3|>", "<|coord_1000|>"])),
    "box_tokens_and_numbers": json.dumps(with_obj(bbox_2d=["<|coord_1|>", 2, 20, 20])),
    "deeply_nested": "[" * 100_000 + "]" * 100_000,
}
RECORD_TARGETS = {  # command -> (file it reads, argv)
    "eval_gt": ("gt.jsonl", ("eval", "--gt", "{w}/gt.jsonl", "--pred", "{w}/pred.jsonl",
                             "--out", "{w}/out")),
    "train": ("train.jsonl", ("train", "{w}/cfg.yaml")),
    "train_val": ("val.jsonl", ("train", "{w}/cfg.yaml", "data.val={w}/val.jsonl")),
    "infer": ("data.jsonl", ("infer", "--model", "{w}/no_model", "--data", "{w}/data.jsonl",
                             "--out", "{w}/p.jsonl")),
}


def record_cases() -> dict[str, Case]:
    cases = {}
    for target, (name, argv) in RECORD_TARGETS.items():
        for bad, text in BAD_RECORDS.items():
            content = (line(GOOD).encode() + (text if isinstance(text, bytes) else text.encode())
                       + b"\n" + line(GOOD_B).encode())
            cases[f"{target}-{bad}"] = Case(argv, f"{name}:2", ((name, content),))
        cases[f"{target}-missing_file"] = Case(argv, f"{name}: no such file", ((name, None),))
    for target in ("train", "train_val", "infer"):  # these read the images
        name, argv = RECORD_TARGETS[target]
        for bad, path in (("image_not_found", "c.png"), ("image_is_a_directory", ".")):
            cases[f"{target}-{bad}"] = Case(
                argv, f"{name}:2: image file",
                ((name, line(GOOD) + line(GOOD | {"images": [path]})),))
    for target in ("train", "infer"):  # damaged image files (val shares train's images)
        name, argv = RECORD_TARGETS[target]
        cases[f"{target}-unreadable_image"] = Case(
            argv, f"{name}:1: cannot read image", (("a.png", b"\x89PNG\r\n\x1a\n garbage"),))
        cases[f"{target}-not_an_image"] = Case(argv, f"{name}:1: cannot read image",
                                               (("a.png", "plain text\n"),))
        cases[f"{target}-image_size_differs"] = Case(argv, f"{name}:2: image {{w}}/b.png is 16x8",
                                                     (("b.png", png_bytes(16, 8)),))
    cases["train-empty_val"] = Case(RECORD_TARGETS["train_val"][1], "val.jsonl: no records",
                                    (("val.jsonl", ""),))
    cases["train-empty_train"] = Case(RECORD_TARGETS["train"][1], "train.jsonl: no records",
                                      (("train.jsonl", "\n"),))
    cases["eval_gt-duplicate_image"] = Case(RECORD_TARGETS["eval_gt"][1], "'a.png' twice",
                                            (("gt.jsonl", line(GOOD) + line(GOOD)),))
    return cases


# -- predictions (coordexp eval --pred) --------------------------------------------------------
P = {"images": ["b.png"], "width": 32, "height": 24,
     "objects": [{"desc": "cat", "score": 0.5, "bbox_2d": [1, 2, 20, 20]}]}


def pobj(**kw) -> dict:
    return P | {"objects": [P["objects"][0] | kw]}


BAD_PREDS = {
    "malformed_json": '{"images": ["b.png"], "objects": [',
    "not_utf8": b'{"images": ["b\xe9.png"]}',
    "not_an_object": "[]",
    "missing_images": json.dumps(without(P, "images")),
    "images_two": json.dumps(P | {"images": ["a.png", "b.png"]}),
    "image_not_in_gt": json.dumps(P | {"images": ["zzz.png"]}),
    "image_twice": json.dumps(P | {"images": ["a.png"]}),
    "width_differs": json.dumps(P | {"width": 64}),
    "no_objects_nor_text": json.dumps(without(P, "objects")),
    "objects_a_dict": json.dumps(P | {"objects": {}}),
    "object_a_string": json.dumps(P | {"objects": ["cat"]}),
    "object_without_score": json.dumps(P | {"objects": [{"desc": "cat", "bbox_2d": [1, 2, 3, 4]}]}),
    "score_string": json.dumps(pobj(score="high")),
    "score_nan": json.dumps(pobj(score=1.0)).replace("1.0", "NaN"),
    "score_bool": json.dumps(pobj(score=True)),
    "box_three": json.dumps(pobj(bbox_2d=[1, 2, 3])),
    "box_strings": json.dumps(pobj(bbox_2d=["1", "2", "3", "4"])),
    "box_infinite": json.dumps(pobj(bbox_2d=[1, 2, 3, 4])).replace("[1,", "[Infinity,"),
    "desc_missing": json.dumps(P | {"objects": [{"score": 0.5, "bbox_2d": [1, 2, 3, 4]}]}),
    "raw_text_not_string": json.dumps(without(P, "objects") | {"raw_text": 5}),
    "raw_text_without_scores": json.dumps(without(P, "objects") | {"raw_text": "{}"}),
    "pieces_not_text": json.dumps(without(P, "objects") | {"raw_text": "ab", "token_pieces":
                                                           ["a", "c"], "token_logprobs": [0, 0]}),
    "logprobs_short": json.dumps(without(P, "objects") | {"raw_text": "ab", "token_pieces":
                                                          ["a", "b"], "token_logprobs": [0]}),
    "negative_counter": json.dumps(P | {"parse_truncated": -1}),
    "thousands_of_digits": json.dumps(P).replace("0.5", "5" * 5000),
}
EVAL = ("eval", "--gt", "{w}/gt.jsonl", "--pred", "{w}/pred.jsonl", "--out", "{w}/out")


def pred_cases() -> dict[str, Case]:
    first = line({"images": ["a.png"], "width": 32, "height": 24, "objects": []})
    cases = {}
    for bad, text in BAD_PREDS.items():
        content = first.encode() + (text if isinstance(text, bytes) else text.encode()) + b"\n"
        cases[f"eval_pred-{bad}"] = Case(EVAL, "pred.jsonl:2", (("pred.jsonl", content),))
    cases["eval_pred-missing_file"] = Case(EVAL, "pred.jsonl: no such file",
                                           (("pred.jsonl", None),))
    cases["eval_pred-a_directory"] = Case(
        ("eval", "--gt", "{w}/gt.jsonl", "--pred", "{w}/run", "--out", "{w}/out"),
        "run: is a directory")
    cases["eval_pred-no_image_of_gt"] = Case(EVAL, "none of its 1 records", (
        ("pred.jsonl", line(P | {"images": ["x.png"]})),))
    return cases


def eval_flag_cases() -> dict[str, Case]:
    gt_pred = ("eval", "--gt", "{w}/gt.jsonl", "--pred", "{w}/pred.jsonl")
    return {
        "eval-out_is_a_file": Case((*gt_pred, "--out", "{w}/a_file"), "--out {w}/a_file"),
        "eval-out_under_a_file": Case((*gt_pred, "--out", "{w}/a_file/x"), "--out {w}/a_file/x"),
        "eval-iou_gate_above_1": Case((*gt_pred, "--out", "{w}/o", "--iou-gate", "1.5"),
                                      "--iou-gate"),
        "eval-threshold_negative": Case((*gt_pred, "--out", "{w}/o", "--semantic-threshold",
                                         "-1"), "--semantic-threshold"),
        "eval-cap_negative": Case((*gt_pred, "--out", "{w}/o", "--max-preds-per-image", "-1"),
                                  "--max-preds-per-image"),
        "eval-field_order_unknown": Case((*gt_pred, "--out", "{w}/o", "--field-order", "x"),
                                         "--field-order"),
        "eval-missing_out": Case(gt_pred, "--out"),
        "eval-gt_a_directory": Case(("eval", "--gt", "{w}/run", "--pred", "{w}/pred.jsonl",
                                     "--out", "{w}/o"), "run: is a directory"),
    }


# -- configs and overrides (coordexp train) ----------------------------------------------------
def cfg_text(w_extra: str) -> str:
    return ("model:\n  init_tiny: qwen2_5_vl\ndata:\n  train: {w}/train.jsonl\n"
            "training:\n  output_dir: {w}/runs\n" + w_extra)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdef", "bcdefg", strict=True))
BAD_CONFIGS = {  # config file text -> culprit
    "not_utf8": (b"training:\n  run_name: \xff\n", "cfg.yaml:2: not UTF-8"),
    "invalid_yaml": ("training: [\n", "cfg.yaml: not valid YAML"),
    "top_level_list": ("- 1\n- 2\n", "a mapping at the top level"),
    "top_level_scalar": ("5\n", "a mapping at the top level"),
    "alias_bomb": (BOMB, "aliases expand"),
    "recursive_alias": ("a: &a [*a]\n", "aliases expand"),
    "thousands_of_digits": ("training:\n  max_steps: " + "9" * 5000 + "\n", "cfg.yaml: not valid"),
    "deep_nesting": ("a: " + "[" * 5000 + "]" * 5000 + "\n", "cfg.yaml"),
    "extends_null": ("extends: null\n", "'extends' must be"),
    "extends_number": ("extends: 5\n", "'extends' must be"),
    "extends_numbers": ("extends: [1, 2]\n", "'extends' must be"),
    "extends_missing": ("extends: nothere.yaml\n", "nothere.yaml: no such config file"),
    "extends_itself": ("extends: cfg.yaml\n", "`extends` cycle"),
    "unknown_top_key": (cfg_text("") + "optimizer: {}\n", "'optimizer'"),
    "unknown_nested_key": (cfg_text("  lr: 0.1\n"), "'training.lr'"),
    "moved_key": (cfg_text("") + "rollout:\n  iou_gate: 0.5\n", "'rollout.iou_gate' moved"),
    "removed_key": (cfg_text("") + "model:\n  max_pixels: 1000\n", "'model.max_pixels'"),
    "section_as_scalar": (cfg_text("") + "rollout: 5\n", "'rollout'"),
    "section_as_list": (cfg_text("") + "match: [1]\n", "'match'"),
    "wrong_type_int": (cfg_text("  max_steps: many\n"), "'training.max_steps'"),
    "float_for_int": (cfg_text("  max_steps: 2.5\n"), "'training.max_steps'"),
    "bool_for_float": (cfg_text("  learning_rate: true\n"), "'training.learning_rate'"),
    "string_for_bool": (cfg_text("  eval_at_end: maybe\n"), "'training.eval_at_end'"),
    "nan_lr": (cfg_text("  learning_rate: .nan\n"), "'training.learning_rate'"),
    "inf_grad_norm": (cfg_text("  max_grad_norm: .inf\n"), "'training.max_grad_norm'"),
    "unknown_choice": (cfg_text("  stage: stage3\n"), "'training.stage'"),
}
BAD_OVERRIDES = {  # override -> culprit
    "lr_negative": ("training.learning_rate=-1e-4", "'training.learning_rate'"),
    "lr_zero": ("training.learning_rate=0", "'training.learning_rate'"),
    "vit_lr_negative": ("training.vit_lr=-1", "'training.vit_lr'"),
    "aligner_lr_zero": ("training.aligner_lr=0", "'training.aligner_lr'"),
    "grad_norm_negative": ("training.max_grad_norm=-1", "'training.max_grad_norm'"),
    "grad_norm_zero": ("training.max_grad_norm=0", "'training.max_grad_norm'"),
    "warmup_negative": ("training.warmup_ratio=-0.1", "'training.warmup_ratio'"),
    "warmup_above_1": ("training.warmup_ratio=1.5", "'training.warmup_ratio'"),
    "min_lr_above_1": ("training.min_lr_ratio=1.5", "'training.min_lr_ratio'"),
    "weight_decay_negative": ("training.weight_decay=-0.1", "'training.weight_decay'"),
    "val_limit_negative": ("data.val_limit=-3", "'data.val_limit'"),
    "save_limit_negative": ("training.save_total_limit=-1", "'training.save_total_limit'"),
    "max_minutes_negative": ("training.max_minutes=-5", "'training.max_minutes'"),
    "seed_negative": ("training.seed=-1", "'training.seed'"),
    "seed_huge": ("training.seed=" + "9" * 30, "'training.seed'"),
    "metric_unknown": ("training.metric_for_best=rollout/mAP50", "'training.metric_for_best'"),
    "metric_lower_is_better": ("training.metric_for_best=rollout/fp_total",
                               "'training.metric_for_best'"),
    "max_steps_zero": ("training.max_steps=0", "'training.max_steps'"),
    "eval_steps_zero": ("training.eval_steps=0", "'training.eval_steps'"),
    "batch_not_multiple": ("training.effective_batch_size=3", "'training.effective_batch_size'"),
    "batch_zero": ("training.effective_batch_size=0", "'training.effective_batch_size'"),
    "per_device_zero": ("training.per_device_batch_size=0", "'training.effective_batch_size'"),
    "b_ratio_above_1": ("stage2_ab.schedule.b_ratio=1.5", "'stage2_ab.schedule.b_ratio'"),
    "b_ratio_negative": ("stage2_ab.schedule.b_ratio=-0.5", "'stage2_ab.schedule.b_ratio'"),
    "n_softctx_zero": ("stage2_ab.n_softctx_iter=0", "'stage2_ab.n_softctx_iter'"),
    "weight_negative": ("stage2_ab.desc_ce_weight=-1", "'stage2_ab.desc_ce_weight'"),
    "stage1_weight_negative": ("coord_soft_ce_w1.w1_weight=-1", "'coord_soft_ce_w1.w1_weight'"),
    "sigma_zero": ("coord_soft_ce_w1.target_sigma=0", "target_sigma"),
    "rollout_temperature_zero": ("rollout.temperature=0", "'rollout.temperature'"),
    "top_p_zero": ("rollout.top_p=0", "'rollout.top_p'"),
    "rollout_batch_zero": ("rollout.batch_size=0", "'rollout.batch_size'"),
    "new_tokens_zero": ("rollout.max_new_tokens=0", "'rollout.max_new_tokens'"),
    "iou_gate_above_1": ("match.iou_gate=1.2", "'match.iou_gate'"),
    "top_k_zero": ("match.candidate_top_k=0", "'match.candidate_top_k'"),
    "fp_cost_negative": ("match.fp_cost=-1", "'match.fp_cost'"),
    "dump_samples_negative": ("monitor_dump.max_samples=-1", "'monitor_dump.max_samples'"),
    "section_replaced": ("training=5", "'training'"),
    "section_emptied": ("data=", "'data'"),
    "both_models": ("model.path={w}", "'model.path'"),
    "no_equals": ("training.max_steps", "key.sub=value"),
    "empty_key_part": ("training..max_steps=3", "key.sub=value"),
    "bad_yaml_value": ("training.run_name=[1", "override 'training.run_name'"),
    "thousands_of_digits": ("training.max_steps=" + "9" * 5000, "'training.max_steps'"),
    "unknown_override_key": ("training.max_stepz=3", "'training.max_stepz'"),
    "no_train_data": ("data.train=", "'data.train'"),
    "output_dir_a_file": ("training.output_dir={w}/a_file", "a_file"),
    "run_exists": ("training.output_dir={w}", "{w}/run already holds a run"),
}


def config_cases() -> dict[str, Case]:
    cases = {}
    for bad, (text, culprit) in BAD_CONFIGS.items():
        cases[f"config-{bad}"] = Case(("train", "{w}/cfg.yaml"), culprit, (("cfg.yaml", text),))
    for bad, (override, culprit) in BAD_OVERRIDES.items():
        cases[f"override-{bad}"] = Case(("train", "{w}/cfg.yaml", override), culprit)
    cases["override-fp16_channel_b"] = Case(
        ("train", "{w}/cfg.yaml", "training.stage=stage2_ab", "stage2_ab.schedule.b_ratio=0.5",
         "training.mixed_precision=fp16"), "fp16")
    cases["config-missing"] = Case(("train", "{w}/nothere.yaml"), "nothere.yaml: no such config")
    cases["config-a_directory"] = Case(("train", "{w}/run"), "run: no such config file")
    cases["train-no_config"] = Case(("train",), "config")
    return cases


# -- data coco / data synth --------------------------------------------------------------------
def coco_with(**change) -> dict:
    return COCO | change


IMG = COCO["images"][0]
ANN = COCO["annotations"][0]
CAT = COCO["categories"][0]
BAD_COCO = {  # instances -> culprit
    "top_level_list": ([], "JSON object"),
    "missing_images": (without(COCO, "images"), "'images'"),
    "missing_annotations": (without(COCO, "annotations"), "'annotations'"),
    "missing_categories": (without(COCO, "categories"), "'categories'"),
    "images_a_dict": (coco_with(images={"1": IMG}), "'images' must be a list"),
    "annotations_null": (coco_with(annotations=None), "'annotations' must be a list"),
    "image_not_object": (coco_with(images=[5]), "image 0 must be an object"),
    "image_without_id": (coco_with(images=[without(IMG, "id")]),
                         "image 0 (id None) has no 'id'"),
    "image_without_file_name": (coco_with(images=[without(IMG, "file_name")]),
                                "image id 1 has no 'file_name'"),
    "image_without_width": (coco_with(images=[without(IMG, "width")]),
                            "image 0 (id 1) has no 'width'"),
    "image_without_height": (coco_with(images=[without(IMG, "height")]),
                             "image 0 (id 1) has no 'height'"),
    "image_width_string": (coco_with(images=[IMG | {"width": "32"}]),
                           "image 0 (id 1): 'width'"),
    "image_width_zero": (coco_with(images=[IMG | {"width": 0}]), "image 0 (id 1): 'width'"),
    "image_id_null": (coco_with(images=[IMG | {"id": None}]), "image 0 (id None): 'id'"),
    "image_file_name_number": (coco_with(images=[IMG | {"file_name": 5}]),
                               "image 0 (id 1): 'file_name'"),
    "duplicate_image_id": (coco_with(images=[IMG, IMG | {"file_name": "b.png"}]),
                           "image 1 (id 1): duplicate image id 1"),
    "category_without_name": (coco_with(categories=[without(CAT, "name")]),
                              "category 0 (id 3) has no 'name'"),
    "category_name_number": (coco_with(categories=[CAT | {"name": 5}]),
                             "category 0 (id 3): 'name'"),
    "category_name_newline": (coco_with(categories=[CAT | {"name": "a\nb"}]),
                              "category 0 (id 3): 'name'"),
    "duplicate_category_id": (coco_with(categories=[CAT, CAT | {"name": "dog"}]),
                              "category 1 (id 3): duplicate category id 3"),
    "annotation_not_object": (coco_with(annotations=["x"]), "annotation 0 must be an object"),
    "segmentation_only": (coco_with(annotations=[without(ANN, "bbox") | {"segmentation": []}]),
                          "annotation 0 (id 7) has no 'bbox'"),
    "without_image_id": (coco_with(annotations=[without(ANN, "image_id")]),
                         "annotation 0 (id 7) has no 'image_id'"),
    "without_category_id": (coco_with(annotations=[without(ANN, "category_id")]),
                            "annotation 0 (id 7) has no 'category_id'"),
    "unknown_category": (coco_with(annotations=[ANN | {"category_id": 99}]),
                         "annotation 0 (id 7) has category_id 99"),
    "unknown_image": (coco_with(annotations=[ANN | {"image_id": 99}]),
                      "annotation 0 (id 7) has image_id 99"),
    "bbox_three": (coco_with(annotations=[ANN | {"bbox": [1, 1, 5]}]),
                   "annotation 0 (id 7) has bbox [1, 1, 5]"),
    "bbox_null": (coco_with(annotations=[ANN | {"bbox": None}]),
                  "annotation 0 (id 7) has bbox None"),
    "bbox_string": (coco_with(annotations=[ANN | {"bbox": "1 1 5 5"}]),
                    "annotation 0 (id 7) has bbox '1 1 5 5'"),
    "bbox_huge": (coco_with(annotations=[ANN | {"bbox": [1, 1, 10 ** 40, 5]}]),
                  "annotation 0 (id 7) has bbox"),
    "iscrowd_two": (coco_with(annotations=[ANN | {"iscrowd": 2}]),
                    "annotation 0 (id 7): 'iscrowd'"),
}
COCO_ARGV = ("data", "coco", "--instances", "{w}/coco.json", "--images", "{w}", "--out",
             "{w}/c.jsonl")


def data_cases() -> dict[str, Case]:
    cases = {f"coco-{bad}": Case(COCO_ARGV, culprit, (("coco.json", json.dumps(inst)),))
             for bad, (inst, culprit) in BAD_COCO.items()}
    bbox_nan = json.dumps(coco_with(annotations=[ANN | {"bbox": [1, 1, 5, 5]}])).replace(
        "[1, 1, 5, 5]", "[NaN, 1, 5, 5]")
    cases["coco-bbox_nan"] = Case(COCO_ARGV, "annotation 0 (id 7) has bbox [nan",
                                  (("coco.json", bbox_nan),))
    cases["coco-not_utf8"] = Case(COCO_ARGV, "coco.json:1: not UTF-8",
                                  (("coco.json", b'{"images": "\xff"}'),))
    cases["coco-truncated"] = Case(COCO_ARGV, "coco.json (truncated?)",
                                   (("coco.json", json.dumps(COCO)[:40]),))
    cases["coco-thousands_of_digits"] = Case(COCO_ARGV, "coco.json", (
        ("coco.json", json.dumps(COCO).replace('"width": 32', '"width": ' + "3" * 5000)),))
    cases["coco-missing_file"] = Case(COCO_ARGV, "coco.json: no such file", (("coco.json", None),))
    cases["coco-out_is_a_directory"] = Case(COCO_ARGV[:-1] + ("{w}/run",), "--out {w}/run")
    cases["coco-out_under_a_file"] = Case(COCO_ARGV[:-1] + ("{w}/a_file/c.jsonl",), "a_file")
    cases["coco-max_objects_negative"] = Case(COCO_ARGV + ("--max-objects", "-1"),
                                              "--max-objects")
    synth = ("data", "synth", "--train", "2", "--val", "1")
    cases["synth-out_is_a_file"] = Case((*synth, "--out", "{w}/a_file"), "--out {w}/a_file")
    cases["synth-train_negative"] = Case(("data", "synth", "--out", "{w}/s", "--train", "-1",
                                          "--val", "1"), "--train")
    cases["synth-image_size_zero"] = Case((*synth, "--out", "{w}/s", "--image-size", "0"),
                                          "image_size")
    cases["synth-unknown_shape"] = Case((*synth, "--out", "{w}/s", "--shapes", "blob"), "blob")
    cases["synth-min_above_max"] = Case((*synth, "--out", "{w}/s", "--min-objects", "5",
                                         "--max-objects", "2"), "min_objects")
    cases["synth-crowded_share"] = Case((*synth, "--out", "{w}/s", "--crowded-share", "2"),
                                        "crowded_share")
    return cases


# -- report ------------------------------------------------------------------------------------
REPORT = ("report", "{w}/run")


def report_cases() -> dict[str, Case]:
    row = line({"step": 1, "kind": "train", "loss": 1.0})
    dump = "run/monitor_dumps/step_000001.json"
    return {
        "report-missing_run": Case(("report", "{w}/nothere"), "nothere: no such run directory"),
        "report-not_a_run": Case(("report", "{w}"), "not a run directory"),
        "report-log_not_utf8": Case(REPORT, "logging.jsonl:2: not UTF-8", (
            ("run/logging.jsonl", row.encode() + b'{"step": 2, "kind": "\xff"}\n'
             + row.encode()),)),
        "report-log_corrupt_row": Case(REPORT, "logging.jsonl:2", (
            ("run/logging.jsonl", row + '{"step": 2, "ki\n' + row),)),
        "report-log_row_without_step": Case(REPORT, "logging.jsonl:1", (
            ("run/logging.jsonl", line({"kind": "train"})),)),
        "report-log_row_a_list": Case(REPORT, "logging.jsonl:1", (("run/logging.jsonl", "[1]\n"),)),
        "report-metadata_invalid": Case(REPORT, "run_metadata.json", (
            ("run/run_metadata.json", "{"),)),
        "report-metadata_not_utf8": Case(REPORT, "run_metadata.json:1: not UTF-8", (
            ("run/run_metadata.json", b'{"a": "\xff"}'),)),
        "report-metadata_a_list": Case(REPORT, "run_metadata.json", (
            ("run/run_metadata.json", "[]"),)),
        "report-metadata_huge_int": Case(REPORT, "run_metadata.json", (
            ("run/run_metadata.json", '{"seed": ' + "7" * 5000 + "}"),)),
        "report-config_invalid_yaml": Case(REPORT, "resolved_config.yaml", (
            ("run/resolved_config.yaml", "training: [\n"),)),
        "report-config_not_utf8": Case(REPORT, "resolved_config.yaml:1: not UTF-8", (
            ("run/resolved_config.yaml", b"a: \xff\n"),)),
        "report-dump_invalid": Case(REPORT, "step_000001.json", ((dump, "{"),)),
        "report-dump_not_utf8": Case(REPORT, "step_000001.json:1: not UTF-8", ((dump, b"\xff"),)),
        "report-dump_without_samples": Case(REPORT, "step_000001.json", ((dump, "{}"),)),
        "report-dump_sample_lacks_keys": Case(REPORT, "sample 0 lacks", (
            (dump, json.dumps({"samples": [{"sample_id": 0}]})),)),
        "report-out_is_a_file": Case((*REPORT, "--out", "{w}/a_file"), "--out {w}/a_file"),
        "report-window_zero": Case((*REPORT, "--window", "0"), "--window"),
        "report-corr_malformed": Case((*REPORT, "--corr", "loss"), "loss"),
        "report-compare_missing_run": Case(("report", "{w}/run", "--compare", "{w}/nothere"),
                                           "nothere"),
    }


# -- model and infer flags ---------------------------------------------------------------------
def model_flag_cases() -> dict[str, Case]:
    infer = ("infer", "--model", "{w}/no_model", "--data", "{w}/data.jsonl")
    return {
        "infer-out_is_a_directory": Case((*infer, "--out", "{w}/run"), "--out {w}/run"),
        "infer-out_under_a_file": Case((*infer, "--out", "{w}/a_file/p.jsonl"), "a_file"),
        "infer-no_model_dir": Case((*infer, "--out", "{w}/p.jsonl"), "no_model"),
        "infer-model_without_config": Case(("infer", "--model", "{w}/run", "--data",
                                            "{w}/data.jsonl", "--out", "{w}/p.jsonl"),
                                           "run: not a model directory"),
        "infer-batch_size_zero": Case((*infer, "--out", "{w}/p.jsonl", "--batch-size", "0"),
                                      "--batch-size"),
        "infer-batch_size_text": Case((*infer, "--out", "{w}/p.jsonl", "--batch-size", "x"),
                                      "--batch-size"),
        "model-init_tiny_out_is_a_file": Case(("model", "init-tiny", "--out", "{w}/a_file"),
                                              "--out {w}/a_file"),
        "model-init_tiny_unknown_family": Case(("model", "init-tiny", "--out", "{w}/m",
                                                "--family", "llama"), "--family"),
        "model-add_tokens_dst_is_a_file": Case(("model", "add-coord-tokens", "--src", "{w}/run",
                                                "--dst", "{w}/a_file"), "--dst {w}/a_file"),
        "model-add_tokens_src_not_a_model": Case(("model", "add-coord-tokens", "--src", "{w}/run",
                                                  "--dst", "{w}/m"), "run: not a model"),
        "demo-out_is_a_file": Case(("demo", "--out", "{w}/a_file"), "--out {w}/a_file"),
        "demo-minutes_nan": Case(("demo", "--out", "{w}/d", "--minutes", "nan"), "--minutes"),
        "demo-minutes_zero": Case(("demo", "--out", "{w}/d", "--minutes", "0"), "--minutes"),
        "eval-constant_score_nan": Case((*EVAL, "--constant-score", "nan"), "--constant-score"),
        "cli-unknown_command": Case(("fly",), "fly"),
        # an earlier output stays as it was when a later run of the command fails
        "eval-keeps_old_outputs": Case(EVAL, "pred.jsonl:1", (
            ("out/metrics.json", '{"mAP": 0.5}\n'), ("out/per_image.json", "[]\n"),
            ("pred.jsonl", "{\n"))),
        "infer-keeps_old_predictions": Case(
            ("infer", "--model", "{w}/no_model", "--data", "{w}/data.jsonl", "--out",
             "{w}/p.jsonl"), "data.jsonl:1", (("p.jsonl", line(P)), ("data.jsonl", "[\n"))),
        "coco-keeps_old_records": Case(COCO_ARGV, "coco.json", (
            ("c.jsonl", line(GOOD)), ("coco.json", "[]"))),
        "report-keeps_old_report": Case(REPORT, "logging.jsonl:1", (
            ("run/report/report.md", "# old\n"), ("run/logging.jsonl", "[1]\n"))),
        "cli-unknown_flag": Case((*EVAL, "--fast"), "--fast"),
    }


# -- export and visualize ---------------------------------------------------------------------
EXPORT = ("export", "coco-results", "--pred", "{w}/pred.jsonl", "--gt", "{w}/coco.json", "--out",
          "{w}/results.json")
VISUALIZE = ("visualize", "--pred", "{w}/pred.jsonl", "--out", "{w}/vis")


def export_cases() -> dict[str, Case]:
    only_a = ("pred.jsonl", line(P | {"images": ["a.png"]}))
    cases = {f"export-{bad}": Case(EXPORT, "coco.json", (only_a, ("coco.json", json.dumps(inst))))
             for bad, (inst, _) in BAD_COCO.items()
             if bad.startswith(("top_level", "missing_images", "missing_categories", "images_a",
                                "image_without"))}
    cases |= {
        "export-pred_image_not_in_gt": Case(EXPORT, "pred.jsonl:2"),
        "export-out_is_a_directory": Case(EXPORT[:-1] + ("{w}/run",), "--out {w}/run"),
        "export-out_under_a_file": Case(EXPORT[:-1] + ("{w}/a_file/r.json",), "a_file"),
        "export-pred_not_utf8": Case(EXPORT, "pred.jsonl:1: not UTF-8",
                                     (("pred.jsonl", b'{"images": ["\xff"]}\n'),)),
        "export-pred_malformed": Case(EXPORT, "pred.jsonl:2", (("pred.jsonl", line(P) + "{\n"),)),
        "export-coco_truncated": Case(EXPORT, "coco.json", (("coco.json", '{"images": ['),)),
        "export-keeps_old_results": Case(EXPORT, "coco.json", (
            ("results.json", "[]\n"), ("coco.json", "{}"))),
        "visualize-out_is_a_file": Case(VISUALIZE[:-1] + ("{w}/a_file",), "--out {w}/a_file"),
        "visualize-pred_not_utf8": Case(VISUALIZE, "pred.jsonl:2: not UTF-8",
                                        (("pred.jsonl", line(P).encode() + b"\xff\n"),)),
        "visualize-pred_malformed": Case(VISUALIZE, "pred.jsonl:1", (("pred.jsonl", "[\n"),)),
        "visualize-gt_malformed": Case((*VISUALIZE, "--gt", "{w}/gt.jsonl"), "gt.jsonl:1",
                                       (("gt.jsonl", "{\n"),)),
        "visualize-min_score_nan": Case((*VISUALIZE, "--min-score", "nan"), "--min-score"),
        "infer-images_missing": Case(("infer", "--model", "{w}/m", "--images", "{w}/nothere",
                                      "--out", "{w}/p.jsonl"), "--images {w}/nothere"),
        "infer-images_none_found": Case(("infer", "--model", "{w}/m", "--images", "{w}/run",
                                         "--out", "{w}/p.jsonl"), "--images"),
        "infer-out_is_a_file_parent": Case(("infer", "--model", "{w}/m", "--images", "{w}",
                                            "--out", "{w}/a_file/p.jsonl"), "a_file"),
    }
    return cases


CASES = (record_cases() | pred_cases() | eval_flag_cases() | config_cases() | data_cases()
         | report_cases() | model_flag_cases() | export_cases())


def snapshot(w: Path) -> dict[str, bytes]:
    return {str(p.relative_to(w)): p.read_bytes() for p in sorted(w.rglob("*")) if p.is_file()}


def run_case(w: Path, case: Case, capsys) -> str:
    """Run the case in folder w; assert the common contract; return the stderr line."""
    for name, content in case.files:
        path = w / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.unlink()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content.replace("{w}", str(w)))
    before = snapshot(w)
    capsys.readouterr()
    try:
        code = main([a.replace("{w}", str(w)) for a in case.argv])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("coordexp"), err
    assert case.culprit.replace("{w}", str(w)) in lines[0]
    after = snapshot(w)
    changed = [name for name, data in before.items() if after.get(name) != data]
    assert not changed, f"changed or removed: {changed}"
    return lines[0]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_exits_2_with_one_line_naming_the_culprit(name, tmp_path, capsys):
    make_world(tmp_path)
    run_case(tmp_path, CASES[name], capsys)


def test_the_corpus_is_large_and_covers_every_command():
    assert len(CASES) + len(MODEL_CASES) >= 150
    commands = {c.argv[0] if c.argv else "" for c in CASES.values()}
    assert {"data", "eval", "train", "infer", "report", "model", "export", "visualize"} <= commands


# -- damaged checkpoints and model files, bad images: a tiny model is built first -------------
CKPT = "runs/run/checkpoints/step_000001"
RESUME = ("train", "{w}/cfg.yaml", "--resume", "latest")
INFER = ("infer", "--model", "{w}/model", "--data", "{w}/data.jsonl", "--out", "{w}/p.jsonl")


def half(path: Path) -> bytes:
    return path.read_bytes()[: path.stat().st_size // 2]


MODEL_CASES = {  # name -> (argv, culprit, damage(w) -> files to write)
    "resume-truncated_safetensors": (RESUME, "step_000001: cannot read checkpoint", lambda w: (
        (f"{CKPT}/model.safetensors", half(w / CKPT / "model.safetensors")),)),
    "resume-truncated_training_state": (RESUME, "step_000001: cannot read checkpoint", lambda w: (
        (f"{CKPT}/training_state.pt", half(w / CKPT / "training_state.pt")),)),
    "resume-text_training_state": (RESUME, "step_000001: cannot read checkpoint", lambda w: (
        (f"{CKPT}/training_state.pt", b"not a checkpoint"),)),
    "resume-training_state_without_optimizer": (RESUME, "missing or mistyped state", lambda w: (
        (f"{CKPT}/training_state.pt", torch_bytes({"scheduler": {}, "rng": {}})),)),
    "resume-trainer_state_without_step": (RESUME, "trainer_state.json: missing or mistyped key(s) "
                                          "step", lambda w: (
        (f"{CKPT}/trainer_state.json", json.dumps({"data_order": {"epoch": 0, "pos": 0}})),)),
    "resume-trainer_state_mistyped": (RESUME, "trainer_state.json: missing or mistyped", lambda w: (
        (f"{CKPT}/trainer_state.json", json.dumps(STATE | {"step": "one"})),)),
    "resume-trainer_state_data_order_mistyped": (RESUME, "data_order", lambda w: (
        (f"{CKPT}/trainer_state.json", json.dumps(STATE | {"data_order": {"pos": "x"}})),)),
    "resume-trainer_state_not_utf8": (RESUME, "trainer_state.json:1: not UTF-8", lambda w: (
        (f"{CKPT}/trainer_state.json", b'{"step": "\xff"}'),)),
    "resume-missing_weights": (RESUME, "incomplete checkpoint (missing model.safetensors)",
                               lambda w: ((f"{CKPT}/model.safetensors", None),)),
    "infer-truncated_safetensors": (INFER, "model: cannot load the model weights", lambda w: (
        ("model/model.safetensors", half(w / "model" / "model.safetensors")),)),
    "train-special_token_desc": (("train", "{w}/cfg.yaml"), "'<|coord_5|>'", lambda w: (
        ("train.jsonl", line(GOOD) + line(with_obj(desc="cat <|coord_5|>"))),)),
    "train-end_of_turn_in_desc": (("train", "{w}/cfg.yaml"), "train.jsonl:1: object 0", lambda w: (
        ("train.jsonl", line(with_obj(desc="cat<|im_end|>dog"))),)),
}
STATE = {"step": 1, "best_metric": None, "best_step": None, "train_seconds": 1.0,
         "data_order": {"epoch": 0, "pos": 2}}


def add_checkpoint(w: Path, model_dir: Path) -> None:
    """A complete-looking checkpoint (the tiny model's files and valid trainer state) in
    w/runs/run, and the model directory itself at w/model."""
    import shutil

    shutil.copytree(model_dir, w / "model")
    shutil.copytree(model_dir, w / CKPT)
    (w / CKPT / "training_state.pt").write_bytes(torch_bytes({"optimizer": {}, "scheduler": {},
                                                              "rng": {}}))
    (w / CKPT / "trainer_state.json").write_text(json.dumps(STATE))


@pytest.fixture()
def quiet_progress():
    """transformers' own progress bars (saving the initial model, loading weights) are not
    errors; off here, so stderr holds exactly what coordexp says."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


@pytest.mark.parametrize("name", sorted(MODEL_CASES))
def test_damaged_model_files_exit_2_with_one_line(name, tmp_path, tiny_dir, capsys,
                                                  quiet_progress):
    make_world(tmp_path)
    add_checkpoint(tmp_path, tiny_dir / "qwen2_5_vl")
    argv, culprit, damage = MODEL_CASES[name]
    run_case(tmp_path, Case(argv, culprit, damage(tmp_path)), capsys)
