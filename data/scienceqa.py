"""ScienceQA (Lu et al., NeurIPS 2022) in its official layout, the QCM-A prompt
and the official accuracy categories.

    root/problems.json             {pid: {question, choices, answer, hint, image, subject, grade, split, ...}}
    root/pid_splits.json           {"train": [pid, ...], "val": [...], "test": [...], "minival": ...}
    root/images/{split}/{pid}/image.png
    root/captions.json             {"captions": {pid: caption}}  (only for context="caption")

`load_scienceqa` turns one split into `Example`s (data/batch.py) with MemVP's
QCM-A prompt (DESIGN.md section 5)

    Question: {question}\\nContext: {hint or N/A}\\nOptions: (A) {c0} (B) {c1}\\nResponse:

and the target " The answer is A." (answer="letter", the published baselines'
format) or " The answer is {choice text}." (answer="text"; shapes' problems
bring their own prefix for text answers, "answer_prefix"). context="caption"
adds the image's caption after the hint, as MemVP's and LaVIN's eval.py do;
target="qcm-ale" appends " BECAUSE: {lecture} {solution}", LaVIN's QCM-ALE.

`score` reports the categories of the official evaluation (ScienceQA's
tools/evaluate_acc.py) and `parse_letter` reads a generated answer as MemVP's
eval.py does. The synthetic
set in shapes.py is written in this same layout and read here.

    python -m data.scienceqa --download [--data_dir DIR]     # fetch, unpack, verify
"""
import os
import re
import string
import warnings
from collections import Counter

from data.batch import DataError, Example, check_dir, read_json
from data.download import fetch, unzip, main as download_main

DEFAULT_ROOT = "data/raw/scienceqa"
URLS = {
    "problems.json": "https://raw.githubusercontent.com/lupantech/ScienceQA/main/data/scienceqa/problems.json",
    "pid_splits.json": "https://raw.githubusercontent.com/lupantech/ScienceQA/main/data/scienceqa/pid_splits.json",
    "train.zip": "https://scienceqa.s3.us-west-1.amazonaws.com/images/train.zip",
    "val.zip": "https://scienceqa.s3.us-west-1.amazonaws.com/images/val.zip",
    "test.zip": "https://scienceqa.s3.us-west-1.amazonaws.com/images/test.zip",
}
CAPTIONS_URL = "https://raw.githubusercontent.com/lupantech/ScienceQA/main/data/captions.json"
SIZES = {"train": 12726, "val": 4241, "test": 4241}  # problems per split in the official release
ANSWER_PREFIX = " The answer is"
CATEGORIES = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")


def build_prompt(question, hint, choices, caption=""):
    """MemVP's QCM input, ending in "Response:" (no trailing space: the target starts with one).
    The context is the hint, then the caption if one is given, as MemVP's get_context_text."""
    context = " ".join([hint or "", caption or ""]).strip() or "N/A"
    options = " ".join(f"({letter}) {c}" for letter, c in zip(string.ascii_uppercase, choices))
    prompt = f"Question: {question}\nContext: {context}\nOptions: {options}\nResponse:"
    return prompt.replace("  ", " ").strip()  # as MemVP/LaVIN do


def _problem_error(pid, p, root, split, problems_file):
    """(kind, message) saying why problem p cannot be used, or None if it is fine."""
    if not isinstance(p, dict):
        return "malformed problem", f"problem {pid} in {problems_file} is not an object"
    for key in ("question", "choices", "answer"):
        if key not in p:
            return "malformed problem", f"problem {pid} in {problems_file} has no '{key}'"
    if not isinstance(p["question"], str) or not p["question"].strip():
        return "malformed problem", f"problem {pid} in {problems_file}: 'question' must be a non-empty string, " \
                                    f"got {p['question']!r:.80}"
    for key in ("hint", "image", "split"):  # optional; text when present (a hint or image may be null)
        if key in p and not isinstance(p[key], str) and (p[key] is not None or key == "split"):
            return "malformed problem", f"problem {pid} in {problems_file}: '{key}' must be a string, got {p[key]!r:.80}"
    choices = p["choices"]
    if not isinstance(choices, list) or not 2 <= len(choices) <= 26 or not all(isinstance(c, str) for c in choices):
        return "malformed problem", (f"problem {pid} in {problems_file}: 'choices' must be 2 to 26 strings, "
                                     f"got {choices!r}")
    if type(p["answer"]) is not int or not 0 <= p["answer"] < len(choices):
        return "answer out of range", (f"problem {pid} in {problems_file}: answer index {p['answer']!r} "
                                       f"is out of range for {len(choices)} choices")
    if p.get("image") and not os.path.isfile(_image_path(root, pid, p, split)):
        return "missing image", f"problem {pid}: image file {_image_path(root, pid, p, split)} is missing"
    return None


def _image_path(root, pid, p, split):
    # images sit under the problem's own split (minival/trainval pids live in images/val, images/train)
    return os.path.join(root, "images", p.get("split", split), pid, p["image"])


def load_scienceqa(root=DEFAULT_ROOT, split="train", answer="letter", strict=True, context="hint",
                   target="qcm-a") -> list[Example]:
    """One split as Examples. strict: stop at the first bad problem with a DataError
    naming it; otherwise skip bad problems with one warning saying how many and why.
    context: "hint", or "caption" (hint + root/captions.json's caption); target: "qcm-a" or "qcm-ale"."""
    if answer not in ("letter", "text") or context not in ("hint", "caption") or target not in ("qcm-a", "qcm-ale"):
        raise ValueError(f"bad answer/context/target: {answer!r}, {context!r}, {target!r}")
    check_dir(root, "ScienceQA", f"python -m data.scienceqa --download --data_dir {root}")
    captions = _captions(root) if context == "caption" else {}
    problems_file, splits_file = os.path.join(root, "problems.json"), os.path.join(root, "pid_splits.json")
    problems, splits = read_json(problems_file), read_json(splits_file)
    if not isinstance(problems, dict) or not isinstance(splits, dict):
        raise DataError(f"{problems_file} and {splits_file} must each hold a JSON object")
    if split not in splits:
        raise DataError(f"{splits_file} has no split '{split}' (it has: {', '.join(splits)})")
    if not isinstance(splits[split], list) or not splits[split]:
        raise DataError(f"{splits_file}: split '{split}' must be a non-empty list of pids, "
                        f"got {str(splits[split])[:80]}")
    examples, skipped = [], []
    for pid in splits[split]:
        pid = str(pid)
        if pid not in problems:
            error = "no problem", (f"pid {pid} is listed in {splits_file} under '{split}' "
                                   f"but has no problem in {problems_file}")
        else:
            error = _problem_error(pid, problems[pid], root, split, problems_file)
        if error and strict:
            raise DataError(error[1])
        if error:
            skipped.append(error)
            continue
        examples.append(_example(pid, problems[pid], root, split, answer, captions.get(pid, ""), target))
    if skipped:
        kinds = ", ".join(f"{n} {kind}" for kind, n in Counter(kind for kind, _ in skipped).items())
        warnings.warn(f"ScienceQA {split}: skipped {len(skipped)} of {len(splits[split])} problems ({kinds}); "
                      f"first: {skipped[0][1]}")
    return examples


def _captions(root):
    """{pid: caption} from root/captions.json, the file MemVP and LaVIN read for context="caption"."""
    path = os.path.join(root, "captions.json")
    if not os.path.isfile(path):
        raise DataError(f"--context caption needs {path}: download {CAPTIONS_URL} to it")
    captions = read_json(path)
    if not isinstance(captions, dict) or not isinstance(captions.get("captions"), dict):
        raise DataError(f'{path} must hold {{"captions": {{pid: caption}}}}, as the official file does')
    return captions["captions"]


def build_target(letter_or_text, lecture="", solution="", target="qcm-a", prefix=ANSWER_PREFIX):
    """The target: prefix + ' A.' (QCM-A; prefix ' The answer is', or the one shapes' text answers
    bring), or LaVIN's QCM-ALE output with a leading space,
    ' The answer is A. BECAUSE: {lecture} {solution}': newlines written as \\n, double spaces
    replaced once, stripped, as LaVIN's create_training_example (so with neither text it ends
    in "BECAUSE:", as LaVIN's does: its line meant to drop that assigns to an unused name)."""
    if target == "qcm-a":
        return f"{prefix} {letter_or_text}."
    lecture, solution = (lecture or "").replace("\n", "\\n"), (solution or "").replace("\n", "\\n")
    return " " + f"The answer is {letter_or_text}. BECAUSE: {lecture} {solution}".replace("  ", " ").strip()


def _example(pid, p, root, split, answer, caption="", target="qcm-a"):
    choices, hint = p["choices"], p.get("hint") or ""
    letters = string.ascii_uppercase[:len(choices)]
    shown = letters if answer == "letter" else choices
    has_image = bool(p.get("image"))
    prefix = (answer == "text" and p.get("answer_prefix")) or ANSWER_PREFIX  # shapes' own ("The circle is")
    return Example(
        id=pid,
        prompt=build_prompt(p["question"], hint, choices, caption),
        target=build_target(shown[p["answer"]], p.get("lecture"), p.get("solution"), target, prefix),
        image=_image_path(root, pid, p, split) if has_image else None,
        answer_prefix=prefix,
        choices=[f" {c}" for c in shown],
        answer=p["answer"],
        meta={"subject": p.get("subject", ""), "grade": p.get("grade", ""), "hint": hint,
              "has_image": has_image, "qtype": p.get("qtype"), "split": p.get("split", split),
              "scene": p.get("scene")},  # qtype and scene: shapes' own fields
    )


def _categories(ex):
    """The official categories of one problem (ScienceQA tools/evaluate_acc.py)."""
    m = ex.meta
    cats = {"natural science": ["NAT"], "social science": ["SOC"], "language science": ["LAN"]}.get(m["subject"], [])
    if m["hint"]:
        cats.append("TXT")  # has text context
    if m["has_image"]:
        cats.append("IMG")
    if not m["hint"] and not m["has_image"]:
        cats.append("NO")  # no context at all
    grade = m["grade"]
    if grade in [f"grade{g}" for g in range(1, 7)]:
        cats.append("G1-6")
    if grade in [f"grade{g}" for g in range(7, 13)]:
        cats.append("G7-12")
    return cats + ["Avg"]


def score(examples, predictions) -> dict:
    """predictions {id: choice index} -> {category: accuracy in percent, or None
    when no example falls in it}. A missing prediction counts as wrong (with a warning)."""
    if not examples:
        raise DataError("nothing to score: no examples")
    missing = [ex.id for ex in examples if ex.id not in predictions]
    if missing:
        warnings.warn(f"{len(missing)} of {len(examples)} examples have no prediction (counted wrong), "
                      f"e.g. {missing[0]}")
    right, total = Counter(), Counter()
    for ex in examples:
        ok = predictions.get(ex.id) == ex.answer
        for cat in _categories(ex):
            total[cat] += 1
            right[cat] += ok
    return {c: 100.0 * right[c] / total[c] if total[c] else None for c in CATEGORIES}


def parse_letter(text, n_choices) -> int:
    """A generated answer as MemVP's eval.py reads it: the first capital letter in the text,
    as an option index if it is one of the n_choices letters, else -1 (invalid, counted wrong)."""
    found = re.search(r"[A-Z]", text)
    letter = found.group() if found else ""
    return string.ascii_uppercase.index(letter) if letter and letter in string.ascii_uppercase[:n_choices] else -1


def format_scores(rows) -> str:
    """{name: score(...) result} -> a plain-text table, one row per name."""
    width = max([len(name) for name in rows] + [4])
    lines = [" " * width + "".join(f"{c:>8}" for c in CATEGORIES)]
    for name, s in rows.items():
        cells = [f"{s[c]:8.2f}" if s[c] is not None else f"{'-':>8}" for c in CATEGORIES]
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(lines)


def download(root=DEFAULT_ROOT, keep_zips=False):
    """Fetch problems.json, pid_splits.json and the three image archives into root, then verify."""
    images = os.path.join(root, "images")
    files = {name: os.path.join(root, name) for name in ("problems.json", "pid_splits.json")}
    files |= {f"{split}.zip": os.path.join(images, f"{split}.zip") for split in SIZES}
    everything = [(URLS[name], path) for name, path in files.items()]
    for name in ("problems.json", "pid_splits.json"):
        fetch(URLS[name], files[name], everything)
    for split in SIZES:
        if not os.path.isdir(os.path.join(images, split)):
            unzip(fetch(URLS[f"{split}.zip"], files[f"{split}.zip"], everything), images, split)
            if not keep_zips:
                os.remove(files[f"{split}.zip"])
    verify(root)


def verify(root=DEFAULT_ROOT):
    """Every official split loads (all images present) with the official sizes."""
    for split, size in SIZES.items():
        n = len(load_scienceqa(root, split))
        if n != size:
            raise DataError(f"ScienceQA {split} has {n} problems in {root}, the official release has {size}")
        print(f"ScienceQA {split}: {n} problems, all images present")


def main(argv=None):
    download_main(argv, "ScienceQA: download and verify, or print a split's sizes", DEFAULT_ROOT, download, verify)


if __name__ == "__main__":
    main()
