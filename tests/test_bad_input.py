"""Damaged datasets and images: one DataError line naming the file, the problem and
what is wrong; never a traceback from deep inside, never a silent success, never a deleted file.

Real files in the official layouts (the trees of test_data_scienceqa / test_data_coco, a real
shapes set), real PIL images; the entry points run in this process (sample.py's own cases are
in test_sample.py).
"""
import json
import os
import re
import shutil
import struct
import zlib

import pytest
from PIL import Image

import data.shapes
from data.batch import DataError, load_image, read_json
from data.coco import load_coco
from data.scienceqa import load_scienceqa
from data.shapes import ensure_shapes
from test_data_coco import IMAGES, write_tree as write_coco
from test_data_scienceqa import PROBLEMS, SPLITS, write_tree as write_sqa


def one_line(error):
    message = str(error.value)
    assert "\n" not in message, message
    return message


# ----------------------------------------------------------------------------- ScienceQA layout

PROBLEM_DAMAGE = [  # (pid, field, value, words of the message); None as field: the whole problem
    ("1", "question", None, "'question' must be a non-empty string, got None"),
    ("2", "question", 5, "'question' must be a non-empty string, got 5"),
    ("2", "question", "  ", "'question' must be a non-empty string"),
    ("2", "hint", 123, "'hint' must be a string, got 123"),
    ("1", "hint", ["a"], "'hint' must be a string, got ['a']"),
    ("1", "image", 5, "'image' must be a string, got 5"),
    ("2", "split", 3, "'split' must be a string, got 3"),
    ("2", "split", None, "'split' must be a string, got None"),
    ("2", "choices", "Ohio,Paris", "'choices' must be 2 to 26 strings"),
    ("2", "choices", [1, 2], "'choices' must be 2 to 26 strings"),
    ("2", "answer", 7, "answer index 7 is out of range for 3 choices"),
    ("2", "answer", "1", "answer index '1' is out of range"),
    ("2", "answer", True, "answer index True is out of range"),
    ("1", "image", "other.png", "image file"),
    ("2", None, [1], "is not an object"),
]


@pytest.mark.parametrize("pid, field, value, message", PROBLEM_DAMAGE,
                         ids=[f"{f}={json.dumps(v)}" for _, f, v, _ in PROBLEM_DAMAGE])
def test_a_damaged_problem_is_named_with_its_field(pid, field, value, message, tmp_path):
    problem = value if field is None else {**PROBLEMS[pid], field: value}
    root = write_sqa(tmp_path / "sqa", {**PROBLEMS, pid: problem})
    with pytest.raises(DataError) as e:
        load_scienceqa(root, "train")
    text = one_line(e)
    assert f"problem {pid}" in text and message in text, text
    assert "problems.json" in text or "image file" in text


def break_file(name, how):
    def damage(root):
        path = os.path.join(root, name)
        os.remove(path)
        if how == "folder":
            os.makedirs(path)
        elif how != "missing":
            with open(path, "wb") as f:
                f.write(how)
    return damage


def edit_splits(change):
    def damage(root):
        path = os.path.join(root, "pid_splits.json")
        splits = json.load(open(path))
        change(splits)
        json.dump(splits, open(path, "w"))
    return damage


FILE_DAMAGE = [  # (damage, words of the message)
    (break_file("problems.json", "folder"), "cannot read .*problems.json \\(IsADirectoryError"),
    (break_file("problems.json", b"{nope"), "problems.json is not valid JSON"),
    (break_file("problems.json", b"\xff\xfe{}"), "problems.json is not valid JSON"),
    (break_file("problems.json", b"[]"), "must each hold a JSON object"),
    (break_file("pid_splits.json", "missing"), "pid_splits.json not found"),
    (break_file("pid_splits.json", "folder"), "cannot read .*pid_splits.json"),
    (edit_splits(lambda s: s.pop("train")), "pid_splits.json has no split 'train'"),
    (edit_splits(lambda s: s.update(train=[])), "split 'train' must be a non-empty list of pids, got \\[\\]"),
    (edit_splits(lambda s: s.update(train="1,2")), "split 'train' must be a non-empty list of pids, got 1,2"),
    (edit_splits(lambda s: s["train"].append("99")), "pid 99 is listed in .*pid_splits.json under 'train' but"),
]


@pytest.mark.parametrize("damage, message", FILE_DAMAGE, ids=[m[:30] for _, m in FILE_DAMAGE])
def test_a_damaged_scienceqa_file_is_named(damage, message, tmp_path):
    root = write_sqa(tmp_path / "sqa")
    damage(root)
    with pytest.raises(DataError, match=message) as e:
        load_scienceqa(root, "train")
    one_line(e)


# ----------------------------------------------------------------------------- COCO (Karpathy) layout

COCO_DAMAGE = [  # (field, value, words of the message)
    ("filename", 7, "'filename' and 'filepath' must be text, got 7 and 'train2014'"),
    ("filename", "", "'filename' and 'filepath' must be text, got '' and"),
    ("filepath", None, "'filename' and 'filepath' must be text, got 'COCO_train2014_000000000001.jpg' and None"),
    ("filepath", 3, "must be text"),
    ("sentences", None, "lacks filename/split/sentences"),
    ("split", None, "'split' must be text, got None"),
    ("sentences", [{"raw": None}], "has no non-empty caption"),
]


@pytest.mark.parametrize("field, value, message", COCO_DAMAGE, ids=[f"{f}={json.dumps(v)}" for f, v, _ in COCO_DAMAGE])
def test_a_damaged_coco_entry_is_named(field, value, message, tmp_path):
    root = write_coco(tmp_path / "coco")
    data = json.load(open(os.path.join(root, "dataset_coco.json")))
    if field == "sentences" and value is None:
        del data["images"][0][field]
    else:
        data["images"][0][field] = value
    json.dump(data, open(os.path.join(root, "dataset_coco.json"), "w"))
    with pytest.raises(DataError) as e:
        load_coco(root, "train")
    text = one_line(e)
    assert "dataset_coco.json" in text and message in text, text


def test_a_folder_where_a_json_file_should_be(tmp_path):
    root = write_coco(tmp_path / "coco", IMAGES)
    os.remove(os.path.join(root, "dataset_coco.json"))
    os.makedirs(os.path.join(root, "dataset_coco.json"))
    with pytest.raises(DataError, match=r"cannot read .*dataset_coco.json \(IsADirectoryError: Is a directory\)"):
        load_coco(root)
    with pytest.raises(DataError, match=r"cannot read .*coco \(IsADirectoryError"):
        read_json(root)


# ----------------------------------------------------------------------------- images

def png_header(w, h):
    """A PNG that says it is w x h (8-bit grey) but holds a few bytes: a decompression bomb's header."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


IMAGE_DAMAGE = {  # name -> (write the file at path, words of the message)
    "1x300000 strip": (lambda p: Image.new("1", (1, 300000)).save(p), "is 1 x 300000 pixels, longer than 100:1"),
    "300x2 strip": (lambda p: Image.new("RGB", (300, 2)).save(p), "is 300 x 2 pixels, longer than 100:1"),
    "bomb, 400M pixels": (lambda p: open(p, "wb").write(png_header(20000, 20000)),
                          "is refused \\(Image size \\(400000000 pixels\\) exceeds limit"),
    "144M pixels (Pillow only warns)": (lambda p: open(p, "wb").write(png_header(12000, 12000)),
                                        "is refused \\(Image size \\(144000000 pixels\\) exceeds limit"),
    "folder": (os.makedirs, "cannot read image .* \\(IsADirectoryError"),
    "missing": (lambda p: None, "cannot read image .* \\(FileNotFoundError"),
    "text": (lambda p: open(p, "w").write("not a picture"), "cannot identify image file"),
}


@pytest.mark.parametrize("name", IMAGE_DAMAGE)
def test_a_bad_image_is_refused_before_decoding(name, tmp_path):
    write, message = IMAGE_DAMAGE[name]
    path = str(tmp_path / "image.png")
    write(path)
    with pytest.raises(DataError, match=message) as e:
        load_image(path, "7")
    assert one_line(e).startswith(f"example 7: ") and path in str(e.value)


def test_a_squarish_long_image_still_loads(tmp_path):
    Image.new("RGB", (1000, 10), "red").save(tmp_path / "banner.png")  # 100:1 exactly
    assert load_image(str(tmp_path / "banner.png"), "banner").size == (1000, 10)


# ----------------------------------------------------------------------------- shapes

@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes") / "set")
    ensure_shapes(root, n_train=10, n_val=5)
    return root


BAD_PARAMS = [  # (arguments of python -m data.shapes, words of the message)
    (["--n_train", "-5"], "n_train must be a whole number from 1, got -5"),
    (["--n_train", "0"], "n_train must be a whole number from 1, got 0"),
    (["--n_val", "0"], "n_val must be a whole number from 1"),
    (["--n_test", "-1"], "n_test must be a whole number from 0"),
    (["--grid", "0"], "grid must be from 3"),
    (["--grid", "2"], "grid must be from 3"),
    (["--grid", "100"], "grid must be from 3 \\(room for 5 objects\\) to 24"),
    (["--out", "{d}/file"], "is a file or empty"),
    (["--out", ""], "is a file or empty"),
    (["--out", "{d}/file/under"], "cannot write .*under \\(NotADirectoryError"),
]


@pytest.mark.parametrize("argv, message", BAD_PARAMS, ids=[" ".join(a) for a, _ in BAD_PARAMS])
def test_bad_shapes_parameters_write_nothing(argv, message, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    argv = ["--n_train", "10", "--n_val", "5", "--out", str(tmp_path / "out")] + [a.format(d=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as e:
        data.shapes.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("error: shapes") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert sorted(os.listdir(tmp_path)) == ["file"] and (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("extra", ["notes.txt", "images/train/1/notes.txt", "results/acc.json"])
def test_shapes_never_replaces_a_folder_holding_other_files(extra, small_set, tmp_path):
    root = shutil.copytree(small_set, tmp_path / "set")
    os.makedirs(os.path.dirname(root / extra), exist_ok=True)
    (root / extra).write_text("keep me")
    with pytest.raises(DataError, match=f"made with other parameters, and files the generator did not write "
                                        f"\\(1, e.g. {extra}\\)") as e:
        ensure_shapes(str(root), n_train=12, n_val=5)
    one_line(e)
    assert (root / extra).read_text() == "keep me" and len(json.load(open(root / "pid_splits.json"))["train"]) == 10


def test_shapes_replaces_its_own_folder_and_says_so(small_set, tmp_path, capsys):
    root = str(shutil.copytree(small_set, tmp_path / "set"))
    ensure_shapes(root, n_train=12, n_val=5)
    assert "was made with other parameters (n_train 10 -> 12); replacing it" in capsys.readouterr().err
    assert len(json.load(open(os.path.join(root, "pid_splits.json")))["train"]) == 12
    assert os.listdir(tmp_path) == ["set"]  # no temporary folder left


@pytest.mark.parametrize("params", [b"{nope", b"[1, 2]", "folder"])
def test_damaged_params_json_is_named(params, small_set, tmp_path):
    root = shutil.copytree(small_set, tmp_path / "set")
    break_file("params.json", params)(root)
    with pytest.raises(DataError, match=r"params.json (is not valid JSON|is not a JSON object|\(IsADirectoryError)"):
        ensure_shapes(str(root), n_train=10, n_val=5)
    assert len(json.load(open(root / "pid_splits.json"))["train"]) == 10
