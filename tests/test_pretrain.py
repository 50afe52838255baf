"""pretrain.py: the offline backbones' own pretraining, at very small sizes.

The small-vocabulary trick is exact, the decoder's text asks what the fuser
stage asks and answers it right, the loops are deterministic and learn, and
the cache rebuilds when anything that makes the weights changes.
"""
import math
import os
import random

import pytest
import torch

import pretrain
from data import shapes
from data.scienceqa import build_prompt
from data.tokenizer import get_encoding
from llm import GPT, GPTConfig
from vit import ViTConfig

SMALL_GPT = GPTConfig(block_size=256, n_layer=1, n_head=2, n_embd=32)
SMALL_VIT = ViTConfig(image_size=64, patch_size=16, width=32, layers=2, heads=2, mlp_width=64)


def assert_same_weights(a, b):
    a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys()
    for name, x in a.items():
        assert torch.equal(x, b[name]), name


@pytest.fixture(scope="module")
def vocab():
    return pretrain.Vocab(n_docs=2000)


def test_small_vocabulary_export_gives_the_same_probabilities(vocab):
    """A softmax over the small vocabulary, the shared row's logit raised by log(n_other), is the
    full 50257-way softmax of the exported GPT-2-shaped model."""
    torch.manual_seed(0)
    small = GPT(GPTConfig(**{**SMALL_GPT.__dict__, "vocab_size": vocab.size}))
    nn_init = torch.nn.init
    nn_init.normal_(small.transformer.wte.weight, std=0.5)  # logits far from uniform
    full = pretrain.export_decoder(small, vocab, SMALL_GPT).double()  # float64: a sum over 50257 logits
    small = small.double()
    text = "Question: What colour is the star?\nContext: N/A\nResponse: The answer is zebra."  # zebra: not in it
    idx_full = torch.tensor([get_encoding().encode_ordinary(text)])
    idx_small = torch.tensor([vocab.encode(text)])
    assert vocab.other in idx_small[0].tolist()  # some token is outside the small vocabulary
    with torch.no_grad():
        offset = torch.zeros(vocab.size, dtype=torch.float64)
        offset[vocab.other] = math.log(vocab.n_other)
        p_small = torch.log_softmax(small.lm_head(small.hidden(idx_small)) + offset, -1)  # (1, T, V_small)
        p_full = torch.log_softmax(full(idx_full)[0], -1)  # (1, T, 50257)
    ids = torch.tensor(vocab.ids)
    torch.testing.assert_close(p_full[..., ids], p_small[..., :vocab.other], atol=1e-10, rtol=0)
    unused = torch.ones(p_full.size(-1), dtype=torch.bool)
    unused[ids] = False
    torch.testing.assert_close(p_full[..., unused].logsumexp(-1), p_small[..., vocab.other], atol=1e-10, rtol=0)


def test_decoder_text_asks_the_fuser_stage_question_and_answers_it_right():
    rng = random.Random(3)
    seen = set()
    for _ in range(300):
        segments = pretrain.decoder_document(rng)
        first, target = segments[0][0], segments[1][0]
        if first.startswith("A picture of"):
            seen.add("caption")
            continue
        # the first question is in exactly the prompt format of the fuser stage
        question = first.split("\n")[0].removeprefix("Question: ")
        context = first.split("\nContext: ")[1].split("\n")[0]
        options = [o.split(") ", 1)[1] for o in first.split("\nOptions: ")[1].split("\n")[0].split(" (")]
        assert first == build_prompt(question, context, options)
        answer = target.removeprefix(shapes.answer_prefix(question) + " ").removesuffix(".")
        assert answer in options and not segments[0][1] and segments[1][1]  # loss on the answer only
        if question.startswith("What colour is the ") and "in the box" not in question:
            shape = question.removeprefix("What colour is the ").removesuffix("?")
            assert f"a {answer} {shape} in row" in context  # the scene says so
            assert target == f" The {shape} is {answer}."  # the key restated just before the answer
            seen.add("colour")
        if question.startswith("Which shape is ") and " of " not in question and " the " not in question:
            colour = question.removeprefix("Which shape is ").removesuffix("?")
            assert f"a {colour} {answer} in row" in context
            assert target == f" It is the {colour} {answer}."
            seen.add("shape")
    assert seen == {"caption", "colour", "shape"}


def test_decoder_pretraining_is_deterministic_and_learns(vocab):
    recipe = pretrain.DecoderRecipe(steps=40, batch_size=8, lr=3e-3, warmup=5, lookup_steps=5, lookup_batch_size=4)
    rng = random.Random(0)
    held_out = [pretrain.decoder_batch(rng, vocab, recipe, SMALL_GPT.block_size) for _ in range(2)]

    def loss(gpt):  # the answers' loss on held-out text, through the exported full-vocabulary model
        with torch.no_grad():
            return sum(gpt(torch.tensor([[vocab.ids[i] if i != vocab.other else 0 for i in row] for row in idx]),
                           torch.where(y == -100, y, torch.tensor(vocab.ids + [0])[y.clamp(min=0)]))[1]
                       for idx, y in held_out).item()

    a = pretrain.train_decoder(SMALL_GPT, recipe, seed=1, progress=False)
    b = pretrain.train_decoder(SMALL_GPT, recipe, seed=1, progress=False)
    assert_same_weights(a, b)
    untrained = pretrain.export_decoder(GPT(GPTConfig(**{**SMALL_GPT.__dict__, "vocab_size": vocab.size})),
                                        vocab, SMALL_GPT)
    assert loss(a) < 0.7 * loss(untrained)


def test_lookup_warm_up_rows_ask_what_they_say(vocab):
    """Even rows repeat a list (each target is the token one period back); odd rows list distinct
    tokens, then " right x" -> the token after x, " left x" -> the token before x."""
    right, left = (vocab.small[get_encoding().encode_ordinary(w)[0]] for w in (" right", " left"))
    idx, tgt = pretrain.lookup_batch(random.Random(5), vocab, 8, 48)
    assert idx.shape == tgt.shape == (8, 48)
    asked = set()
    for b in range(8):
        y = tgt[b].tolist()
        row = idx[b].tolist() + [y[-1]]  # the whole row: the last token is only a target
        targets = [t for t, v in enumerate(y) if v != -100]
        assert targets and all(y[t] == row[t + 1] for t in targets)  # targets are the next tokens
        if b % 2 == 0:
            period = next(p for p in range(4, 20) if all(row[t + 1] == row[t + 1 - p] for t in targets))
            assert all(row[t + 1 - period] == y[t] for t in targets)
            continue
        items = row[:min(i for i, token in enumerate(row) if token in (right, left))]
        assert len(set(items)) == len(items) and right not in items and left not in items
        for t in targets:  # row[t - 1] is " right" or " left", row[t] the item asked about
            at = items.index(row[t])
            asked.add(row[t - 1])
            assert y[t] == items[at + 1 if row[t - 1] == right else at - 1]
    assert asked == {right, left}


def test_vit_pretraining_is_deterministic_and_learns_its_labels():
    recipe = pretrain.ViTRecipe(steps=30, batch_size=16, lr=3e-3, warmup=5, images=64)
    vit, heads = pretrain.train_vit(SMALL_VIT, recipe, seed=2, progress=False)
    again, _ = pretrain.train_vit(SMALL_VIT, recipe, seed=2, progress=False)
    assert_same_weights(vit, again)
    pixels, shape_of, colour_of = pretrain.vit_data(64, 64, 4, seed=2, progress=False)  # the very images it trained on
    with torch.no_grad():
        trained = heads.losses(vit(pixels), shape_of, colour_of)
        fresh = pretrain.ViTHeads(SMALL_VIT.width, recipe.colour_layer)
        untrained = fresh.losses(pretrain.ViT(SMALL_VIT)(pixels), shape_of, colour_of)
    assert set(trained) == {"shape", "count", "colour"}
    assert sum(trained.values()) < 0.7 * sum(untrained.values())
    for name in trained:  # each label is learned, not only the easiest
        assert trained[name] < 0.9 * untrained[name], name


def test_vit_colour_labels_sit_on_the_recipes_layer():
    hidden = [torch.randn(2, 17, 8, requires_grad=True) for _ in range(4)]  # h_0..h_3, 4 x 4 patches
    shape_of, colour_of = torch.zeros(2, 16, dtype=torch.long), torch.zeros(2, 16, dtype=torch.long)
    shape_of[:, :3], colour_of[:, :3] = torch.randint(1, 6, (2, 3)), torch.randint(1, 7, (2, 3))  # 3 objects
    for layer in (0, 1, 2):
        losses = pretrain.ViTHeads(8, colour_layer=layer).losses(hidden, shape_of, colour_of)
        grads = torch.autograd.grad(sum(losses.values()), hidden, allow_unused=True)
        reached = [i for i, g in enumerate(grads) if g is not None]
        assert reached == ([3] if layer == 0 else [layer, 3]), layer  # the last layer: shape and count
    with pytest.raises(ValueError, match="colour_layer"):
        pretrain.train_vit(SMALL_VIT, pretrain.ViTRecipe(steps=1, colour_layer=SMALL_VIT.layers + 1), progress=False)


def test_cache_builds_once_and_rebuilds_on_change(tmp_path, monkeypatch):
    monkeypatch.setenv("NANODEHVF_CACHE", str(tmp_path))
    recipe = pretrain.ViTRecipe(steps=2, batch_size=4, warmup=1, images=8)
    first = pretrain.tiny_vit(recipe=recipe, config=SMALL_VIT, progress=False)
    files = list((tmp_path / "tiny").glob("vit-*.pt"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    second = pretrain.tiny_vit(recipe=recipe, config=SMALL_VIT, progress=False)  # from the cache
    assert files[0].stat().st_mtime_ns == stamp
    assert_same_weights(first, second)
    for changed in (dict(recipe=pretrain.ViTRecipe(steps=3, batch_size=4, warmup=1, images=8)),
                    dict(recipe=recipe, seed=1)):
        pretrain.tiny_vit(config=SMALL_VIT, progress=False, **changed)
        now = list((tmp_path / "tiny").glob("vit-*.pt"))
        assert len(now) == 1 and now[0] != files[0]  # a new fingerprint; the stale file is gone
        files = now
    monkeypatch.setattr(shapes, "VERSION", shapes.VERSION + 1)  # a new shapes generator: rebuilt too
    pretrain.tiny_vit(recipe=recipe, seed=1, config=SMALL_VIT, progress=False)
    assert list((tmp_path / "tiny").glob("vit-*.pt")) != files


def test_a_build_runs_on_one_thread_whatever_the_callers_count(tmp_path, monkeypatch):
    """The cached weights are named by config, recipe, seed and data version only, so they must
    not depend on the machine's thread count (which changes the order of float sums, and two
    threads built a measurably different decoder from one): a build runs on one thread."""
    monkeypatch.setenv("NANODEHVF_CACHE", str(tmp_path))
    seen = []
    train_vit = pretrain.train_vit
    monkeypatch.setattr(pretrain, "train_vit", lambda *a, **k: (seen.append(torch.get_num_threads()), train_vit(*a, **k))[1])
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pretrain.tiny_vit(recipe=pretrain.ViTRecipe(steps=1, batch_size=4, warmup=1, images=4), config=SMALL_VIT,
                          progress=False)
        assert seen == [1] and torch.get_num_threads() == 2  # pinned for the build, given back after
    finally:
        torch.set_num_threads(before)


def test_building_or_loading_leaves_the_callers_random_state_alike(tmp_path, monkeypatch):
    """train.py seeds, builds the backbones, then initialises the fuser: a first run (which
    builds them) and a later one (which loads them) must start the fuser from the same weights."""
    monkeypatch.setenv("NANODEHVF_CACHE", str(tmp_path))
    recipe = pretrain.ViTRecipe(steps=2, batch_size=4, warmup=1, images=4)
    draws = []
    for _ in range(2):  # built, then loaded from the cache
        torch.manual_seed(7)
        pretrain.tiny_vit(recipe=recipe, config=SMALL_VIT, progress=False)
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[1])


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: the backbones build one after the other")
def test_a_first_run_builds_the_vit_beside_the_decoder_with_the_same_weights(tmp_path, monkeypatch):
    """Neither backbone cached: the ViT builds in a second process while the decoder builds here,
    and both equal what building them one after the other gives."""
    small = dict(vit_recipe=pretrain.ViTRecipe(steps=3, batch_size=4, warmup=1, images=8), vit_config=SMALL_VIT,
                 decoder_recipe=pretrain.DecoderRecipe(steps=3, batch_size=2, warmup=1, lookup_steps=2,
                                                       lookup_batch_size=2), decoder_config=SMALL_GPT)
    monkeypatch.setenv("NANODEHVF_CACHE", str(tmp_path / "in-turn"))
    vit = pretrain.tiny_vit(3, small["vit_recipe"], SMALL_VIT, progress=False)
    gpt = pretrain.tiny_decoder(3, small["decoder_recipe"], SMALL_GPT, progress=False)
    monkeypatch.setenv("NANODEHVF_CACHE", str(tmp_path / "beside"))
    monkeypatch.setattr(pretrain, "train_vit", lambda *a, **k: pytest.fail("the ViT was built here, not beside"))
    vit_beside, gpt_beside = pretrain.tiny_backbones(3, progress=False, **small)
    assert_same_weights(vit, vit_beside)
    assert_same_weights(gpt, gpt_beside)


def test_explained_variance_share():
    x = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])  # one axis per labelling
    assert pretrain._explained(x, torch.tensor([0, 0, 1, 1])) == 50.0  # explains axis 0: half the variance
    assert pretrain._explained(x, torch.tensor([0, 1, 0, 1])) == 50.0  # axis 1
    assert pretrain._explained(x, torch.tensor([0, 1, 1, 0])) == 0.0  # neither: both groups average to 0
    assert pretrain._explained(x, torch.arange(4)) == 100.0  # every point its own group
