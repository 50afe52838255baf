"""Shapes: a deterministic synthetic dataset in ScienceQA's layout, so train.py
runs offline, learns in minutes on a CPU, and shows the `none` ablation (image
ignored) failing where the fused modes succeed (DESIGN.md section 5).

Each image is 224x224 with 1-4 solid shapes (1-5 for count questions, so that
every count option, 1 to 5, can be right) on a plain background. The image
is cut into a grid (default 4x4 cells of 56 px); every object lies inside its
own cell, with its size and position jittered, so a tiny ViT whose patches
match the cells sees one object per patch. Question types:

    colour    "What colour is the circle?"           (the named shape is unique in the image)
    shape     "Which shape is blue?"                 (the named colour is unique)
    count     "How many shapes are there?"
    position  "Which shape is left of the red square?"
    text      no image; the fact is in the hint (ScienceQA's TXT) or in the
              question itself (NO context)

The answer restates the question's key just before the answer word:
" The circle is red.", " It is the blue square.", " The shape left of the red
square is the star." (count and text: " The answer is 3."). A tiny decoder
finds the object a question names when that name sits right before the word
to produce, far less often when it sits back in the question (README,
"Results on shapes"). Each problem stores its prefix as "answer_prefix", and
the loader scores the options after it.

Position: A is left of B when A's grid column is smaller than B's, right of when
larger, above when A's grid row is smaller, below when larger. Since objects
stay inside their cells these relations hold for the whole shapes, and a
position question is only asked about a reference object unique by colour and
shape for which exactly one other object satisfies the relation, so the answer
is unique and computable from the scene record stored with every problem. That
one object is then the furthest that way in the whole scene (for "left of": the
leftmost, alone in its column), so the answer never depends on the reference:
position asks which object is furthest left, right, up or down.

Every question has 2-5 options; the answer's position is drawn from a shuffled
bag per number of options, so positions are balanced to within one question.
`dataset_coco.json` in the same folder is a Karpathy-layout caption file for
the same images (data/coco.py reads it). Same seed and sizes -> byte-identical
files.

    python -m data.shapes --n_train 16000 --n_val 400 --out data/raw/shapes
"""
import argparse
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import replace

from PIL import Image, ImageDraw
from tqdm import tqdm

from data.batch import DataError, read_json

VERSION = 3  # bump when the generator changes, so ensure_shapes regenerates old copies
N_TRAIN, N_VAL = 16000, 400  # default sizes (train.py uses them too); test has N_VAL problems
SIZE = 224
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 230),
           "yellow": (240, 210, 40), "purple": (150, 60, 190), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
BACKGROUNDS = {"black": (20, 20, 20), "dark gray": (70, 70, 70), "light gray": (190, 190, 190),
               "white": (245, 245, 245), "beige": (230, 220, 195)}  # unsaturated, far from every object colour
BG_JITTER = 8  # each background channel moves by up to this much, per image
QTYPES = ("colour", "shape", "count", "position", "text")
RELATIONS = {"left of": (1, -1), "right of": (1, 1), "above": (0, -1), "below": (0, 1)}  # (row=0/col=1, sign)
NUMBERS = ("one", "two", "three", "four", "five")
# subject, grades, topic, category per question type, in the way ScienceQA fills them
META = {"colour": ("natural science", (1, 2), "colors", "Identify colors"),
        "shape": ("natural science", (2, 3), "shapes", "Identify shapes"),
        "count": ("natural science", (1, 3), "counting", "Count objects"),
        "position": ("social science", (7, 8), "geography", "Read a map: relative position"),
        "text": ("language science", (4, 9), "reading-comprehension", "Find facts in a text")}


# ----------------------------------------------------------------------------- scenes and drawing

def make_scene(rng, grid=4, most=4):
    """1 to `most` objects in distinct grid cells, each jittered inside its cell."""
    cell = SIZE / grid
    objects = []
    for c in rng.sample(range(grid * grid), rng.randint(1, most)):
        row, col = divmod(c, grid)
        size = int(cell * rng.uniform(0.5, 0.8))  # bounding-box side in px
        slack = int(cell) - size - 2
        x0, y0 = int(col * cell) + 1 + rng.randint(0, slack), int(row * cell) + 1 + rng.randint(0, slack)
        objects.append({"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)),
                        "row": row, "col": col, "box": [x0, y0, x0 + size, y0 + size]})
    bg = rng.choice(list(BACKGROUNDS))
    rgb = [min(255, max(0, v + rng.randint(-BG_JITTER, BG_JITTER))) for v in BACKGROUNDS[bg]]
    return {"grid": grid, "background": bg, "background_rgb": rgb, "objects": objects}


def draw(scene):
    img = Image.new("RGB", (SIZE, SIZE), tuple(scene["background_rgb"]))
    d = ImageDraw.Draw(img)
    for o in scene["objects"]:
        x0, y0, x1, y1 = o["box"]
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        fill = COLOURS[o["colour"]]
        if o["shape"] == "circle":
            d.ellipse(o["box"], fill=fill)
        elif o["shape"] == "square":
            d.rectangle([x0 + r * 0.15, y0 + r * 0.15, x1 - r * 0.15, y1 - r * 0.15], fill=fill)
        elif o["shape"] == "triangle":
            d.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
        elif o["shape"] == "diamond":
            d.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
        else:  # star: 5 points at radius r, inner corners at 0.45 r
            radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
            angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
            d.polygon([(cx + q * math.cos(a), cy + q * math.sin(a)) for q, a in zip(radii, angles)], fill=fill)
    return img


def related(scene, ref, relation):
    """Objects standing in `relation` to ref (see the module docstring)."""
    axis, sign = RELATIONS[relation]
    key = ("row", "col")[axis]
    return [o for o in scene["objects"] if o is not ref and (o[key] - ref[key]) * sign > 0]


# ----------------------------------------------------------------------------- questions

def _ask(rng, qtype, scene):
    """(question, hint, answer text, option pool) for this scene, or None if it cannot ask qtype."""
    objs = scene["objects"]
    if qtype == "colour":
        unique = [o for o in objs if sum(p["shape"] == o["shape"] for p in objs) == 1]
        if unique:
            o = rng.choice(unique)
            return f"What colour is the {o['shape']}?", "", o["colour"], list(COLOURS)
    elif qtype == "shape":
        unique = [o for o in objs if sum(p["colour"] == o["colour"] for p in objs) == 1]
        if unique:
            o = rng.choice(unique)
            return f"Which shape is {o['colour']}?", "", o["shape"], list(SHAPES)
    elif qtype == "count":
        return "How many shapes are there?", "", str(len(objs)), ["1", "2", "3", "4", "5"]
    elif qtype == "position":
        asks = [(ref, rel) for ref in objs for rel in RELATIONS
                if sum((p["colour"], p["shape"]) == (ref["colour"], ref["shape"]) for p in objs) == 1
                and len(related(scene, ref, rel)) == 1]
        if asks:
            ref, rel = rng.choice(asks)
            answer = related(scene, ref, rel)[0]["shape"]
            return f"Which shape is {rel} the {ref['colour']} {ref['shape']}?", "", answer, list(SHAPES)
    return None


def answer_prefix(question):
    """What the answer to a shapes question starts with: its key restated, so the answer word follows
    it ("What colour is the circle?" -> " The circle is"); " The answer is" for any other question."""
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        return f" The {m[1]} is"
    if m := re.fullmatch(r"Which shape is (\w+)\?", question):
        return f" It is the {m[1]}"
    if m := re.fullmatch(r"Which shape is ((?:left|right) of|above|below) the (\w+) (\w+)\?", question):
        return f" The shape {m[1]} the {m[2]} {m[3]} is the"
    return " The answer is"


def _ask_text(rng, inline):
    """A question answered by a stated fact: in the hint (TXT) or, inline, in the question (NO)."""
    shape = rng.choice(SHAPES)
    if rng.random() < 0.5:
        colour = rng.choice(list(COLOURS))
        fact, q, answer, pool = f"The {shape} in the box is {colour}.", f"What colour is the {shape} in the box?", \
            colour, list(COLOURS)
    else:
        n = rng.randint(1, 5)
        fact, q, answer, pool = f"There {'is' if n == 1 else 'are'} {n} {shape}{'' if n == 1 else 's'} in the box.", \
            f"How many {shape}s are in the box?", str(n), ["1", "2", "3", "4", "5"]
    return (f"{fact} {q}", "", answer, pool) if inline else (q, fact, answer, pool)


def caption(scene):
    """Reference captions: the objects left to right, a relation, and a count."""
    objs = sorted(scene["objects"], key=lambda o: (o["col"], o["row"]))
    names = [f"a {o['colour']} {o['shape']}" for o in objs]
    listing = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    refs = [f"{listing} on a {scene['background']} background"]
    if len(objs) > 1:
        a, b = objs[0], objs[1]
        refs.append(f"{names[0]} {'left of' if a['col'] < b['col'] else 'above'} {names[1]}")
    refs.append(f"{NUMBERS[len(objs) - 1]} shape{'s' if len(objs) > 1 else ''}: {listing}")
    return refs


def describe(scene):
    """The scene in words: what the tiny decoder reads in "Context:" while it is pretrained
    (pretrain.py), and what the fuser has to supply from the image instead."""
    return "; ".join(f"a {o['colour']} {o['shape']} in row {o['row'] + 1}, column {o['col'] + 1}"
                     for o in scene["objects"]) + "."


# ----------------------------------------------------------------------------- the dataset

def generate(out, n_train=N_TRAIN, n_val=N_VAL, n_test=None, seed=0, grid=4, progress=True):
    """Write the dataset into the folder out (which must not exist yet)."""
    n_test = n_val if n_test is None else n_test
    rng = random.Random(seed)
    os.makedirs(out)
    problems, splits, images = {}, {}, []
    bags = {}  # (split, number of options) -> answer positions still to hand out
    pid = 0
    bar = tqdm(total=n_train + n_val + n_test, desc="shapes", unit="problem", disable=not progress)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        splits[split] = []
        order = []
        for i in range(n):
            if i % len(QTYPES) == 0:  # every run of 5 questions has one of each type, in a shuffled order
                order = rng.sample(QTYPES, len(QTYPES))
            qtype = order[i % len(QTYPES)]
            pid += 1
            problems[str(pid)], scene = _problem(rng, qtype, split, bags, grid)
            splits[split].append(str(pid))
            if scene is not None:
                path = os.path.join(out, "images", split, str(pid))
                os.makedirs(path)
                draw(scene).save(os.path.join(path, "image.png"), format="PNG", compress_level=1)
                images.append(_caption_entry(len(images), pid, split, scene))
            bar.update()
    bar.close()
    splits["trainval"] = splits["train"] + splits["val"]
    for name, obj in (("problems.json", problems), ("pid_splits.json", splits),
                      ("dataset_coco.json", {"dataset": "shapes", "images": images})):
        with open(os.path.join(out, name), "w") as f:
            f.write(json.dumps(obj))  # no indent: the C encoder, several times faster


def _problem(rng, qtype, split, bags, grid):
    if qtype == "text":
        scene, inline = None, rng.random() < 0.5
        question, hint, answer, pool = _ask_text(rng, inline)
    else:
        while True:  # resample until this scene can ask this question type
            # count options are 1-5: with at most 4 objects "5" would never be right, a prior
            # that a text-only model could learn
            scene = make_scene(rng, grid, 5 if qtype == "count" else 4)
            asked = _ask(rng, qtype, scene)
            if asked:
                question, hint, answer, pool = asked
                break
    k = rng.randint(2, min(5, len(pool)))
    bag = bags.setdefault((split, k), [])
    if not bag:
        bag.extend(rng.sample(range(k), k))
    pos = bag.pop()
    choices = rng.sample([c for c in pool if c != answer], k - 1)
    choices.insert(pos, answer)
    subject, grades, topic, category = META[qtype]
    problem = {"question": question, "choices": choices, "answer": pos, "hint": hint,
               "image": "image.png" if scene else None, "task": "closed choice",
               "grade": f"grade{rng.choice(grades)}", "subject": subject, "topic": topic,
               "category": category, "skill": category.lower(), "lecture": "",
               "solution": f"The answer is {answer}.", "split": split, "qtype": qtype, "scene": scene,
               "answer_prefix": answer_prefix(question)}
    return problem, scene


def _caption_entry(imgid, pid, split, scene):
    refs = caption(scene)
    sentids = list(range(imgid * 3, imgid * 3 + len(refs)))
    return {"filepath": f"images/{split}/{pid}", "filename": "image.png", "imgid": imgid, "cocoid": pid,
            "split": split, "sentids": sentids,
            "sentences": [{"raw": r, "tokens": r.replace(",", "").replace(":", "").split(), "imgid": imgid, "sentid": s}
                          for r, s in zip(refs, sentids)]}


def caption_examples(root, split, every=4):
    """Caption examples for one image in `every` of a split: "A picture of" -> the first reference
    (every object, left to right, and the background). The default run trains them beside the
    questions, so sample.py can caption an image as well as answer about it."""
    from data.coco import load_coco  # the captions file is in Karpathy's layout
    first = [ex for ex in load_coco(root, split) if ex.meta["caption_index"] == 0][::every]
    return [replace(ex, id=f"caption-{ex.id}", meta={**ex.meta, "pid": ex.id}) for ex in first]  # ids apart from QA's


def names_an_object(caption, scene):
    """Does the caption name the colour and shape of at least one object of the scene ("red star")?"""
    return any(f"{o['colour']} {o['shape']}" in caption for o in scene["objects"])


def binding(example):
    """A question where more than one option is in the scene ("What colour is the star?" with a red
    and a blue object): spotting an option in the image is not enough, it must be bound to the object."""
    scene, qtype = example.meta.get("scene"), example.meta.get("qtype")
    if not scene or qtype not in ("colour", "shape", "position"):
        return False
    present = {o["colour" if qtype == "colour" else "shape"] for o in scene["objects"]}
    return sum(c.strip() in present for c in example.choices) > 1


def type_scores(examples, predictions):
    """Accuracy (%) per question type, and on the binding subset (see `binding`)."""
    groups = {}
    for ex in examples:
        for key in (ex.meta.get("qtype"), "binding" if binding(ex) else None):
            if key and ex.id in predictions:
                groups.setdefault(key, []).append(predictions[ex.id] == ex.answer)
    return {key: 100.0 * sum(hits) / len(hits) for key, hits in sorted(groups.items())}


# what generate() writes, plus params.json: a folder holding anything else is never replaced
GENERATED = re.compile(r"(problems|pid_splits|dataset_coco|params)\.json|images/(train|val|test)/\d+/image\.png")


def _check(root, params):
    """DataError unless these parameters make a dataset."""
    if not root or os.path.exists(root) and not os.path.isdir(root):
        raise DataError(f"shapes: the output folder {root!r} is a file or empty; name a folder")
    for key, low in (("n_train", 1), ("n_val", 1), ("n_test", 0)):
        if type(params[key]) is not int or params[key] < low:
            raise DataError(f"shapes: {key} must be a whole number from {low}, got {params[key]!r}")
    if type(params["grid"]) is not int or not 3 <= params["grid"] <= 24:
        raise DataError(f"shapes: grid must be from 3 (room for 5 objects) to 24 (cells of 9 px), "
                        f"got {params['grid']!r}")


def _install(tmp, root, params):
    """Move the set just made at tmp into root, unless another run made the same set there while
    this one generated (two train.py runs started together): replacing it would pull the files
    from under the run already reading them."""
    params_file = os.path.join(root, "params.json")
    if os.path.isfile(params_file) and read_json(params_file) == params:
        shutil.rmtree(tmp)
        return
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)


def ensure_shapes(root="data/raw/shapes", n_train=N_TRAIN, n_val=N_VAL, seed=0, n_test=None, grid=4):
    """Make sure root holds the shapes set with these parameters; (re)generate it if it is
    missing or was made with others, unless root holds files the generator did not write. Returns root."""
    params = {"version": VERSION, "n_train": n_train, "n_val": n_val,
              "n_test": n_val if n_test is None else n_test, "seed": seed, "grid": grid}
    _check(root, params)
    params_file = os.path.join(root, "params.json")
    if os.path.lexists(params_file):
        old = read_json(params_file)
        if old == params:
            return root
        if not isinstance(old, dict):
            raise DataError(f"{params_file} is not a JSON object; delete {root} to make the shapes set again")
        found = [os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                 for d, _, files in os.walk(root) for f in files]
        foreign = [f for f in found if not GENERATED.fullmatch(f)]
        if foreign:
            raise DataError(f"{root} holds a shapes set made with other parameters, and files the generator did "
                            f"not write ({len(foreign)}, e.g. {foreign[0]}); move them away to let it be replaced")
        changed = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in params.items() if old.get(k) != v)
        print(f"shapes: {root} was made with other parameters ({changed}); replacing it", file=sys.stderr)
    elif os.path.isdir(root) and os.listdir(root):
        raise DataError(f"{root} exists and is not a shapes dataset (no params.json); refusing to overwrite it")
    tmp = root.rstrip("/") + f".tmp{os.getpid()}"
    t0 = time.time()
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        generate(tmp, n_train, n_val, params["n_test"], seed, grid)
        with open(os.path.join(tmp, "params.json"), "w") as f:
            json.dump(params, f)
        _install(tmp, root, params)
    except OSError as e:
        raise DataError(f"shapes: cannot write {root} ({type(e).__name__}: {e.strerror})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # left only if something failed
    print(f"shapes: wrote {n_train + n_val + params['n_test']} problems to {root} in {time.time() - t0:.1f}s",
          file=sys.stderr)
    return root


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate the synthetic shapes dataset (ScienceQA layout)")
    parser.add_argument("--n_train", type=int, default=N_TRAIN, help="training problems (default %(default)s)")
    parser.add_argument("--n_val", type=int, default=N_VAL, help="validation problems, and test (default %(default)s)")
    parser.add_argument("--n_test", type=int, default=None, help="test problems (default: same as --n_val)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", type=int, default=4, help="objects sit in a grid x grid layout (default %(default)s)")
    parser.add_argument("--out", default="data/raw/shapes", help="output folder (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        ensure_shapes(args.out, args.n_train, args.n_val, args.seed, args.n_test, args.grid)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
