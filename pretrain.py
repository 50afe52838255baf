"""Pretrain the offline tiny backbones, so the fuser meets what it meets in the paper.

DEHVF (like MemVP and LLaVA) starts from *pretrained* backbones: the decoder
already understands the question, the ViT's layers already mean something, and
only the fuser learns. Offline there are no public weights, so `--llm tiny
--vit tiny` make their own, once, on shapes (data/shapes.py), and cache them
like downloaded weights:

  decoder  a 4-layer GPT-2 trained as a language model, first on random token
           lists that teach it the look-up (the token after or before a
           given one; see lookup_batch), then on shapes *text*: the exact QCM
           prompts the fuser is trained on, but with the scene described in
           words in the "Context:" field, then the right answer; the
           captions; the text-only questions. It learns to answer from a
           described scene. In the fuser stage the context says "N/A" and the
           image has to supply the facts, as in the paper.
  ViT      a 4-layer CLIP-style ViT trained on shapes images with labels that
           never see a question: each last-layer patch token names the shape
           in its cell (or none), the class token counts the objects, and each
           second-layer patch token names its cell's colour. Like CLIP's, its
           deep layers are trained on concepts (shape, count), so fine detail
           (colour) is strongest in the shallow ones: which ViT layer to read
           is a real question for the fuser. (Without the colour labels colour
           is still linearly readable in every layer, but as a small share of
           the features' variance, 2-7% in h1-h4, and the fuser hardly learned
           to read it.)

Both are built on first use (the decoder with a progress bar, the ViT beside it
in a second process) into the weights cache (weights.cache_dir()/tiny/...),
under a fingerprint of their config, the shapes generator's version, the
recipe and the seed; a stale one is rebuilt.
`--llm tiny-random --vit tiny-random` are the same sizes untrained (tests, the ablation).

    python pretrain.py                # build both (train.py does this itself)
"""
import argparse
import functools
import hashlib
import json
import math
import multiprocessing
import os
import random
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
from data import shapes
from data.scienceqa import build_prompt
from data.tokenizer import EOT, get_encoding
from llm import GPT, GPTConfig
from vit import ViT, ViTConfig, preprocess
from weights import cache_dir


@dataclass
class DecoderRecipe:
    steps: int = 4000  # 4000 of 8, not 1500 of 16: same cost; seed 0 colour 67.6 -> 100, seeds 1, 2 not (README)
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.1
    questions: int = 2  # questions asked about each described scene (the first in the exact prompt format)
    hard: float = 1.0  # share of image questions whose wrong options are drawn from the scene first
    lookups: int = 6  # short look-ups after the questions ("star: red"), a dense signal for reading the scene
    text: float = 0.25  # share of documents that are a text-only question (the fact in the hint or the question)
    lookup_steps: int = 1000  # first, a warm-up on random token lists that forms the look-up (see lookup_batch)
    lookup_batch_size: int = 32
    lookup_length: int = 64  # tokens per warm-up row


@dataclass
class ViTRecipe:
    steps: int = 1200
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.05
    images: int = 6000  # scenes drawn once and reused (drawing is the slow part)
    colour_layer: int = 2  # the shallow layer whose patch tokens name their cell's colour (0: no colour labels)


# ----------------------------------------------------------------------------- decoder text

def _options(rng, answer, pool, scene_values, hard):
    """2-5 options including the answer; with probability `hard` the wrong ones come from the scene first."""
    k = rng.randint(2, min(5, len(pool)))
    others = [c for c in pool if c != answer]
    rng.shuffle(others)
    if rng.random() < hard:
        others.sort(key=lambda c: c not in scene_values)  # stable: scene values first, shuffled among themselves
    choices = others[:k - 1]
    choices.insert(rng.randrange(k), answer)
    return choices


def decoder_document(rng, hard=1.0, questions=2, lookups=6, text=0.25):
    """One training text as (segments): [(text, has_loss), ...]. Either a described scene followed by
    `questions` questions about it, a text-only question, or a caption."""
    roll = rng.random()
    if roll < 0.1:  # a caption, as the fuser stage asks for one: "A picture of ..."
        scene = shapes.make_scene(rng)
        return [("A picture of", False), (" " + rng.choice(shapes.caption(scene)), True)]
    if roll < 0.1 + text:  # a text-only question (ScienceQA's TXT and NO)
        question, hint, answer, pool = shapes._ask_text(rng, rng.random() < 0.5)
        choices = _options(rng, answer, pool, [], 0.0)
        return [(build_prompt(question, hint, choices), False), (f"{shapes.answer_prefix(question)} {answer}.", True)]
    scene = shapes.make_scene(rng, most=5)
    values = {"colour": [o["colour"] for o in scene["objects"]], "shape": [o["shape"] for o in scene["objects"]],
              "count": [], "position": [o["shape"] for o in scene["objects"]]}
    segments, first = [], True
    for qtype in rng.sample(shapes.QTYPES[:4], 4)[:questions]:
        asked = shapes._ask(rng, qtype, scene)
        if asked is None:
            continue
        question, _, answer, pool = asked
        choices = _options(rng, answer, pool, values[qtype], hard)
        if first:
            prompt = build_prompt(question, shapes.describe(scene), choices)
            first = False
        else:
            prompt = "\n" + build_prompt(question, "", choices).replace("\nContext: N/A", "")
        segments += [(prompt, False), (f"{shapes.answer_prefix(question)} {answer}.", True)]
    objects = scene["objects"]
    for _ in range(lookups):
        key, value = rng.choice((("shape", "colour"), ("colour", "shape")))
        o = rng.choice(objects)
        if sum(p[key] == o[key] for p in objects) == 1:  # a key that names one object
            segments += [(f"\n{o[key]}:", False), (f" {o[value]}", True)]
    return segments


@functools.lru_cache(maxsize=None)
def vocabulary(seed=0):
    return Vocab(seed)


class Vocab:
    """The GPT-2 tokens shapes text uses, plus one row standing for all others.

    Training a 50257-way softmax at every position would cost the tiny decoder
    most of its time, so it trains on the few hundred tokens shapes text uses.
    Every other token shares one embedding row ("other"), whose logit counts
    n_other times: a softmax over the small vocabulary with log(n_other) added
    to that logit is exactly the full softmax with those rows tied. `export`
    writes the full 50257-row embedding, so the result is a plain GPT-2-shaped
    checkpoint that gives the same probabilities."""

    def __init__(self, seed=0, n_docs=20000):
        enc, rng = get_encoding(), random.Random(seed)
        used = {EOT}
        for _ in range(n_docs):
            for text, _ in decoder_document(rng):
                used.update(enc.encode_ordinary(text))
        self.ids = sorted(used)  # small id -> GPT-2 id
        self.small = {t: i for i, t in enumerate(self.ids)}
        self.other = len(self.ids)  # the shared row
        self.n_other = enc.n_vocab - len(self.ids)
        self.size = len(self.ids) + 1

    def encode(self, text):
        return [self.small.get(t, self.other) for t in get_encoding().encode_ordinary(text)]


def decoder_batch(rng, vocab, recipe, block_size):
    """(idx, targets) (B, T) long on the small vocabulary: loss on the answers and captions only."""
    rows = []
    for _ in range(recipe.batch_size):
        tokens, targets = [], []
        for text, has_loss in decoder_document(rng, recipe.hard, recipe.questions, recipe.lookups, recipe.text):
            ids = vocab.encode(text)
            tokens += ids
            targets += ids if has_loss else [-100] * len(ids)
        tokens, targets = tokens + [vocab.small[EOT]], targets + [vocab.small[EOT]]
        rows.append((tokens[:block_size + 1], targets[:block_size + 1]))
    T = max(len(t) for t, _ in rows) - 1
    idx = torch.full((len(rows), T), vocab.small[EOT], dtype=torch.long)
    tgt = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (t, y) in enumerate(rows):
        idx[i, :len(t) - 1] = torch.tensor(t[:-1])
        tgt[i, :len(y) - 1] = torch.tensor(y[1:])
    return idx, tgt


def lookup_batch(rng, vocab, batch_size, length):
    """(idx, targets) (B, length) long on the small vocabulary: the look-up, free of shapes' few values.

    Even rows: a random token list repeated (after its first copy each token is the one that came
    after the same token before). Odd rows: a list of distinct tokens, then queries " right x" ->
    the token after x in the list, " left x" -> the one before it. Shapes questions are these two
    look-ups: "Which shape is red?" is the token after " red" in the context, "What colour is the
    star?" the token before " star". Trained on shapes text alone the tiny decoder did not form
    them in up to 12,000 steps (it answered with any value the scene names); on these lists it forms
    them in a few hundred, and shapes text then learns to use them."""
    enc = get_encoding()
    right, left = (vocab.small[enc.encode_ordinary(word)[0]] for word in (" right", " left"))
    n = vocab.other  # the small vocabulary's own tokens are 0..n-1
    idx = torch.empty(batch_size, length + 1, dtype=torch.long)
    tgt = torch.full((batch_size, length + 1), -100, dtype=torch.long)
    for b in range(batch_size):
        span = rng.randrange(4, 20)
        if b % 2 == 0:
            start = rng.randrange(10)  # a few unrelated tokens first
            items = [rng.randrange(n) for _ in range(span)]
            row = ([rng.randrange(n) for _ in range(start)] + items * (length // span + 2))[:length + 1]
            idx[b] = torch.tensor(row)
            tgt[b, start + span:] = idx[b, start + span:]
        else:
            items = rng.sample([t for t in range(n) if t not in (right, left)], span)
            row, y = list(items), [-100] * span
            while len(row) < length + 1:
                i, forward = rng.randrange(1, span - 1), rng.random() < 0.5
                row += [right if forward else left, items[i], items[i + 1 if forward else i - 1]]
                y += [-100, -100, row[-1]]
            idx[b], tgt[b] = torch.tensor(row[:length + 1]), torch.tensor(y[:length + 1])
    return idx[:, :-1], tgt[:, 1:]  # (B, length) each: predict each token from those before it


def train_decoder(config: GPTConfig, recipe: DecoderRecipe, seed=0, progress=True):
    """A GPT-2-shaped decoder (full vocabulary): the look-up warm-up, then shapes text; see Vocab for
    the small-vocabulary trick."""
    torch.manual_seed(seed)
    vocab = vocabulary(seed)
    small = GPT(GPTConfig(**{**asdict(config), "vocab_size": vocab.size}))
    offset = torch.zeros(vocab.size)
    offset[vocab.other] = math.log(vocab.n_other)
    rng = random.Random(seed + 1)

    def loss_on(idx, targets, offset):
        keep = targets != -100
        logits = small.lm_head(small.hidden(idx)[keep]) + offset  # (N, V_small)
        return F.cross_entropy(logits, targets[keep])

    params = list(small.parameters())
    if recipe.lookup_steps:  # constant lr; no offset: the lists hold no "other" token, and with the offset
        # the first steps go to pushing that row down and the look-up formed hundreds of steps later
        warm = replace(recipe, steps=recipe.lookup_steps)
        _optimise(params, warm, lambda: loss_on(*lookup_batch(rng, vocab, recipe.lookup_batch_size,
                                                              recipe.lookup_length), 0.0),
                  "decoder look-up", progress, decay=False)
    _optimise(params, recipe, lambda: loss_on(*decoder_batch(rng, vocab, recipe, config.block_size), offset),
              "pretrain decoder", progress)
    return export_decoder(small, vocab, config)


def _optimise(params, recipe, loss, desc, progress, decay=True):
    """The loop both pretrainings share: AdamW (decay on matrices only), linear warm-up then cosine
    to 0 (or constant, decay=False), gradients clipped at 1; loss() computes one batch's loss."""
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": recipe.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=recipe.lr, betas=(0.9, 0.95))
    bar = tqdm(range(recipe.steps), desc=desc, disable=not progress)
    for step in bar:
        lr = recipe.lr * min(1.0, (step + 1) / recipe.warmup)
        lr *= 0.5 * (1 + math.cos(math.pi * step / recipe.steps)) if decay else 1.0
        for g in opt.param_groups:
            g["lr"] = lr
        value = loss()
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{value.item():.3f}")


def export_decoder(small, vocab, config):
    full = GPT(config)
    state = small.state_dict()
    wte = state["transformer.wte.weight"]  # (V_small, d)
    big = wte[vocab.other].repeat(config.vocab_size, 1)  # every unused token: the shared row
    big[torch.tensor(vocab.ids)] = wte[:vocab.other]
    state["transformer.wte.weight"] = big
    full.load_state_dict(state)
    return full


@torch.no_grad()
def decoder_accuracy(gpt, n=400, seed=12345, hard=0.5):
    """Accuracy (%) per question type of a decoder answering from the described scene, on fresh
    scenes: the option with the highest logit after the answer's prefix (" The star is", as the
    fuser stage trains it; shapes.answer_prefix). 'binding' = image questions
    with more than one option present in the scene (the text must be read, not just scanned)."""
    enc, rng = get_encoding(), random.Random(seed)
    right, total = {}, {}
    for _ in range(n):
        scene, qtype = shapes.make_scene(rng, most=5), rng.choice(shapes.QTYPES)
        if qtype == "text":
            question, hint, answer, pool = shapes._ask_text(rng, rng.random() < 0.5)
            values = []
        elif asked := shapes._ask(rng, qtype, scene):
            question, _, answer, pool = asked
            hint, values = shapes.describe(scene), [o["colour" if qtype == "colour" else "shape"] for o in scene["objects"]]
        else:
            continue
        choices = _options(rng, answer, pool, values, hard)
        prompt = build_prompt(question, hint, choices) + shapes.answer_prefix(question)
        logits = gpt.lm_head(gpt.hidden(torch.tensor([enc.encode_ordinary(prompt)]))[0, -1])
        pick = max(choices, key=lambda c: logits[enc.encode_ordinary(" " + c)[0]].item())
        binding = qtype in ("colour", "shape", "position") and sum(c in values for c in choices) > 1
        for key in (qtype, "binding") if binding else (qtype,):
            right[key] = right.get(key, 0) + (pick == answer)
            total[key] = total.get(key, 0) + 1
    return {k: round(100.0 * right[k] / total[k], 1) for k in total}


# ----------------------------------------------------------------------------- the ViT

def vit_data(n, image_size, grid, seed, progress=True):
    """n fresh shapes scenes: pixels (n, 3, S, S), the shape in each grid cell (n, grid^2) with
    0 = empty, 1.. = shapes.SHAPES, and the colour likewise (0 = empty, 1.. = shapes.COLOURS)."""
    rng = random.Random(seed)
    pixels = torch.empty(n, 3, image_size, image_size)
    shape_of, colour_of = torch.zeros(n, grid * grid, dtype=torch.long), torch.zeros(n, grid * grid, dtype=torch.long)
    for i in tqdm(range(n), desc="draw scenes", disable=not progress, leave=False):
        scene = shapes.make_scene(rng, grid, most=5)
        pixels[i] = preprocess(shapes.draw(scene), image_size)
        for o in scene["objects"]:
            cell = o["row"] * grid + o["col"]
            shape_of[i, cell] = 1 + shapes.SHAPES.index(o["shape"])
            colour_of[i, cell] = 1 + list(shapes.COLOURS).index(o["colour"])
    return pixels, shape_of, colour_of


class ViTHeads(torch.nn.Module):
    """The pretraining heads, thrown away afterwards: each last-layer patch token names the
    shape in its cell (or none), the class token counts the objects, and each patch token of
    layer `colour_layer` names its cell's colour (or none)."""

    def __init__(self, width, colour_layer):
        super().__init__()
        self.shape = torch.nn.Linear(width, 1 + len(shapes.SHAPES))
        self.count = torch.nn.Linear(width, 6)  # 0..5 objects
        self.colour = torch.nn.Linear(width, 1 + len(shapes.COLOURS)) if colour_layer else None
        self.colour_layer = colour_layer

    def losses(self, hidden, shape_of, colour_of):  # hidden: [h_0..h_L], each (B, 1 + P, D)
        last = hidden[-1]
        out = {"shape": F.cross_entropy(self.shape(last[:, 1:]).flatten(0, 1), shape_of.flatten()),
               "count": F.cross_entropy(self.count(last[:, 0]), (shape_of > 0).sum(1))}
        if self.colour_layer:
            patches = hidden[self.colour_layer][:, 1:]
            out["colour"] = F.cross_entropy(self.colour(patches).flatten(0, 1), colour_of.flatten())
        return out


def train_vit(config: ViTConfig, recipe: ViTRecipe, seed=0, progress=True):
    """A CLIP-shaped ViT trained on shapes images with shape, count and colour labels (no questions)."""
    if not 0 <= recipe.colour_layer <= config.layers:
        raise ValueError(f"colour_layer must be in 0..{config.layers}, not {recipe.colour_layer}")
    torch.manual_seed(seed)
    pixels, shape_of, colour_of = vit_data(recipe.images, config.image_size, config.grid, seed, progress)
    vit, heads = ViT(config), ViTHeads(config.width, recipe.colour_layer)
    gen = torch.Generator().manual_seed(seed)

    def loss():
        pick = torch.randint(recipe.images, (recipe.batch_size,), generator=gen)
        return sum(heads.losses(vit(pixels[pick]), shape_of[pick], colour_of[pick]).values())

    _optimise(list(vit.parameters()) + list(heads.parameters()), recipe, loss, "pretrain ViT", progress)
    return vit, heads


def probe_vit(vit, n=1500, seed=54321, steps=300):
    """Which ViT layer holds what: a linear probe per layer on patch tokens (colour and shape of
    the cell's object, non-empty cells) and class tokens (count), fit on 2/3, accuracy (%) on 1/3;
    and how loud each is: the share (%) of the LayerNormed patch tokens' variance that the cell's
    colour or shape explains ("colour var", "shape var"; what the fuser, which LNs each layer, sees)."""
    pixels, shape_of, colour_of = vit_data(n, vit.config.image_size, vit.config.grid, seed, progress=False)
    with torch.no_grad():
        hidden = vit(pixels)
    split = 2 * n // 3
    out = {}
    for layer, h in enumerate(hidden):
        row = {}
        full = h[:, 1:]  # (n, P, D)
        normed = F.layer_norm(full, full.shape[-1:])  # as the fuser sees a layer
        for name, labels in (("colour", colour_of), ("shape", shape_of)):
            keep = labels > 0
            x_tr, y_tr = full[:split][keep[:split]], labels[:split][keep[:split]]
            x_te, y_te = full[split:][keep[split:]], labels[split:][keep[split:]]
            row[name] = _probe(x_tr, y_tr, x_te, y_te, steps)
            row[f"{name} var"] = _explained(normed[keep], labels[keep])
        count = (shape_of > 0).sum(1)
        row["count"] = _probe(h[:split, 0], count[:split], h[split:, 0], count[split:], steps)
        out[f"h{layer}"] = row
    return out


def _explained(x, labels):
    """Share (%) of the variance of x (N, D) between the groups of labels (N,): sum_c n_c |mean_c - mean|^2 / total."""
    centred = x - x.mean(0)
    between = sum((labels == c).sum() * centred[labels == c].mean(0).pow(2).sum() for c in labels.unique())
    return round(100.0 * (between / centred.pow(2).sum()).item(), 1)


def _probe(x_tr, y_tr, x_te, y_te, steps):
    torch.manual_seed(0)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    head = torch.nn.Linear(x_tr.size(1), int(y_tr.max()) + 1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(head((x_tr - mean) / std), y_tr)
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        return round(100.0 * (head((x_te - mean) / std).argmax(1) == y_te).float().mean().item(), 1)


# ----------------------------------------------------------------------------- the cache

VERSION = 4  # bump when the text, the labels or the loops change, so cached backbones rebuild (4: answers restate the key)


def cache_path(kind, config, recipe, seed):
    """Where a pretrained backbone is cached: the name carries a fingerprint of everything that
    makes its weights, so a change to any of it makes a new file."""
    key = json.dumps({"kind": kind, "config": asdict(config), "recipe": asdict(recipe), "seed": seed,
                      "shapes": shapes.VERSION, "pretrain": VERSION}, sort_keys=True)
    return cache_dir() / "tiny" / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def _cached(kind, config, recipe, seed, build, progress):
    """Load a pretrained backbone's weights from the weights cache, or build them (minutes),
    cache them and remove the stale ones of the same kind."""
    path = cache_path(kind, config, recipe, seed)
    folder = path.parent
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    print(f"pretraining the tiny {kind} (once; cached at {path})", flush=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thread count changes float sums' order, and these builds diverge on it: pin it
    try:
        with torch.random.fork_rng(devices=[]):  # building or loading leaves the caller's random state alike
            state = build().state_dict()
    finally:
        torch.set_num_threads(threads)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash leaves no half file under the real name
    for stale in folder.glob(f"{kind}-*.pt"):
        if stale != path:
            stale.unlink(missing_ok=True)
    return state


def tiny_decoder(seed=0, recipe=None, config=None, progress=True) -> GPT:
    """The offline decoder: GPTConfig.tiny() pretrained on shapes text (cached)."""
    config, recipe = config or GPTConfig.tiny(), recipe or DecoderRecipe()
    gpt = GPT(config)
    gpt.load_state_dict(_cached("decoder", config, recipe, seed,
                                lambda: train_decoder(config, recipe, seed, progress), progress))
    return gpt


def tiny_vit(seed=0, recipe=None, config=None, progress=True) -> ViT:
    """The offline ViT: ViTConfig.tiny() pretrained on shapes images (cached)."""
    config, recipe = config or ViTConfig.tiny(), recipe or ViTRecipe()
    vit = ViT(config)
    vit.load_state_dict(_cached("vit", config, recipe, seed,
                                lambda: train_vit(config, recipe, seed, progress)[0], progress))
    return vit


def tiny_backbones(seed=0, progress=True, vit_recipe=None, vit_config=None, decoder_recipe=None,
                   decoder_config=None):
    """(ViT, decoder), both pretrained offline. When neither is cached yet, the ViT builds in a second
    process beside the decoder: each build runs on one thread anyway (see _cached), so on two cores
    the first run ends minutes sooner, with the same weights as building one after the other."""
    vit_recipe, vit_config = vit_recipe or ViTRecipe(), vit_config or ViTConfig.tiny()
    decoder_recipe, decoder_config = decoder_recipe or DecoderRecipe(), decoder_config or GPTConfig.tiny()
    beside = None
    if (os.cpu_count() or 1) > 1 and not (cache_path("vit", vit_config, vit_recipe, seed).is_file() or
                                          cache_path("decoder", decoder_config, decoder_recipe, seed).is_file()):
        beside = multiprocessing.get_context("spawn").Process(  # no progress bar: the decoder's takes the line
            target=tiny_vit, args=(seed, vit_recipe, vit_config, False), daemon=True)
        beside.start()
    gpt = tiny_decoder(seed, decoder_recipe, decoder_config, progress)
    if beside:
        beside.join()  # had it failed (its error is printed), tiny_vit below builds the ViT here
    return tiny_vit(seed, vit_recipe, vit_config, progress), gpt


def main(argv=None):
    p = argparse.ArgumentParser(description="Pretrain (or load from the cache) the offline tiny backbones, "
                                            "and say what they learned.", formatter_class=cli.Help)
    p.add_argument("--seed", type=int, default=0, help="the backbones' seed (train.py uses 0)")
    p.add_argument("--probe", action="store_true", help="also measure the decoder on described scenes and "
                                                        "probe each ViT layer for colour, shape and count")
    args = p.parse_args(argv)
    vit, gpt = tiny_backbones(args.seed)
    print(f"decoder: {sum(p.numel() for p in gpt.parameters()):,} parameters; "
          f"ViT: {sum(p.numel() for p in vit.parameters()):,}; cached under {cache_dir() / 'tiny'}")
    if args.probe:
        print("decoder, answering from the described scene (%):", decoder_accuracy(gpt, n=1000))
        for layer, row in probe_vit(vit).items():
            print(f"ViT {layer}: linear probe (%) {row}")


if __name__ == "__main__":
    main()
