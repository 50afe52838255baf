"""Speed and memory of the fusion modes side by side.

DEHVF keeps the sequence text-only (the image enters the decoder's FFNs), where
`prefix` (LLaVA-style) makes it 196 positions longer for a ViT-B/16 (its patch tokens,
no class token, as LLaVA feeds them). This measures what that buys against baselines
implemented as well as our own mode: every mode runs the LM head only at the target
positions, on contiguous rows (GPT.head), and prefix uses the same SDPA kernel and
the 196 visual tokens it trains with.

All modes share one frozen ViT and one frozen GPT (default "random": GPT-2 124M and
CLIP ViT-B/16 shapes, random weights, nothing to download). After a discarded
warm-up, each repetition runs every mode, in an order rotated each time; reported
are medians of the times and medians of the per-repetition ratios to dehvf (x).

- step: forward + backward + AdamW on the trainable parameters, B samples of T
  tokens, loss on the last --answer of each. "uncached" runs the ViT; "cached" is
  given VLM.features (what a frozen-ViT feature cache holds), so it is the LLM
  part; the difference is the ViT's share. `none` trains nothing: its backward runs
  through the decoder down to block 1, as dehvf's does (dehvf's first trainable
  input enters block 0's FFN), so dehvf/none is the fuser's own cost.
- whole run: --epochs epochs with the feature cache: the ViT once, then cached steps.
- prefill: batch 1, a T-token prompt to the next token's logits, with and without the ViT.
- decode: --new_tokens greedy tokens with the KV cache and by recomputing the whole
  sequence per token, the prefill excluded (generate(n) - generate(1)).
- memory: peak bytes of the warm-up's uncached step above those allocated before it
  (weights, AdamW state, batch). CUDA: torch.cuda.max_memory_allocated. CPU: the
  peak of the running sum of torch.profiler's allocation and free events
  (profile_memory=True): tensor bytes exactly, whatever malloc caches or other
  processes do.

    python bench.py --threads 1          # B=4, T=128: 12 minutes on 2 busy CPU cores
    python bench.py --T 32,64,128,256,512 --modes dehvf,prefix,none --decode_modes "" --json /tmp/sweep.json
    python bench.py --device cuda        # bf16 autocast
"""
import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext

import torch
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

import cli
from llm import GPT, GPTConfig
from model import MODES, VLM, build_backbones
from vit import ViT, ViTConfig
from weights import CheckpointError


def backbones(llm, vit):
    """The real shapes with random weights for "random", else build_backbones' names or paths."""
    vision, gpt = build_backbones("tiny-random" if llm == "random" else llm, "tiny-random" if vit == "random" else vit)
    gpt = GPT(GPTConfig()) if llm == "random" else gpt
    vision = ViT(ViTConfig()) if vit == "random" else vision
    return vision.eval(), gpt.eval()


def make_batch(model, B, T, answer, device):
    g = torch.Generator().manual_seed(0)
    S = model.vit.config.image_size
    images = torch.randn(B, 3, S, S, generator=g)
    idx = torch.randint(model.gpt.config.vocab_size, (B, T), generator=g)
    targets = torch.full_like(idx, -100)
    targets[:, -answer:] = idx[:, -answer:]  # the answer carries the loss, the prompt does not
    return [t.to(device) for t in (images, idx, targets, targets == -100)]


def timed(fn, device):
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def peak_memory(fn, device):
    """Peak bytes allocated while fn runs, above those allocated before it."""
    if device.type == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):  # nbytes: + allocation, - free
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def jobs(model, opt, batch, amp):
    """The timed callables of one mode: {name: fn}."""
    images, idx, targets, prompt_mask = batch
    with torch.no_grad(), amp():
        feats, feats1 = model.features(images), model.features(images[:1])

    def step(features=None):
        hook = None
        if model.mode == "none":  # nothing trains: still run the backward dehvf needs, from block 1 on
            hook = model.gpt.transformer.h[0].register_forward_hook(lambda m, i, out: out.requires_grad_())
        with amp():
            _, loss = model(images, idx, targets, prompt_mask, features=features)
        if hook is not None:
            hook.remove()
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def prefill(features=None):
        with amp():
            h = model.hidden(images[:1], idx[:1], features=features)  # (1, T, d)
            return model.gpt.lm_head(h[:, -1])  # the next token's logits

    if model.mode == "none":  # no features: cached and uncached are the same computation
        return dict(step=step, prefill=prefill)
    return dict(step=step, step_cached=lambda: step(feats), prefill=prefill, prefill_cached=lambda: prefill(feats1))


def prime(opt):
    """Create AdamW's state now (a step on zero gradients): it is resident, not step memory."""
    for p in (p for group in opt.param_groups for p in group["params"]):
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def bench_T(models, opts, T, args, device, amp):
    modes, cuda = list(models), device.type == "cuda"
    fns = {mode: jobs(m, opts[mode], make_batch(m, args.B, T, args.answer, device), amp) for mode, m in models.items()}
    memory = {}
    for mode in modes:  # the warm-up: every callable once; its uncached step also gives the memory figure
        if opts[mode] is not None and not opts[mode].state:
            prime(opts[mode])
        memory[mode] = [peak_memory(fns[mode]["step"], device) / 2**20]
        for key in fns[mode]:
            if key != "step":
                fns[mode][key]()
    times = {mode: {key: [] for key in fns[mode]} for mode in modes}
    for r in tqdm(range(args.reps), desc=f"T={T}, repetitions", leave=False):
        for mode in modes[r % len(modes):] + modes[:r % len(modes)]:  # rotated each repetition
            for key, fn in fns[mode].items():
                times[mode][key].append(timed(fn, device))
    for t in times.values():
        t.setdefault("step_cached", t["step"])  # `none`
        t.setdefault("prefill_cached", t["prefill"])
        t["vit"] = [u - c for u, c in zip(t["step"], t["step_cached"])]  # the ViT's share of a step
        t["cache_speedup"] = [u / c for u, c in zip(t["step"], t["step_cached"])]
        t["whole_run"] = [v + args.epochs * c for v, c in zip(t["vit"], t["step_cached"])]
    for mode in modes:
        times[mode]["memory"] = memory[mode]
        if args.profile:  # what the time goes to: the top ops of one cached step
            with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda, record_shapes=True) as prof:
                fns[mode].get("step_cached", fns[mode]["step"])()
            print(f"\n{mode}, T={T}, a cached step:\n" + prof.key_averages(group_by_input_shape=True).table(
                sort_by=f"self_{'device' if cuda else 'cpu'}_time_total", row_limit=args.profile, max_name_column_width=50))
    return {mode: {key: summary(v, times["dehvf"][key]) for key, v in times[mode].items()} for mode in modes}


def summary(values, dehvf):
    """The median, and the median of the per-repetition ratios to dehvf."""
    ratios = [v / d if d else float("nan") for v, d in zip(values, dehvf)]
    return dict(median=statistics.median(values), x=statistics.median(ratios), reps=values)


def bench_decode(model, args, device, amp):
    """Decoding only: generate(new_tokens) - generate(1), with the KV cache and by recomputation."""
    images, idx, _, _ = make_batch(model, 1, args.decode_prompt, 1, device)
    generate = lambda n, cache: timed(lambda: model.generate(images, idx, n, use_cache=cache), device)
    with amp():
        generate(2, True), generate(2, False)  # warm-up
        kv, recompute = [], []
        for r in range(args.decode_reps):
            for cache in (True, False) if r % 2 == 0 else (False, True):
                (kv if cache else recompute).append(generate(args.new_tokens, cache) - generate(1, cache))
    n = args.new_tokens - 1
    return dict(kv_tok_s=n / statistics.median(kv), recompute_tok_s=n / statistics.median(recompute),
                speedup=statistics.median(r / c for c, r in zip(kv, recompute)), kv_s=kv, recompute_s=recompute)


def report(config, results, decode):
    print(f"\n{config['device']} {config['precision']}, torch {config['torch']}, {config['threads']} threads, "
          f"B={config['B']}, loss on {config['answer']} tokens each, {config['reps']} reps after a warm-up; "
          f"x = median of per-rep ratios to dehvf\nmemory: {config['memory_method']}")
    cols = [("step", "step s", 1), ("step_cached", "cached s", 1), ("prefill", "prefill ms", 1e3),
            ("prefill_cached", "no-ViT ms", 1e3), ("memory", "act MiB", 1)]
    for T, res in results.items():
        print(f"\nT={T:<4}" + "".join(f"{name:>11} {'x':>5}" for name, _ in [c[1:] for c in cols])
              + "   ViT s  unc/cached")
        for mode, r in res.items():
            print(f"{mode:<6}" + "".join(f"{r[k]['median'] * s:11.4g} {r[k]['x']:5.2f}" for k, _, s in cols)
                  + f"{r['vit']['median']:8.3g}{r['cache_speedup']['median']:12.2f}")
        if "prefix" in res:
            print(f"whole run, {config['epochs']} epochs, both cached: prefix/dehvf {res['prefix']['whole_run']['x']:.2f}x")
    if len(results) > 1 and "prefix" in res:
        print("\nT sweep   prefix/dehvf: cached step   prefill (no ViT)   memory   |  dehvf/none: cached step")
        for T, res in results.items():
            none = 1 / res["none"]["step_cached"]["x"] if "none" in res else float("nan")
            p = res["prefix"]
            print(f"T={T:<6}{p['step_cached']['x']:26.2f}{p['prefill_cached']['x']:19.2f}{p['memory']['x']:9.2f}"
                  f"{none:28.2f}")
    for mode, d in decode.items():
        print(f"\ndecode, {mode}, B=1, {config['decode_prompt']}-token prompt, {config['new_tokens']} new tokens: "
              f"KV cache {d['kv_tok_s']:.2f} tok/s, recompute {d['recompute_tok_s']:.2f} tok/s, x{d['speedup']:.1f}")


def words(s):
    return [w for w in s.split(",") if w]


def ints(s):
    return [int(w) for w in words(s)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=cli.Help)
    p.add_argument("--llm", default="random", help='"random" (GPT-2 124M shapes), "tiny", "tiny-random", a public name or a path')
    p.add_argument("--vit", default="random", help='"random" (CLIP ViT-B/16 shapes), "tiny", "tiny-random", a public name or a path')
    p.add_argument("--modes", default=",".join(MODES), type=words, help="comma list, dehvf included")
    p.add_argument("--B", type=int, default=4, help="training batch size")
    p.add_argument("--T", default="128", type=ints, help="text tokens per sample; a comma list sweeps")
    p.add_argument("--answer", type=int, default=16, help="target tokens per sample (the rest is prompt)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions after the warm-up")
    p.add_argument("--epochs", type=int, default=20, help="epochs of the whole-run figure")
    p.add_argument("--decode_modes", default="dehvf", type=words, help="comma list (recomputing is slow on a CPU)")
    p.add_argument("--decode_prompt", type=int, default=128, help="prompt tokens before decoding")
    p.add_argument("--new_tokens", type=int, default=128, help="tokens to decode")
    p.add_argument("--decode_reps", type=int, default=1, help="timed decoding repetitions after a warm-up")
    p.add_argument("--profile", type=int, default=0, help="print the top N ops of each mode's cached step")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (bf16 autocast)")
    p.add_argument("--json", default=None, help="also write every figure to this file")
    args = p.parse_args(argv)
    modes, Ts, decode_modes = args.modes, args.T, args.decode_modes
    if "dehvf" not in modes or not set(modes) <= set(MODES) or not set(decode_modes) <= set(modes):
        sys.exit(f"bench.py: --modes must be among {', '.join(MODES)} and include dehvf; --decode_modes among --modes")
    if min(Ts) <= args.answer or min(args.B, args.reps, args.new_tokens - 1, args.decode_reps, args.answer) < 1:
        sys.exit("bench.py: need every T > --answer >= 1, --new_tokens >= 2, and --B, --reps, --decode_reps >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench.py: --device cuda, but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else nullcontext
    torch.manual_seed(0)
    try:
        vision, gpt = backbones(args.llm, args.vit)
    except (CheckpointError, OSError) as e:
        sys.exit(f"bench.py: {e}")
    longest = max(*Ts, args.decode_prompt + args.new_tokens) + vision.config.grid ** 2 * ("prefix" in modes)
    if longest > gpt.config.block_size:
        sys.exit(f"bench.py: {longest} positions exceed the decoder's context of {gpt.config.block_size}")
    models = {mode: VLM(vision, gpt, mode).to(device) for mode in modes}
    opts = {mode: torch.optim.AdamW(m.trainable_parameters(), lr=1e-4) if m.n_trainable() else None
            for mode, m in models.items()}
    config = dict(vars(args), torch=torch.__version__, threads=torch.get_num_threads(), device=str(device),
                  precision="bf16 autocast" if cuda else "fp32", trainable={k: m.n_trainable() for k, m in models.items()},
                  memory_method="torch.cuda.max_memory_allocated above memory_allocated before the step" if cuda else
                  "peak of the running sum of torch.profiler allocation/free events (profile_memory=True) in the step")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}, modes {', '.join(modes)}", flush=True)
    results = {T: bench_T(models, opts, T, args, device, amp) for T in Ts}
    decode = {mode: bench_decode(models[mode], args, device, amp) for mode in decode_modes}
    report(config, results, decode)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=config, results=results, decode=decode), f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
