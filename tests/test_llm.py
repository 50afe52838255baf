"""llm.py: parity with transformers' GPT-2, every size read from config.json, the KV cache,
top-k sampling, the FFN memory hook, causality."""
import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from llm import PUBLIC, GPT, GPTConfig, KVCache
from weights import CheckpointError


def max_diff(a, b):
    return (a - b).abs().max().item()


def official_bin(hf_model, path):
    """Write hf_model the way the original openai gpt2 pytorch_model.bin is laid out:
    no "transformer." prefix, no lm_head, and the attention mask buffers saved as weights."""
    config = hf_model.config
    state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    n = config.n_positions
    for i in range(config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.ones(n, n).tril().view(1, 1, n, n)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    path.mkdir()
    torch.save(state, path / "pytorch_model.bin")
    config.to_json_file(path / "config.json")
    return path


@pytest.fixture(params=["safetensors", "bin", "official_bin", "weights_file"])
def gpt2_checkpoint(request, hf_gpt2, tmp_path):
    """The tiny transformers GPT-2 and a path to it, in each layout GPT.from_pretrained reads."""
    hf, saved = hf_gpt2
    if request.param == "safetensors":  # save_pretrained's own layout
        assert (saved / "model.safetensors").exists()
        return hf, saved
    if request.param == "bin":  # a transformers state dict pickled, next to config.json
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
        hf.config.to_json_file(tmp_path / "config.json")
        return hf, tmp_path
    if request.param == "official_bin":
        return hf, official_bin(hf, tmp_path / "gpt2")
    return hf, saved / "model.safetensors"  # a weights file, config.json beside it


@torch.no_grad()
def test_gpt2_parity_tiny(gpt2_checkpoint):
    hf, path = gpt2_checkpoint
    model = GPT.from_pretrained(str(path)).eval()
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (2, 4, 64)
    torch.manual_seed(1)
    idx = torch.randint(0, hf.config.vocab_size, (3, 40))
    ours, _ = model(idx)
    theirs = hf(idx).logits
    assert ours.shape == theirs.shape == (3, 40, 101)
    assert max_diff(ours, theirs) <= 1e-4
    # the loss: our targets are the next tokens, theirs are shifted inside the model
    _, loss = model(idx[:, :-1], targets=idx[:, 1:])
    assert abs(loss.item() - hf(idx, labels=idx).loss.item()) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("use_cache", [True, False])
def test_gpt2_greedy_generation_matches(hf_gpt2, use_cache):
    hf, path = hf_gpt2
    model = GPT.from_pretrained(str(path)).eval()
    torch.manual_seed(2)
    idx = torch.randint(0, hf.config.vocab_size, (2, 7))
    ours = model.generate(idx, 20, temperature=0, use_cache=use_cache)
    theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=20, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    assert ours.shape == (2, 27)
    assert torch.equal(ours, theirs)


@torch.no_grad()
def test_gpt2_parity_124M_shape(tmp_path):
    """The real gpt2 shape (12 layers, 768 wide, 50257 tokens, 1024 positions), random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(str(tmp_path)).eval()
    assert model.config == GPTConfig()  # the defaults are gpt2's
    idx = torch.randint(0, 50257, (2, 12))
    assert max_diff(model(idx)[0], hf(idx).logits) <= 1e-4


def edited_config(saved, path, **changes):
    """A copy of the checkpoint folder saved, its config.json changed (a value None: the key deleted)."""
    shutil.copytree(saved, path)
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        config.pop(key, None) if value is None else config.update({key: value})
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("key", ["n_head", "n_layer", "n_embd", "n_positions", "vocab_size", "layer_norm_epsilon"])
def test_config_without_a_size_is_an_error_not_a_guess(hf_gpt2, tmp_path, key):
    """Each size that shapes the model comes from config.json: missing, it is a clear error (the
    head count used to be guessed as n_embd // 64: a silently wrong model)."""
    path = edited_config(hf_gpt2[1], tmp_path / "gpt2", **{key: None}, n_ctx=None)
    with pytest.raises(CheckpointError) as e:
        GPT.from_pretrained(str(path))
    keys = "n_positions or n_ctx" if key == "n_positions" else key
    assert str(e.value).startswith(f"{path / 'config.json'} has no {keys}: the model cannot be built without it")


def test_config_values_are_read_and_checked(hf_gpt2, tmp_path, monkeypatch):
    _, saved = hf_gpt2
    older = edited_config(saved, tmp_path / "older", n_positions=None, n_ctx=64, layer_norm_epsilon=1e-6)
    model = GPT.from_pretrained(str(older))  # older configs give the context as n_ctx
    assert (model.config.block_size, model.config.n_head, model.config.layer_norm_eps) == (64, 4, 1e-6)
    assert model.transformer.h[0].ln_1.eps == 1e-6
    for name, changes, message in [
        ("text", dict(n_head="4"), "n_head is '4', not a positive int"),
        ("odd", dict(n_head=3), "n_head 3 does not divide n_embd 64"),
        ("relu", dict(activation_function="relu"), "activation_function is 'relu'; only GPT-2's 'gelu_new'"),
        ("scaled", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx is True"),
    ]:
        path = edited_config(saved, tmp_path / name, **changes)
        with pytest.raises(CheckpointError, match="^" + re.escape(f"{path / 'config.json'}: {message}")):
            GPT.from_pretrained(str(path))
    alone = tmp_path / "alone"  # the weights without their config.json
    alone.mkdir()
    shutil.copy(saved / "model.safetensors", alone)
    with pytest.raises(CheckpointError, match="^" + re.escape(f"{alone / 'config.json'} not found: the model's sizes")):
        GPT.from_pretrained(str(alone / "model.safetensors"))

    # a public name: what its (downloaded) config.json lacks comes from our table of its sizes
    monkeypatch.setenv("NANODEHVF_CACHE", str(tmp_path / "cache"))
    edited_config(saved, tmp_path / "cache" / "openai-community" / "gpt2", layer_norm_epsilon=None)
    model = GPT.from_pretrained("gpt2")  # in the cache: nothing to download
    assert model.config.layer_norm_eps == PUBLIC["gpt2"].layer_norm_eps
    assert model.config.n_head == 4  # the rest from the file


def tiny_model(seed=0):
    """Smaller than GPTConfig.tiny() (a 97-token vocabulary) so that step-by-step loops stay fast."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, vocab_size=97, n_layer=3, n_head=4, n_embd=32)).eval()


def random_memory(config, B, N=6, seed=3):
    """A memory function returning fixed random (K, V) per layer."""
    g = torch.Generator().manual_seed(seed)
    d = config.n_embd
    slots = [(torch.randn(B, N, d, generator=g) * 0.2, torch.randn(B, N, d, generator=g) * 0.2)
             for _ in range(config.n_layer)]
    return lambda layer, x: slots[layer]


@torch.no_grad()
@pytest.mark.parametrize("variant", ["plain", "memory", "prefix"])
def test_kv_cache_matches_recompute(variant):
    model = tiny_model()
    B, T0, steps = 2, 5, 30
    memory = random_memory(model.config, B) if variant == "memory" else None
    prefix = torch.randn(B, 4, model.config.n_embd) if variant == "prefix" else None
    idx = torch.randint(0, model.config.vocab_size, (B, T0 + steps))
    cache = KVCache()
    logits, _ = model(idx[:, :T0], memory=memory, prefix=prefix, cache=cache)  # prefill
    assert max_diff(logits, model(idx[:, :T0], memory=memory, prefix=prefix)[0]) <= 1e-5
    for t in range(T0, T0 + steps):
        step, _ = model(idx[:, t:t + 1], memory=memory, cache=cache)  # (B, 1, V)
        assert len(cache) == t + 1 + (0 if prefix is None else prefix.size(1))
        full, _ = model(idx[:, :t + 1], memory=memory, prefix=prefix)  # (B, t + 1, V)
        assert max_diff(step[:, 0], full[:, -1]) <= 1e-5, f"step {t - T0}"


@torch.no_grad()
def test_kv_cache_several_tokens_at_a_time():
    """Chunks of new tokens after a cached past see the past and, causally, each other."""
    model = tiny_model()
    idx = torch.randint(0, model.config.vocab_size, (2, 20))
    full, _ = model(idx)
    cache, outs, t = KVCache(), [], 0
    for n in (6, 3, 1, 7, 3):
        outs.append(model(idx[:, t:t + n], cache=cache)[0])
        t += n
    assert max_diff(torch.cat(outs, dim=1), full) <= 1e-5


@torch.no_grad()
def test_generate_with_and_without_cache_identical():
    model = tiny_model()
    B = 2
    memory, prefix = random_memory(model.config, B), torch.randn(B, 3, model.config.n_embd)
    idx = torch.randint(0, model.config.vocab_size, (B, 4))
    for kw in ({}, dict(memory=memory), dict(prefix=prefix)):
        a = model.generate(idx, 15, temperature=0, use_cache=True, **kw)
        b = model.generate(idx, 15, temperature=0, use_cache=False, **kw)
        assert torch.equal(a, b), kw
        torch.manual_seed(5)
        a = model.generate(idx, 15, temperature=1.0, top_k=20, use_cache=True, **kw)
        torch.manual_seed(5)
        b = model.generate(idx, 15, temperature=1.0, top_k=20, use_cache=False, **kw)
        assert torch.equal(a, b), kw


@torch.no_grad()
def test_top_k_sampling_never_leaves_the_top_k():
    """Every sampled token is among the k most likely at its step (ties included), and top_k=1 is greedy."""
    model = tiny_model()
    B, T0, steps, k = 4, 3, 25, 3
    idx = torch.randint(0, model.config.vocab_size, (B, T0))
    torch.manual_seed(0)
    out = model.generate(idx, steps, temperature=2.0, top_k=k)  # a hot temperature: the tail is likely
    logits, _ = model(out[:, :-1])  # (B, T0 + steps - 1, V): what each new token was sampled from
    for t in range(T0, T0 + steps):
        step_logits = logits[:, t - 1]  # (B, V)
        kth = step_logits.topk(k, dim=-1).values[:, -1]  # (B,)
        chosen = step_logits.gather(1, out[:, t:t + 1])[:, 0]
        assert (chosen >= kth - 1e-6).all(), f"step {t - T0}: a token outside the top {k}"
    assert len(set(out[:, T0:].flatten().tolist())) > k  # the guard: not one fixed set of k tokens
    assert torch.equal(model.generate(idx, 10, temperature=1.0, top_k=1), model.generate(idx, 10, temperature=0))


@torch.no_grad()
def test_ffn_memory_is_extra_hidden_units():
    """mlp(x) = c_proj(gelu(c_fc(x))) + gelu(x K^T) V: the slots are N more hidden units."""
    model = tiny_model()
    mlp = model.transformer.h[0].mlp
    B, T, N, d = 2, 7, 6, model.config.n_embd
    x, K, V = torch.randn(B, T, d), torch.randn(B, N, d), torch.randn(B, N, d)
    out = mlp(x, (K, V))
    gelu = lambda t: F.gelu(t, approximate="tanh")
    for b in range(B):
        expected = mlp.c_proj(gelu(mlp.c_fc(x[b]))) + gelu(x[b] @ K[b].T) @ V[b]
        assert max_diff(out[b], expected) <= 1e-5
    # as hidden units: slots whose output weights are 0 are the same as no slots, and as a plain GPT
    assert torch.equal(mlp(x, (K, torch.zeros_like(V))), mlp(x))
    idx = torch.randint(0, model.config.vocab_size, (B, 16))
    assert torch.equal(model(idx, memory=lambda layer, x: (K, torch.zeros_like(V)))[0], model(idx)[0])
    assert max_diff(model(idx, memory=lambda layer, x: (K, V))[0], model(idx)[0]) > 1e-2


@torch.no_grad()
def test_memory_gets_each_layer_and_its_input_stream():
    model = tiny_model()
    idx = torch.randint(0, model.config.vocab_size, (2, 9))
    seen = []
    model(idx, memory=lambda layer, x: seen.append((layer, x.clone())))
    assert [layer for layer, _ in seen] == list(range(model.config.n_layer))
    embeddings = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(9))
    assert torch.equal(seen[0][1], embeddings)  # layer 0 sees the stream entering block 0


@torch.no_grad()
def test_attention_is_causal():
    model = tiny_model()
    idx = torch.randint(0, model.config.vocab_size, (2, 24))
    base, _ = model(idx)
    for t in (1, 10, 23):
        changed = idx.clone()
        changed[:, t:] = torch.randint(0, model.config.vocab_size, (2, 24 - t))
        out, _ = model(changed)
        assert max_diff(out[:, :t], base[:, :t]) <= 1e-6
        assert max_diff(out[:, t:], base[:, t:]) > 1e-3  # the changed positions do change


@torch.no_grad()
def test_targets_give_the_loss_and_the_head_can_run_where_there_is_a_target():
    model = tiny_model()
    idx = torch.randint(0, model.config.vocab_size, (2, 10))
    targets = torch.randint(0, model.config.vocab_size, (2, 10))
    targets[0, :6] = -100
    targets[1, :3] = -100
    full, _ = model(idx)
    logits, loss = model(idx, targets=targets)
    keep = targets != -100
    assert logits.shape == full.shape == (2, 10, model.config.vocab_size) and torch.equal(logits, full)
    assert abs(loss.item() - F.cross_entropy(full[keep], targets[keep]).item()) <= 1e-5
    # forward's two halves: the head run only at the 11 positions with a target gives their logits
    compact = model.lm_head(model.hidden(idx)[keep])
    assert compact.shape == (11, model.config.vocab_size) and max_diff(compact, full[keep]) <= 1e-5


def test_context_overflow_is_an_error():
    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8))
    with pytest.raises(ValueError, match="9 positions exceeds the context of 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
