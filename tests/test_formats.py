"""Converters to records (YOLO, VOC, ODVG, LVIS) and back to COCO, on hand-made fixtures: the
same three photos written in each format convert to the same records."""

import json

import pytest
import yaml
from PIL import Image

from coordexp.cli import main

# The photos: edge-touching boxes, an image without objects, names with a space and non-ASCII.
PHOTOS = [
    ("a.png", 64, 40, [("traffic light", (0, 0, 20, 16)), ("café", (40, 30, 64, 40))]),
    ("b.png", 50, 40, []),
    ("c.png", 97, 61, [("dog", (3, 7, 94, 61)), ("traffic light", (0, 0, 97, 5))]),
]
NAMES = ["traffic light", "café", "dog"]
# What every converter must produce for them, written out by hand (image paths aside).
EXPECTED = [
    (64, 40, [{"desc": "traffic light", "bbox_2d": [0, 0, 20, 16]},
              {"desc": "café", "bbox_2d": [40, 30, 64, 40]}]),
    (50, 40, []),
    (97, 61, [{"desc": "dog", "bbox_2d": [3, 7, 94, 61]},
              {"desc": "traffic light", "bbox_2d": [0, 0, 97, 5]}]),
]


def save_images(folder, photos=PHOTOS):
    folder.mkdir(parents=True, exist_ok=True)
    for name, w, h, _ in photos:
        Image.new("RGB", (w, h), (90, 90, 90)).save(folder / name)


def write_coco(root, photos=PHOTOS):
    save_images(root / "images", photos)
    images = [{"id": i + 1, "file_name": n, "width": w, "height": h}
              for i, (n, w, h, _) in enumerate(photos)]
    anns = [{"id": len(images) * 10 + k, "image_id": i + 1, "category_id": NAMES.index(d) + 1,
             "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0}
            for i, (_, _, _, objs) in enumerate(photos) for k, (d, (x1, y1, x2, y2)) in
            enumerate(objs)]
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(NAMES)]
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def write_yolo(root, number=repr, photos=PHOTOS):
    """Ultralytics layout; `number` formats the normalised floats (repr, or 6 decimals)."""
    save_images(root / "images" / "train", photos)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "data.yaml").write_text(yaml.safe_dump({"names": NAMES}, allow_unicode=True),
                                    encoding="utf-8")
    for name, w, h, objs in photos:
        lines = [" ".join([str(NAMES.index(d))] + [number(v) for v in (
            (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h)])
                 for d, (x1, y1, x2, y2) in objs]
        (root / "labels" / "train" / f"{name[:-4]}.txt").write_text("".join(
            x + "\n" for x in lines))
    return root


def voc_xml(name, w, h, objs, difficult=()):
    parts = [f"<annotation>\n  <filename>{name}</filename>\n  <size><width>{w}</width>"
             f"<height>{h}</height><depth>3</depth></size>"]
    for k, (d, (x1, y1, x2, y2)) in enumerate(objs):
        parts.append(f"  <object>\n    <name>{d}</name>\n    <difficult>{int(k in difficult)}"
                     f"</difficult>\n    <bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin>"
                     f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox>\n  </object>")
    return "\n".join(parts) + "\n</annotation>\n"


def write_voc(root, photos=PHOTOS, difficult=()):
    """VOC: 1-based inclusive integer corners (xmin = x1 + 1, xmax = x2)."""
    save_images(root / "JPEGImages", photos)
    (root / "Annotations").mkdir()
    for i, (name, w, h, objs) in enumerate(photos):
        marked = {k for j, k in difficult if j == i}
        (root / "Annotations" / f"{name[:-4]}.xml").write_text(voc_xml(name, w, h, objs, marked),
                                                               encoding="utf-8")
    return root


def write_odvg(root):
    """Detection lines for the first two photos, a grounding line for the third."""
    save_images(root / "images")
    lines = []
    for name, w, h, objs in PHOTOS[:2]:
        inst = [{"bbox": list(b), "label": NAMES.index(d), "category": d} for d, b in objs]
        lines.append({"filename": name, "width": w, "height": h,
                      "detection": {"instances": inst}})
    name, w, h, objs = PHOTOS[2]
    lines.append({"filename": name, "width": w, "height": h, "grounding": {
        "caption": "a dog under a traffic light",
        "regions": [{"bbox": list(b), "phrase": d} for d, b in objs]}})
    path = root / "odvg.jsonl"
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines),
                    encoding="utf-8")
    return path


def write_lvis(root):
    """COCO boxes, images named by coco_url, and federated labels per image."""
    save_images(root / "val2017")
    inst = json.loads(write_coco(root / "coco").read_text())
    for img in inst["images"]:
        img["coco_url"] = f"http://images.cocodataset.org/val2017/{img.pop('file_name')}"
        img["neg_category_ids"], img["not_exhaustive_category_ids"] = [], []
    inst["images"][0]["neg_category_ids"] = [3]
    inst["images"][2]["not_exhaustive_category_ids"] = [1]
    path = root / "lvis.json"
    path.write_text(json.dumps(inst))
    return path


def records_in(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def expected_records(prefix):
    return [{"images": [f"{prefix}/{name}"], "width": w, "height": h, "objects": objs}
            for (name, *_), (w, h, objs) in zip(PHOTOS, EXPECTED, strict=True)]


def convert(args, capsys):
    code = main(["data", *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


# -- each converter on the fixture ------------------------------------------------------------

def test_coco_fixture_converts_to_the_expected_records(tmp_path, capsys):
    inst = write_coco(tmp_path / "coco")
    out = tmp_path / "out" / "r.jsonl"
    convert(["coco", "--instances", str(inst), "--images", str(tmp_path / "coco" / "images"),
             "--out", str(out)], capsys)
    got = [{k: r[k] for k in ("images", "width", "height", "objects")} for r in records_in(out)]
    assert got == expected_records("../coco/images")


def test_yolo_fixture_converts_to_the_expected_records(tmp_path, capsys):
    root = write_yolo(tmp_path / "yolo")
    out = tmp_path / "out" / "r.jsonl"
    printed = convert(["yolo", "--root", str(root), "--out", str(out)], capsys)
    assert records_in(out) == expected_records("../yolo/images/train")
    assert printed.strip() == f"wrote 3 records to {out}"


def test_voc_fixture_converts_to_the_expected_records(tmp_path, capsys):
    root = write_voc(tmp_path / "voc")
    out = tmp_path / "out" / "r.jsonl"
    convert(["voc", "--root", str(root), "--out", str(out)], capsys)
    assert records_in(out) == expected_records("../voc/JPEGImages")


def test_odvg_fixture_converts_to_the_expected_records(tmp_path, capsys):
    path = write_odvg(tmp_path / "odvg")
    out = tmp_path / "out" / "r.jsonl"
    convert(["odvg", "--input", str(path), "--images", str(tmp_path / "odvg" / "images"),
             "--out", str(out)], capsys)
    want = expected_records("../odvg/images")
    want[2]["caption"] = "a dog under a traffic light"
    assert records_in(out) == want


def test_odvg_labels_resolve_through_the_label_map(tmp_path, capsys):
    path = write_odvg(tmp_path / "odvg")
    lines = records_in(path)
    for inst in lines[0]["detection"]["instances"]:
        del inst["category"]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "map.json").write_text(json.dumps({str(i): n for i, n in enumerate(NAMES)}))
    out = tmp_path / "out" / "r.jsonl"
    convert(["odvg", "--input", str(path), "--images", str(tmp_path / "odvg" / "images"),
             "--label-map", str(tmp_path / "map.json"), "--out", str(out)], capsys)
    assert records_in(out)[0]["objects"] == EXPECTED[0][2]


def test_lvis_fixture_keeps_federated_labels_by_name(tmp_path, capsys):
    path = write_lvis(tmp_path / "lvis")
    out = tmp_path / "out" / "r.jsonl"
    convert(["lvis", "--instances", str(path), "--images", str(tmp_path / "lvis"),
             "--out", str(out)], capsys)
    want = expected_records("../lvis/val2017")
    for i, rec in enumerate(want):
        rec |= {"image_id": i + 1, "neg_categories": [], "not_exhaustive_categories": []}
    want[0]["neg_categories"] = ["dog"]
    want[2]["not_exhaustive_categories"] = ["traffic light"]
    assert records_in(out) == want


# -- the same photos in three formats give the same pixel boxes ------------------------------

def test_coco_yolo_and_voc_of_the_same_photos_give_the_same_pixel_boxes(tmp_path, capsys):
    photos = PHOTOS + [("d.png", 333, 251, [("dog", (17, 1, 301, 250)),
                                            ("café", (0, 99, 333, 251))])]
    outs = {}
    write_coco(tmp_path / "coco", photos)
    write_yolo(tmp_path / "yolo", number=lambda v: f"{v:.6f}", photos=photos)
    write_voc(tmp_path / "voc", photos)
    for fmt, args in (("coco", ["--instances", str(tmp_path / "coco" / "instances.json"),
                                "--images", str(tmp_path / "coco" / "images")]),
                      ("yolo", ["--root", str(tmp_path / "yolo")]),
                      ("voc", ["--root", str(tmp_path / "voc")])):
        outs[fmt] = tmp_path / "out" / f"{fmt}.jsonl"
        convert([fmt, *args, "--out", str(outs[fmt])], capsys)
    coco, yolo, voc = (records_in(outs[f]) for f in ("coco", "yolo", "voc"))
    assert [r["objects"] for r in voc] == [r["objects"] for r in coco]
    for c, y in zip(coco, yolo, strict=True):
        assert (c["width"], c["height"]) == (y["width"], y["height"])
        assert [o["desc"] for o in c["objects"]] == [o["desc"] for o in y["objects"]]
        for oc, oy in zip(c["objects"], y["objects"], strict=True):
            assert oy["bbox_2d"] == pytest.approx(oc["bbox_2d"], abs=0.01)
    assert [o["bbox_2d"] for o in coco[3]["objects"]] == [[17, 1, 301, 250], [0, 99, 333, 251]]


# -- VOC difficult objects ---------------------------------------------------------------------

def test_voc_difficult_objects_are_flagged_or_dropped_and_counted(tmp_path, capsys):
    root = write_voc(tmp_path / "voc", difficult=[(0, 1), (2, 0)])
    keep, drop = tmp_path / "keep.jsonl", tmp_path / "drop.jsonl"
    convert(["voc", "--root", str(root), "--out", str(keep)], capsys)
    flags = [[o.get("difficult", False) for o in r["objects"]] for r in records_in(keep)]
    assert flags == [[False, True], [], [True, False]]
    printed = convert(["voc", "--root", str(root), "--difficult", "drop", "--out", str(drop)],
                      capsys)
    assert [[o["desc"] for o in r["objects"]] for r in records_in(drop)] == [
        ["traffic light"], [], ["traffic light"]]
    assert "skipped 2 difficult objects" in printed


def test_files_left_out_are_counted_by_reason(tmp_path, capsys):
    yolo = write_yolo(tmp_path / "yolo")
    (yolo / "images" / "train" / "notes.txt").write_text("not an image")
    (yolo / "labels" / "train" / "z.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    printed = convert(["yolo", "--root", str(yolo), "--out", str(tmp_path / "y.jsonl")], capsys)
    assert "wrote 3 records" in printed
    assert "skipped 1 label files without image, 1 non image files" in printed
    voc = write_voc(tmp_path / "voc")
    Image.new("RGB", (8, 8)).save(voc / "JPEGImages" / "unlabelled.png")
    printed = convert(["voc", "--root", str(voc), "--out", str(tmp_path / "v.jsonl")], capsys)
    assert printed.strip().endswith("; skipped 1 images without annotation")


def test_voc_image_set_selects_ids_in_its_order(tmp_path, capsys):
    root = write_voc(tmp_path / "voc")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "val.txt").write_text("c\na\n")
    out = tmp_path / "r.jsonl"
    convert(["voc", "--root", str(root), "--image-set", "val", "--out", str(out)], capsys)
    assert [r["images"][0].rsplit("/", 1)[1] for r in records_in(out)] == ["c.png", "a.png"]
    (root / "ImageSets" / "Main" / "val.txt").write_text("c\nmissing\n")
    assert main(["data", "voc", "--root", str(root), "--image-set", "val", "--out",
                 str(out)]) == 2
    assert f"val.txt:2: no annotation {root / 'Annotations' / 'missing.xml'}" in \
        capsys.readouterr().err


# -- to-coco -----------------------------------------------------------------------------------

def test_to_coco_round_trips_coco_and_scores_itself_perfectly_with_pycocotools(tmp_path, capsys):
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    inst = write_coco(tmp_path / "coco")
    recs, back = tmp_path / "r.jsonl", tmp_path / "back.json"
    convert(["coco", "--instances", str(inst), "--images", str(tmp_path / "coco" / "images"),
             "--out", str(recs)], capsys)
    convert(["to-coco", "--records", str(recs), "--out", str(back)], capsys)
    orig, got = json.loads(inst.read_text()), json.loads(back.read_text())
    assert [(i["id"], i["width"], i["height"]) for i in got["images"]] == [
        (i["id"], i["width"], i["height"]) for i in orig["images"]]
    names = {c["id"]: c["name"] for c in orig["categories"]}
    got_names = {c["id"]: c["name"] for c in got["categories"]}
    assert sorted((a["image_id"], names[a["category_id"]], a["bbox"]) for a in orig["annotations"]
                  ) == sorted((a["image_id"], got_names[a["category_id"]], a["bbox"])
                              for a in got["annotations"])
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(back))
        dt = gt.loadRes([{"image_id": a["image_id"], "category_id": a["category_id"],
                          "bbox": a["bbox"], "score": 1.0} for a in got["annotations"]])
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_to_coco_of_lvis_records_writes_federated_category_ids(tmp_path, capsys):
    path = write_lvis(tmp_path / "lvis")
    recs, back = tmp_path / "r.jsonl", tmp_path / "back.json"
    convert(["lvis", "--instances", str(path), "--images", str(tmp_path / "lvis"),
             "--out", str(recs)], capsys)
    convert(["to-coco", "--records", str(recs), "--out", str(back)], capsys)
    got = json.loads(back.read_text())
    name = {c["id"]: c["name"] for c in got["categories"]}
    assert [[name[i] for i in img["neg_category_ids"]] for img in got["images"]] == [
        ["dog"], [], []]
    assert [[name[i] for i in img["not_exhaustive_category_ids"]] for img in got["images"]] == [
        [], [], ["traffic light"]]


# -- malformed inputs: exit 2, one line naming the file and line -----------------------------

def yolo_broken(root, what):
    write_yolo(root)
    labels = root / "labels" / "train"
    if what == "missing_label_file":
        (labels / "b.txt").unlink()
        return ["yolo", "--root", str(root)], f"{labels / 'b.txt'}: missing label file"
    line = {"class_out_of_range": "3 0.5 0.5 0.2 0.2", "coordinate_above_one": "0 1.2 0.5 0.2 0.2",
            "coordinate_negative": "1 0.5 -0.1 0.2 0.2", "segment_polygon": "0 0.1 0.1 0.5 0.1 0.3",
            "box_past_the_edge": "0 0.9 0.5 0.4 0.2"}[what]
    (labels / "c.txt").write_text((labels / "c.txt").read_text() + line + "\n")
    return ["yolo", "--root", str(root)], f"{labels / 'c.txt'}:3: "


def voc_broken(root, what):
    write_voc(root)
    xml = root / "Annotations" / "c.xml"
    text = xml.read_text()
    if what == "truncated_xml":
        xml.write_text(text[: text.index("<xmax>", text.index("dog"))])
        return ["voc", "--root", str(root)], f"{xml}:7: not valid XML"
    if what == "entity":
        xml.write_text('<?xml version="1.0"?>\n<!DOCTYPE a [<!ENTITY e "x">]>\n' + text)
        return ["voc", "--root", str(root)], f"{xml}:2: DTDs and entities are not accepted"
    xml.write_text(text.replace("<xmax>94</xmax>", "<xmax>98</xmax>"))  # the image is 97 wide
    return ["voc", "--root", str(root)], f"{xml}:7: box 4,8,98,61"


def odvg_broken(root, what):
    path = write_odvg(root)
    lines = records_in(path)
    if what == "bbox_outside":
        lines[1]["detection"]["instances"] = [{"bbox": [0, 0, 51, 4], "category": "dog"}]
    else:  # a label without a label map
        lines[1]["detection"]["instances"] = [{"bbox": [0, 0, 5, 4], "label": 2}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return (["odvg", "--input", str(path), "--images", str(root / "images")],
            f"{path}:2: instance 0")


def lvis_broken(root, what):
    path = write_lvis(root)
    inst = json.loads(path.read_text())
    if what == "unknown_neg_category":
        inst["images"][1]["neg_category_ids"] = [99]
    elif what == "unknown_category_id":
        inst["annotations"][0]["category_id"] = 42
    else:
        inst["annotations"][1]["bbox"] = [1, 2, 3]
    path.write_text(json.dumps(inst))
    where = {"unknown_neg_category": f"{path}: image id 2: neg_category_ids",
             "unknown_category_id": f"{path}: annotation 0",
             "short_bbox": f"{path}: annotation 1 (id 31) has bbox [1, 2, 3]"}[what]
    return ["lvis", "--instances", str(path), "--images", str(root)], where


BROKEN = {
    "yolo_missing_label_file": (yolo_broken, "missing_label_file"),
    "yolo_class_out_of_range": (yolo_broken, "class_out_of_range"),
    "yolo_coordinate_above_one": (yolo_broken, "coordinate_above_one"),
    "yolo_coordinate_negative": (yolo_broken, "coordinate_negative"),
    "yolo_segment_polygon": (yolo_broken, "segment_polygon"),
    "yolo_box_past_the_edge": (yolo_broken, "box_past_the_edge"),
    "voc_truncated_xml": (voc_broken, "truncated_xml"),
    "voc_entity": (voc_broken, "entity"),
    "voc_box_outside": (voc_broken, "box_outside"),
    "odvg_bbox_outside": (odvg_broken, "bbox_outside"),
    "odvg_label_without_map": (odvg_broken, "label_without_map"),
    "lvis_unknown_neg_category": (lvis_broken, "unknown_neg_category"),
    "lvis_unknown_category_id": (lvis_broken, "unknown_category_id"),
    "lvis_short_bbox": (lvis_broken, "short_bbox"),
}


@pytest.mark.parametrize(("make", "what"), BROKEN.values(), ids=BROKEN.keys())
def test_malformed_input_exits_2_with_one_line_naming_file_and_line(tmp_path, capsys, make,
                                                                    what):
    args, where = make(tmp_path / "ds", what)
    out = tmp_path / "out.jsonl"
    assert main(["data", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert where in err
    assert not out.exists()
