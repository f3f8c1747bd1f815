import json

from coordexp.cli import main
from coordexp.data.records import read_records


def test_synth_is_byte_identical_and_coco_round_trips(tmp_path, capsys):
    for name in ("a", "b"):
        assert main(["data", "synth", "--out", str(tmp_path / name), "--train", "64", "--val",
                     "16", "--seed", "0"]) == 0
    for split in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "a" / split).read_bytes() == (tmp_path / "b" / split).read_bytes()
    val = read_records(tmp_path / "a" / "val.jsonl")
    assert len(val) == 16 and all(1 <= len(r.objects) <= 12 for r in val)
    coco = json.loads((tmp_path / "a" / "val_coco.json").read_text())
    assert len(coco["images"]) == 16
    out = tmp_path / "rt" / "val.jsonl"
    assert main(["data", "coco", "--instances", str(tmp_path / "a" / "val_coco.json"),
                 "--images", str(tmp_path / "a"), "--out", str(out)]) == 0
    back = read_records(out)
    assert [r.objects for r in back] == [r.objects for r in val]
    assert [r.image_path.resolve() for r in back] == [r.image_path.resolve() for r in val]


def test_coco_conversion_skips_and_counts(tmp_path, capsys):
    inst = {"images": [{"id": 1, "file_name": "a.png", "width": 10, "height": 10},
                       {"id": 2, "file_name": "b.png", "width": 10, "height": 10}],
            "categories": [{"id": 3, "name": "cat"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 2, 2]},
                            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [1, 1, 2, 2],
                             "iscrowd": 1}]
            + [{"id": 10 + i, "image_id": 2, "category_id": 3, "bbox": [0, 0, 1, 1]}
               for i in range(3)]}
    (tmp_path / "i.json").write_text(json.dumps(inst))
    code = main(["data", "coco", "--instances", str(tmp_path / "i.json"), "--images",
                 str(tmp_path), "--out", str(tmp_path / "o.jsonl"), "--max-objects", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "1 crowd annotations" in printed and "1 images over max objects" in printed
    (rec,) = read_records(tmp_path / "o.jsonl", check_images=False)
    assert rec.objects[0].box_px == (1.0, 1.0, 3.0, 3.0) and rec.objects[0].desc == "cat"


def test_truncated_coco_json_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "t.json").write_text('{"images": [{"id": 1, "file_na')
    code = main(["data", "coco", "--instances", str(tmp_path / "t.json"), "--images",
                 str(tmp_path), "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "t.json" in err and "truncated" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_negative_count_exits_2_with_one_line(tmp_path, capsys):
    try:
        main(["data", "synth", "--out", str(tmp_path), "--train", "-1", "--val", "2"])
    except SystemExit as e:
        assert e.code == 2
    err = capsys.readouterr().err
    assert "--train" in err and len(err.strip().splitlines()) == 1
