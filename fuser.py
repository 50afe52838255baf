"""The DEHVF fuser: hierarchical visual features, mixed per decoder layer, stored as FFN memory.

This is the only part that trains (DESIGN.md section 4, paper section 3).
For one batch of images and every decoder layer l:

1. Visual tokens per ViT layer. Patch tokens of each selected ViT layer k are
   average-pooled on their 2-D grid (the class token kept) and normalised by
   that layer's own LayerNorm: F_k, (B, N, D_v) with N = 1 + ceil(g / pool)^2
   for a g x g grid (a grid that pool does not divide, as ViT-B/32's 7 x 7,
   gets smaller blocks at its right and bottom edges).
   Computed once per image (`pool_features`, cacheable) and normalised per batch.
2. Dynamic selection. g_l = mean of LN(x_l) over the prompt tokens entering
   decoder layer l; a_l = softmax(W_sel g_l + e_l) over the K ViT layers.
   Only prompt tokens feed g_l, so an answer never sees itself (causality),
   and at generation the mix is computed once, at prefill.
3. Fusion. Fbar_l = sum_k a_lk F_k.
4. Projection. Z_l = P(Fbar_l), with one shared low-rank projector
   P = Linear(D_v, r) -> GELU -> Linear(r, d).
5. Memory. K_l = (Z_l + p_k) / sqrt(d), V_l = gamma_l * (Z_l + p_v). The
   1/sqrt(d) keeps the memory scores x @ K^T at the scale of attention scores.
   gamma_l starts at 0: at step 0 the model is exactly the frozen GPT, and the
   first gradient reaches the gates (they sit on the values only: gelu(0) = 0
   would give gates on the keys a zero gradient). p_k and p_v both start small
   and random, so even a batch without images gives the gates a gradient.
6. Injection. (K_l, V_l) go into decoder layer l's FFN (llm.py), through the
   VisualMemory that `memory_for` returns. A sample without an image has
   Z_l = 0: its learned slots p_k, p_v act alone, as MemVP's do, so text-only
   problems train the fuser too.

`static` mode drops W_sel g_l (a per-layer learned mix only); `memvp` mode is
K = 1, the penultimate ViT layer, fed to every decoder layer.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class FuserConfig:
    vit_layers: tuple | None = None  # ViT hidden states to mix, 1..L_v; None = all of them
    pool: int = 2  # average-pool patch tokens pool x pool on their grid (196 -> 49 for ViT-B/16)
    rank: int = 128  # bottleneck r of the shared projector
    gate: str = "scalar"  # gamma_l per decoder layer: "scalar" or "vector" (d,)
    dynamic: bool = True  # False: static mode, the mix does not look at the text


class HierarchicalFuser(nn.Module):

    def __init__(self, config: FuserConfig, vit_config, gpt_config):
        super().__init__()
        self.config = config
        self.layers = list(config.vit_layers or range(1, vit_config.layers + 1))
        if not all(1 <= k <= vit_config.layers for k in self.layers):
            raise ValueError(f"fuser ViT layers {self.layers}: each must be in 1..{vit_config.layers}")
        if config.pool < 1:
            raise ValueError(f"fuser pool must be at least 1, not {config.pool}")
        K, D_v, d, L = len(self.layers), vit_config.width, gpt_config.n_embd, gpt_config.n_layer
        N = 1 + math.ceil(vit_config.grid / config.pool) ** 2  # the class token + the pooled grid
        self.norms = nn.ModuleList([nn.LayerNorm(D_v) for _ in range(K)])  # LN_k, one per ViT layer
        self.layer_bias = self.select = None  # with one ViT layer (memvp) there is nothing to choose
        if K > 1:
            self.layer_bias = nn.Parameter(torch.zeros(L, K))  # e_l, each decoder layer's own preference
        if K > 1 and config.dynamic:
            self.select_norm = nn.LayerNorm(d)  # the LN in g_l = mean LN(x_l)
            self.select = nn.Linear(d, K, bias=False)  # W_sel, shared across decoder layers
            nn.init.normal_(self.select.weight, std=0.02)
        self.down = nn.Linear(D_v, config.rank)  # P = up(gelu(down(.)))
        self.up = nn.Linear(config.rank, d)
        self.slot_key = nn.Parameter(torch.randn(N, d) * 0.02)  # p_k
        self.slot_value = nn.Parameter(torch.randn(N, d) * 0.02)  # p_v
        self.gate = nn.Parameter(torch.zeros(L, d if config.gate == "vector" else 1))  # gamma_l
        self.n_decoder_layers = L

    def pool_features(self, hidden):
        """ViT hidden states [h_0..h_L] -> pooled tokens of the selected layers, (B, K, N, D_v).
        Depends only on the image: this is what a feature cache stores."""
        pooled = []
        for k in self.layers:
            h = hidden[k]  # (B, 1 + P, D_v)
            B, T, D = h.shape
            g = math.isqrt(T - 1)
            patches = h[:, 1:].transpose(1, 2).reshape(B, D, g, g)  # (B, D_v, g, g)
            # ceil_mode: a last row/column of blocks that overhangs the grid averages the patches it covers
            patches = F.avg_pool2d(patches, self.config.pool, ceil_mode=True)  # (B, D_v, g', g'), g' = ceil(g / pool)
            patches = patches.flatten(2).transpose(1, 2)  # (B, g'^2, D_v)
            pooled.append(torch.cat([h[:, :1], patches], dim=1))  # (B, N, D_v)
        return torch.stack(pooled, dim=1)

    def memory_for(self, pooled, prompt_mask, has_image):
        """The `memory` llm.py's blocks call for one batch, a VisualMemory: step 1 here, steps 2-6 per
        decoder layer. pooled: (B, K, N, D_v), or None when no sample has an image; prompt_mask: (B, T) bool;
        has_image: (B,) bool, False = Z_l = 0 for that sample, its learned slots p_k, p_v alone."""
        B, K, N = prompt_mask.size(0), len(self.layers), self.slot_key.size(0)
        if pooled is None:  # zeros stand in: every weight takes part as in any batch (DDP needs that)
            pooled = self.slot_key.new_zeros(B, K, N, self.norms[0].normalized_shape[0])
        feats = torch.stack([norm(pooled[:, k]) for k, norm in enumerate(self.norms)], dim=1)  # step 1: (B, K, N, D_v)
        prompt_weights = prompt_mask.float() / prompt_mask.sum(1, keepdim=True).clamp(min=1)  # (B, T), the prompt mean
        image_mask = None if has_image.all() else has_image[:, None, None]  # (B, 1, 1); None: all have one
        return VisualMemory(self, feats, prompt_weights, image_mask)

    def layer_mix(self, layer, x, prompt_weights):
        """Step 2: a_l, (B, K), decoder layer `layer`'s mix over the K ViT layers, read from the
        prompt tokens of x (B, T, d), the residual stream entering that layer."""
        B, K = x.size(0), len(self.layers)
        if self.layer_bias is None:  # one ViT layer: nothing to choose
            return x.new_ones(B, K)
        scores = self.layer_bias[layer].expand(B, K)  # e_l
        if self.select is not None:
            g = torch.einsum("bt,btd->bd", prompt_weights, self.select_norm(x))  # (B, d): the prompt's mean LN(x_l)
            scores = scores + self.select(g)
        return scores.softmax(dim=-1)

    def layer_slots(self, layer, feats, a, image_mask):
        """Steps 3-5: decoder layer `layer`'s memory (K_l, V_l), (B, N, d) each, from its mix a (B, K)."""
        fbar = torch.einsum("bk,bknc->bnc", a, feats)  # step 3: Fbar_l = sum_k a_lk F_k, (B, N, D_v)
        z = self.up(F.gelu(self.down(fbar)))  # step 4: Z_l = P(Fbar_l), (B, N, d)
        if image_mask is not None:  # a sample without an image: Z_l = 0, its slots act alone
            z = torch.where(image_mask, z, 0.0)
        keys = (z + self.slot_key) / math.sqrt(z.size(-1))  # step 5
        values = self.gate[layer] * (z + self.slot_value)
        return keys, values


class VisualMemory:
    """What llm.py's blocks call for one batch: memory(layer, x) -> (K_l, V_l) (step 6). Each layer's
    slots are made at its first call (the prefill, which holds the whole prompt) and reused for every
    later token. `mix` (B, L, K) keeps each layer's a_l, for pictures and analysis."""

    def __init__(self, fuser, feats, prompt_weights, image_mask):
        self.fuser, self.feats, self.prompt_weights, self.image_mask = fuser, feats, prompt_weights, image_mask
        self.mix = feats.new_zeros(feats.size(0), fuser.n_decoder_layers, feats.size(1))  # (B, L, K)
        self.slots = {}  # layer -> (K_l, V_l)

    def __call__(self, layer, x):  # x: (B, T, d), the residual stream entering decoder layer `layer`
        if layer not in self.slots:
            a = self.fuser.layer_mix(layer, x, self.prompt_weights)  # (B, K)
            self.mix[:, layer] = a.detach()
            self.slots[layer] = self.fuser.layer_slots(layer, self.feats, a, self.image_mask)
        return self.slots[layer]
