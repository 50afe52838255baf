"""data/batch.py: collate's layout and masks, truncation, and multiple-choice scoring."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data.batch as batch
from data.batch import DataError, Example, choice_batch, choice_scores, collate, next_tokens, pick_choices
from data.tokenizer import EOT, get_encoding

enc = get_encoding()


def tiny_transform(img):
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32) / 255).permute(2, 0, 1)


def qa(i, prompt, choices, answer, image=None):
    return Example(id=str(i), prompt=prompt, target=f" The answer is{choices[answer]}.", image=image,
                   answer_prefix=" The answer is", choices=choices, answer=answer)


def test_collate_layout(tmp_path):
    path = str(tmp_path / "a.png")
    Image.new("RGB", (20, 20), (255, 0, 0)).save(path)
    exs = [qa(0, "Question: a?\nResponse:", [" A", " B"], 1, image=path),
           Example(id="7", prompt="A picture of", target=" a red square on a white background", image=None)]
    b = collate(exs, enc, tiny_transform, block_size=64)
    B, T = b["idx"].shape
    assert (B, T) == (2, max(len(enc.encode_ordinary(e.prompt + e.target)) for e in exs))  # + EOT - 1
    for i, ex in enumerate(exs):
        p = enc.encode_ordinary(ex.prompt)
        tokens = p + enc.encode_ordinary(ex.target) + [EOT]
        n = len(tokens) - 1
        assert b["idx"][i, :n].tolist() == tokens[:-1] and (b["idx"][i, n:] == EOT).all()
        assert b["targets"][i, :len(p) - 1].eq(-100).all() and b["targets"][i, n:].eq(-100).all()
        assert b["targets"][i, len(p) - 1:n].tolist() == tokens[len(p):]  # targets = tokens[1:] past the prompt
        assert b["prompt_mask"][i].tolist() == [t < len(p) for t in range(T)]
    assert b["ids"] == ["0", "7"] and b["has_image"].tolist() == [True, False] and b["n_truncated"] == 0
    assert b["images"].shape == (2, 3, 8, 8) and torch.allclose(b["images"][0, 0], torch.ones(8, 8))
    assert b["images"][1].eq(0).all()
    # a batch with no image still has (B, 3, S, S) images, all zero
    b = collate(exs[1:], enc, tiny_transform, block_size=64)
    assert b["images"].shape == (1, 3, 8, 8) and b["images"].eq(0).all()


def test_long_prompts_are_cut_from_the_left(monkeypatch):
    monkeypatch.setattr(batch, "_warned_truncation", False)
    long = " ".join(f"word{i}" for i in range(100)) + "\nResponse:"
    exs = [qa(0, long, [" A", " B"], 0), qa(1, "Short?\nResponse:", [" A", " B"], 1)]
    with pytest.warns(UserWarning, match="cut from the left"):
        b = collate(exs, enc, tiny_transform, block_size=32)
    assert b["idx"].shape[1] == 32 and b["n_truncated"] == 1
    kept = b["targets"][0][b["targets"][0] != -100].tolist()
    assert enc.decode(kept) == " The answer is A.<|endoftext|>"
    assert enc.decode(b["idx"][0][b["prompt_mask"][0]].tolist()).endswith("word99\nResponse:")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process; later cuts are only counted
        assert collate(exs, enc, tiny_transform, block_size=32)["n_truncated"] == 1
    with pytest.raises(DataError, match="example 0: its target alone"):
        collate(exs, enc, tiny_transform, block_size=5)
    with pytest.raises(DataError, match="example 3: empty prompt"):
        collate([Example(id="3", prompt="", target=" a cat", image=None)], enc, tiny_transform, block_size=32)


def test_collate_rejects_unreadable_images(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match=r"example 0: cannot read image .*broken.png"):
        collate([qa(0, "Q?", [" A", " B"], 0, image=str(bad))], enc, tiny_transform, 64)
    with pytest.raises(DataError, match=r"example 0: cannot read image .*absent.png"):
        collate([qa(0, "Q?", [" A", " B"], 0, image=str(tmp_path / "absent.png"))], enc, tiny_transform, 64)


class CausalBag(torch.nn.Module):
    """A tiny causal LM (mean of the embeddings so far -> logits) to compare scoring layouts."""

    def __init__(self, V=50257, d=16):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.out = torch.nn.Embedding(V, d), torch.nn.Linear(d, V)

    def forward(self, idx):  # (R, T) -> (R, T, V)
        x = self.emb(idx).cumsum(1) / torch.arange(1, idx.shape[1] + 1)[None, :, None]
        return self.out(x)


def scored(full, b):
    """(R, T, V) logits at every position -> (N, V) at the scored ones, as scored_logits gives them
    (the VLM's head runs only where score_targets != -100)."""
    return full[b["score_targets"] != -100]


def gold_logits(b, exs):
    """Scored logits, (N, V), that put all their mass on the right continuation of each row's example."""
    R, T = b["idx"].shape
    logits = torch.full((R, T, 50257), -20.0)
    example_of_pair = [i for i, n in enumerate(b["n_choices"]) for _ in range(n)]
    for r, pair in zip(b["score_row"].tolist(), b["score_choice"].tolist()):
        ex = exs[example_of_pair[pair]]
        gold = enc.encode_ordinary(ex.prompt) + enc.encode_ordinary(ex.answer_prefix + ex.choices[ex.answer])
        for t in range(min(T, len(gold) - 1)):
            logits[r, t, gold[t + 1]] = 20.0
    return scored(logits, b)


def test_choice_batch_one_token_choices():
    exs = [qa(0, "Question: x?\nResponse:", [" A", " B", " C"], 2),
           qa(1, "Question: longer one?\nResponse:", [" A", " B"], 0)]
    b = choice_batch(exs, enc, tiny_transform, block_size=64)
    assert b["idx"].shape[0] == 2 and b["n_choices"] == [3, 2] and b["answer"] == [2, 0]
    assert b["score_row"].tolist() == [0, 0, 0, 1, 1] and b["score_tok"].tolist() == [317, 347, 327, 317, 347]
    for i, ex in enumerate(exs):
        ctx = enc.encode_ordinary(ex.prompt) + enc.encode_ordinary(ex.answer_prefix)
        assert b["idx"][i, :len(ctx)].tolist() == ctx
        assert b["score_pos"][b["score_row"] == i].eq(len(ctx) - 1).all()
        assert b["prompt_mask"][i].sum() == len(enc.encode_ordinary(ex.prompt))  # not the answer prefix
    assert pick_choices(gold_logits(b, exs), b) == [2, 0]


def test_choice_batch_multi_token_choices_and_layouts_agree():
    exs = [qa(0, "Q: what?\nResponse:", [" a big red ball", " blue", " a small square"], 2),
           qa(1, "Q: colour?\nResponse:", [" red", " green"], 1)]
    b = choice_batch(exs, enc, tiny_transform, block_size=64)
    assert b["idx"].shape[0] == 5  # one row per (example, choice)
    assert len(b["score_tok"]) == sum(len(enc.encode_ordinary(c)) for ex in exs for c in ex.choices)
    assert pick_choices(gold_logits(b, exs), b) == [2, 1]
    # for one-token choices, one row per example and one row per choice give the same scores
    model = CausalBag()
    single = choice_batch(exs[1:], enc, tiny_transform, 64)
    assert single["idx"].shape[0] == 1
    per_choice = choice_batch(exs[1:] + exs[:1], enc, tiny_transform, 64)  # multi-token example forces rows
    with torch.no_grad():
        s1 = choice_scores(scored(model(single["idx"]), single), single)[0]
        s2 = choice_scores(scored(model(per_choice["idx"]), per_choice), per_choice)[0, :2]  # padded to 3
    assert torch.allclose(s1, s2, atol=1e-5) and not torch.allclose(s1[0], s1[1])
    # the head runs only where score_targets != -100 (row-major): score_index says which output each token reads
    with torch.no_grad():
        full = model(per_choice["idx"])  # (R, T, V)
    logp = torch.log_softmax(full, -1)
    tok_logp = logp[per_choice["score_row"], per_choice["score_pos"], per_choice["score_tok"]]  # read in place
    pairs = torch.zeros(5).index_add_(0, per_choice["score_choice"], tok_logp)
    scores = choice_scores(scored(full, per_choice), per_choice)  # (2, 3): the 2-choice example padded with -inf
    assert torch.isinf(scores[0, 2]) and torch.allclose(scores[torch.isfinite(scores)], pairs, atol=1e-5)
    assert (per_choice["score_targets"] != -100).sum() == len(per_choice["score_tok"])  # each position scored once
    assert (single["score_targets"] != -100).sum() == 1 and single["score_index"].tolist() == [0, 0]  # shared
    with pytest.raises(DataError, match="example 9 has no choices"):
        choice_batch([Example(id="9", prompt="A picture of", target=" x", image=None)], enc, tiny_transform, 64)


def test_next_tokens_is_one_step_of_greedy_generation():
    """What the published ScienceQA protocol reads: the argmax token after prompt + " The answer is",
    from the compact (N, V) logits, in both layouts; compared with running each context alone."""
    model = CausalBag()
    exs = [qa(0, "Q: what?\nResponse:", [" a big red ball", " blue", " a small square"], 2),
           qa(1, "Q: which colour is it?\nResponse:", [" A", " B"], 1),
           qa(2, "Q: x?\nResponse:", [" A", " B", " C"], 0)]
    for chunk in (exs, exs[1:]):  # one row per (example, choice), then one row per example
        b = choice_batch(chunk, enc, tiny_transform, 64)
        with torch.no_grad():
            compact = scored(model(b["idx"]), b)  # (N, V)
            alone = [int(model(torch.tensor([enc.encode_ordinary(ex.prompt + ex.answer_prefix)]))[0, -1].argmax())
                     for ex in chunk]
        assert next_tokens(compact, b).tolist() == alone
        assert len(set(alone)) > 1  # the examples' next tokens differ, so a row mix-up would show


def test_load_image_leaves_transparency_to_preprocess(tmp_path):
    """A see-through PNG (ScienceQA has many) must reach vit.preprocess with its alpha, which puts it
    on white as CLIPImageProcessor does; converting to RGB on load would make it black."""
    from vit import preprocess
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    white = preprocess(Image.new("RGB", (16, 16), "white"), 16)
    assert torch.equal(preprocess(batch.load_image(tmp_path / "clear.png", "t"), 16), white)
