"""Train the fuser: one plain loop, in nanoGPT's order.

    python train.py                                  # offline: shapes, tiny backbones pretrained here
    python train.py --dataset scienceqa --llm gpt2 --vit openai/clip-vit-base-patch16
    torchrun --nproc_per_node=4 train.py ...         # DistributedDataParallel, same losses
    python train.py --eval_only --split test         # score out_dir/best.pt on a split

Each step: lr for this step -> maybe evaluate and checkpoint -> micro-steps with
gradient accumulation -> clip -> step -> zero_grad -> log. The data order is a
function of (seed, step) alone, so `--resume` continues exactly where a run
stopped. Checkpoints (model.py's format plus the optimizer and step) are
written to a temporary file and renamed, so a crash never leaves half a file.
The model is selected on val (best.pt); at the end best.pt is scored on test
(--split), the split papers report, into out_dir/test.json.
"""
import argparse
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import model as vlm
from data import coco, scienceqa, shapes
from data.batch import (DataError, choice_batch, choice_scores, collate, next_tokens, score_choices, scored_logits,
                        to_device)
from data.metrics import caption_scores
from data.tokenizer import EOT, get_encoding
from features import FeatureCache
from fuser import FuserConfig
from outdir import RunError, atomic_write, claim, read_log, save
from vit import preprocess
from weights import CheckpointError

# What differs per dataset; a flag given on the command line wins, and every resolved value is printed
# at the start. Where the table gives blr, lr = blr * global batch / 256 (MAE's rule, which MemVP keeps).
#   scienceqa: MemVP's scripts/finetuning_sqa_7b.sh (8 GPUs x batch 4 = 32; 20 epochs, 2 warm-up epochs,
#              blr 9e-3, weight decay 0.02) and its train.py (AdamW betas (0.9, 0.95), cosine to min_lr 0,
#              no gradient clipping)
#   coco:      ADEM-VL's README command for COCO caption (8 GPUs x 2 x accum 2 = 32; 5 epochs, 0.1 warm-up
#              epochs, blr 9e-3, weight decay 0.02) and its train.py (betas (0.9, 0.95), min_lr 0, no clipping)
#   shapes:    chosen for a CPU run of minutes (README, "Results"); min_lr lr / 10, the gates' lr 10 x lr
DEFAULTS = {
    "shapes": dict(answer="text", loss="lm", lr=6e-3, gate_lr_x=10, warmup=50, epochs=2.5,
                   weight_decay=0.01, beta1=0.9, beta2=0.99, grad_clip=1.0),
    "scienceqa": dict(answer="letter", loss="lm", blr=9e-3, warmup_epochs=2.0, epochs=20.0,
                      weight_decay=0.02, beta1=0.9, beta2=0.95, min_lr=0.0, grad_clip=0.0),
    "coco": dict(answer="letter", loss="lm", blr=9e-3, warmup_epochs=0.1, epochs=5.0,
                 weight_decay=0.02, beta1=0.9, beta2=0.95, min_lr=0.0, grad_clip=0.0),
}
SHOWN = ("answer", "loss", "lr", "gate_lr", "min_lr", "warmup", "epochs", "weight_decay", "beta1", "beta2",
         "grad_clip")


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help with the defaults, but no "(default: None)" (sample.py uses it too)."""
    def _get_help_string(self, action):
        if action.default is None or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=Help)
    a = p.add_argument
    a("--dataset", default="shapes", choices=["shapes", "scienceqa", "coco"], help="shapes is made offline")
    a("--data_dir", default=None, help="default: data/raw/<dataset>")
    a("--answer", default=None, choices=["letter", "text"],
      help="QA target ' The answer is A.', scored as published (the letter the greedy next token names) "
           "and by likelihood; or ' The answer is red.', scored by likelihood (default: per dataset)")
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
    a("--lr", type=float, default=None, help="peak learning rate (default: per dataset, DEFAULTS in train.py)")
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
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 autocast on CUDA")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--cache_features", default=None, choices=["off", "memory", "disk"],
      help="compute a frozen ViT's features once: in memory (fp32) or in out_dir (fp16, memory-mapped); "
           "default: memory for shapes, else off")
    args = p.parse_args(argv)
    tiny_shapes = args.dataset == "shapes"
    resolve_defaults(args, int(os.environ.get("WORLD_SIZE", 1)))
    args.pool = args.pool if args.pool is not None else (1 if args.vit in vlm.OFFLINE else 2)
    args.data_dir = args.data_dir or f"data/raw/{args.dataset}"
    check_args(p, args)
    if not (0 <= args.beta1 < 1 and 0 <= args.beta2 < 1):
        p.error("--beta1 and --beta2 must be in [0, 1)")
    if args.dataset == "coco" and (args.context, args.target) != ("hint", "qcm-a"):
        p.error("--context and --target are ScienceQA's; coco has captions")
    args.cache_features = args.cache_features or ("memory" if tiny_shapes and args.freeze in ("all", "vit") else "off")
    if args.cache_features != "off" and args.freeze not in ("all", "vit"):
        p.error(f"--cache_features needs a frozen ViT, but --freeze {args.freeze} trains it")
    if args.dataset == "coco" and args.loss == "choices":
        p.error("--loss choices needs multiple-choice questions; coco has captions")
    return args


def check_args(p, args):
    """Refuse at parse time what cannot make a run: nan, inf, numbers out of range, unknown devices."""
    positive = {"lr": 10, "gate_lr": 10, "epochs": 1e6}  # > 0 and at most this: lr > 10 diverges on anything
    bounds = {**{k: (0, high) for k, high in positive.items()}, "min_lr": (0, args.lr), "weight_decay": (0, 10), "grad_clip": (0, 1e6), "warmup": (0, 1e9),
              "max_steps": (1, 1e9), "eval_interval": (1, 1e9), "eval_samples": (1, 1e9), "seed": (0, 2**63 - 1),
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
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a device name: cpu, cuda, cuda:1, mps")
    if (device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count() or device.type not in
            ("cpu", "cuda", "mps") or device.type == "mps" and not torch.backends.mps.is_available()):
        p.error(f"--device {args.device}: no such device here ({torch.cuda.device_count()} CUDA devices); "
                f"use --device cpu")
    if not args.out_dir:
        p.error("--out_dir must name a folder")
    if os.path.isfile(args.data_dir):
        p.error(f"--data_dir {args.data_dir} is a file, not a dataset folder")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out_dir, --overwrite replaces it: choose one")


def resolve_defaults(args, world):
    """Fill what the command line left unset from DEFAULTS[dataset]; lr from blr and the global batch."""
    table = dict(DEFAULTS[args.dataset])
    gate_lr_x = table.pop("gate_lr_x", 1)
    if args.lr is not None or args.blr is not None:  # a rate given either way replaces the table's
        table.pop("lr", None), table.pop("blr", None)
    if args.warmup is not None or args.warmup_epochs is not None:
        table.pop("warmup", None), table.pop("warmup_epochs", None)
    for k, v in table.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.lr is None:
        args.lr = args.blr * args.batch_size * args.grad_accum * world / 256
    args.gate_lr = gate_lr_x * args.lr if args.gate_lr is None else args.gate_lr
    args.min_lr = args.lr / 10 if args.min_lr is None else args.min_lr


def load_data(args):
    """(train, val, test) examples, test being --split (all that --eval_only reads); shapes has
    questions and captions together."""
    if args.dataset == "shapes":
        shapes.ensure_shapes(args.data_dir, args.n_train, args.n_val)

    def load(split):
        if args.dataset == "coco":
            return coco.load_coco(args.data_dir, split)
        questions = scienceqa.load_scienceqa(args.data_dir, split, args.answer, context=args.context,
                                             target=args.target)
        return questions + (shapes.caption_examples(args.data_dir, split) if args.dataset == "shapes" else [])
    return [] if args.eval_only else load("train"), [] if args.eval_only else load("val"), load(args.split)


def build_model(args):
    try:
        vit, gpt = vlm.build_backbones(args.llm, args.vit)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; or train offline on small backbones pretrained here: --llm tiny --vit tiny") from None
    layers = tuple(int(k) for k in args.vit_layers.split(",")) if args.vit_layers else None
    n, grid = vit.config.layers, vit.config.grid
    if layers and (len(set(layers)) < len(layers) or not all(1 <= k <= n for k in layers)):
        raise RunError(f"--vit_layers must be distinct layers in 1..{n} (--vit {args.vit} has {n}), "
                       f"not {args.vit_layers}")
    if args.pool > grid:
        raise RunError(f"--pool must be at most the {grid}x{grid} patch grid of --vit {args.vit}, not {args.pool}")
    fuser = FuserConfig(vit_layers=layers, pool=args.pool, rank=args.rank)
    return vlm.VLM(vit, gpt, args.mode, fuser, args.freeze)


def stream(n, seed, start, count):
    """Indices start .. start+count-1 of an endless stream of shuffled epochs: a
    function of (seed, position) alone, which is what makes resume exact."""
    out, epoch, perm = [], None, None
    for i in range(start, start + count):
        if i // n != epoch:
            epoch = i // n
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        out.append(int(perm[i % n]))
    return out


@torch.no_grad()
def predict(model, examples, args, batch_of, rank=0, world=1):
    """{id: greedy caption} for captions; for QA {id: (the option of highest likelihood, the option
    the greedy next token after " The answer is" names, or -1)}; sharded over processes."""
    model.eval()
    mine, out, enc = examples[rank::world], {}, get_encoding()
    for i in tqdm(range(0, len(mine), args.batch_size), desc="eval", leave=False, disable=rank != 0):
        chunk = mine[i:i + args.batch_size]
        captions, chunk = [ex for ex in chunk if ex.choices is None], [ex for ex in chunk if ex.choices]
        if captions:
            batch = batch_of(captions, collate)
            prompt = batch["idx"][:, :int(batch["prompt_mask"][0].sum())]  # every prompt is "A picture of"
            tokens = model.generate(batch["images"], prompt, 24, has_image=batch["has_image"],
                                    features=batch["features"])
            for ex, row in zip(captions, tokens[:, prompt.size(1):].tolist()):
                out[ex.id] = get_encoding().decode(row[:row.index(EOT)] if EOT in row else row).strip()
        if chunk:
            batch = batch_of(chunk, choice_batch)
            logits = scored_logits(model, batch)  # (N, V)
            likely = choice_scores(logits, batch).argmax(dim=-1).tolist()
            said = [scienceqa.parse_letter(enc.decode([t]), n)
                    for t, n in zip(next_tokens(logits, batch).tolist(), batch["n_choices"])]
            out.update({ex.id: (i, j) for ex, i, j in zip(chunk, likely, said)})
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, out)
        out = {k: v for part in parts for k, v in part.items()}
    model.train()
    return out


def evaluate(model, examples, args, batch_of, rank=0, world=1):
    """Captions: BLEU-4 and CIDEr-D of greedy captions. QA: accuracy by ScienceQA's categories of the
    most likely option; with --answer letter, also of the published protocol (MemVP's eval.py: the
    letter the greedy next token names, invalid = wrong), which is then the metric, the likelihood
    table under "likelihood". Shapes has both, and adds accuracy per question type and how often a
    caption names an object right."""
    out = predict(model, examples, args, batch_of, rank, world)
    if args.dataset == "coco":
        scores = caption_scores(coco.references(examples), out)
        return {"BLEU-4": scores["BLEU-4"], "CIDEr": scores["CIDEr"], "metric": scores["CIDEr"]}
    questions, captions = [ex for ex in examples if ex.choices], [ex for ex in examples if ex.choices is None]

    def table(picks):
        scores = scienceqa.score(questions, picks)
        return {**scores, **shapes.type_scores(questions, picks)} if args.dataset == "shapes" else scores
    scores = likelihood = table({ex.id: out[ex.id][0] for ex in questions})
    if args.answer == "letter":
        said = {ex.id: out[ex.id][1] for ex in questions}
        invalid = 100.0 * sum(v < 0 for v in said.values()) / len(said)
        scores = {**table(said), "invalid": invalid, "likelihood": likelihood}
    if args.dataset == "shapes" and captions:
        scene = {ex.id: ex.meta["scene"] for ex in questions if ex.meta["scene"]}
        named = [shapes.names_an_object(out[ex.id], scene[ex.meta["pid"]]) for ex in captions]
        scores["caption"] = 100.0 * sum(named) / len(named)
    return {**scores, "metric": scores["Avg"]}


def summary(scores):
    """One line of an evaluation's numbers (the likelihood table by its Avg)."""
    flat = {k: v for k, v in scores.items() if isinstance(v, float) and k != "metric"}
    if "likelihood" in scores:
        flat["Avg(likelihood)"] = scores["likelihood"]["Avg"]
    return " ".join(f"{k} {v:.2f}" for k, v in flat.items())


def write_test(scores, args, step, n):
    """out_dir/{split}.json: the scores of best.pt on the split, and print them as a table."""
    result = {"split": args.split, "checkpoint": os.path.join(args.out_dir, "best.pt"), "step": step,
              "examples": n, **{k: v for k, v in scores.items() if k != "metric"}}
    with open(os.path.join(args.out_dir, f"{args.split}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{args.split} ({n} examples, best.pt of step {step}): {summary(scores)}")
    if args.dataset != "coco":
        rows = {"published": scores, "likelihood": scores["likelihood"]} if "likelihood" in scores else \
            {"likelihood": scores}
        print(scienceqa.format_scores(rows))


def test(model, examples, args, batch_of, rank=0, world=1):
    """Score out_dir/best.pt on --split: its weights into model, then out_dir/{split}.json and a sample."""
    if world > 1:
        dist.barrier()  # rank 0 writes best.pt
    best = vlm.load_checkpoint(os.path.join(args.out_dir, "best.pt"))
    model.load_state_dict(best["model"], strict=False)  # its trained weights; the frozen ones are the same
    scores = evaluate(model, examples, args, batch_of, rank, world)
    if rank == 0:
        write_test(scores, args, best["step"], len(examples))
        show_sample(model, examples, args, batch_of)


def show_sample(model, examples, args, batch_of):
    """End a run by answering one example."""
    ex = next((e for e in examples if e.image), examples[0])
    answer = predict(model, [ex], args, batch_of)[ex.id]
    print(f"\nimage: {ex.image}\n{ex.prompt}")
    if ex.choices is None:
        print(f"-> {answer}\n(a reference: {ex.references[0]})")
    else:
        print(f"->{ex.answer_prefix}{ex.choices[answer[0]]}. (most likely; right answer:{ex.choices[ex.answer]})")


def load_resume(path, args, flag="--resume"):
    """The checkpoint to resume from (or to score, flag --eval_only), after checking it was made by
    a run like this one (for scoring: on the same data; settings older checkpoints lack are not checked)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{flag}: no checkpoint at {path} (check --out_dir)")
    ckpt = vlm.load_checkpoint(path)
    kinds = {"step": int, "best": (int, float), "rng": torch.Tensor, "train_args": dict,
             "optimizer": (dict, type(None))}
    bad = [k for k, kind in kinds.items() if k not in ckpt or not isinstance(ckpt[k], kind)]
    if bad or ckpt["step"] < 0 or ckpt["rng"].dtype != torch.uint8 or ckpt["rng"].shape != torch.get_rng_state().shape:
        raise CheckpointError(f"{flag}: {path} has no valid {', '.join(bad) or 'step or rng'} (not written by "
                              f"train.py, or damaged): start a new run with --overwrite")
    old = ckpt["train_args"]
    keys = ("dataset", "answer", "context", "target") + (("n_train", "n_val") if args.dataset == "shapes" else ())
    if flag == "--resume":
        keys += ("mode", "llm", "vit", "freeze", "vit_layers", "pool", "rank", "loss", "batch_size", "grad_accum",
                 "seed")
    changed = [k for k in keys if old.get(k) != getattr(args, k) and (flag == "--resume" or k in old)]
    if changed:
        raise CheckpointError(f"{flag}: {path} was trained with other settings: "
                              + ", ".join(f"--{k} {old.get(k)}" for k in changed))
    return ckpt


def setup_distributed(args):
    """(rank, world): torchrun sets RANK and WORLD_SIZE; nccl on CUDA, gloo on CPU."""
    if "RANK" not in os.environ:
        return 0, 1
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
    return dist.get_rank(), dist.get_world_size()


def make_optimizer(model, args):
    """AdamW; weight decay on matrices only (nanoGPT); the gates may get their own lr."""
    groups = {"decay": [], "no_decay": [], "gate": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups["gate" if name == "fuser.gate" else "decay" if p.dim() >= 2 else "no_decay"].append(p)
    scale = {"decay": 1.0, "no_decay": 1.0, "gate": args.gate_lr / args.lr}
    return torch.optim.AdamW([{"params": ps, "weight_decay": args.weight_decay if g == "decay" else 0.0,
                               "lr_scale": scale[g]} for g, ps in groups.items() if ps], lr=args.lr,
                             betas=(args.beta1, args.beta2))


def lr_at(step, max_steps, args):
    """Linear warm-up, then cosine down to min_lr."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, max_steps - args.warmup))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


def main(argv=None):
    args = get_args(argv)
    rank, world = setup_distributed(args)
    master, ddp, on_cuda = rank == 0, world > 1, args.device.startswith("cuda")
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and on_cuda)
    autocast = torch.autocast("cuda" if on_cuda else "cpu", torch.bfloat16) if bf16 else nullcontext()
    ckpt_path, log_path = os.path.join(args.out_dir, "ckpt.pt"), os.path.join(args.out_dir, "log.jsonl")
    if args.eval_only:
        ckpt = load_resume(os.path.join(args.out_dir, "best.pt"), args, "--eval_only")
    else:
        ckpt = load_resume(ckpt_path, args) if args.resume else None
    # the run owns out_dir (held until exit); scoring a finished run only reads it
    lock = claim(args.out_dir, args.resume, args.overwrite) if master and not args.eval_only else None  # noqa: F841

    torch.manual_seed(args.seed)  # the same initial weights in every process
    enc = get_encoding()
    train_set, val_set, test_set = load_data(args)
    global_batch = args.batch_size * args.grad_accum * world
    if not args.eval_only and (not train_set or not val_set):
        raise DataError(f"{args.data_dir} has no {'training' if not train_set else 'validation'} examples: "
                        f"check --data_dir")
    if global_batch > len(train_set) and not args.eval_only:
        raise RunError(f"a global batch of {global_batch} (--batch_size x --grad_accum x processes) is more than the "
                       f"{len(train_set)} training examples: lower --batch_size")
    val_set = val_set[:args.eval_samples] if args.eval_samples else val_set
    model = vlm.from_checkpoint(ckpt) if ckpt else build_model(args)
    model.to(args.device)
    params = model.trainable_parameters()
    if master:
        print(f"{args.mode}: {model.n_trainable():,} trainable parameters; "
              f"{len(train_set)} train / {len(val_set)} val / {len(test_set)} {args.split} examples")
    transform = lambda img: preprocess(img, model.vit.config.image_size)
    cache = None
    if args.cache_features != "off" and args.mode != "none":  # a frozen ViT's features, computed once
        out = args.out_dir if args.cache_features == "disk" else None
        os.makedirs(args.out_dir, exist_ok=True)
        cache = FeatureCache(model, train_set + val_set + test_set, transform, out, device=args.device)

    def batch_of(examples, make):  # tensors on the device, with cached features when there is a cache
        batch = make(examples, enc, None if cache or args.mode == "none" else transform, model.block_size)
        batch["features"] = cache(batch["image_paths"], args.device) if cache else None
        return to_device(batch, args.device)

    if args.eval_only:
        test(model, test_set, args, batch_of, rank, world)
        if ddp:
            dist.destroy_process_group()
        return
    max_steps = args.max_steps or math.ceil(args.epochs * len(train_set) / global_batch)
    if args.warmup is None:
        args.warmup = round(args.warmup_epochs * len(train_set) / global_batch)
    if master:
        print(f"{args.dataset} settings (DEFAULTS in train.py, or as given): "
              + ", ".join(f"{k} {getattr(args, k):.4g}" if isinstance(getattr(args, k), float)
                          else f"{k} {getattr(args, k)}" for k in SHOWN))
    optimizer = make_optimizer(model, args) if params else None
    start, best = 0, -1.0
    if ckpt:
        start, best = ckpt["step"], ckpt["best"]
        if start > max_steps:
            raise RunError(f"--resume: {ckpt_path} is at step {start}, past the run's {max_steps} steps: "
                           f"raise --max_steps (or --epochs) to train on")
        if optimizer:
            try:
                optimizer.load_state_dict(ckpt["optimizer"] or {})
            except (KeyError, ValueError):  # torch's words for a state of other parameters
                raise CheckpointError(f"--resume: {ckpt_path} holds no optimizer state for this model") from None
        torch.set_rng_state(ckpt["rng"].cpu())
    train_model = DDP(model, device_ids=[torch.cuda.current_device()] if on_cuda else None) if ddp and params else model
    train_model = torch.compile(train_model) if args.compile else train_model
    kept = read_log(log_path, start) if master else None  # parsed now, written back with the first new entry

    def log(entry):
        nonlocal kept
        if master:
            if kept is not None:  # on resume, drop what was logged after the checkpoint
                atomic_write(log_path, lambda f: f.write(b"".join(kept)))
                kept = None
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    bar = tqdm(range(start, max_steps + 1), initial=start, total=max_steps + 1, desc="train", disable=not master)
    t0 = time.time()
    for step in bar:
        lr = lr_at(step, max_steps, args)
        for group in (optimizer.param_groups if optimizer else []):
            group["lr"] = lr * group["lr_scale"]
        if step % args.eval_interval == 0 or step == max_steps:
            scores = evaluate(model, val_set, args, batch_of, rank, world)
            log({"step": step, "lr": lr, **scores})
            bar.write(f"step {step}: {summary(scores)}")
            state = vlm.checkpoint_state(model, args.llm, args.vit)
            state.update(step=step, best=max(best, scores["metric"]), rng=torch.get_rng_state(),
                         train_args=vars(args), optimizer=optimizer.state_dict() if optimizer else None)
            if master:  # best.pt first: a kill between the two never leaves a ckpt.pt that counts a best.pt not written
                if scores["metric"] > best:
                    save(state, os.path.join(args.out_dir, "best.pt"))
                save(state, ckpt_path)
            best = max(best, scores["metric"])
            t0 = time.time()
        if step == max_steps or optimizer is None:
            break
        # this process's micro-batches of this step's global batch: a function of the step alone
        mine = args.batch_size * args.grad_accum
        order = stream(len(train_set), args.seed, step * global_batch + rank * mine, mine)
        make = choice_batch if args.loss == "choices" else collate
        micro = [batch_of([train_set[i] for i in order[k:k + args.batch_size]], make)
                 for k in range(0, mine, args.batch_size)]
        # normalise by the global count of targets: any split over processes and micro-steps
        # then gives the same gradient as one big batch
        count = torch.tensor(float(sum(len(b["ids"]) if args.loss == "choices" else (b["targets"] != -100).sum()
                                       for b in micro)), device=args.device)
        if ddp:
            dist.all_reduce(count)
        total = torch.zeros((), device=args.device)
        for k, batch in enumerate(micro):
            with (train_model.no_sync() if ddp and k < len(micro) - 1 else nullcontext()), autocast:
                if args.loss == "choices":
                    answers = torch.tensor(batch["answer"], device=args.device)
                    loss_sum = F.cross_entropy(score_choices(train_model, batch), answers, reduction="sum")
                else:
                    logits, loss = train_model(batch["images"], batch["idx"], batch["targets"],
                                               batch["prompt_mask"], batch["has_image"], batch["features"])
                    loss_sum = loss * logits.size(0)
                (loss_sum * world / count).backward()  # DDP averages over processes: undo its 1/world
            total += loss_sum.detach()
        if ddp:
            dist.all_reduce(total)
        loss = (total / count).item()
        if not math.isfinite(loss):  # stop before the weights take this step: nothing after it is saved
            raise RunError(f"the loss is {loss} at step {step}; stopped, nothing saved after it: lower --lr "
                           f"or check the data")
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt, t0 = time.time() - t0, time.time()
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        log({"step": step, "loss": loss, "lr": lr, "tokens_per_s": sum(b["idx"].numel() for b in micro) * world / dt})
    if master:
        print(f"done: best val {'CIDEr' if args.dataset == 'coco' else 'accuracy'} {best:.2f}, "
              f"checkpoints in {args.out_dir}")
    test(model, test_set, args, batch_of, rank, world)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (DataError, CheckpointError, RunError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # no space, no permission, a file where a folder should be
        sys.exit(f"error: {e.filename}: {e.strerror}" if e.filename and e.strerror else f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted (the last checkpoint written is intact)")
