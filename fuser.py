"""The DEHVF fuser: hierarchical visual features, mixed per decoder layer, stored as FFN memory.

This is the only part that trains (DESIGN.md section 4, paper section 3).
For one batch of images and every decoder layer l:

1. Visual tokens per ViT layer. Patch tokens of each selected ViT layer k are
   average-pooled on their 2-D grid (the class token kept) and normalised by
   that layer's own LayerNorm: F_k, (B, N, D_v) with N = 1 + P / pool^2.
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
   would give gates on the keys a zero gradient).
6. Injection. (K_l, V_l, slot_mask) go into decoder layer l's FFN (llm.py),
   through the function returned by `memory`.

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
        assert all(1 <= k <= vit_config.layers for k in self.layers), f"ViT layers must be in 1..{vit_config.layers}"
        assert vit_config.grid % config.pool == 0, f"pool {config.pool} must divide the {vit_config.grid}-patch grid"
        K, D_v, d, L = len(self.layers), vit_config.width, gpt_config.n_embd, gpt_config.n_layer
        N = 1 + (vit_config.grid // config.pool) ** 2
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
        self.slot_value = nn.Parameter(torch.zeros(N, d))  # p_v
        self.gate = nn.Parameter(torch.zeros(L, d if config.gate == "vector" else 1))  # gamma_l
        self.selection = None  # (B, L, K): the mix a of the last batch, for pictures and analysis

    def pool_features(self, hidden):
        """ViT hidden states [h_0..h_L] -> pooled tokens of the selected layers, (B, K, N, D_v).
        Depends only on the image: this is what a feature cache stores."""
        pooled = []
        for k in self.layers:
            h = hidden[k]  # (B, 1 + P, D_v)
            B, T, D = h.shape
            g = math.isqrt(T - 1)
            patches = h[:, 1:].transpose(1, 2).reshape(B, D, g, g)  # (B, D_v, g, g)
            patches = F.avg_pool2d(patches, self.config.pool).flatten(2).transpose(1, 2)  # (B, P / pool^2, D_v)
            pooled.append(torch.cat([h[:, :1], patches], dim=1))  # (B, N, D_v)
        return torch.stack(pooled, dim=1)

    def memory(self, pooled, prompt_mask, has_image):
        """The function llm.py's blocks call: memory(layer, x) -> (K_l, V_l, slot_mask).
        pooled: (B, K, N, D_v); prompt_mask: (B, T) bool; has_image: (B,) bool.
        Each layer's slots are computed on the first call (the prefill) and reused after."""
        feats = torch.stack([norm(pooled[:, k]) for k, norm in enumerate(self.norms)], dim=1)  # (B, K, N, D_v)
        # P's first map is linear and the mix sums to 1, so down(sum_k a_k F_k) = sum_k a_k down(F_k):
        # project each ViT layer once here instead of once per decoder layer
        feats = self.down(feats)  # (B, K, N, r)
        B, K, N, _ = feats.shape
        slot_mask = has_image[:, None].expand(B, N)  # (B, N): no image -> no slots -> text-only
        weights = prompt_mask.float() / prompt_mask.sum(1, keepdim=True).clamp(min=1)  # (B, T) mean over prompt
        self.selection = feats.new_zeros(B, self.gate.size(0), K)
        slots = {}

        def memory(layer, x):  # x: (B, T, d) entering decoder layer `layer`
            if layer not in slots:
                a = feats.new_ones(B, K)  # (B, K), the mix over ViT layers
                if self.layer_bias is not None:
                    scores = self.layer_bias[layer].expand(B, K)
                    if self.select is not None:
                        g = torch.einsum("bt,btd->bd", weights, self.select_norm(x))  # (B, d)
                        scores = scores + self.select(g)
                    a = scores.softmax(dim=-1)
                self.selection[:, layer] = a.detach()
                z = self.up(F.gelu(torch.einsum("bk,bknr->bnr", a, feats)))  # (B, N, d)
                keys = (z + self.slot_key) / math.sqrt(z.size(-1))
                values = self.gate[layer] * (z + self.slot_value)
                slots[layer] = (keys, values, slot_mask)
            return slots[layer]

        return memory
