"""COCO Captions with Karpathy's split, as image-captioning `Example`s.

    root/dataset_coco.json    {"images": [{filepath, filename, split, cocoid, sentences: [{raw, ...}]}]}
    root/train2014/COCO_train2014_*.jpg
    root/val2014/COCO_val2014_*.jpg

Image i is read from root/filepath/filename. Karpathy's "restval" images are
merged into train (113,287 train, 5,000 val, 5,000 test images). Captions are
lower-cased with whitespace stripped; the prompt is "A picture of" and the
target " " + caption (DESIGN.md section 5). Train has one example per
(image, caption) pair; val and test have one example per image, with the first
caption as target and all of them as `references` for BLEU / CIDEr-D
(data/metrics.py). shapes.py writes the same layout for its images.

    python -m data.coco --download [--data_dir DIR]     # fetch, unpack, verify
"""
import os
import warnings
from collections import Counter

from data.batch import DataError, Example, check_dir, read_json
from data.download import fetch, unzip, unzip_file, main as download_main

DEFAULT_ROOT = "data/raw/coco"
URLS = {
    "caption_datasets.zip": "http://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
    "train2014.zip": "http://images.cocodataset.org/zips/train2014.zip",
    "val2014.zip": "http://images.cocodataset.org/zips/val2014.zip",
}
SIZES = {"train": 113287, "val": 5000, "test": 5000}  # images per split, restval merged into train
PROMPT = "A picture of"


def clean_caption(raw):
    return " ".join(raw.lower().split())


def _captions(entry):
    """The cleaned, non-empty captions of one entry."""
    sentences = entry["sentences"] if isinstance(entry["sentences"], list) else []
    raws = [s.get("raw") for s in sentences if isinstance(s, dict)]
    return [c for c in (clean_caption(r) for r in raws if isinstance(r, str)) if c]


def _image_error(entry, root, ann):
    """(kind, message) saying why an entry of the caption file cannot be used, or None."""
    if not isinstance(entry, dict) or not all(k in entry for k in ("filename", "split", "sentences")):
        return "malformed entry", f"an entry of {ann} lacks filename/split/sentences: {str(entry)[:200]}"
    name = entry.get("cocoid", entry.get("imgid", entry["filename"]))
    filename, filepath = entry["filename"], entry.get("filepath", "")  # filepath is optional
    if not isinstance(filename, str) or not filename or not isinstance(filepath, str):
        return "malformed entry", (f"image {name} in {ann}: 'filename' and 'filepath' must be text, "
                                   f"got {filename!r:.60} and {filepath!r:.60}")
    if not isinstance(entry["split"], str):
        return "malformed entry", f"image {name} in {ann}: 'split' must be text, got {entry['split']!r:.60}"
    if not _captions(entry):
        return "no captions", f"image {name} in {ann} has no non-empty caption"
    path = os.path.join(root, entry.get("filepath", ""), entry["filename"])
    if not os.path.isfile(path):
        return "missing image", f"image {name}: file {path} (listed in {ann}) is missing"
    return None


def load_coco(root=DEFAULT_ROOT, split="train", ann_file="dataset_coco.json", strict=True) -> list[Example]:
    """One Karpathy split as Examples. strict: stop at the first bad entry with a
    DataError naming it; otherwise skip bad entries with one warning saying how many and why."""
    check_dir(root, "COCO Captions", f"python -m data.coco --download --data_dir {root}")
    ann = os.path.join(root, ann_file)
    data = read_json(ann)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{ann} is not a Karpathy split file (no 'images' list)")
    wanted = ("train", "restval") if split == "train" else (split,)
    entries = [e for e in data["images"] if not isinstance(e, dict) or e.get("split") in wanted  # and the broken
               or not isinstance(e.get("split"), str)]  # ones, for _image_error to name
    if not entries:
        present = sorted({str(e.get("split")) for e in data["images"] if isinstance(e, dict)})
        raise DataError(f"{ann} has no images in split '{split}' (splits present: {', '.join(present)})")
    examples, skipped = [], []
    for entry in entries:
        error = _image_error(entry, root, ann)
        if error and strict:
            raise DataError(error[1])
        if error:
            skipped.append(error)
            continue
        refs = _captions(entry)
        image_id = str(entry.get("cocoid", entry.get("imgid", entry["filename"])))
        path = os.path.join(root, entry.get("filepath", ""), entry["filename"])
        targets = refs if split == "train" else refs[:1]
        for k, ref in enumerate(targets):
            examples.append(Example(id=image_id, prompt=PROMPT, target=" " + ref, image=path, references=refs,
                                    meta={"split": entry["split"], "caption_index": k}))
    if skipped:
        kinds = ", ".join(f"{n} {kind}" for kind, n in Counter(kind for kind, _ in skipped).items())
        warnings.warn(f"COCO {split}: skipped {len(skipped)} of {len(entries)} images ({kinds}); "
                      f"first: {skipped[0][1]}")
    return examples


def references(examples):
    """{image id: [reference captions]}, the form data/metrics.py takes."""
    return {ex.id: ex.references for ex in examples}


def download(root=DEFAULT_ROOT, keep_zips=False):
    """Fetch Karpathy's split file and the train2014 / val2014 images into root, then verify."""
    files = {name: os.path.join(root, name) for name in URLS}
    everything = [(URLS[name], path) for name, path in files.items()]
    ann = os.path.join(root, "dataset_coco.json")
    if not os.path.isfile(ann):
        zip_path = fetch(URLS["caption_datasets.zip"], files["caption_datasets.zip"], everything)
        unzip_file(zip_path, "dataset_coco.json", ann)
        if not keep_zips:
            os.remove(files["caption_datasets.zip"])
    for name in ("train2014", "val2014"):
        if not os.path.isdir(os.path.join(root, name)):
            unzip(fetch(URLS[f"{name}.zip"], files[f"{name}.zip"], everything), root, name)
            if not keep_zips:
                os.remove(files[f"{name}.zip"])
    verify(root)


def verify(root=DEFAULT_ROOT):
    """Every Karpathy split loads (all images present) with the expected number of images."""
    for split, size in SIZES.items():
        n = len(references(load_coco(root, split)))
        if n != size:
            raise DataError(f"COCO {split} has {n} images in {root}, Karpathy's split has {size}")
        print(f"COCO {split}: {n} images, all present")


def main(argv=None):
    download_main(argv, "COCO Captions (Karpathy split): download and verify", DEFAULT_ROOT, download, verify)


if __name__ == "__main__":
    main()
