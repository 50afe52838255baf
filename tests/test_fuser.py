"""fuser.py: the six steps of DESIGN.md section 4 against a plain re-implementation, the
mix a (B, L, K) in dehvf / static / memvp, and the memory contract llm.py relies on."""
import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from fuser import FuserConfig, HierarchicalFuser
from llm import GPTConfig
from model import VLM, build_backbones
from vit import PUBLIC, ViTConfig

B, T, PROMPT = 3, 10, 6  # batch, tokens, prompt tokens (the rest is the answer)


@functools.lru_cache(maxsize=None)
def _backbones():
    torch.manual_seed(0)
    return build_backbones("tiny-random", "tiny-random")


def make(mode, seed=0):
    """A VLM on (copies of) the seeded tiny backbones, its trainable weights moved off their
    init (gates open, a sharper selector) as training would, so the memory and the mix matter."""
    vit, gpt = (copy.deepcopy(m) for m in _backbones())
    torch.manual_seed(seed)  # the fuser's own init
    model = VLM(vit, gpt, mode)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def close(a, b, atol=1e-5):  # (torch.testing.assert_close costs seconds of imports on first use)
    return a.shape == b.shape and (a - b).abs().max().item() <= atol


def inputs(seed=0, vocab=50257, image_size=64):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, image_size, image_size, generator=g)
    idx = torch.randint(0, vocab, (B, T), generator=g)
    prompt_mask = (torch.arange(T) < PROMPT).expand(B, T)
    return images, idx, prompt_mask


def test_pool_features_keeps_class_token_and_averages_patch_blocks():
    vit_config = ViTConfig.tiny()  # 64 px / 16 = a 4 x 4 patch grid
    fuser = HierarchicalFuser(FuserConfig(vit_layers=(2, 4), pool=2), vit_config, GPTConfig.tiny())
    torch.manual_seed(0)
    hidden = [torch.randn(2, 1 + 16, vit_config.width) for _ in range(vit_config.layers + 1)]
    pooled = fuser.pool_features(hidden)
    assert pooled.shape == (2, 2, 1 + 4, vit_config.width)  # (B, K, N, D_v): N = 1 + 16 / 2^2
    for k, layer in enumerate((2, 4)):
        h = hidden[layer]
        grid = h[:, 1:].reshape(2, 4, 4, -1)  # (B, row, col, D): patches are row-major
        assert torch.equal(pooled[:, k, 0], h[:, 0])  # the class token, untouched
        for slot, (r, c) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)], start=1):  # 2 x 2 blocks, row-major
            block = grid[:, r:r + 2, c:c + 2].reshape(2, 4, -1).mean(1)
            assert close(pooled[:, k, slot], block, atol=1e-6)


def test_pool_that_does_not_divide_the_grid_overhangs_it():
    """ViT-B/32's 7 x 7 grid with the default pool 2: 4 x 4 blocks, those on the right and bottom
    edges averaging the patches they cover (2 x 1, 1 x 2, and the corner patch alone)."""
    vit_config = ViTConfig(image_size=224, patch_size=32, width=16, layers=2, heads=2, mlp_width=32)
    assert vit_config.grid == 7
    fuser = HierarchicalFuser(FuserConfig(), vit_config, GPTConfig.tiny())  # the default pool, 2
    assert fuser.slot_key.shape[0] == 1 + 16  # N = 1 + ceil(7 / 2)^2
    torch.manual_seed(0)
    hidden = [torch.randn(2, 1 + 49, 16) for _ in range(3)]
    pooled = fuser.pool_features(hidden)  # (B, K, N, D_v)
    assert pooled.shape == (2, 2, 17, 16)
    grid = hidden[1][:, 1:].reshape(2, 7, 7, 16)
    for r, c in [(0, 0), (0, 6), (6, 0), (6, 6), (2, 4)]:
        block = grid[:, r:r + 2, c:c + 2].reshape(2, -1, 16).mean(1)  # slicing stops at the edge
        assert close(pooled[:, 0, 1 + (r // 2) * 4 + c // 2], block, atol=1e-6), (r, c)
    assert close(pooled[:, 0, 16], grid[:, 6, 6], atol=1e-6)  # the corner block is one patch
    for pool, N in [(3, 1 + 9), (7, 1 + 1), (9, 1 + 1)]:  # a pool as big as the grid or bigger: one block
        assert HierarchicalFuser(FuserConfig(pool=pool), vit_config, GPTConfig.tiny()).pool_features(hidden).shape[2] == N
    for bad, message in [(dict(pool=0), "pool must be at least 1"), (dict(vit_layers=(3,)), r"must be in 1\.\.2")]:
        with pytest.raises(ValueError, match=message):  # a clear error, not an assert
            HierarchicalFuser(FuserConfig(**bad), vit_config, GPTConfig.tiny())


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_clip_builds_a_fuser_with_the_defaults(name):
    """Each public name's tower (vit.py's table) with FuserConfig()'s pool 2 and GPT-2's width;
    the 7 x 7 grid of clip-vit-base-patch32 used to fail an assert here."""
    vit_config = PUBLIC[name]
    fuser = HierarchicalFuser(FuserConfig(), vit_config, GPTConfig())
    g = math.ceil(vit_config.grid / 2)
    h = torch.randn(1, 1 + vit_config.grid ** 2, vit_config.width)  # one layer's hidden state, for them all
    pooled = fuser.pool_features([h] * (vit_config.layers + 1))
    assert pooled.shape == (1, vit_config.layers, 1 + g * g, vit_config.width)
    memory = fuser.memory_for(pooled, torch.ones(1, 4, dtype=torch.bool), torch.ones(1, dtype=torch.bool))
    keys, values = memory(0, torch.randn(1, 4, GPTConfig().n_embd))
    assert keys.shape == values.shape == (1, 1 + g * g, GPTConfig().n_embd)


@pytest.mark.parametrize("mode", ["dehvf", "static"])
@pytest.mark.parametrize("images_in", ["some", "all"])  # "all" takes the fuser's path without torch.where
def test_memory_matches_the_design_written_out(mode, images_in):
    """Steps 1-5 computed literally, with plain ops, equal the fuser's memory and mix, for
    every decoder layer."""
    model = make(mode)
    fuser, d = model.fuser, model.gpt.config.n_embd
    images, idx, prompt_mask = inputs()
    prompt_mask = prompt_mask.clone()
    prompt_mask[1, 4:] = False  # prompts of different lengths
    has_image = torch.tensor([True, images_in == "all", True])
    with torch.no_grad():
        pooled = model.features(images)  # (B, K, N, D_v)
        memory = fuser.memory_for(pooled, prompt_mask, has_image)
        for layer in range(model.gpt.config.n_layer):
            x = torch.randn(B, T, d)  # the residual stream entering this layer
            keys, values = memory(layer, x)
            # the design, literally
            Fk = torch.stack([norm(pooled[:, k]) for k, norm in enumerate(fuser.norms)], 1)  # (B, K, N, D_v)
            scores = fuser.layer_bias[layer].expand(B, -1)
            if mode == "dehvf":
                m = prompt_mask[..., None].float()
                g = (fuser.select_norm(x) * m).sum(1) / m.sum(1)  # (B, d): mean of LN(x) over the prompt
                scores = scores + g @ fuser.select.weight.T
            a = scores.softmax(-1)  # (B, K)
            Fbar = (a[:, :, None, None] * Fk).sum(1)  # (B, N, D_v)
            Z = fuser.up(F.gelu(fuser.down(Fbar)))  # (B, N, d)
            Z[~has_image] = 0  # step 6: no image, Z = 0; the learned slots act alone
            assert close(memory.mix[:, layer], a, atol=1e-6)
            assert close(keys, (Z + fuser.slot_key) / math.sqrt(d))
            assert close(values, fuser.gate[layer] * (Z + fuser.slot_value))
            if images_in == "some":
                assert torch.equal(keys[1], fuser.slot_key / math.sqrt(d))  # exactly: no trace of its image
                assert values[1].abs().min() > 0  # the gates are open: the text-only sample's slots act
            # the slots are computed once per layer (at prefill) and reused for every later call
            again = memory(layer, torch.randn(B, 1, d))
            assert all(u is v for u, v in zip(again, (keys, values)))
        # a batch without images needs no features: the same slots for every sample
        keys, values = fuser.memory_for(None, prompt_mask, torch.zeros(B, dtype=torch.bool))(0, torch.randn(B, T, d))
        assert torch.equal(keys, (fuser.slot_key / math.sqrt(d)).expand(B, -1, -1))
        assert torch.equal(values, (fuser.gate[0] * fuser.slot_value).expand(B, -1, -1))


@torch.no_grad()
def test_mix_per_mode():
    images, idx, prompt_mask = inputs()
    other_images, other_idx, _ = inputs(seed=1)
    L = GPTConfig.tiny().n_layer
    for mode, K in [("dehvf", 4), ("static", 4), ("memvp", 1)]:
        model = make(mode)
        a = model.fusion_mix(images, idx, prompt_mask)
        assert a.shape == (B, L, K)
        assert close(a.sum(-1), torch.ones(B, L), atol=1e-6)  # a mix over the ViT layers
        assert (a >= 0).all()
        # a different prompt, and a different image
        new_prompt = model.fusion_mix(images, other_idx, prompt_mask)
        new_image = model.fusion_mix(other_images, idx, prompt_mask)
        # a different answer (tokens outside the prompt): the mix never reads it
        answer = idx.clone()
        answer[:, PROMPT:] = other_idx[:, PROMPT:]
        new_answer = model.fusion_mix(images, answer, prompt_mask)
        assert torch.equal(new_answer, a)
        if mode == "dehvf":  # each sample's own mix, read off its prompt, different per decoder layer
            assert (new_prompt - a).abs().max() > 1e-2
            assert (a[0] - a[1]).abs().max() > 1e-2
            assert (a[:, 0] - a[:, 1]).abs().max() > 1e-2
            # the selector reads the text, not the image; but x_l past layer 0 carries the image
            # memory the earlier layers added, so only layer 0's mix is image-free
            assert torch.equal(new_image[:, 0], a[:, 0]) and not torch.equal(new_image, a)
        if mode == "static":  # a learned constant per decoder layer: no prompt, no image, no sample
            assert torch.equal(new_prompt, a) and torch.equal(new_image, a)
            assert torch.equal(a, a[:1].expand_as(a))
            assert (a[:, 0] - a[:, 1]).abs().max() > 1e-2
            assert close(a[0], model.fuser.layer_bias.softmax(-1), atol=1e-6)
        if mode == "memvp":  # K = 1, the penultimate ViT layer: one-hot
            assert model.fuser.layers == [model.vit.config.layers - 1]
            assert torch.equal(a, torch.ones(B, L, 1))


def test_vector_gate_is_per_channel_starts_closed_and_trains_per_channel():
    vit, gpt = (copy.deepcopy(m) for m in _backbones())
    torch.manual_seed(0)
    model = VLM(vit, gpt, "dehvf", FuserConfig(gate="vector"))
    L, d = gpt.config.n_layer, gpt.config.n_embd
    gate = model.fuser.gate
    assert gate.shape == (L, d) and not gate.any()  # gamma_l: a (d,) vector per decoder layer, at 0
    images, idx, prompt_mask = inputs()
    targets = idx.roll(-1, dims=1)
    targets[:, :PROMPT - 1] = targets[:, -1] = -100  # the answer carries the loss
    with torch.no_grad():
        assert torch.equal(model(images, idx, prompt_mask=prompt_mask)[0], gpt(idx)[0])  # identity at init
    model(images, idx, targets, prompt_mask)[1].backward()
    assert gate.grad.ne(0).all()  # every channel of every layer gets its own gradient ...
    assert (gate.grad != gate.grad[:, :1]).any(1).all()  # ... not one value per layer
    with torch.no_grad():
        gate -= gate.grad  # a plain gradient step (building a torch.optim optimiser costs seconds of imports)
        assert (gate != gate[:, :1]).any(1).all()  # so the channels move apart
        # and each channel scales its own output channel of the memory
        gate.zero_()
        gate[:, 5] = 1.0
        memory = model.fuser.memory_for(model.features(images), prompt_mask, torch.ones(B, dtype=torch.bool))
        for layer in range(L):
            _, values = memory(layer, torch.randn(B, T, d))
            assert values[..., 5].abs().min() > 0 and not values[..., :5].any() and not values[..., 6:].any()
