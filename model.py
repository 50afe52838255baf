"""The VLM: a frozen ViT and a frozen GPT joined by the fuser (or by a baseline).

    image -> ViT -> [h_1..h_L] -> fuser -> per decoder layer (K_l, V_l) -> GPT's FFNs
    prompt tokens -------------------------------------------------------> GPT -> answer

Fusion modes (DESIGN.md section 4), one flag, the same code path where possible:

    dehvf   the method: per-layer dynamic mix of all ViT layers, as FFN memory
    static  the mix is a learned per-layer constant (no look at the text)
    memvp   one ViT layer (the penultimate) into every decoder layer (MemVP)
    prefix  LLaVA-style: projected penultimate-layer patch tokens put before the text
    none    text only, the image is ignored (the ablation)

Only the fuser (or prefix's projector) trains unless `freeze` says otherwise.
`train.py`, `sample.py` and `bench.py` use `VLM.forward`, `VLM.generate` and
the checkpoint helpers at the bottom.
"""
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn as nn

import pretrain
from fuser import FuserConfig, HierarchicalFuser
from llm import GPT, GPTConfig
from vit import ViT, ViTConfig
from weights import CheckpointError, torch_load

MODES = ("dehvf", "static", "memvp", "prefix", "none")
FREEZE = ("all", "vit", "llm", "none")  # which backbones stay frozen: both, one, or neither


class VLM(nn.Module):

    def __init__(self, vit: ViT, gpt: GPT, mode="dehvf", fuser_config=None, freeze="all"):
        super().__init__()
        assert mode in MODES, f"mode must be one of {MODES}"
        assert freeze in FREEZE, f"freeze must be one of {FREEZE}"
        self.vit, self.gpt, self.mode, self.freeze = vit, gpt, mode, freeze
        D_v, d = vit.config.width, gpt.config.n_embd
        self.penultimate = vit.config.layers - 1
        fuser_config = replace(fuser_config or FuserConfig(), dynamic=mode == "dehvf")
        if mode == "memvp":
            fuser_config = replace(fuser_config, vit_layers=(self.penultimate,))
        if mode in ("dehvf", "static", "memvp"):
            self.fuser = HierarchicalFuser(fuser_config, vit.config, gpt.config)
        if mode == "prefix":  # LLaVA-1.5's two-layer MLP projector
            self.projector = nn.Sequential(nn.Linear(D_v, d), nn.GELU(), nn.Linear(d, d))
        self.fuser_config = fuser_config
        self.vit_trains = freeze in ("llm", "none")
        for p in self.vit.parameters():
            p.requires_grad_(self.vit_trains)
        for p in self.gpt.parameters():
            p.requires_grad_(freeze in ("vit", "none"))

    @property
    def block_size(self):
        """Text tokens that fit the decoder's context: prefix mode's visual tokens take their share."""
        return self.gpt.config.block_size - (self.vit.config.grid ** 2 if self.mode == "prefix" else 0)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def n_trainable(self):
        return sum(p.numel() for p in self.trainable_parameters())

    def features(self, images):
        """What the fusion consumes from each image: the fuser's pooled ViT layers (B, K, N, D_v),
        or prefix's penultimate-layer patch tokens (B, P, D_v), without the class token, as LLaVA
        feeds them. With a frozen ViT they are the same every epoch, so train.py can cache them."""
        if self.mode == "none":
            return None
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.vit_trains):
            if self.mode == "prefix":
                return self.vit(images, upto=self.penultimate)[-1][:, 1:]
            return self.fuser.pool_features(self.vit(images, upto=max(self.fuser.layers)))

    def hidden(self, images, idx, prompt_mask=None, has_image=None, features=None):
        """Final hidden states of the text, (B, T, d). images: (B, 3, S, S); idx: (B, T);
        prompt_mask: (B, T) bool, the tokens the fuser's selector may read (default: all);
        has_image: (B,) bool, False = that sample has no image (default: all True): in the memory
        modes its learned slots act alone (Z = 0), in prefix mode it gets no prefix."""
        B, T = idx.shape
        has_image = torch.ones(B, dtype=torch.bool, device=idx.device) if has_image is None else has_image
        if self.mode == "none" or (self.mode == "prefix" and not has_image.any()):
            return self.gpt.hidden(idx)
        if features is None and has_image.any():  # a batch without images needs no ViT
            features = self.features(images)
        if self.mode == "prefix":
            prefix = self.projector(features)  # (B, P, d)
            if has_image.all():
                return self.gpt.hidden(idx, prefix=prefix)
            # text-only samples must see no prefix and keep positions 0..T-1: run them apart
            with_image = self.gpt.hidden(idx[has_image], prefix=prefix[has_image])
            h = with_image.new_empty(B, T, with_image.size(-1))  # the GPT's output dtype (fp32 under autocast)
            h[has_image] = with_image
            h[~has_image] = self.gpt.hidden(idx[~has_image])
            return h
        prompt_mask = torch.ones_like(idx, dtype=torch.bool) if prompt_mask is None else prompt_mask
        return self.gpt.hidden(idx, memory=self.fuser.memory_for(features, prompt_mask, has_image))

    def forward(self, images, idx, targets=None, prompt_mask=None, has_image=None, features=None):
        """(logits, loss) as GPT.forward: (B, T, V) without targets, (N, V) at the N targets with."""
        return self.gpt.head(self.hidden(images, idx, prompt_mask, has_image, features), targets)

    @torch.no_grad()
    def fusion_mix(self, images, idx, prompt_mask=None, has_image=None, features=None):
        """(B, L, K): the mix over ViT layers each decoder layer chose for each sample (DESIGN.md
        section 4, step 2), in a memory mode; arguments as hidden's. Read off the prompt, so it is
        also the mix that generate chooses at prefill for that prompt."""
        has_image = torch.ones(idx.size(0), dtype=torch.bool, device=idx.device) if has_image is None else has_image
        prompt_mask = torch.ones_like(idx, dtype=torch.bool) if prompt_mask is None else prompt_mask
        if features is None and has_image.any():
            features = self.features(images)
        memory = self.fuser.memory_for(features, prompt_mask, has_image)
        self.gpt.hidden(idx, memory=memory)  # the decoder runs to give each layer its x_l
        return memory.mix

    @torch.no_grad()
    def generate(self, images, prompt_idx, max_new_tokens, temperature=0.0, top_k=None,
                 has_image=None, use_cache=True, features=None):
        """Continue prompt_idx (B, T) for an image batch. The ViT and every layer's memory are
        computed once, at prefill, and reused for each new token."""
        B = prompt_idx.size(0)
        has_image = torch.ones(B, dtype=torch.bool, device=prompt_idx.device) if has_image is None else has_image
        if self.mode == "none" or (self.mode == "prefix" and not has_image.any()):
            return self.gpt.generate(prompt_idx, max_new_tokens, temperature, top_k, use_cache=use_cache)
        if features is None and has_image.any():
            features = self.features(images)
        if self.mode == "prefix":
            prefix = self.projector(features)  # (B, P, d)
            if has_image.all():
                return self.gpt.generate(prompt_idx, max_new_tokens, temperature, top_k, prefix=prefix,
                                         use_cache=use_cache)
            # as in hidden: the samples with an image and those without run apart
            out = prompt_idx.new_empty(B, prompt_idx.size(1) + max_new_tokens)
            out[has_image] = self.gpt.generate(prompt_idx[has_image], max_new_tokens, temperature, top_k,
                                               prefix=prefix[has_image], use_cache=use_cache)
            out[~has_image] = self.gpt.generate(prompt_idx[~has_image], max_new_tokens, temperature, top_k,
                                                use_cache=use_cache)
            return out
        memory = self.fuser.memory_for(features, torch.ones_like(prompt_idx, dtype=torch.bool), has_image)
        return self.gpt.generate(prompt_idx, max_new_tokens, temperature, top_k, memory, use_cache=use_cache)


# ----------------------------------------------------------------------------- building and checkpoints

OFFLINE = ("tiny", "tiny-random")  # backbones made here, not loaded by name: small pretrained ones, or untrained


def build_backbones(llm="tiny", vit="tiny"):
    """A public name or local path for each backbone; or "tiny": small ones pretrained offline on
    shapes (pretrain.py, built once and cached); or "tiny-random": the same sizes, untrained."""
    gpt = {"tiny": pretrain.tiny_decoder, "tiny-random": lambda: GPT(GPTConfig.tiny())}.get(llm)
    vision = {"tiny": pretrain.tiny_vit, "tiny-random": lambda: ViT(ViTConfig.tiny())}.get(vit)
    return (vision() if vision else ViT.from_pretrained(vit)), (gpt() if gpt else GPT.from_pretrained(llm))


def checkpoint_state(model: VLM, llm: str, vit: str) -> dict:
    """Only what rebuilds the model: its arguments, the trainable weights, and the backbones'
    weights when they cannot be had by name (offline tiny or random ones, or trained ones)."""
    keep = {name for name, p in model.named_parameters() if p.requires_grad}
    if llm in OFFLINE or model.freeze in ("vit", "none"):
        keep |= {"gpt." + k for k in model.gpt.state_dict()}
    if vit in OFFLINE or model.vit_trains:
        keep |= {"vit." + k for k in model.vit.state_dict()}
    state = {k: v for k, v in model.state_dict().items() if k in keep or not k.startswith(("gpt.", "vit."))}
    return {
        "nanodehvf": 1,
        "args": dict(llm=llm, vit=vit, mode=model.mode, freeze=model.freeze,
                     fuser=asdict(model.fuser_config),
                     gpt_config=asdict(model.gpt.config), vit_config=asdict(model.vit.config)),
        "model": state,
    }


def load_checkpoint(path) -> dict:
    """The dict a nanoDEHVF checkpoint file holds (checkpoint_state's, plus what train.py adds)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    ckpt = torch_load(path, "checkpoint")
    if not isinstance(ckpt, dict) or "nanodehvf" not in ckpt:
        raise CheckpointError(f"{path} is not a nanoDEHVF checkpoint (was it written by train.py?)")
    return ckpt


def from_checkpoint(ckpt) -> VLM:
    """Rebuild a VLM from checkpoint_state's dict, or from a path to a saved one."""
    ckpt = load_checkpoint(ckpt) if isinstance(ckpt, (str, Path)) else ckpt
    args, state = ckpt.get("args"), ckpt.get("model")
    if not (isinstance(args, dict) and isinstance(state, dict) and args.get("mode") in MODES
            and args.get("freeze") in FREEZE and all(isinstance(args.get(k), str) for k in ("llm", "vit"))
            and all(isinstance(args.get(k), dict) for k in ("fuser", "gpt_config", "vit_config"))
            and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise CheckpointError("checkpoint is damaged or from another version: its model arguments or weights "
                              "are missing or malformed")
    try:
        has = lambda prefix: any(k.startswith(prefix) for k in state)
        gpt = GPT(GPTConfig(**args["gpt_config"])) if has("gpt.") else GPT.from_pretrained(args["llm"])
        vision = ViT(ViTConfig(**args["vit_config"])) if has("vit.") else ViT.from_pretrained(args["vit"])
        fuser = dict(args["fuser"], vit_layers=tuple(args["fuser"]["vit_layers"] or ()) or None)
        model = VLM(vision, gpt, args["mode"], FuserConfig(**fuser), args["freeze"])
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (KeyError, TypeError, AssertionError, RuntimeError) as e:  # malformed args, shapes that do not fit
        detail = " ".join(str(e).split())  # one line: load_state_dict's list of mismatches spans several
        raise CheckpointError(f"checkpoint is damaged or from another version ({type(e).__name__}: "
                              f"{detail[:400]})") from None
    missing = [k for k in missing if not k.startswith(("gpt.", "vit."))]  # backbones by name are loaded
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not fit its model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    return model


if __name__ == "__main__":  # trainable parameters per mode at GPT-2 124M + ViT-B/16 shapes, nothing downloaded
    with torch.device("meta"):  # shapes only: no memory, no init
        vision, gpt = ViT(ViTConfig()), GPT(GPTConfig())
        for mode in MODES:
            print(f"{mode:>6}: {VLM(vision, gpt, mode).n_trainable():>9,} trainable parameters")
