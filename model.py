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
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import pretrain
from fuser import FuserConfig, HierarchicalFuser
from llm import GPT, GPTConfig
from vit import ViT, ViTConfig
from weights import CheckpointError, copy_state, torch_load

MODES = ("dehvf", "static", "memvp", "prefix", "none")
FREEZE = ("all", "vit", "llm", "none")  # which backbones stay frozen: both, one, or neither


class VLM(nn.Module):
    """Images and a prompt in, next-token logits out, with both backbones left as published: the
    frozen ViT encodes the image, the fuser (or prefix's projector), the only part that trains,
    turns its features into what the frozen GPT can take in, and the GPT decodes. `hidden`,
    `forward` and `generate` all read in that order: encode -> fuse -> decode."""

    def __init__(self, vit: ViT, gpt: GPT, mode="dehvf", fuser_config=None, freeze="all"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if freeze not in FREEZE:
            raise ValueError(f"freeze must be one of {FREEZE}, not {freeze!r}")
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
        """Encode: what the fusion consumes from each image: the fuser's pooled ViT layers (B, K, N, D_v),
        or prefix's penultimate-layer patch tokens (B, P, D_v), without the class token, as LLaVA
        feeds them. With a frozen ViT they are the same every epoch, so train.py can cache them."""
        if self.mode == "none":
            return None
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.vit_trains):
            if self.mode == "prefix":
                return self.vit(images, upto=self.penultimate)[-1][:, 1:]
            return self.fuser.pool_features(self.vit(images, upto=max(self.fuser.layers)))

    def fuse(self, images, prompt_mask, has_image, features=None) -> dict:
        """Encode and fuse: what the decoder receives besides the tokens, as GPT keyword arguments:
        {"memory": the fuser's per-layer FFN slots}, {"prefix": (B, P, d) embeddings}, or {} (mode
        none, or prefix mode with no image in the batch). The ViT runs only when no features are
        given and some sample has an image."""
        if self.mode == "none" or (self.mode == "prefix" and not has_image.any()):
            return {}
        if features is None and has_image.any():
            features = self.features(images)
        if self.mode == "prefix":
            return {"prefix": self.projector(features)}
        return {"memory": self.fuser.memory_for(features, prompt_mask, has_image)}

    @staticmethod
    def decode(run, idx, has_image, vision):
        """run(idx, **vision): GPT.hidden or GPT.generate on the batch. In prefix mode a sample without
        an image must see no prefix and keep positions 0..T-1, so a mixed batch runs in two parts."""
        if "prefix" not in vision or has_image.all():
            return run(idx, **vision)
        with_image = run(idx[has_image], prefix=vision["prefix"][has_image])
        out = with_image.new_empty(idx.size(0), *with_image.shape[1:])  # run's dtype (fp32 under autocast)
        out[has_image] = with_image
        out[~has_image] = run(idx[~has_image])
        return out

    def hidden(self, images, idx, prompt_mask=None, has_image=None, features=None):
        """Final hidden states of the text, (B, T, d). images: (B, 3, S, S), or None with features
        (the cached output of `features`); idx: (B, T); prompt_mask: (B, T) bool, the tokens the
        fuser's selector may read (default: all); has_image: (B,) bool, False = that sample has no
        image (default: all True): in the memory modes its learned slots act alone (Z = 0), in
        prefix mode it gets no prefix."""
        prompt_mask, has_image = _defaults(idx, prompt_mask, has_image)
        vision = self.fuse(images, prompt_mask, has_image, features)  # encode -> fuse
        return self.decode(self.gpt.hidden, idx, has_image, vision)  # -> decode

    def forward(self, images, idx, targets=None, prompt_mask=None, has_image=None, features=None):
        """(logits, loss). Without targets: logits at every position, (B, T, V), and None. With targets
        ((B, T), -100 = none) the head, a large part of a step at 50k words, runs only where there is
        one: logits (N, V) for those N positions (row-major), and their mean cross-entropy."""
        h = self.hidden(images, idx, prompt_mask, has_image, features)  # (B, T, d)
        if targets is None:
            return self.gpt.lm_head(h), None
        scored = targets != -100
        logits = self.gpt.lm_head(h[scored])  # boolean indexing copies: (N, d) contiguous -> (N, V)
        return logits, F.cross_entropy(logits.float(), targets[scored])

    @torch.no_grad()
    def fusion_mix(self, images, idx, prompt_mask=None, has_image=None, features=None):
        """(B, L, K): the mix over ViT layers each decoder layer chose for each sample (DESIGN.md
        section 4, step 2), in a memory mode; arguments as hidden's. Read off the prompt, so it is
        also the mix that generate chooses at prefill for that prompt."""
        prompt_mask, has_image = _defaults(idx, prompt_mask, has_image)
        vision = self.fuse(images, prompt_mask, has_image, features)
        self.gpt.hidden(idx, **vision)  # the decoder runs to give each layer its x_l
        return vision["memory"].mix

    @torch.no_grad()
    def generate(self, images, prompt_idx, max_new_tokens, temperature=0.0, top_k=None,
                 has_image=None, use_cache=True, features=None):
        """Continue prompt_idx (B, T) for an image batch. The ViT and every layer's memory are
        computed once, at prefill, and reused for each new token."""
        prompt_mask, has_image = _defaults(prompt_idx, None, has_image)  # the whole prompt is prompt
        vision = self.fuse(images, prompt_mask, has_image, features)  # encode -> fuse, once
        run = lambda idx, **v: self.gpt.generate(idx, max_new_tokens, temperature, top_k, use_cache=use_cache, **v)
        return self.decode(run, prompt_idx, has_image, vision)  # -> decode, token by token


def _defaults(idx, prompt_mask, has_image):
    """hidden's defaults for idx (B, T): every token is prompt, (B, T); every sample has an image, (B,)."""
    prompt_mask = torch.ones_like(idx, dtype=torch.bool) if prompt_mask is None else prompt_mask
    has_image = torch.ones_like(idx[:, 0], dtype=torch.bool) if has_image is None else has_image
    return prompt_mask, has_image


# ----------------------------------------------------------------------------- building and checkpoints

OFFLINE = ("tiny", "tiny-random")  # backbones made here, not loaded by name: small pretrained ones, or untrained


def build_backbones(llm="tiny", vit="tiny"):
    """A public name or local path for each backbone; or "tiny": small ones pretrained offline on
    shapes (pretrain.py, built once and cached); or "tiny-random": the same sizes, untrained."""
    if llm == vit == "tiny":
        return pretrain.tiny_backbones()  # on a first run, the two builds side by side
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


def _config(args, key, config_class):
    """config_class from a checkpoint's args[key]: its fields only (a missing one keeps its default),
    each of its default's type, sizes positive. Anything else is a CheckpointError."""
    defaults = {f.name: f.default for f in fields(config_class)}
    for name, value in args[key].items():
        kind = type(defaults.get(name, ...))
        if name == "vit_layers":  # None (all of them) or ViT layer numbers
            fits = value is None or isinstance(value, (list, tuple)) and all(type(k) is int for k in value)
        elif kind in (int, float):  # sizes and eps (an int stands for a float)
            fits = type(value) in (int, kind) and value > 0
        else:  # str, bool; a name we do not know (kind: ellipsis) never fits
            fits = type(value) is kind
        if not fits:
            raise CheckpointError(f"checkpoint is damaged or from another version: its {key} setting "
                                  f"{name}={value!r} is unknown or of the wrong kind")
    return config_class(**args[key])


def from_checkpoint(ckpt) -> VLM:
    """Rebuild a VLM from checkpoint_state's dict, or from a path to a saved one. What the file
    holds is checked before it is used (a CheckpointError says what is wrong); a bug here is not
    reported as a damaged file."""
    ckpt = load_checkpoint(ckpt) if isinstance(ckpt, (str, Path)) else ckpt
    args, state = ckpt.get("args"), ckpt.get("model")
    if not (isinstance(args, dict) and all(isinstance(args.get(k), str) for k in ("llm", "vit", "mode", "freeze"))
            and all(isinstance(args.get(k), dict) for k in ("fuser", "gpt_config", "vit_config"))
            and isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise CheckpointError("checkpoint is damaged or from another version: its model arguments or weights "
                              "are missing or malformed")
    gpt_config, vit_config = _config(args, "gpt_config", GPTConfig), _config(args, "vit_config", ViTConfig)
    fuser_config = _config(args, "fuser", FuserConfig)
    if gpt_config.n_embd % gpt_config.n_head or vit_config.width % vit_config.heads:
        raise CheckpointError("checkpoint is damaged or from another version: a head count does not divide a width")
    fuser_config = replace(fuser_config, vit_layers=tuple(fuser_config.vit_layers or ()) or None)
    stored = {part for part in ("gpt", "vit") if any(k.startswith(part + ".") for k in state)}
    gpt = GPT(gpt_config) if "gpt" in stored else GPT.from_pretrained(args["llm"])
    vision = ViT(vit_config) if "vit" in stored else ViT.from_pretrained(args["vit"])
    try:
        model = VLM(vision, gpt, args["mode"], fuser_config, args["freeze"])
    except ValueError as e:  # VLM's and the fuser's own checks: mode, freeze, ViT layers, pooling
        raise CheckpointError(f"checkpoint is damaged or from another version: {e}") from None
    # every key and shape checked; a backbone loaded by name is not stored (a stored one must be whole)
    copy_state(model, state, "checkpoint", in_place=tuple(f"{part}." for part in {"gpt", "vit"} - stored))
    return model


# ----------------------------------------------------------------------------- train.py's checkpoints

TRAINING = {"step": int, "best": (int, float), "rng": torch.Tensor, "train_args": dict, "optimizer": (dict, type(None))}


def load_training_checkpoint(path, flag, same):
    """A checkpoint train.py wrote (checkpoint_state's dict plus TRAINING's keys), to resume (flag
    --resume) or to score (--eval_only), after checking it was trained with the settings in `same`
    ({name: value}; for scoring, a setting an older checkpoint lacks is not checked)."""
    if not Path(path).is_file():  # load_checkpoint would say so too, without the flag and the hint
        raise CheckpointError(f"{flag}: no checkpoint at {path} (check --out_dir)")
    ckpt = load_checkpoint(path)
    bad = [k for k, kind in TRAINING.items() if k not in ckpt or not isinstance(ckpt[k], kind)]
    if bad or ckpt["step"] < 0 or ckpt["rng"].dtype != torch.uint8 or ckpt["rng"].shape != torch.get_rng_state().shape:
        raise CheckpointError(f"{flag}: {path} has no valid {', '.join(bad) or 'step or rng'} (not written by "
                              f"train.py, or damaged): start a new run with --overwrite")
    old = ckpt["train_args"]
    changed = [k for k, v in same.items() if old.get(k) != v and (flag == "--resume" or k in old)]
    if changed:
        raise CheckpointError(f"{flag}: {path} was trained with other settings: "
                              + ", ".join(f"--{k} {old.get(k)}" for k in changed))
    return ckpt


def restore_training_state(ckpt, optimizer, path):
    """Put a --resume checkpoint's optimizer state (if anything trains) and random state back."""
    if optimizer is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"] or {})
        except (KeyError, ValueError):  # torch's words for a state of other parameters
            raise CheckpointError(f"--resume: {path} holds no optimizer state for this model") from None
    torch.set_rng_state(ckpt["rng"].cpu())


if __name__ == "__main__":  # trainable parameters per mode at GPT-2 124M + ViT-B/16 shapes, nothing downloaded
    with torch.device("meta"):  # shapes only: no memory, no init
        vision, gpt = ViT(ViTConfig()), GPT(GPTConfig())
        for mode in MODES:
            print(f"{mode:>6}: {VLM(vision, gpt, mode).n_trainable():>9,} trainable parameters")
