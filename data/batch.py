"""From examples to tensors: the `Example` record, `collate` for training and
`choice_batch` / `pick_choices` for multiple-choice scoring (by the options'
likelihood, or by the greedy next token after the prompt, `next_tokens`).

Every dataset file (scienceqa.py, coco.py; shapes.py writes the ScienceQA
layout) turns its files into a list of `Example`s. train.py, sample.py and the
evaluation code turn lists of examples into tensors here, so tokenisation,
label masking, padding and image loading live in one place (DESIGN.md section 5).

One training row, nanoGPT's next-token layout:

    tokens  = prompt_ids + target_ids + [EOT]      (EOT teaches the model to stop)
    idx     = tokens[:-1]
    targets = tokens[1:], with -100 wherever the token to predict is still prompt

so the loss falls on the target and the closing EOT only. Rows are right-padded
with EOT (targets -100 there). `prompt_mask` marks the prompt positions of idx:
the fuser's layer selector averages over those only (DESIGN.md section 4.2).
"""
import json
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps

from data.tokenizer import EOT

IGNORE = -100  # the label F.cross_entropy skips


class DataError(Exception):
    """Bad or missing data. Command-line entry points catch it, print the
    message (one line) and exit non-zero."""


@dataclass
class Example:
    id: str                               # pid for QA, image id for captions
    prompt: str                           # QA: QCM prompt ending in "Response:"; captions: "A picture of"
    target: str                           # " The answer is A." / " The answer is red." / " a red circle ..."
    image: str | None                     # path of the image file (opened at collate time); None = no image
    answer_prefix: str | None = None      # " The answer is" for multiple choice, None for captions
    choices: list[str] | None = None      # what may follow prompt + answer_prefix: [" A", " B"] / [" red", " blue"]
    answer: int | None = None             # index of the right choice
    references: list[str] | None = None   # captions: every reference caption of the image
    meta: dict = field(default_factory=dict)  # subject, grade, hint, has_image, qtype ... for the scorers


MAX_ASPECT = 100  # a longer strip keeps under 1% of itself in CLIP's centre crop


def load_image(path, ex_id):
    """Open and fully decode an image as RGB (to_rgb: what vit.preprocess takes), or raise DataError
    naming the example and the file. Refused before decoding: more pixels than Pillow's
    Image.MAX_IMAGE_PIXELS (decompression bombs) and strips longer than MAX_ASPECT:1."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow only warns up to twice the limit
            with Image.open(path) as img:
                w, h = img.size
                if max(w, h) > MAX_ASPECT * min(w, h):
                    raise DataError(f"example {ex_id}: image {path} is {w} x {h} pixels, longer than {MAX_ASPECT}:1; "
                                    f"CLIP's centre crop would keep under 1% of it (cut it into squarer pieces)")
                img.load()  # the full decode, so truncated files fail here
            return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"example {ex_id}: image {path} is refused ({e} Shrink it, or raise "
                        f"PIL.Image.MAX_IMAGE_PIXELS if you trust it)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"example {ex_id}: cannot read image {path} ({type(e).__name__}: {e})") from None


def to_rgb(image):
    """Any PIL image as the RGB picture a person sees: EXIF orientation applied (a phone photo
    stands upright), 16-bit grey kept in range, see-through parts (an alpha band, or a palette
    colour marked transparent, as in many ScienceQA diagrams) put onto white."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):  # 16-bit grey: keep the top 8 bits rather than clipping
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
    if "A" in image.getbands() or "transparency" in image.info:  # onto white, as HF's CLIPImageProcessor does
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255)), image.convert("RGBA"))
    return image if image.mode == "RGB" else image.convert("RGB")


def _images(examples, image_transform):
    """(B, 3, S, S) float images (zeros where there is none) and the (B,) has_image mask.
    image_transform None: no image is opened (a feature cache stands in), images is None."""
    has_image = torch.tensor([ex.image is not None for ex in examples], dtype=torch.bool)
    if image_transform is None:
        return None, has_image
    pixels = {i: image_transform(load_image(ex.image, ex.id)) for i, ex in enumerate(examples) if ex.image is not None}
    if pixels:
        shape = next(iter(pixels.values())).shape
    else:  # no image in this batch: learn the size from a blank image
        shape = image_transform(Image.new("RGB", (224, 224))).shape
    images = torch.zeros(len(examples), *shape)
    for i, x in pixels.items():
        if x.shape != shape:
            raise DataError(f"example {examples[i].id}: image_transform gave {tuple(x.shape)}, expected {tuple(shape)}")
        images[i] = x
    return images, has_image


_warned_truncation = False


def _fit(prompt_ids, cont_len, block_size, ex_id):
    """Cut the prompt from the left so prompt + continuation (cont_len tokens,
    the last of which is never an input) fits block_size. Returns (ids, cut?)."""
    global _warned_truncation
    if not prompt_ids:
        raise DataError(f"example {ex_id}: empty prompt (the first target token needs something to follow)")
    room = block_size + 1 - cont_len  # prompt tokens that fit
    if room < 1:
        raise DataError(f"example {ex_id}: its target alone ({cont_len} tokens) does not fit block_size={block_size}")
    if len(prompt_ids) <= room:
        return prompt_ids, False
    if not _warned_truncation:
        warnings.warn(f"example {ex_id}: prompt of {len(prompt_ids)} tokens cut from the left to {room} to fit "
                      f"block_size={block_size}; later cuts are counted in each batch's 'n_truncated'")
        _warned_truncation = True
    return prompt_ids[len(prompt_ids) - room:], True


def _pad(rows, value):
    """list of B int lists -> (B, T) long, right-padded with value."""
    T = max(len(r) for r in rows)
    out = torch.full((len(rows), T), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def collate(examples, enc, image_transform, block_size) -> dict:
    """Training batch. enc: tiktoken encoding; image_transform: PIL.Image -> (3, S, S).

    Returns images (B, 3, S, S) float, has_image (B,) bool, idx (B, T) long,
    targets (B, T) long (-100 on prompt and padding), prompt_mask (B, T) bool,
    ids list[str], n_truncated int (prompts cut from the left to fit block_size),
    image_paths list[str | None] (for a feature cache).
    """
    if not examples:
        raise DataError("collate got an empty list of examples")
    idx, targets, prompt_lens, n_truncated = [], [], [], 0
    for ex in examples:
        target_ids = enc.encode_ordinary(ex.target) + [EOT]
        prompt_ids, cut = _fit(enc.encode_ordinary(ex.prompt), len(target_ids), block_size, ex.id)
        n_truncated += cut
        tokens = prompt_ids + target_ids
        idx.append(tokens[:-1])
        targets.append([IGNORE] * (len(prompt_ids) - 1) + target_ids)  # = tokens[1:], prompt part masked
        prompt_lens.append(len(prompt_ids))
    idx, targets = _pad(idx, EOT), _pad(targets, IGNORE)  # (B, T) each
    prompt_mask = torch.arange(idx.shape[1])[None, :] < torch.tensor(prompt_lens)[:, None]  # (B, T)
    images, has_image = _images(examples, image_transform)
    return {"images": images, "has_image": has_image, "idx": idx, "targets": targets,
            "prompt_mask": prompt_mask, "ids": [ex.id for ex in examples], "n_truncated": n_truncated,
            "image_paths": [ex.image for ex in examples]}


def choice_batch(examples, enc, image_transform, block_size) -> dict:
    """Rows to score each choice by its log-likelihood after prompt + answer_prefix
    (lm-eval-harness style); with one-token choices (" A", " red") this is reading
    the choice logits after " The answer is" (or shapes' " The circle is").

    If every choice in the batch is one token, there is one row per example
    (the context; choice j is scored at its last position). Otherwise there is
    one row per (example, choice): context + choice, scored on the choice tokens.
    Returns, with R rows and M scored tokens in all:
        images (R, 3, S, S), has_image (R,), idx (R, T), prompt_mask (R, T)  (model inputs),
            image_paths list (R,) (for a feature cache)
        score_row, score_pos, score_tok (M,) long: log p(score_tok) is read from
            the logits of row score_row at position score_pos
        score_choice (M,) long: which (example, choice) pair each token belongs to,
            pairs numbered example by example: example 0's choices, then example 1's ...
        n_choices list[int] (B,), answer list[int | None] (B,), ids list[str] (B,)
        score_targets (R, T): 0 at scored positions, -100 elsewhere, so that the model's head runs
            there only; score_index (M,): which of those N positions (row-major) token m reads
        first_score (B,) long: the scored token m that follows each example's prompt + answer_prefix
    Use: pick_choices(scored_logits(model, batch), batch) -> B predictions.
    """
    ctxs, conts = [], []  # per example: context ids, list of choice ids
    for ex in examples:
        if ex.choices is None or ex.answer_prefix is None:
            raise DataError(f"example {ex.id} has no choices to score")
        ctxs.append((enc.encode_ordinary(ex.prompt), enc.encode_ordinary(ex.answer_prefix)))
        conts.append([enc.encode_ordinary(c) for c in ex.choices])
    one_row = all(len(c) == 1 for cs in conts for c in cs)
    rows, prompt_lens, row_image, score, first = [], [], [], ([], [], [], []), []
    pair = 0
    for i, (ex, (prompt_ids, prefix_ids), cs) in enumerate(zip(examples, ctxs, conts)):
        longest = max(len(c) for c in cs)
        prompt_ids, _ = _fit(prompt_ids, len(prefix_ids) + longest, block_size, ex.id)
        ctx = prompt_ids + prefix_ids
        first.append(len(score[0]))  # the first token of choice 0 is read right after ctx
        for j, c in enumerate(cs):
            if j == 0 or not one_row:
                rows.append((ctx + c)[:-1])
                prompt_lens.append(len(prompt_ids))
                row_image.append(ex)
            for k, tok in enumerate(c):  # token k of the choice is predicted at position len(ctx) - 1 + k
                for lst, v in zip(score, (len(rows) - 1, len(ctx) - 1 + k, tok, pair)):
                    lst.append(v)
            pair += 1
    idx = _pad(rows, EOT)  # (R, T)
    prompt_mask = torch.arange(idx.shape[1])[None, :] < torch.tensor(prompt_lens)[:, None]  # (R, T)
    images, has_image = _images(row_image, image_transform)
    out = {"images": images, "has_image": has_image, "idx": idx, "prompt_mask": prompt_mask,
           "n_choices": [len(cs) for cs in conts], "answer": [ex.answer for ex in examples],
           "ids": [ex.id for ex in examples], "image_paths": [ex.image for ex in row_image]}
    for name, lst in zip(("score_row", "score_pos", "score_tok", "score_choice", "first_score"), (*score, first)):
        out[name] = torch.tensor(lst, dtype=torch.long)
    # for a model that runs its head only where targets != -100 (model.py): mark the scored
    # positions, and say which of the N head outputs (row-major order) each scored token reads
    flat = out["score_row"] * idx.shape[1] + out["score_pos"]
    positions, out["score_index"] = torch.unique(flat, return_inverse=True)  # (N,), (M,)
    out["score_targets"] = torch.full_like(idx, IGNORE).view(-1).index_fill_(0, positions, 0).view_as(idx)
    return out


def choice_scores(logits, batch):
    """(B, C) summed log-probability of each example's choices, -inf where an example has fewer
    than C. logits: (N, V), at the scored positions only (row-major), as scored_logits gives."""
    index, tok, pair = (batch[k].to(logits.device) for k in ("score_index", "score_tok", "score_choice"))
    tok_logp = torch.log_softmax(logits.float(), dim=-1)[index, tok]  # (M,)
    pairs = torch.zeros(sum(batch["n_choices"]), device=logits.device).index_add_(0, pair, tok_logp)
    return torch.nn.utils.rnn.pad_sequence(pairs.split(batch["n_choices"]), batch_first=True,
                                           padding_value=-float("inf"))


def scored_logits(model, batch):
    """(N, V) logits of model (a VLM) at choice_batch's scored positions only: given them as
    targets, its head runs nowhere else. batch: choice_batch's, optionally with cached "features"."""
    logits, _ = model(batch["images"], batch["idx"], batch["score_targets"], batch["prompt_mask"],
                      batch["has_image"], batch.get("features"))
    return logits


def score_choices(model, batch):
    """(B, C) log-likelihood of each example's choices under model (a VLM)."""
    return choice_scores(scored_logits(model, batch), batch)


def next_tokens(logits, batch):
    """(B,) the greedy next token after each example's prompt + answer_prefix: one step of greedy
    generation, read from the same logits as the choices' (MemVP's eval.py generates one token
    after "The answer is"). logits: (N, V) from scored_logits."""
    return logits[batch["score_index"].to(logits.device)[batch["first_score"].to(logits.device)]].argmax(dim=-1)


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def pick_choices(logits, batch) -> list[int]:
    """The index of the most likely choice of every example. logits: (N, V) from scored_logits."""
    return choice_scores(logits, batch).argmax(dim=-1).tolist()


def check_dir(path, what, command):
    """A missing data directory: one message with the command that makes it."""
    if not os.path.isdir(path):
        raise DataError(f"{what} not found at {path}. Download it with `{command}`, "
                        f"or pass --data_dir with the folder of a copy you already have")


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e})") from None
    except OSError as e:  # a folder where the file should be, no permission, a read error
        raise DataError(f"cannot read {path} ({type(e).__name__}: {e.strerror})") from None
