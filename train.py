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

The settings (the defaults per dataset, every flag) are train_args.py's, the
scoring is data/evaluate.py's, the run's files (out_dir) are outdir.py's.
"""
import atexit
import json
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import cli
import model as vlm
from data import coco, scienceqa, shapes
from data.batch import DataError, choice_batch, collate, score_choices, to_device
from data.evaluate import evaluate, report, show_sample, summary
from data.tokenizer import get_encoding
from features import FeatureCache
from fuser import FuserConfig
from outdir import RunError, atomic_write, claim, log_writer, save
from train_args import SAME_DATA, SAME_RUN, describe, get_args
from vit import preprocess
from weights import CheckpointError


def load_data(args, global_batch):
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
    if args.eval_only:
        return [], [], load(args.split)
    train_set, val_set = load("train"), load("val")
    if not train_set or not val_set:
        raise DataError(f"{args.data_dir} has no {'training' if not train_set else 'validation'} examples: "
                        f"check --data_dir")
    if global_batch > len(train_set):
        raise RunError(f"a global batch of {global_batch} (--batch_size x --grad_accum x processes) is more than the "
                       f"{len(train_set)} training examples: lower --batch_size")
    val_set = val_set[:args.eval_samples] if args.eval_samples else val_set
    return train_set, val_set, load(args.split)


def load_run(args):
    """The checkpoint --eval_only scores (best.pt) or --resume continues (ckpt.pt), if either: made by
    a run on the same data, and to resume, also with the same model, batch and data order."""
    if not (args.eval_only or args.resume):
        return None
    same = SAME_DATA + (("n_train", "n_val") if args.dataset == "shapes" else ()) + (() if args.eval_only else SAME_RUN)
    name, flag = ("best.pt", "--eval_only") if args.eval_only else ("ckpt.pt", "--resume")
    return vlm.load_training_checkpoint(os.path.join(args.out_dir, name), flag, {k: getattr(args, k) for k in same})


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


def test(model, examples, args, batch_of, rank=0, world=1):
    """Score out_dir/best.pt on --split: its weights into model, then out_dir/{split}.json and a sample."""
    if world > 1:
        dist.barrier()  # rank 0 writes best.pt
    path = os.path.join(args.out_dir, "best.pt")
    best = vlm.load_checkpoint(path)
    model.load_state_dict(best["model"], strict=False)  # its trained weights; the frozen ones are the same
    scores = evaluate(model, examples, args, batch_of, rank, world)
    if rank == 0:
        result = {"split": args.split, "checkpoint": path, "step": best["step"], "examples": len(examples),
                  **{k: v for k, v in scores.items() if k != "metric"}}
        atomic_write(os.path.join(args.out_dir, f"{args.split}.json"),
                     lambda f: f.write(json.dumps(result, indent=1).encode()))
        report(scores, f"{args.split} ({len(examples)} examples, best.pt of step {best['step']})")
        show_sample(model, examples, args, batch_of)


def setup_distributed(args):
    """(rank, world): torchrun sets RANK and WORLD_SIZE; nccl on CUDA, gloo on CPU."""
    if "RANK" not in os.environ:
        return 0, 1
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    atexit.register(dist.destroy_process_group)
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
    ckpt = load_run(args)
    # the run owns out_dir (held until exit); scoring a finished run only reads it
    lock = claim(args.out_dir, args.resume, args.overwrite) if master and not args.eval_only else None  # noqa: F841

    torch.manual_seed(args.seed)  # the same initial weights in every process
    enc = get_encoding()
    global_batch = args.batch_size * args.grad_accum * world
    train_set, val_set, test_set = load_data(args, global_batch)
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

    if args.eval_only:  # nothing to train: score best.pt
        return test(model, test_set, args, batch_of, rank, world)
    optimizer = make_optimizer(model, args) if params else None  # None: mode none, the backbones frozen
    # with nothing to train the run is step 0: one evaluation and checkpoint, then the test split
    max_steps = (args.max_steps or math.ceil(args.epochs * len(train_set) / global_batch)) if optimizer else 0
    if args.warmup is None:
        args.warmup = round(args.warmup_epochs * len(train_set) / global_batch)
    if master:
        print(describe(args))
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    start, best = (ckpt["step"], ckpt["best"]) if ckpt else (0, -1.0)
    if start > max_steps:
        raise RunError(f"--resume: {ckpt_path} is at step {start}, past the run's {max_steps} steps: "
                       f"raise --max_steps (or --epochs) to train on")
    if ckpt:
        vlm.restore_training_state(ckpt, optimizer, ckpt_path)
    train_model = DDP(model, device_ids=[torch.cuda.current_device()] if on_cuda else None) if ddp and optimizer else model
    train_model = torch.compile(train_model) if args.compile else train_model
    log = log_writer(os.path.join(args.out_dir, "log.jsonl"), start) if master else lambda entry: None

    bar = tqdm(range(start, max_steps + 1), initial=start, total=max_steps + 1, desc="train", disable=not master)
    t0 = time.time()
    for step in bar:
        lr = lr_at(step, max_steps, args)
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
        if step == max_steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
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


if __name__ == "__main__":
    cli.run(main, "interrupted (the last checkpoint written is intact)")
