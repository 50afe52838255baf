"""CLIP's vision transformer, from scratch, returning every layer's hidden states.

The fuser (fuser.py) reads the ViT hierarchically: shallow layers carry fine
detail, deep layers semantics. So `ViT.forward` returns the whole list
[h_0, h_1, ..., h_L], each (B, 1 + P, D): the class token then P patch tokens,
with h_0 the embeddings after `pre_layrnorm`, exactly as Hugging Face's
CLIPVisionModel(output_hidden_states=True) returns them. The ViT is frozen.

Also here: `preprocess`, CLIP's image preprocessing with PIL only (resize the
short side with bicubic, centre crop, normalise with CLIP's mean and std). It
takes an RGB image: reading image files (EXIF orientation, 16-bit grey,
see-through parts) is the data code's, data/batch.py's `load_image`.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from weights import CheckpointError, copy_state, hf_checkpoint, read_config

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    layer_norm_eps: float = 1e-5
    act: str = "quick_gelu"  # CLIP's x * sigmoid(1.702 x); "gelu" also accepted

    @classmethod
    def tiny(cls):
        """A small random ViT for offline runs and tests."""
        return cls(image_size=64, patch_size=16, width=128, layers=4, heads=4, mlp_width=512)

    @property
    def grid(self):  # patches per side
        return self.image_size // self.patch_size


PUBLIC = {  # public name -> its sizes, as llm.py's; the name is the huggingface.co repository
    "openai/clip-vit-base-patch32": ViTConfig(patch_size=32),  # ViT-B/32
    "openai/clip-vit-base-patch16": ViTConfig(),  # ViT-B/16
    "openai/clip-vit-large-patch14": ViTConfig(patch_size=14, width=1024, layers=24, heads=16, mlp_width=4096),
    "openai/clip-vit-large-patch14-336": ViTConfig(image_size=336, patch_size=14, width=1024, layers=24, heads=16,
                                                   mlp_width=4096),
}
# our field -> its name in a Hugging Face CLIP vision config
HF_FIELDS = dict(image_size="image_size", patch_size="patch_size", width="hidden_size", layers="num_hidden_layers",
                 heads="num_attention_heads", mlp_width="intermediate_size", layer_norm_eps="layer_norm_eps",
                 act="hidden_act")


class Attention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.heads = config.heads
        self.q_proj = nn.Linear(config.width, config.width)
        self.k_proj = nn.Linear(config.width, config.width)
        self.v_proj = nn.Linear(config.width, config.width)
        self.out_proj = nn.Linear(config.width, config.width)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (proj(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # every token sees every token
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.act = config.act
        self.fc1 = nn.Linear(config.width, config.mlp_width)
        self.fc2 = nn.Linear(config.mlp_width, config.width)

    def forward(self, x):
        x = self.fc1(x)
        x = x * torch.sigmoid(1.702 * x) if self.act == "quick_gelu" else F.gelu(x)
        return self.fc2(x)


class EncoderLayer(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ViT(nn.Module):
    """CLIP's vision tower, kept frozen. It returns every layer's hidden states, not only the last,
    because the fuser mixes them per decoder layer (shallow = detail, deep = semantics)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        D = config.width
        self.class_embedding = nn.Parameter(torch.randn(D) * D ** -0.5)
        self.patch_embedding = nn.Conv2d(3, D, config.patch_size, stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.grid ** 2 + 1, D)
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        self.pre_layrnorm = nn.LayerNorm(D, eps=config.layer_norm_eps)  # sic: CLIP's spelling
        self.layers = nn.ModuleList([EncoderLayer(config) for _ in range(config.layers)])

    def forward(self, pixels, upto=None):
        """pixels: (B, 3, S, S) from preprocess -> [h_0, ..., h_upto], each (B, 1 + P, D)."""
        B = pixels.size(0)
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, D, g, g)
        patches = patches.flatten(2).transpose(1, 2)  # (B, P, D)
        cls = self.class_embedding.expand(B, 1, -1)
        x = torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (B, 1 + P, D)
        x = self.pre_layrnorm(x)
        hidden = [x]
        for layer in self.layers[:upto]:
            x = layer(x)
            hidden.append(x)
        return hidden

    @classmethod
    def from_pretrained(cls, name_or_path: str):
        """The vision tower of a public CLIP (see PUBLIC), or of a local checkpoint
        (a CLIPModel's `vision_model.*` keys or a CLIPVisionModel's) with its config.json."""
        repo = name_or_path if name_or_path in PUBLIC and not Path(name_or_path).exists() else None
        state, hf_config, config_file = hf_checkpoint(name_or_path, repo)
        if hf_config is not None and hf_config.get("model_type") not in ("clip", "clip_vision_model", None):
            raise CheckpointError(f"{name_or_path} is a {hf_config['model_type']} checkpoint, not CLIP")
        # keep the vision tower (CLIPModel and older CLIPVisionModel files nest it under
        # vision_model.); CLIP's names, minus their nesting
        if any(k.startswith("vision_model.") for k in state):
            state = {k.removeprefix("vision_model."): v for k, v in state.items() if k.startswith("vision_model.")}
        state = {k.replace("embeddings.", "").replace("encoder.", ""): v for k, v in state.items()}
        # position_ids is a buffer; post_layernorm only feeds CLIP's pooled output, which we never use
        state = {k: v for k, v in state.items() if k != "position_ids" and not k.startswith("post_layernorm")}
        if "patch_embedding.weight" not in state:
            raise CheckpointError(f"{name_or_path} is not a CLIP vision checkpoint (no patch embedding)")
        # every size from config.json (a CLIPModel's nests them in vision_config), or for a public
        # name from our table; copy_state then checks the weights against them
        vision = hf_config.get("vision_config", hf_config) if hf_config is not None else None
        config = ViTConfig(**read_config(vision, config_file, HF_FIELDS, ViTConfig, PUBLIC.get(repo)))
        if config.act not in ("quick_gelu", "gelu"):
            raise CheckpointError(f"{config_file}: hidden_act is {config.act!r}, not quick_gelu or gelu")
        if config.width % config.heads:
            raise CheckpointError(f"{config_file}: num_attention_heads {config.heads} does not divide "
                                  f"hidden_size {config.width}")
        model = cls(config)
        copy_state(model, state, name_or_path)
        return model


def preprocess(image: Image.Image, size: int = 224) -> torch.Tensor:
    """CLIP preprocessing: an RGB PIL image -> (3, size, size) normalised float tensor."""
    assert image.mode == "RGB", f"preprocess takes RGB, not {image.mode}: data.batch.to_rgb makes it"
    w, h = image.size
    # the short side becomes `size` (rounded as Hugging Face's CLIPImageProcessor does), then the centre square
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    if max(new_w, new_h) <= 2 * size:  # as CLIP does it: resize all, then crop
        image = image.resize((new_w, new_h), Image.BICUBIC).crop((left, top, left + size, top + size))
    else:  # a long strip (1 x 300000 would need 224 x 67M): resize only the source box that becomes
        # the square; the filter still reads the pixels around it, so the same picture within rounding
        sx, sy = w / new_w, h / new_h  # source pixels per resized pixel
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        image = image.resize((size, size), Image.BICUBIC, box=box)
    x = np.asarray(image, dtype=np.float32) / 255.0  # (size, size, 3)
    x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())
