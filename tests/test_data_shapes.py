"""data/shapes.py: determinism, answers re-derived from the scene records, balance,
and that the ScienceQA and COCO loaders read what it writes."""
import filecmp
import json
import os
import re
from collections import Counter

import pytest
from PIL import Image

from data.batch import DataError
from data.coco import load_coco
from data.scienceqa import load_scienceqa, score
from data.shapes import BACKGROUNDS, BG_JITTER, COLOURS, SHAPES, answer_prefix, ensure_shapes, generate


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes") / "set")
    generate(root, n_train=600, n_val=100, seed=3, progress=False)
    with open(os.path.join(root, "problems.json")) as f:
        return root, json.load(f)


def test_same_seed_same_bytes(shapes, tmp_path):
    root, _ = shapes
    again, other = str(tmp_path / "again"), str(tmp_path / "other")
    generate(again, n_train=600, n_val=100, seed=3, progress=False)
    generate(other, n_train=600, n_val=100, seed=4, progress=False)
    for name in ("problems.json", "pid_splits.json", "dataset_coco.json"):
        assert filecmp.cmp(os.path.join(root, name), os.path.join(again, name), shallow=False)
    images = [os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs if f.endswith(".png")]
    assert len(images) > 400
    assert all(filecmp.cmp(os.path.join(root, p), os.path.join(again, p), shallow=False) for p in images)
    assert not filecmp.cmp(os.path.join(root, "problems.json"), os.path.join(other, "problems.json"), shallow=False)


# relation -> (the grid coordinate it compares, its sign)
AXIS = {"left of": ("col", -1), "right of": ("col", 1), "above": ("row", -1), "below": ("row", 1)}
POSITION_QUESTION = re.compile(r"Which shape is (left of|right of|above|below) the (\w+) (\w+)\?")


def rederive(p):
    """The answer text of an image question, worked out from the scene record alone."""
    objs, q = p["scene"]["objects"], p["question"]
    if m := re.fullmatch(r"What colour is the (\w+)\?", q):
        (o,) = [o for o in objs if o["shape"] == m[1]]  # exactly one: the question must be unambiguous
        return o["colour"]
    if m := re.fullmatch(r"Which shape is (\w+)\?", q):
        (o,) = [o for o in objs if o["colour"] == m[1]]
        return o["shape"]
    if q == "How many shapes are there?":
        return str(len(objs))
    m = POSITION_QUESTION.fullmatch(q)
    (ref,) = [o for o in objs if (o["colour"], o["shape"]) == (m[2], m[3])]
    key, sign = AXIS[m[1]]
    (o,) = [o for o in objs if o is not ref and (o[key] - ref[key]) * sign > 0]
    return o["shape"]


def test_every_answer_follows_from_the_scene_or_the_text(shapes):
    root, problems = shapes
    seen = Counter()
    for pid, p in problems.items():
        seen[p["qtype"]] += 1
        assert 2 <= len(p["choices"]) <= 5 and len(set(p["choices"])) == len(p["choices"])
        answer = p["choices"][p["answer"]]
        if p["qtype"] == "text":
            assert p["image"] is None and p["scene"] is None
            source = p["hint"] or p["question"]  # the hint (TXT) or the question itself (NO) states the fact
            found = [c for c in p["choices"] if re.search(rf"\b{c}\b", source)]
            assert found == [answer], (pid, source, p["choices"])
        else:
            assert p["image"] == "image.png" and rederive(p) == answer, pid
    assert min(seen.values()) == max(seen.values()) and len(seen) == 5  # each type equally often


def test_a_position_answer_is_the_object_furthest_that_way(shapes):
    """Exactly one object left of the reference means it is the leftmost object, alone in its
    column: a position question never needs its reference object (README, "Results on shapes")."""
    _, problems = shapes
    asked = Counter()
    for p in problems.values():
        if p["qtype"] != "position":
            continue
        relation = POSITION_QUESTION.fullmatch(p["question"])[1]
        key, sign = AXIS[relation]
        objs = p["scene"]["objects"]
        furthest = max(o[key] * sign for o in objs)
        (o,) = [o for o in objs if o[key] * sign == furthest]
        assert o["shape"] == p["choices"][p["answer"]]
        asked[relation] += 1
    assert len(asked) == 4 and sum(asked.values()) >= 100


def test_images_match_their_scenes(shapes):
    root, problems = shapes
    far = min(sum((a - b) ** 2 for a, b in zip(c, bg)) ** 0.5 for c in COLOURS.values() for bg in BACKGROUNDS.values())
    assert far - BG_JITTER * 3 ** 0.5 > 80  # backgrounds stay clearly apart from every object colour
    for pid in [k for k, p in problems.items() if p["image"]][:150]:
        p = problems[pid]
        img = Image.open(os.path.join(root, "images", p["split"], pid, "image.png"))
        assert img.size == (224, 224) and img.mode == "RGB"
        scene, cell = p["scene"], 224 / p["scene"]["grid"]
        assert 1 <= len(scene["objects"]) <= (5 if p["qtype"] == "count" else 4)
        cells = {(o["row"], o["col"]) for o in scene["objects"]}
        assert len(cells) == len(scene["objects"])  # one object per cell
        (r, c) = next((r, c) for r in range(4) for c in range(4) if (r, c) not in cells)
        assert img.getpixel((int((c + 0.5) * cell), int((r + 0.5) * cell))) == tuple(scene["background_rgb"])
        for o in scene["objects"]:
            x0, y0, x1, y1 = o["box"]
            assert o["col"] * cell <= x0 < x1 <= (o["col"] + 1) * cell
            assert o["row"] * cell <= y0 < y1 <= (o["row"] + 1) * cell
            assert img.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == COLOURS[o["colour"]]
            assert o["shape"] in SHAPES


def test_every_count_option_can_be_right(shapes):
    # with 1-4 objects a count option "5" would never be right: a prior a text-only model can learn
    _, problems = shapes
    answers = Counter(p["choices"][p["answer"]] for p in problems.values() if p["qtype"] == "count")
    assert set(answers) == {"1", "2", "3", "4", "5"} and min(answers.values()) > 10, answers


def test_answer_positions_balanced(shapes):
    _, problems = shapes
    train = [p for p in problems.values() if p["split"] == "train"]
    for k in range(2, 6):
        positions = Counter(p["answer"] for p in train if len(p["choices"]) == k)
        n = sum(positions.values())
        assert n > 50 and set(positions) == set(range(k))
        assert all(abs(positions[i] / n - 1 / k) <= 0.05 for i in range(k)), (k, positions)


def test_loaders_read_it_and_every_category_exists(shapes):
    root, problems = shapes
    train = load_scienceqa(root, "train", answer="text")
    val, test = load_scienceqa(root, "val"), load_scienceqa(root, "test")
    assert (len(train), len(val), len(test)) == (600, 100, 100)
    s = score(train, {ex.id: ex.answer for ex in train})
    assert all(v == 100.0 for v in s.values())  # no category is empty (None)
    assert {ex.meta["qtype"] for ex in train} == {"colour", "shape", "count", "position", "text"}
    caps = load_coco(root, "val")
    val_pids = json.load(open(os.path.join(root, "pid_splits.json")))["val"]
    image_pids = [pid for pid in val_pids if problems[pid]["image"]]
    assert [ex.id for ex in caps] == image_pids
    objs = problems[caps[0].id]["scene"]["objects"]
    for o in objs:  # every object is named in the first reference
        assert f"{o['colour']} {o['shape']}" in caps[0].references[0]
    assert caps[0].target == " " + caps[0].references[0] and caps[0].prompt == "A picture of"


def test_text_answers_restate_the_key_just_before_the_answer(shapes):
    root, problems = shapes
    restated = Counter()
    for ex in load_scienceqa(root, "train", answer="text"):
        p, answer = problems[ex.id], ex.choices[ex.answer]
        assert ex.target == f"{ex.answer_prefix}{answer}." and ex.answer_prefix == answer_prefix(p["question"])
        if p["qtype"] in ("colour", "shape", "position"):
            named = {word for o in p["scene"]["objects"] for word in (o["shape"], o["colour"])}
            assert set(ex.answer_prefix.split()) & named  # the object the question names is named again
            restated[p["qtype"]] += 1
        else:
            assert ex.answer_prefix == " The answer is"
    assert set(restated) == {"colour", "shape", "position"}
    assert answer_prefix("What colour is the star?") == " The star is"
    assert answer_prefix("Which shape is red?") == " It is the red"
    assert answer_prefix("Which shape is left of the red star?") == " The shape left of the red star is the"
    assert answer_prefix("What colour is the big star?") == " The answer is"  # not a shapes question
    # letter answers keep the published format, whatever the dataset
    assert all(ex.answer_prefix == " The answer is" for ex in load_scienceqa(root, "train", answer="letter"))


def test_ensure_shapes_regenerates_only_when_needed(tmp_path):
    root = str(tmp_path / "shapes")
    ensure_shapes(root, n_train=10, n_val=5, seed=0)
    stamp = os.path.getmtime(os.path.join(root, "problems.json"))
    ensure_shapes(root, n_train=10, n_val=5, seed=0)  # same parameters: untouched
    assert os.path.getmtime(os.path.join(root, "problems.json")) == stamp
    ensure_shapes(root, n_train=12, n_val=5, seed=0)  # different: regenerated
    assert len(json.load(open(os.path.join(root, "pid_splits.json")))["train"]) == 12
    assert not [d for d in os.listdir(tmp_path) if ".tmp" in d]
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a shapes dataset"):
        ensure_shapes(str(other), n_train=10, n_val=5)
    assert (other / "notes.txt").read_text() == "keep me"


def test_a_set_made_meanwhile_by_another_run_is_kept(tmp_path):
    """Two runs started together both generate; the second to finish must not replace (and so
    briefly delete) the identical set the first is already reading."""
    from data.shapes import _install
    root = str(tmp_path / "shapes")
    ensure_shapes(root, n_train=10, n_val=5, seed=0)  # the first run's set
    stamp = os.path.getmtime(os.path.join(root, "problems.json"))
    params = json.load(open(os.path.join(root, "params.json")))
    tmp = str(tmp_path / "shapes.tmp2")  # the second run's copy, made the same way
    generate(tmp, 10, 5, 5, 0, progress=False)
    json.dump(params, open(os.path.join(tmp, "params.json"), "w"))
    _install(tmp, root, params)
    assert os.path.getmtime(os.path.join(root, "problems.json")) == stamp and not os.path.exists(tmp)
    generate(tmp, 10, 5, 5, 0, progress=False)  # made with other parameters: it does replace the set
    _install(tmp, root, {**params, "n_train": 11})
    assert os.path.getmtime(os.path.join(root, "problems.json")) != stamp and not os.path.exists(tmp)


def test_captions_train_beside_the_questions_and_are_checked_against_the_scene(shapes):
    """The default run's caption examples (one image in four) and the check that a generated
    caption names an object of the scene: every reference passes, a wrong colour does not."""
    from data.shapes import caption_examples, names_an_object
    root, problems = shapes
    questions = load_scienceqa(root, "train", "text")
    captions = caption_examples(root, "train")
    n_images = sum(p["image"] is not None for p in problems.values() if p["split"] == "train")
    assert len(captions) == (n_images + 3) // 4
    assert not {ex.id for ex in captions} & {ex.id for ex in questions}  # predictions keyed apart
    for ex in captions:
        scene = problems[ex.meta["pid"]]["scene"]
        assert ex.prompt == "A picture of" and ex.image.endswith(f"/{ex.meta['pid']}/image.png")
        assert all(names_an_object(ref, scene) for ref in ex.references)
        o = scene["objects"][0]
        others = [c for c in COLOURS if all((c, o["shape"]) != (p["colour"], p["shape"]) for p in scene["objects"])]
        assert not names_an_object(f"a {others[0]} {o['shape']} on a white background", scene)


def test_type_scores_and_the_binding_subset(shapes):
    from data.shapes import binding, type_scores
    root, _ = shapes
    examples = [ex for ex in load_scienceqa(root, "val", "text")]
    for ex in examples:  # binding: more than one option is in the scene, worked out by hand here
        if ex.meta["qtype"] in ("colour", "shape", "position"):
            key = "colour" if ex.meta["qtype"] == "colour" else "shape"
            present = {o[key] for o in ex.meta["scene"]["objects"]}
            assert binding(ex) == (len([c for c in ex.choices if c.strip() in present]) > 1)
        else:
            assert not binding(ex)
    assert any(binding(ex) for ex in examples) and not all(binding(ex) for ex in examples)
    # right on every colour question, wrong on everything else
    predictions = {ex.id: ex.answer if ex.meta["qtype"] == "colour" else (ex.answer + 1) % len(ex.choices)
                   for ex in examples}
    scores = type_scores(examples, predictions)
    assert scores["colour"] == 100.0 and scores["shape"] == scores["count"] == scores["text"] == 0.0
    bound = [ex for ex in examples if binding(ex)]
    assert scores["binding"] == pytest.approx(100.0 * sum(ex.meta["qtype"] == "colour" for ex in bound) / len(bound))
