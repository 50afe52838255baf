"""Train the fuser: one plain loop, in nanoGPT's order.

    python train.py                                  # offline: shapes, tiny backbones pretrained here
    python train.py --dataset scienceqa --llm gpt2 --vit openai/clip-vit-base-patch16
    torchrun --nproc_per_node=4 train.py ...         # DistributedDataParallel, same losses

Each step: lr for this step -> maybe evaluate and checkpoint -> micro-steps with
gradient accumulation -> clip -> step -> zero_grad -> log. The data order is a
function of (seed, step) alone, so `--resume` continues exactly where a run
stopped. Checkpoints (model.py's format plus the optimizer and step) are
written to a temporary file and renamed, so a crash never leaves half a file.
"""
import argparse
import json
import math
import os
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
from data.batch import DataError, choice_batch, collate, score_choices, to_device
from data.metrics import caption_scores
from data.tokenizer import EOT, get_encoding
from features import FeatureCache
from fuser import FuserConfig
from vit import preprocess
from weights import CheckpointError


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
      help="QA target: ' The answer is A.' or ' The answer is red.' (default: letter, text for shapes)")
    a("--loss", default="lm", choices=["lm", "choices"],
      help="lm: next-token loss on the target; choices: cross-entropy over the options' likelihoods")
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
    a("--lr", type=float, default=None, help="peak learning rate (default: 3e-3, 6e-3 for shapes)")
    a("--gate_lr", type=float, default=None, help="lr of the fuser's gates (default: lr, 10 x lr for shapes)")
    a("--min_lr", type=float, default=None, help="end of the cosine (default: lr / 10)")
    a("--warmup", type=int, default=50, help="warm-up steps")
    a("--weight_decay", type=float, default=0.01, help="AdamW, on matrices only")
    a("--grad_clip", type=float, default=1.0, help="0 = off")
    a("--epochs", type=float, default=None, help="length of the run, unless --max_steps (default: 4, 2.5 for shapes)")
    a("--max_steps", type=int, default=None, help="optimiser steps (default: from --epochs)")
    a("--eval_interval", type=int, default=250, help="steps between evaluations and checkpoints")
    a("--eval_samples", type=int, default=None, help="validation examples per evaluation (default: all)")
    a("--n_train", type=int, default=shapes.N_TRAIN, help="shapes: training problems")
    a("--n_val", type=int, default=shapes.N_VAL, help="shapes: validation (and test) problems")
    a("--out_dir", default="out", help="checkpoints and log.jsonl")
    a("--resume", action="store_true", help="continue from out_dir/ckpt.pt")
    a("--seed", type=int, default=1337, help="weights, data order")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: bf16 autocast on CUDA")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--cache_features", default=None, choices=["off", "memory", "disk"],
      help="compute a frozen ViT's features once: in memory (fp32) or in out_dir (fp16, memory-mapped); "
           "default: memory for shapes, else off")
    args = p.parse_args(argv)
    tiny_shapes = args.dataset == "shapes"
    args.answer = args.answer or ("text" if tiny_shapes else "letter")
    args.lr = (6e-3 if tiny_shapes else 3e-3) if args.lr is None else args.lr
    args.gate_lr = (10 * args.lr if tiny_shapes else args.lr) if args.gate_lr is None else args.gate_lr
    args.epochs = (2.5 if tiny_shapes else 4.0) if args.epochs is None else args.epochs
    args.pool = args.pool if args.pool is not None else (1 if args.vit in vlm.OFFLINE else 2)
    args.data_dir = args.data_dir or f"data/raw/{args.dataset}"
    for name in ("batch_size", "grad_accum", "eval_interval", "rank", "pool", "n_train", "n_val"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if min(args.lr, args.gate_lr, args.epochs) <= 0 or (args.max_steps is not None and args.max_steps < 1):
        p.error("--lr, --gate_lr, --epochs and --max_steps must be positive")
    args.cache_features = args.cache_features or ("memory" if tiny_shapes and args.freeze in ("all", "vit") else "off")
    if args.cache_features != "off" and args.freeze not in ("all", "vit"):
        p.error(f"--cache_features needs a frozen ViT, but --freeze {args.freeze} trains it")
    if args.dataset == "coco" and args.loss == "choices":
        p.error("--loss choices needs multiple-choice questions; coco has captions")
    return args


def load_data(args):
    if args.dataset == "coco":
        return coco.load_coco(args.data_dir, "train"), coco.load_coco(args.data_dir, "val")
    if args.dataset == "shapes":  # questions and captions together
        shapes.ensure_shapes(args.data_dir, args.n_train, args.n_val)
        return tuple(scienceqa.load_scienceqa(args.data_dir, split, args.answer)
                     + shapes.caption_examples(args.data_dir, split) for split in ("train", "val"))
    return (scienceqa.load_scienceqa(args.data_dir, "train", args.answer),
            scienceqa.load_scienceqa(args.data_dir, "val", args.answer))


def build_model(args):
    try:
        vit, gpt = vlm.build_backbones(args.llm, args.vit)
    except CheckpointError as e:
        raise CheckpointError(f"{e}\n(or train offline on small backbones pretrained here: --llm tiny --vit tiny)") from None
    layers = tuple(int(k) for k in args.vit_layers.split(",")) if args.vit_layers else None
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
    """{id: chosen option index} for QA, {id: greedy caption} for captions; sharded over processes."""
    model.eval()
    mine, out = examples[rank::world], {}
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
            for ex, s in zip(chunk, score_choices(model, batch_of(chunk, choice_batch))):
                out[ex.id] = int(s.argmax())
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, out)
        out = {k: v for part in parts for k, v in part.items()}
    model.train()
    return out


def evaluate(model, examples, args, batch_of, rank=0, world=1):
    """QA: accuracy by ScienceQA's categories; captions: BLEU-4 and CIDEr-D of greedy captions.
    Shapes has both, and adds accuracy per question type and how often a caption names an object right."""
    out = predict(model, examples, args, batch_of, rank, world)
    if args.dataset == "coco":
        scores = caption_scores(coco.references(examples), out)
        return {"BLEU-4": scores["BLEU-4"], "CIDEr": scores["CIDEr"], "metric": scores["CIDEr"]}
    questions = [ex for ex in examples if ex.choices]
    scores = scienceqa.score(questions, out)
    if args.dataset == "shapes":
        scores.update(shapes.type_scores(questions, out))
        scene = {ex.id: ex.meta["scene"] for ex in questions if ex.meta["scene"]}
        captions = [ex for ex in examples if ex.choices is None]
        if captions:
            named = [shapes.names_an_object(out[ex.id], scene[ex.meta["pid"]]) for ex in captions]
            scores["caption"] = 100.0 * sum(named) / len(named)
    return {**scores, "metric": scores["Avg"]}


def show_sample(model, examples, args, batch_of):
    """End a run by answering one validation example."""
    ex = next((e for e in examples if e.image), examples[0])
    answer = predict(model, [ex], args, batch_of)[ex.id]
    print(f"\nimage: {ex.image}\n{ex.prompt}")
    if args.dataset == "coco":
        print(f"-> {answer}\n(a reference: {ex.references[0]})")
    else:
        print(f"->{ex.answer_prefix}{ex.choices[answer]}. (right answer:{ex.choices[ex.answer]})")


def load_resume(path, args):
    """The checkpoint to resume from, after checking it was made by a run like this one."""
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume: no checkpoint at {path} (check --out_dir)")
    ckpt = vlm.load_checkpoint(path)
    old = ckpt.get("train_args", {})
    changed = [k for k in ("dataset", "mode", "llm", "vit", "freeze", "vit_layers", "pool", "rank", "loss",
                           "answer", "batch_size", "grad_accum", "seed") if old.get(k) != getattr(args, k)]
    if changed:
        raise CheckpointError(f"--resume: {path} was trained with other settings: "
                              + ", ".join(f"--{k} {old.get(k)}" for k in changed))
    return ckpt


def save(obj, path):
    """Write to a temporary file, then rename: a crash or Ctrl-C never leaves half a checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)  # atomic: readers see the old file or the new one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
                               "lr_scale": scale[g]} for g, ps in groups.items() if ps], lr=args.lr, betas=(0.9, 0.99))


def lr_at(step, max_steps, args):
    """Linear warm-up, then cosine down to min_lr."""
    min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, max_steps - args.warmup))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - min_lr)


def main(argv=None):
    args = get_args(argv)
    rank, world = setup_distributed(args)
    master, ddp, on_cuda = rank == 0, world > 1, args.device.startswith("cuda")
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and on_cuda)
    autocast = torch.autocast("cuda" if on_cuda else "cpu", torch.bfloat16) if bf16 else nullcontext()
    ckpt_path, log_path = os.path.join(args.out_dir, "ckpt.pt"), os.path.join(args.out_dir, "log.jsonl")
    ckpt = load_resume(ckpt_path, args) if args.resume else None

    torch.manual_seed(args.seed)  # the same initial weights in every process
    enc = get_encoding()
    train_set, val_set = load_data(args)
    val_set = val_set[:args.eval_samples] if args.eval_samples else val_set
    model = vlm.from_checkpoint(ckpt) if ckpt else build_model(args)
    model.to(args.device)
    params = model.trainable_parameters()
    if master:
        print(f"{args.mode}: {model.n_trainable():,} trainable parameters; "
              f"{len(train_set)} train / {len(val_set)} val examples")
    transform = lambda img: preprocess(img, model.vit.config.image_size)
    cache = None
    if args.cache_features != "off" and args.mode != "none":  # a frozen ViT's features, computed once
        out = args.out_dir if args.cache_features == "disk" else None
        os.makedirs(args.out_dir, exist_ok=True)
        cache = FeatureCache(model, train_set + val_set, transform, out, device=args.device)

    def batch_of(examples, make):  # tensors on the device, with cached features when there is a cache
        batch = make(examples, enc, None if cache or args.mode == "none" else transform, model.block_size)
        batch["features"] = cache(batch["image_paths"], args.device) if cache else None
        return to_device(batch, args.device)

    global_batch = args.batch_size * args.grad_accum * world
    max_steps = args.max_steps or math.ceil(args.epochs * len(train_set) / global_batch)
    optimizer = make_optimizer(model, args) if params else None
    start, best = 0, -1.0
    if ckpt:
        if optimizer:
            optimizer.load_state_dict(ckpt["optimizer"])
        start, best = ckpt["step"], ckpt["best"]
        torch.set_rng_state(ckpt["rng"].cpu())
    train_model = DDP(model, device_ids=[torch.cuda.current_device()] if on_cuda else None) if ddp and params else model
    train_model = torch.compile(train_model) if args.compile else train_model
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        kept = [line for line in open(log_path)] if ckpt and os.path.isfile(log_path) else []
        with open(log_path, "w") as f:  # on resume, drop what was logged after the checkpoint
            f.writelines(line for line in kept if json.loads(line)["step"] < start)

    def log(entry):
        if master:
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
            bar.write(f"step {step}: " + " ".join(f"{k} {v:.2f}" for k, v in scores.items() if v is not None))
            state = vlm.checkpoint_state(model, args.llm, args.vit)
            state.update(step=step, best=max(best, scores["metric"]), rng=torch.get_rng_state(),
                         train_args=vars(args), optimizer=optimizer.state_dict() if optimizer else None)
            if master:
                save(state, ckpt_path)
                if scores["metric"] > best:
                    save(state, os.path.join(args.out_dir, "best.pt"))
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
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ddp:
            dist.all_reduce(total)
        loss = (total / count).item()
        dt, t0 = time.time() - t0, time.time()
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        log({"step": step, "loss": loss, "lr": lr, "tokens_per_s": sum(b["idx"].numel() for b in micro) * world / dt})
    if master:
        print(f"done: best {'CIDEr' if args.dataset == 'coco' else 'accuracy'} {best:.2f}, "
              f"checkpoints in {args.out_dir}")
        show_sample(model, val_set, args, batch_of)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (DataError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted (the last checkpoint written is intact)")
