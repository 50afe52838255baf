"""GPT-2, from scratch, with one door for vision: extra key-value memory in the FFN.

This is the frozen language model of nanoDEHVF. It is plain GPT-2 (parameter
names as in the public checkpoint, so `from_pretrained` is a loop over keys),
with two additions the rest of the code needs:

- a KV cache, so generating one more token costs one token;
- `memory`: a function `memory(layer, x) -> (K, V) or None` that block
  `layer` calls with the residual stream `x` entering it. The returned N
  visual slots are appended to that block's FFN hidden units (DESIGN.md
  section 3): mlp(x) = c_proj(gelu(c_fc(x))) + gelu(x @ K^T) @ V. `fuser.py`
  provides the function; this file knows nothing about images. With
  memory=None this is bit-for-bit GPT-2.

`prefix` (LLaVA-style input embeddings put before the text) is the other way
in, used only by the `prefix` baseline mode.
"""
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from weights import CheckpointError, copy_state, hf_checkpoint, read_config

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    layer_norm_eps: float = 1e-5

    @classmethod
    def tiny(cls):
        """A small random decoder for offline runs and tests."""
        return cls(block_size=256, n_layer=4, n_head=4, n_embd=128)


PUBLIC = {  # public name -> its sizes, as in nanoGPT; the files are huggingface.co/openai-community/<name>'s
    "gpt2": GPTConfig(),  # 124M parameters
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


class KVCache:
    """Keys and values of every position seen so far, per layer."""

    def __init__(self):
        self.k, self.v = {}, {}

    def __len__(self):
        return self.k[0].size(2) if self.k else 0

    def update(self, layer, k, v):  # k, v: (B, nh, T, hs) -> all positions so far
        if layer in self.k:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, layer, cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, past + T, hs)
        past = k.size(2) - T
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T == 1:  # one new token sees everything before it
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # several new tokens after a cached prefix
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    """GPT-2's FFN. Visual memory slots, when given, are extra hidden units:
    K holds their input weights, V their output weights."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x, slots=None):  # x: (B, T, d), already layer-normed
        y = self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))
        if slots is not None:
            K, V = slots  # (B, N, d) each
            y = y + F.gelu(x @ K.transpose(1, 2), approximate="tanh") @ V  # (B, T, N) @ (B, N, d)
        return y


class Block(nn.Module):
    """One GPT-2 layer (pre-LN attention, then the FFN), where the visual memory enters: just before the FFN."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, layer, memory=None, cache=None):
        slots = memory(layer, x) if memory is not None else None  # from the stream entering the block
        x = x + self.attn(self.ln_1(x), layer, cache)
        x = x + self.mlp(self.ln_2(x), slots)
        return x


class GPT(nn.Module):
    """GPT-2 as nanoGPT writes it, kept frozen: the VLM (model.py) changes no weight of it and reaches
    it only through `memory` (the fuser's FFN slots) or `prefix` (input embeddings), so with neither
    it is exactly the public GPT-2. `hidden` and `lm_head` are forward's two halves, for callers
    that need the logits at a few positions only."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps),
        ))
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)

    def hidden(self, idx, memory=None, prefix=None, cache=None):
        """The trunk: final hidden states (after ln_f) of the text positions, (B, T, d).
        prefix: (B, P, d) input embeddings placed before idx; their outputs are dropped."""
        past = len(cache) if cache is not None else 0
        x = self.transformer.wte(idx)  # (B, T, d)
        P = 0 if prefix is None else prefix.size(1)
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)  # (B, P + T, d)
        if past + x.size(1) > self.config.block_size:
            raise ValueError(f"sequence of {past + x.size(1)} positions exceeds the context of "
                             f"{self.config.block_size}")
        pos = torch.arange(past, past + x.size(1), device=idx.device)
        x = x + self.transformer.wpe(pos)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, layer, memory, cache)
        return self.transformer.ln_f(x[:, P:])

    def lm_head(self, h):
        """Logits (..., V) of hidden states h (..., d), the head tied to the token embedding as in
        GPT-2. Give it only the positions you need: at GPT-2 small's 50,257 words it costs as much as
        five blocks, so training passes only the positions that have a target (model.py)."""
        return F.linear(h, self.transformer.wte.weight)

    def forward(self, idx, targets=None, memory=None, prefix=None, cache=None):
        """nanoGPT's: logits at every position, (B, T, V), and the mean loss over the targets
        ((B, T), -100 = no target), or None without targets."""
        logits = self.lm_head(self.hidden(idx, memory, prefix, cache))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, memory=None, prefix=None,
                 use_cache=True):
        """Append max_new_tokens to idx (B, T). temperature 0 = greedy."""
        cache = KVCache() if use_cache else None
        new = idx
        for step in range(max_new_tokens):
            if use_cache:
                h = self.hidden(new, memory, prefix if step == 0 else None, cache)
            else:
                h = self.hidden(idx, memory, prefix)
            logits = self.lm_head(h[:, -1]).float()  # (B, V)
            if temperature == 0:
                new = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                new = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat([idx, new], dim=1)  # (B, T + step + 1)
        return idx

    @classmethod
    def from_pretrained(cls, name_or_path: str):
        """GPT-2 from a public name (see PUBLIC), a local Hugging Face checkpoint directory, or a
        weights file, with config.json beside it."""
        public = name_or_path in PUBLIC and not Path(name_or_path).exists()
        repo = f"openai-community/{name_or_path}" if public else None
        state, hf_config, config_file = hf_checkpoint(name_or_path, repo)
        if hf_config is not None and hf_config.get("model_type", "gpt2") != "gpt2":
            raise CheckpointError(f"{name_or_path} is a {hf_config['model_type']} checkpoint, not GPT-2")
        # Hugging Face names, with or without the "transformer." of GPT2LMHeadModel
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
        state = {k: v for k, v in state.items()  # buffers and the tied head are not weights of ours
                 if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
        if "wte.weight" not in state or "wpe.weight" not in state:
            raise CheckpointError(f"{name_or_path} is not a GPT-2 checkpoint (no wte/wpe weights)")
        # every size from config.json (what a public name's lacks from PUBLIC); copy_state then checks
        # the weights against them
        config = GPTConfig(**read_config(hf_config, config_file, dict(
            block_size=("n_positions", "n_ctx"), vocab_size="vocab_size", n_layer="n_layer", n_head="n_head",
            n_embd="n_embd", layer_norm_eps="layer_norm_epsilon"), GPTConfig, PUBLIC[name_or_path] if public else None))
        if config.n_embd % config.n_head:
            raise CheckpointError(f"{config_file}: n_head {config.n_head} does not divide n_embd {config.n_embd}")
        for key, ours in (("activation_function", "gelu_new"), ("scale_attn_weights", True),
                          ("scale_attn_by_inverse_layer_idx", False)):  # GPT-2's, and Hugging Face's defaults
            if hf_config.get(key, ours) != ours:
                raise CheckpointError(f"{config_file}: {key} is {hf_config[key]!r}; only GPT-2's {ours!r} is supported")
        model = cls(config)
        state = {"transformer." + k: v for k, v in state.items()}
        # GPT-2 stores these as Conv1D, (in, out): nn.Linear wants (out, in)
        copy_state(model, state, name_or_path,
                   transposed=("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))
        return model
