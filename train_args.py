"""train.py's settings: the defaults per dataset, every flag, and the checks that refuse a run that cannot be.

`get_args` parses the command line, fills what it left unset from DEFAULTS (the
dataset's recipe, then the rules every dataset shares), and refuses what cannot
make a run (nan, inf, numbers out of range, flags that do not go together) with
one line before anything is loaded. The resolved settings are what a checkpoint
keeps as "train_args"; SAME_DATA and SAME_RUN name those that --eval_only and
--resume require to match.
"""
import argparse
import os
import re

import torch

import cli
import model as vlm
from data import shapes

# What differs per dataset; a flag given on the command line wins, and every resolved value is printed
# at the start. Where the table gives blr, lr = blr * global batch / 256 (MAE's rule, which MemVP keeps).
#   scienceqa: MemVP's scripts/finetuning_sqa_7b.sh (8 GPUs x batch 4 = 32; 20 epochs, 2 warm-up epochs,
#              blr 9e-3, weight decay 0.02) and its train.py (AdamW betas (0.9, 0.95), cosine to min_lr 0,
#              no gradient clipping)
#   coco:      ADEM-VL's README command for COCO caption (8 GPUs x 2 x accum 2 = 32; 5 epochs, 0.1 warm-up
#              epochs, blr 9e-3, weight decay 0.02) and its train.py (betas (0.9, 0.95), min_lr 0, no clipping)
#   shapes:    chosen for a CPU run of minutes (README, "Results"); the gates' lr 10 x lr; a frozen ViT's
#              features computed once, in memory
# Unset by the table: gate_lr = lr, min_lr = lr / 10, no feature cache, data_dir data/raw/<dataset>.
DEFAULTS = {
    "shapes": dict(answer="text", loss="lm", lr=6e-3, gate_lr_x=10, warmup=50, epochs=2.5, weight_decay=0.01,
                   beta1=0.9, beta2=0.99, grad_clip=1.0, cache_features="memory"),
    "scienceqa": dict(answer="letter", loss="lm", blr=9e-3, warmup_epochs=2.0, epochs=20.0,
                      weight_decay=0.02, beta1=0.9, beta2=0.95, min_lr=0.0, grad_clip=0.0),
    "coco": dict(answer="letter", loss="lm", blr=9e-3, warmup_epochs=0.1, epochs=5.0,
                 weight_decay=0.02, beta1=0.9, beta2=0.95, min_lr=0.0, grad_clip=0.0),
}
SHOWN = ("answer", "loss", "lr", "gate_lr", "min_lr", "warmup", "epochs", "weight_decay", "beta1", "beta2",
         "grad_clip")  # printed at the start
SAME_DATA = ("dataset", "answer", "context", "target")  # + n_train, n_val for shapes: scored on the same data
SAME_RUN = ("mode", "llm", "vit", "freeze", "vit_layers", "pool", "rank", "loss", "batch_size", "grad_accum",
            "seed")  # + SAME_DATA: a resumed run is the same run


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train the fuser: one plain loop, in nanoGPT's order.", formatter_class=cli.Help)
    a = p.add_argument
    a("--dataset", default="shapes", choices=["shapes", "scienceqa", "coco"], help="shapes is made offline")
    a("--data_dir", default=None, help="default: data/raw/<dataset>")
    a("--answer", default=None, choices=["letter", "text"],
      help="QA target ' The answer is A.', scored as published (the letter the greedy next token names) "
           "and by likelihood; or ' The answer is red.' (shapes restates the key: ' The star is red.'), "
           "scored by likelihood (default: per dataset)")
    a("--context", default="hint", choices=["hint", "caption"],
      help="ScienceQA context: the hint, or hint + data_dir/captions.json's caption (MemVP's/LaVIN's eval)")
    a("--target", default="qcm-a", choices=["qcm-a", "qcm-ale"],
      help="ScienceQA target: the answer, or answer + ' BECAUSE: {lecture} {solution}' (LaVIN's QCM-ALE)")
    a("--loss", default=None, choices=["lm", "choices"],
      help="lm: next-token loss on the target; choices: cross-entropy over the options' "
           "likelihoods (default: per dataset)")
    a("--mode", default="dehvf", choices=vlm.MODES, help="how the image reaches the decoder (model.py)")
    a("--llm", default="tiny", help="gpt2, gpt2-medium, ..., a local checkpoint, tiny (small, pretrained "
                                    "offline on shapes text: pretrain.py, cached) or tiny-random (untrained)")
    a("--vit", default="tiny", help="openai/clip-vit-base-patch16, ..., a local checkpoint, tiny (pretrained "
                                    "offline on shapes images) or tiny-random")
    a("--freeze", default="all", choices=vlm.FREEZE, help="which backbones stay frozen")
    a("--vit_layers", default=None, help="comma-separated ViT layers for the fuser (default: all)")
    a("--pool", type=int, default=None, help="fuser pooling (default: 2, 1 for the tiny ones)")
    a("--rank", type=int, default=128, help="fuser projector rank")
    a("--batch_size", type=int, default=32, help="per process, per micro-step")
    a("--grad_accum", type=int, default=1, help="micro-steps per optimiser step")
    a("--lr", type=float, default=None, help="peak learning rate (default: per dataset, DEFAULTS in train_args.py)")
    a("--blr", type=float, default=None, help="base learning rate: lr = blr * global batch / 256")
    a("--gate_lr", type=float, default=None, help="lr of the fuser's gates (default: lr, 10 x lr for shapes)")
    a("--min_lr", type=float, default=None, help="end of the cosine (default: per dataset)")
    a("--warmup", type=int, default=None, help="warm-up steps (default: per dataset, or from --warmup_epochs)")
    a("--warmup_epochs", type=float, default=None, help="warm-up in epochs")
    a("--weight_decay", type=float, default=None, help="AdamW, on matrices only (default: per dataset)")
    a("--beta1", type=float, default=None, help="AdamW beta1 (default: per dataset)")
    a("--beta2", type=float, default=None, help="AdamW beta2 (default: per dataset)")
    a("--grad_clip", type=float, default=None, help="0 = off (default: per dataset)")
    a("--epochs", type=float, default=None, help="length of the run, unless --max_steps (default: per dataset)")
    a("--max_steps", type=int, default=None, help="optimiser steps (default: from --epochs)")
    a("--eval_interval", type=int, default=250, help="steps between evaluations and checkpoints")
    a("--eval_samples", type=int, default=None, help="validation examples per evaluation (default: all)")
    a("--n_train", type=int, default=shapes.N_TRAIN, help="shapes: training problems")
    a("--n_val", type=int, default=shapes.N_VAL, help="shapes: validation (and test) problems")
    a("--out_dir", default="out", help="checkpoints and log.jsonl")
    a("--resume", action="store_true", help="continue from out_dir/ckpt.pt")
    a("--overwrite", action="store_true", help="replace the run in out_dir (a used out_dir is refused without it)")
    a("--eval_only", action="store_true", help="no training: score out_dir/best.pt on --split")
    a("--split", default="test", help="the split best.pt is scored on at the end (or with --eval_only)")
    a("--seed", type=int, default=1337, help="weights, data order")
    a("--device", type=cli.device, default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 autocast on CUDA")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--cache_features", default=None, choices=["off", "memory", "disk"],
      help="compute a frozen ViT's features once: in memory (fp32) or in out_dir (fp16, memory-mapped); "
           "default: memory for shapes, else off")
    args = p.parse_args(argv)
    resolve_defaults(args, int(os.environ.get("WORLD_SIZE", 1)))
    check_args(p, args)
    return args


def resolve_defaults(args, world):
    """Fill what the command line left unset from DEFAULTS[dataset]; lr from blr and the global batch."""
    table = dict(DEFAULTS[args.dataset])
    gate_lr_x = table.pop("gate_lr_x", 1)
    for pair in (("lr", "blr"), ("warmup", "warmup_epochs")):  # given either way, the table's pair is out
        if any(getattr(args, k) is not None for k in pair):
            table = {k: v for k, v in table.items() if k not in pair}
    if args.freeze not in ("all", "vit"):  # a ViT that trains has new features every step
        table.pop("cache_features", None)
    for k, v in table.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.lr is None:
        args.lr = args.blr * args.batch_size * args.grad_accum * world / 256
    args.gate_lr = gate_lr_x * args.lr if args.gate_lr is None else args.gate_lr
    args.min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    args.cache_features = args.cache_features or "off"
    args.pool = (1 if args.vit in vlm.OFFLINE else 2) if args.pool is None else args.pool
    args.data_dir = args.data_dir or f"data/raw/{args.dataset}"


def check_args(p, args):
    """Refuse at parse time what cannot make a run: nan, inf, numbers out of range, settings that do not
    go together."""
    positive = {"lr": 10, "gate_lr": 10, "epochs": 1e6}  # > 0 and at most this: lr > 10 diverges on anything
    bounds = {**{k: (0, high) for k, high in positive.items()}, "min_lr": (0, args.lr), "weight_decay": (0, 10),
              "grad_clip": (0, 1e6), "warmup": (0, 1e9), "max_steps": (1, 1e9), "eval_interval": (1, 1e9),
              "eval_samples": (1, 1e9), "seed": (0, 2**63 - 1),
              # 65536: only a typo asks for a batch (or a projector rank) that no memory holds
              "batch_size": (1, 65536), "grad_accum": (1, 65536), "rank": (1, 65536), "pool": (1, 1024),
              "n_train": (1, 1e7), "n_val": (1, 1e7)}
    for name, (low, high) in bounds.items():
        v = getattr(args, name, None)
        if v is not None and not ((low < v if name in positive else low <= v) and v <= high):  # nan fails too
            p.error(f"--{name} must be {'above' if name in positive else 'at least'} {low} "
                    f"and at most {high:g}, not {v}")
    if args.vit_layers is not None and not re.fullmatch(r"\d+(,\d+)*", args.vit_layers):
        p.error(f"--vit_layers must be comma-separated layer numbers such as 1,6,12, not {args.vit_layers!r}")
    if not args.out_dir:
        p.error("--out_dir must name a folder")
    if os.path.isfile(args.data_dir):
        p.error(f"--data_dir {args.data_dir} is a file, not a dataset folder")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out_dir, --overwrite replaces it: choose one")
    if not (0 <= args.beta1 < 1 and 0 <= args.beta2 < 1):
        p.error("--beta1 and --beta2 must be in [0, 1)")
    if args.dataset == "coco" and (args.context, args.target) != ("hint", "qcm-a"):
        p.error("--context and --target are ScienceQA's; coco has captions")
    if args.cache_features != "off" and args.freeze not in ("all", "vit"):
        p.error(f"--cache_features needs a frozen ViT, but --freeze {args.freeze} trains it")
    if args.dataset != "scienceqa" and args.loss == "choices":  # shapes trains captions too
        p.error(f"--loss choices needs multiple-choice questions only; {args.dataset} has captions")


def describe(args):
    """One line of the settings that differ per dataset, as resolved."""
    return f"{args.dataset} settings (DEFAULTS in train_args.py, or as given): " + ", ".join(
        f"{k} {getattr(args, k):.4g}" if isinstance(getattr(args, k), float) else f"{k} {getattr(args, k)}"
        for k in SHOWN)
