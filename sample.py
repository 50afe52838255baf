"""Ask a trained checkpoint about one image: answer a multiple-choice question, or continue a prompt.

    python sample.py --image x.jpg --question "What colour is the circle?" --options "red,blue,green"
    python sample.py --image x.jpg --prompt "A picture of" --temperature 0.8 --top_k 40
    python sample.py --image x.jpg --question ... --options ... --show_fusion fusion.png
    python sample.py --mix_by_type out/mix          # shapes: the mean mix per question type, one PNG each

A question goes into the prompt training used (data/scienceqa.py's QCM) and its
options are scored by their likelihood after " The answer is" (for a checkpoint
trained on shapes' text answers, after the prefix it trained on, " The circle is":
data/shapes.py's answer_prefix), through the same path train.py evaluates with
(data/batch.py's choice_batch and score_choices).
`--show_fusion` draws, with Pillow only, the fuser's mix over ViT layers that
each decoder layer chose for this image and text (DESIGN.md section 4, step 2).
"""
import argparse
import os
import string
import sys
import warnings

import torch
from PIL import Image, ImageDraw, ImageFont

import cli
import model as vlm
from data import shapes
from data.batch import DataError, Example, choice_batch, load_image, score_choices, to_device
from data.scienceqa import ANSWER_PREFIX, build_prompt, load_scienceqa
from data.tokenizer import EOT, get_encoding
from outdir import atomic_write
from vit import preprocess
from weights import CheckpointError


def number(kind, ok, rule):
    """An argparse type: text -> kind, refused with `rule` unless ok(value)."""
    def parse(text):
        value = kind(text)  # a ValueError here: argparse's "invalid ... value"
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse's message names it
    return parse


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=cli.Help)
    a = p.add_argument
    a("--image", default=None, help="the image file (any format Pillow reads)")
    a("--question", default=None, help="a multiple-choice question (with --options)")
    a("--options", default=None, help="its options, comma-separated, 2 to 26: 'red,blue,green'")
    a("--context", default=None, help="the question's hint (the prompt's 'Context:'; N/A if none)")
    a("--prompt", default="A picture of", help="without --question: the text to continue")
    a("--checkpoint", default="out/best.pt", help="written by train.py")
    a("--answer", default=None, choices=["letter", "text"],
      help="options scored as ' A' or as ' red' (default: as the checkpoint was trained)")
    a("--max_new_tokens", type=number(int, lambda n: n >= 1, "must be at least 1"), default=30,
      help="generation length (stops early at end of text)")
    a("--temperature", type=number(float, lambda t: t == 0 or 1e-3 <= t < float("inf"),
                                   "must be 0 (greedy) or from 0.001 (smaller is greedy in effect) to finite"),
      default=0.0, help="0 = greedy")
    a("--top_k", type=number(int, lambda k: k >= 1, "must be at least 1"), default=None,
      help="sample among the k likeliest tokens only (temperature > 0)")
    a("--seed", type=number(int, lambda n: 0 <= n < 2 ** 63, "must be from 0 to 2**63 - 1"), default=1337,
      help="for sampling")
    a("--show_fusion", default=None, metavar="PNG", help="save the fuser's ViT-layer mix as a heat map")
    a("--mix_by_type", default=None, metavar="PREFIX", help="instead of one image: the mean mix over ViT "
      "layers per shapes question type on 40 validation questions each, saved as PREFIX-<type>.png")
    a("--device", type=cli.device, default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    args = p.parse_args(argv)
    if (args.image is None) == (args.mix_by_type is None):
        p.error("give --image (one image) or --mix_by_type (shapes validation questions)")
    if (args.question is None) != (args.options is None):
        p.error("--question and --options go together")
    if args.question is not None and not args.question.strip():
        p.error("--question is empty")
    if args.question is None and not args.prompt:
        p.error("--prompt is empty")
    if args.options is not None:
        args.options = [o.strip() for o in args.options.split(",")]
        if not 2 <= len(args.options) <= 26 or not all(args.options):
            p.error(f"--options needs 2 to 26 non-empty options separated by commas, got {len(args.options)}")
        if len(set(args.options)) < len(args.options):
            p.error(f"--options: each option must differ, got {', '.join(args.options)}")
    mix_file = args.mix_by_type and f"{args.mix_by_type}-colour.png"  # (its four files share a folder)
    outputs = {"--show_fusion": args.show_fusion, "--mix_by_type": mix_file}
    for flag, out in outputs.items():  # never a folder, never one of the inputs
        if out is None:
            continue
        if not out or os.path.isdir(out) or not os.path.isdir(os.path.dirname(os.path.abspath(out))):
            p.error(f"{flag} {out!r}: name a PNG file in a folder that exists")
        inputs = [f for f in (args.image, args.checkpoint) if f and os.path.exists(f)]
        if os.path.exists(out) and any(os.path.samefile(f, out) for f in inputs):
            p.error(f"{flag} {out} is an input (--image or --checkpoint); name a new file")
    return args


def answer_question(model, args, answer_format, enc, prefix=ANSWER_PREFIX):
    """Score the options after prefix; print the answer and each option's probability (among the options)."""
    shown = string.ascii_uppercase[:len(args.options)] if answer_format == "letter" else args.options
    ex = Example(id="--question", prompt=build_prompt(args.question, args.context, args.options), target="",
                 image=args.image, answer_prefix=prefix, choices=[f" {s}" for s in shown])
    transform = lambda img: preprocess(img, model.vit.config.image_size)
    batch = to_device(choice_batch([ex], enc, transform, model.block_size), args.device)
    probs = score_choices(model, batch)[0].softmax(dim=-1).tolist()
    best = max(range(len(probs)), key=probs.__getitem__)
    print(f"{ex.prompt}{prefix}{ex.choices[best]}.")
    width = max(len(o) for o in args.options)
    for i, (letter, option, prob) in enumerate(zip(string.ascii_uppercase, args.options, probs)):
        print(f"  ({letter}) {option:<{width}}  {prob:.3f}{'  <-' if i == best else ''}")
    if args.show_fusion:  # the fuser's mix for this question, (L, K)
        return model.fusion_mix(batch["images"], batch["idx"], batch["prompt_mask"], batch["has_image"])[0]


def continue_prompt(model, image, args, enc):
    """Generate after --prompt, stop at the end-of-text token, print prompt + continuation."""
    ids = enc.encode_ordinary(args.prompt)
    room = model.block_size + 1 - args.max_new_tokens  # the last new token is never fed back
    if len(ids) > room:
        warnings.warn(f"the prompt's {len(ids)} tokens are cut from the left to {room}, leaving room "
                      f"for --max_new_tokens {args.max_new_tokens} in a context of {model.block_size}")
        ids = ids[-room:]
    pixels = preprocess(image, model.vit.config.image_size)[None].to(args.device)  # (1, 3, S, S)
    idx = torch.tensor([ids], device=args.device)  # (1, T)
    new = model.generate(pixels, idx, args.max_new_tokens, args.temperature, args.top_k)[0, len(ids):].tolist()
    print(enc.decode(ids + (new[:new.index(EOT)] if EOT in new else new)))
    if args.show_fusion:  # the fuser's mix, (L, K), as generate chose it at prefill
        return model.fusion_mix(pixels, idx)[0]


def save_fusion(selection, vit_layers, path, title):
    """Heat map, Pillow only: rows = decoder layers, columns = ViT layers, each cell its weight."""
    L, K = selection.shape
    font, small = ImageFont.load_default(15), ImageFont.load_default(12)
    lines = [title[0], title[1] if len(title[1]) <= 70 else title[1][:67] + "...",
             "cell: weight of ViT layer h_k in decoder layer l's mix (each row sums to 1)"]
    cw, ch, left, top = 60, 28, 130, 92  # cell size, room for the labels
    width = max(left + K * cw + 20, 20 + int(max(f.getlength(t) for f, t in zip((font, small, small), lines))))
    img = Image.new("RGB", (width, top + L * ch + 40), "white")
    d = ImageDraw.Draw(img)
    for y, f, text in zip((8, 30, top + L * ch + 12), (font, small, small), lines):
        d.text((10, y), text, fill="black" if f is font else "dimgray", font=f)
    d.text((left + K * cw / 2, top - 24), "ViT layer (hidden state h_k)", fill="black", font=small, anchor="md")
    d.text((10, top + L * ch / 2), "decoder layer", fill="black", font=small, anchor="lm")
    for k, layer in enumerate(vit_layers):
        d.text((left + k * cw + cw / 2, top - 6), f"h{layer}", fill="black", font=small, anchor="md")
    for l in range(L):
        d.text((left - 8, top + l * ch + ch / 2), str(l), fill="black", font=small, anchor="rm")
        for k in range(K):
            w, x, y = float(selection[l, k]), left + k * cw, top + l * ch
            d.rectangle((x, y, x + cw - 2, y + ch - 2), fill=tuple(round(255 - w * (255 - c)) for c in (8, 48, 107)))
            d.text((x + cw / 2 - 1, y + ch / 2 - 1), f"{w:.2f}", font=small, anchor="mm",
                   fill="white" if w > 0.5 else "black")  # shade: 0 white, 1 dark blue
    atomic_write(path, lambda f: img.save(f, format="PNG"))  # never half a picture at path


def mix_by_type(model, trained, args, enc, per_type=40):
    """The fuser's mix averaged over validation questions of each shapes type: does the decoder
    read other ViT layers for colour than for counting? One heat map per type, and a line each."""
    if trained.get("dataset") != "shapes" or not hasattr(model, "fuser"):
        raise CheckpointError(f"--mix_by_type needs a checkpoint trained on shapes in a mode with a fuser; "
                              f"{args.checkpoint} is not one")
    questions = [ex for ex in load_scienceqa(trained["data_dir"], "val", trained["answer"]) if ex.image]
    transform = lambda img: preprocess(img, model.vit.config.image_size)
    for qtype in ("colour", "shape", "count", "position"):
        chosen = [ex for ex in questions if ex.meta["qtype"] == qtype][:per_type]
        if not chosen:
            continue
        batch = to_device(choice_batch(chosen, enc, transform, model.block_size), args.device)
        mix = model.fusion_mix(batch["images"], batch["idx"], batch["prompt_mask"], batch["has_image"])
        mix = mix.float().mean(0).cpu()  # (L, K): decoder layer x ViT layer
        path = f"{args.mix_by_type}-{qtype}.png"
        save_fusion(mix, model.fuser.layers, path, (f"{model.mode}: mean mix over {len(chosen)} '{qtype}' questions",
                                                    trained["data_dir"]))
        top = [f"h{model.fuser.layers[k]}" for k in mix.argmax(1).tolist()]
        print(f"{qtype:>8}: heaviest ViT layer per decoder layer {' '.join(top)}; "
              f"mean weights per ViT layer {' '.join(f'{w:.2f}' for w in mix.mean(0).tolist())} -> {path}")


def main(argv=None):
    args = get_args(argv)
    if args.image is not None and not os.path.isfile(args.image):  # (a folder or a pipe would not do either)
        raise DataError(f"no image file at {args.image}" + (" (it is a folder)" if os.path.isdir(args.image) else ""))
    image = args.image and load_image(args.image, "--image")  # a bad image fails here, before the model loads
    ckpt = vlm.load_checkpoint(args.checkpoint)
    trained = ckpt.get("train_args") or {}
    model = vlm.from_checkpoint(ckpt)
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise CheckpointError(f"{args.checkpoint} holds NaN or infinite weights ({bad[0]}, {len(bad)} tensors in all): "
                              f"the run that saved it diverged; use an earlier checkpoint")
    model = model.to(args.device).eval()
    if args.mix_by_type:
        with torch.no_grad():
            return mix_by_type(model, trained, args, get_encoding())
    if args.show_fusion and not hasattr(model, "fuser"):
        sys.exit(f"error: --show_fusion needs a mode with a fuser (dehvf, static, memvp); "
                 f"{args.checkpoint} is mode '{model.mode}'")
    if args.question is None and args.max_new_tokens > model.block_size:
        sys.exit(f"error: --max_new_tokens must be at most {model.block_size}, the model's context")
    enc = get_encoding()
    torch.manual_seed(args.seed)
    with torch.no_grad():
        if args.question is not None:
            answer = args.answer or trained.get("answer", "letter")
            shapes_text = trained.get("dataset") == "shapes" and answer == "text"  # as it was trained to answer
            prefix = shapes.answer_prefix(args.question) if shapes_text else ANSWER_PREFIX
            mix = answer_question(model, args, answer, enc, prefix)
        else:
            if trained.get("dataset") == "scienceqa":  # shapes trains captions too
                print(f"note: this checkpoint was trained to answer {trained['dataset']} questions; ask one with "
                      f"--question \"...\" --options \"a,b,c\"", file=sys.stderr)
            mix = continue_prompt(model, image, args, enc)
    if args.show_fusion:
        text = f"Q: {args.question}" if args.question is not None else f"prompt: {args.prompt}"
        title = f"{model.mode}: mix over ViT layers per decoder layer", f"{os.path.basename(args.image)}  {text}"
        try:
            save_fusion(mix.float().cpu(), model.fuser.layers, args.show_fusion, title)
        except OSError as e:
            sys.exit(f"error: cannot write --show_fusion {args.show_fusion} ({type(e).__name__}: {e.strerror})")
        print(f"fusion weights saved to {args.show_fusion}", file=sys.stderr)


if __name__ == "__main__":
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"  # one line, no source
    cli.run(main)
