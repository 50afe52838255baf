"""Ask a trained checkpoint about one image: answer a multiple-choice question, or continue a prompt.

    python sample.py --image x.jpg --question "What colour is the circle?" --options "red,blue,green"
    python sample.py --image x.jpg --prompt "A picture of" --temperature 0.8 --top_k 40
    python sample.py --image x.jpg --question ... --options ... --show_fusion fusion.png
    python sample.py --mix_by_type out/mix          # shapes: the mean mix per question type, one PNG each

A question goes into the prompt training used (data/scienceqa.py's QCM) and its
options are scored by their likelihood after " The answer is", through the same
path train.py evaluates with (data/batch.py's choice_batch and score_choices).
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

import model as vlm
from data.batch import DataError, Example, choice_batch, load_image, score_choices, to_device
from data.scienceqa import ANSWER_PREFIX, build_prompt, load_scienceqa
from data.tokenizer import EOT, get_encoding
from train import Help
from vit import preprocess
from weights import CheckpointError


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=Help)
    a = p.add_argument
    a("--image", default=None, help="the image file (any format Pillow reads)")
    a("--question", default=None, help="a multiple-choice question (with --options)")
    a("--options", default=None, help="its options, comma-separated, 2 to 26: 'red,blue,green'")
    a("--context", default=None, help="the question's hint (the prompt's 'Context:'; N/A if none)")
    a("--prompt", default="A picture of", help="without --question: the text to continue")
    a("--checkpoint", default="out/best.pt", help="written by train.py")
    a("--answer", default=None, choices=["letter", "text"],
      help="options scored as ' A' or as ' red' (default: as the checkpoint was trained)")
    a("--max_new_tokens", type=int, default=30, help="generation length (stops early at end of text)")
    a("--temperature", type=float, default=0.0, help="0 = greedy")
    a("--top_k", type=int, default=None, help="sample among the k likeliest tokens only (temperature > 0)")
    a("--seed", type=int, default=1337, help="for sampling")
    a("--show_fusion", default=None, metavar="PNG", help="save the fuser's ViT-layer mix as a heat map")
    a("--mix_by_type", default=None, metavar="PREFIX", help="instead of one image: the mean mix over ViT "
      "layers per shapes question type on 40 validation questions each, saved as PREFIX-<type>.png")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    args = p.parse_args(argv)
    if (args.image is None) == (args.mix_by_type is None):
        raise ValueError("give --image (one image) or --mix_by_type (shapes validation questions)")
    if (args.question is None) != (args.options is None):
        raise ValueError("--question and --options go together")
    if args.options is not None:
        args.options = [o.strip() for o in args.options.split(",")]
        if not 2 <= len(args.options) <= 26 or not all(args.options):
            raise ValueError(f"--options needs 2 to 26 non-empty options separated by commas, got {len(args.options)}")
    if args.show_fusion and not os.path.isdir(os.path.dirname(os.path.abspath(args.show_fusion))):
        raise ValueError(f"--show_fusion {args.show_fusion}: its folder does not exist")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device here (use --device cpu)")
    if not (0 <= args.temperature < float("inf")):
        raise ValueError(f"--temperature must be 0 (greedy) or positive, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1 or args.max_new_tokens < 1:
        raise ValueError("--top_k and --max_new_tokens must be at least 1")
    return args


def answer_question(model, args, answer_format, enc):
    """Score the options; print the answer and each option's probability (among the options)."""
    shown = string.ascii_uppercase[:len(args.options)] if answer_format == "letter" else args.options
    ex = Example(id="--question", prompt=build_prompt(args.question, args.context, args.options), target="",
                 image=args.image, answer_prefix=ANSWER_PREFIX, choices=[f" {s}" for s in shown])
    transform = lambda img: preprocess(img, model.vit.config.image_size)
    batch = to_device(choice_batch([ex], enc, transform, model.block_size), args.device)
    probs = score_choices(model, batch)[0].softmax(dim=-1).tolist()
    best = max(range(len(probs)), key=probs.__getitem__)
    print(f"{ex.prompt}{ANSWER_PREFIX}{ex.choices[best]}.")
    width = max(len(o) for o in args.options)
    for i, (letter, option, prob) in enumerate(zip(string.ascii_uppercase, args.options, probs)):
        print(f"  ({letter}) {option:<{width}}  {prob:.3f}{'  <-' if i == best else ''}")


def continue_prompt(model, image, args, enc):
    """Generate after --prompt, stop at the end-of-text token, print prompt + continuation."""
    ids = enc.encode_ordinary(args.prompt)
    if not ids:
        raise ValueError("--prompt is empty")
    room = model.block_size + 1 - args.max_new_tokens  # the last new token is never fed back
    if room < 1:
        raise ValueError(f"--max_new_tokens must be at most {model.block_size}, the model's context")
    if len(ids) > room:
        warnings.warn(f"the prompt's {len(ids)} tokens are cut from the left to {room}, leaving room "
                      f"for --max_new_tokens {args.max_new_tokens} in a context of {model.block_size}")
        ids = ids[-room:]
    pixels = preprocess(image, model.vit.config.image_size)[None].to(args.device)  # (1, 3, S, S)
    idx = torch.tensor([ids], device=args.device)  # (1, T)
    new = model.generate(pixels, idx, args.max_new_tokens, args.temperature, args.top_k)[0, len(ids):].tolist()
    print(enc.decode(ids + (new[:new.index(EOT)] if EOT in new else new)))


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
    tmp = f"{path}.tmp{os.getpid()}"
    img.save(tmp, format="PNG")
    os.replace(tmp, path)  # atomic: never half a picture at path


def mix_by_type(model, trained, args, enc, per_type=40):
    """The fuser's mix averaged over validation questions of each shapes type: does the decoder
    read other ViT layers for colour than for counting? One heat map per type, and a line each."""
    if trained.get("dataset") != "shapes" or not hasattr(model, "fuser"):
        raise ValueError("--mix_by_type needs a checkpoint trained on shapes in a mode with a fuser")
    questions = [ex for ex in load_scienceqa(trained["data_dir"], "val", trained["answer"]) if ex.image]
    transform = lambda img: preprocess(img, model.vit.config.image_size)
    for qtype in ("colour", "shape", "count", "position"):
        chosen = [ex for ex in questions if ex.meta["qtype"] == qtype][:per_type]
        score_choices(model, to_device(choice_batch(chosen, enc, transform, model.block_size), args.device))
        mix = model.fuser.selection.float().mean(0).cpu()  # (L, K): decoder layer x ViT layer
        path = f"{args.mix_by_type}-{qtype}.png"
        save_fusion(mix, model.fuser.layers, path, (f"{model.mode}: mean mix over {len(chosen)} '{qtype}' questions",
                                                    trained["data_dir"]))
        top = [f"h{model.fuser.layers[k]}" for k in mix.argmax(1).tolist()]
        print(f"{qtype:>8}: heaviest ViT layer per decoder layer {' '.join(top)}; "
              f"mean weights per ViT layer {' '.join(f'{w:.2f}' for w in mix.mean(0).tolist())} -> {path}")


def main(argv=None):
    args = get_args(argv)
    if args.mix_by_type:
        ckpt = vlm.load_checkpoint(args.checkpoint)
        model = vlm.from_checkpoint(ckpt).to(args.device).eval()
        with torch.no_grad():
            return mix_by_type(model, ckpt.get("train_args") or {}, args, get_encoding())
    if not os.path.isfile(args.image):
        raise DataError(f"no image file at {args.image}")
    image = load_image(args.image, "--image")  # a bad image fails here, before the model loads
    ckpt = vlm.load_checkpoint(args.checkpoint)
    trained = ckpt.get("train_args") or {}
    model = vlm.from_checkpoint(ckpt).to(args.device).eval()
    if args.show_fusion and not hasattr(model, "fuser"):
        raise ValueError(f"--show_fusion needs a mode with a fuser (dehvf, static, memvp); "
                         f"{args.checkpoint} is mode '{model.mode}'")
    enc = get_encoding()
    torch.manual_seed(args.seed)
    with torch.no_grad():
        if args.question is not None:
            answer_question(model, args, args.answer or trained.get("answer", "letter"), enc)
        else:
            if trained.get("dataset") == "scienceqa":  # shapes trains captions too
                print(f"note: this checkpoint was trained to answer {trained['dataset']} questions; ask one with "
                      f"--question \"...\" --options \"a,b,c\"", file=sys.stderr)
            continue_prompt(model, image, args, enc)
    if args.show_fusion:
        text = f"Q: {args.question}" if args.question is not None else f"prompt: {args.prompt}"
        save_fusion(model.fuser.selection[0].float().cpu(), model.fuser.layers, args.show_fusion,
                    (f"{model.mode}: mix over ViT layers per decoder layer", f"{os.path.basename(args.image)}  {text}"))
        print(f"fusion weights saved to {args.show_fusion}", file=sys.stderr)


if __name__ == "__main__":
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"  # one line, no source
    try:
        main()
    except (DataError, CheckpointError, ValueError) as e:
        sys.exit(f"error: {e}")
