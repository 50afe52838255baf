"""data/scienceqa.py on a tiny ScienceQA tree written in the official layout."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from data.batch import DataError, collate
from data.scienceqa import format_scores, load_scienceqa, main, parse_letter, score
from data.tokenizer import EOT, get_encoding

PROBLEMS = {
    "1": {"question": "Which color is the sky?", "choices": ["green", "blue"], "answer": 1,
          "hint": "Look at the picture.", "image": "image.png", "subject": "natural science", "grade": "grade2",
          "split": "train", "lecture": "", "solution": ""},
    "2": {"question": "Which is a state?", "choices": ["Ohio", "Paris", "Rome"], "answer": 2, "hint": "",
          "image": None, "subject": "social science", "grade": "grade8", "split": "train"},
    "3": {"question": "Which word rhymes with cat?", "choices": ["hat", "dog", "sun", "cup"], "answer": 0,
          "hint": "", "image": "image.png", "subject": "language science", "grade": "grade5", "split": "train"},
    "4": {"question": "What is 2+2?", "choices": ["1", "2", "3", "4", "5"], "answer": 3,
          "hint": "Two and two make four.", "image": None, "subject": "natural science", "grade": "grade11",
          "split": "train"},
    "5": {"question": "Is it red?", "choices": ["yes", "no"], "answer": 0, "hint": "", "image": "image.png",
          "subject": "social science", "grade": "grade1", "split": "val"},
    "6": {"question": "Unused?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None,
          "subject": "natural science", "grade": "grade3", "split": "test"},
}
SPLITS = {"train": ["1", "2", "3", "4"], "val": ["5"], "test": ["6"], "minival": ["5"]}
COLOURS = {"1": (10, 20, 200), "3": (200, 10, 10), "5": (10, 200, 10)}


def write_tree(root, problems=PROBLEMS, splits=SPLITS):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "problems.json"), "w") as f:
        json.dump(problems, f)
    with open(os.path.join(root, "pid_splits.json"), "w") as f:
        json.dump(splits, f)
    for pid, p in problems.items():
        if isinstance(p, dict) and p.get("image"):  # a damaged problem (tests/test_bad_input.py) gets none
            folder = os.path.join(root, "images", p["split"], pid)
            os.makedirs(folder, exist_ok=True)
            Image.new("RGB", (40, 30), COLOURS.get(pid, (128, 128, 128))).save(os.path.join(folder, "image.png"))
    return str(root)


@pytest.fixture
def sqa(tmp_path):
    return write_tree(tmp_path / "scienceqa")


def tiny_transform(img):  # PIL -> (3, 8, 8) in [0, 1], standing in for vit.preprocess
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32) / 255).permute(2, 0, 1)


def test_loader_prompts_and_targets(sqa):
    train = load_scienceqa(sqa, "train")
    assert [ex.id for ex in train] == ["1", "2", "3", "4"]
    ex = train[0]
    assert ex.prompt == ("Question: Which color is the sky?\nContext: Look at the picture.\n"
                         "Options: (A) green (B) blue\nResponse:")
    assert ex.target == " The answer is B." and ex.answer_prefix == " The answer is"
    assert ex.choices == [" A", " B"] and ex.answer == 1
    assert ex.image == os.path.join(sqa, "images", "train", "1", "image.png")
    assert train[1].prompt == ("Question: Which is a state?\nContext: N/A\n"
                               "Options: (A) Ohio (B) Paris (C) Rome\nResponse:")
    assert train[1].image is None and train[1].target == " The answer is C."
    assert train[3].prompt.endswith("Options: (A) 1 (B) 2 (C) 3 (D) 4 (E) 5\nResponse:")
    assert train[3].choices == [" A", " B", " C", " D", " E"]
    text = load_scienceqa(sqa, "train", answer="text")
    assert [ex.target for ex in text] == [" The answer is blue.", " The answer is Rome.", " The answer is hat.",
                                          " The answer is 4."]
    assert text[1].choices == [" Ohio", " Paris", " Rome"] and text[1].prompt == train[1].prompt
    # minival pids live in images/val (their problem's split), not images/minival
    assert load_scienceqa(sqa, "minival")[0].image == os.path.join(sqa, "images", "val", "5", "image.png")


def test_scorer_categories(sqa):
    train = load_scienceqa(sqa, "train")
    # answers 1, 2, 0, 3: pids 2 and 3 right, 1 and 4 wrong
    s = score(train, {"1": 0, "2": 2, "3": 0, "4": 1})
    assert s == {"NAT": 0.0, "SOC": 100.0, "LAN": 100.0, "TXT": 0.0, "IMG": 50.0, "NO": 100.0,
                 "G1-6": 50.0, "G7-12": 50.0, "Avg": 50.0}
    with pytest.warns(UserWarning, match="1 of 4 examples have no prediction"):
        s = score(train, {"1": 1, "2": 2, "4": 3})  # pid 3 missing: counted wrong
    assert s["Avg"] == 75.0 and s["LAN"] == 0.0
    only_two = score(train[1:2], {"2": 2})
    assert only_two["NAT"] is None and only_two["SOC"] == 100.0
    table = format_scores({"dehvf": s, "none": only_two})
    assert table.splitlines()[0].split() == ["NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg"]
    assert table.splitlines()[1].split()[-1] == "75.00" and table.splitlines()[2].split()[1] == "-"


# Every official category and both grade edges, answered right (R) or wrong (W); the expected table
# is worked out by hand from ScienceQA's tools/evaluate_acc.py: NAT/SOC/LAN by subject, TXT = has a
# hint, IMG = has an image, NO = neither, G1-6 = grade1..grade6, G7-12 = grade7..grade12.
#   pid subject  hint image grade  -> categories          answer
#   a   natural  yes  yes   1      NAT TXT IMG G1-6       R
#   b   natural  no   yes   6      NAT IMG G1-6           W  (image only: not NO; grade 6 is G1-6)
#   c   social   no   no    7      SOC NO G7-12           R  (grade 7 is G7-12)
#   d   social   yes  no    12     SOC TXT G7-12          W
#   e   language no   no    6      LAN NO G1-6            R
#   f   language yes  no    7      LAN TXT G7-12          W
#   g   natural  no   no    3      NAT NO G1-6            R
#   h   social   no   yes   9      SOC IMG G7-12          W  (predicted -1: an invalid generated answer)
#   i   language yes  yes   6      LAN TXT IMG G1-6       R
HAND = {"a": ("natural science", "A hint.", 1, True), "b": ("natural science", "", 6, False),
        "c": ("social science", "", 7, True), "d": ("social science", "A hint.", 12, False),
        "e": ("language science", "", 6, True), "f": ("language science", "A hint.", 7, False),
        "g": ("natural science", "", 3, True), "h": ("social science", "", 9, False),
        "i": ("language science", "A hint.", 6, True)}
WITH_IMAGE = {"a", "b", "h", "i"}
HAND_TABLE = {"NAT": 200 / 3, "SOC": 100 / 3, "LAN": 200 / 3, "TXT": 50.0, "IMG": 50.0, "NO": 100.0,
              "G1-6": 80.0, "G7-12": 25.0, "Avg": 500 / 9}


def test_scorer_against_a_table_worked_out_by_hand(tmp_path):
    problems = {pid: {"question": f"Q {pid}?", "choices": ["x", "y", "z"], "answer": 1, "hint": hint,
                      "image": "image.png" if pid in WITH_IMAGE else None, "subject": subject,
                      "grade": f"grade{grade}", "split": "test"}
                for pid, (subject, hint, grade, _) in HAND.items()}
    root = write_tree(tmp_path / "hand", problems, {"test": list(HAND)})
    examples = load_scienceqa(root, "test")
    predictions = {pid: 1 if right else (-1 if pid == "h" else 2) for pid, (*_, right) in HAND.items()}
    s = score(examples, predictions)
    assert s.keys() == HAND_TABLE.keys()
    for cat, expected in HAND_TABLE.items():
        assert s[cat] == pytest.approx(expected), cat


@pytest.mark.parametrize("text, n_choices, expected", [
    (" A", 4, 0), ("C", 3, 2), (" B.", 2, 1), ("(D)", 4, 3),
    (" E", 4, -1),        # a letter beyond the options: invalid
    (" The", 5, -1),      # the first capital is T: invalid, as MemVP's eval.py
    (" Answer", 2, 0),    # ... and here A, as MemVP's regex finds it
    (" b", 2, -1), ("", 2, -1), (" 2", 2, -1),
])
def test_parse_letter_as_memvp(text, n_choices, expected):
    assert parse_letter(text, n_choices) == expected


def test_caption_context_and_qcm_ale_target(sqa):
    with open(os.path.join(sqa, "captions.json"), "w") as f:
        json.dump({"captions": {"1": "A blue sky.", "2": "Ohio on a map."}}, f)
    plain = load_scienceqa(sqa, "train")
    captioned = load_scienceqa(sqa, "train", context="caption")
    assert captioned[0].prompt == ("Question: Which color is the sky?\nContext: Look at the picture. A blue sky.\n"
                                   "Options: (A) green (B) blue\nResponse:")
    assert "\nContext: Ohio on a map.\n" in captioned[1].prompt  # no hint: the caption alone
    assert captioned[2].prompt == plain[2].prompt and "\nContext: N/A\n" in captioned[2].prompt  # no caption
    some_right = {"1": 1, "2": 0, "3": 0, "4": 0}
    assert score(captioned, some_right) == score(plain, some_right)  # TXT is still "has a hint"
    problems = {**PROBLEMS, "2": {**PROBLEMS["2"], "lecture": "States are\nparts.", "solution": "Rome  is a city."}}
    ale = load_scienceqa(write_tree(sqa, problems), "train", target="qcm-ale")
    assert ale[1].target == " The answer is C. BECAUSE: States are\\nparts. Rome is a city."
    assert ale[0].target == " The answer is B. BECAUSE:"  # no lecture, no solution: as LaVIN writes it
    assert ale[1].choices == plain[1].choices and ale[1].prompt == plain[1].prompt
    os.remove(os.path.join(sqa, "captions.json"))
    with pytest.raises(DataError, match=r"--context caption needs .*captions.json: download https://"):
        load_scienceqa(sqa, "train", context="caption")


def test_collated_targets_decode_to_the_answer(sqa):
    enc = get_encoding()
    for answer in ("letter", "text"):
        examples = load_scienceqa(sqa, "train", answer=answer) + load_scienceqa(sqa, "val", answer=answer)
        b = collate(examples, enc, tiny_transform, block_size=256)
        for i, ex in enumerate(examples):
            kept = b["targets"][i][b["targets"][i] != -100].tolist()
            assert kept[-1] == EOT and enc.decode(kept[:-1]) == ex.target  # exactly " The answer is X."
            assert enc.decode(b["idx"][i][b["prompt_mask"][i]].tolist()) == ex.prompt
        assert b["has_image"].tolist() == [True, False, True, False, True]
        assert b["images"][1].abs().sum() == 0 and b["images"][3].abs().sum() == 0
        assert torch.allclose(b["images"][0][:, 0, 0], torch.tensor([10, 20, 200]) / 255)


def test_bad_input_names_the_pid_and_file(sqa, tmp_path):
    problems_file = os.path.join(sqa, "problems.json")
    # a corrupt image is found when the batch is built
    with open(os.path.join(sqa, "images", "train", "3", "image.png"), "wb") as f:
        f.write(b"not a png at all")
    examples = load_scienceqa(sqa, "train")
    with pytest.raises(DataError, match=r"example 3: cannot read image .*images/train/3/image.png"):
        collate(examples, get_encoding(), tiny_transform, 256)
    # a missing image is found when loading; non-strict loading skips it and says so
    os.remove(os.path.join(sqa, "images", "train", "1", "image.png"))
    with pytest.raises(DataError, match=r"problem 1: image file .*images/train/1/image.png is missing"):
        load_scienceqa(sqa, "train")
    with pytest.warns(UserWarning, match=r"skipped 1 of 4 problems \(1 missing image\)"):
        assert [ex.id for ex in load_scienceqa(sqa, "train", strict=False)] == ["2", "3", "4"]
    # answer index out of range, and a pid with no problem
    bad = write_tree(tmp_path / "bad", {**PROBLEMS, "2": {**PROBLEMS["2"], "answer": 3}},
                     {**SPLITS, "val": ["5", "77"]})
    with pytest.raises(DataError, match=r"problem 2 in .*problems.json: answer index 3 is out of range for 3 choices"):
        load_scienceqa(bad, "train")
    with pytest.raises(DataError, match=r"pid 77 is listed in .*pid_splits.json under 'val' but has no problem"):
        load_scienceqa(bad, "val")
    with pytest.warns(UserWarning, match=r"skipped 1 of 2 problems \(1 no problem\)"):
        assert len(load_scienceqa(bad, "val", strict=False)) == 1
    # malformed problems.json, a missing field, an unknown split
    with open(problems_file, "w") as f:
        f.write('{"1": {"question": ')
    with pytest.raises(DataError, match=r"problems.json is not valid JSON"):
        load_scienceqa(sqa, "train")
    write_tree(sqa, {**PROBLEMS, "4": {k: v for k, v in PROBLEMS["4"].items() if k != "choices"}})
    with pytest.raises(DataError, match=r"problem 4 in .*problems.json has no 'choices'"):
        load_scienceqa(sqa, "train")
    with pytest.raises(DataError, match=r"no split 'dev' \(it has: train, val, test, minival\)"):
        load_scienceqa(sqa, "dev")


def test_missing_dir_says_how_to_download(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"python -m data.scienceqa --download --data_dir .*nowhere.*--data_dir"):
        load_scienceqa(missing)
    with pytest.raises(SystemExit) as e:
        main(["--data_dir", missing])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ScienceQA not found") and err.count("\n") == 1
