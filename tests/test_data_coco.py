"""data/coco.py on a tiny Karpathy-split tree."""
import json
import os

import pytest
from PIL import Image

from data.batch import DataError
from data.coco import load_coco, main, references

IMAGES = [
    {"filepath": "train2014", "filename": "COCO_train2014_000000000001.jpg", "split": "train", "cocoid": 1,
     "sentences": [{"raw": "A Man riding a HORSE ."}, {"raw": "  a person on a horse\n"}]},
    {"filepath": "val2014", "filename": "COCO_val2014_000000000002.jpg", "split": "restval", "cocoid": 2,
     "sentences": [{"raw": "Two dogs play."}]},
    {"filepath": "val2014", "filename": "COCO_val2014_000000000003.jpg", "split": "val", "cocoid": 3,
     "sentences": [{"raw": "A red bus."}, {"raw": "A bus parked on a street"}, {"raw": "  "}]},
    {"filepath": "val2014", "filename": "COCO_val2014_000000000004.jpg", "split": "test", "cocoid": 4,
     "sentences": [{"raw": "A cat sleeping on a couch"}]},
]


def write_tree(root, images=IMAGES):
    for entry in images:
        os.makedirs(os.path.join(root, entry["filepath"]), exist_ok=True)
        path = os.path.join(root, entry["filepath"], entry["filename"])
        Image.new("RGB", (16, 12), (entry["cocoid"] * 50, 0, 0)).save(path)
    with open(os.path.join(root, "dataset_coco.json"), "w") as f:
        json.dump({"images": images, "dataset": "coco"}, f)
    return str(root)


@pytest.fixture
def coco(tmp_path):
    return write_tree(tmp_path / "coco")


def test_splits_captions_and_references(coco):
    train = load_coco(coco, "train")  # restval merged in, one example per caption
    assert [(ex.id, ex.target) for ex in train] == [("1", " a man riding a horse ."), ("1", " a person on a horse"),
                                                    ("2", " two dogs play.")]
    assert all(ex.prompt == "A picture of" and ex.answer_prefix is None for ex in train)
    assert train[0].image == os.path.join(coco, "train2014", "COCO_train2014_000000000001.jpg")
    val = load_coco(coco, "val")  # one example per image, every caption as a reference (empty ones dropped)
    assert len(val) == 1 and val[0].target == " a red bus."
    assert val[0].references == ["a red bus.", "a bus parked on a street"]
    assert references(load_coco(coco, "test")) == {"4": ["a cat sleeping on a couch"]}


def test_bad_input(coco, tmp_path, capsys):
    os.remove(os.path.join(coco, "val2014", "COCO_val2014_000000000002.jpg"))
    with pytest.raises(DataError, match=r"image 2: file .*COCO_val2014_000000000002.jpg .*is missing"):
        load_coco(coco, "train")
    with pytest.warns(UserWarning, match=r"skipped 1 of 2 images \(1 missing image\)"):
        assert len(load_coco(coco, "train", strict=False)) == 2
    with pytest.raises(DataError, match=r"no images in split 'minival' \(splits present: restval, test, train, val\)"):
        load_coco(coco, "minival")
    no_caption = write_tree(tmp_path / "c2", IMAGES[:3] + [{**IMAGES[3], "sentences": [{"raw": " "}]}])
    with pytest.raises(DataError, match=r"image 4 in .*dataset_coco.json has no non-empty caption"):
        load_coco(no_caption, "test")
    with open(os.path.join(coco, "dataset_coco.json"), "w") as f:
        f.write("[1, 2")
    with pytest.raises(DataError, match=r"dataset_coco.json is not valid JSON"):
        load_coco(coco)
    with pytest.raises(SystemExit) as e:
        main(["--data_dir", str(tmp_path / "none")])
    assert e.value.code == 1
    assert "python -m data.coco --download --data_dir" in capsys.readouterr().err
