"""sample.py from the command line, on a real checkpoint file made in seconds.

The checkpoint is a tiny random VLM written as train.py writes one
(model.checkpoint_state plus train_args). Three runs go through a real
`python sample.py` subprocess (answer + --show_fusion, generation, a bad file),
started together since each pays torch's import. The other bad inputs run the
script's own `__main__` block in this process (runpy), so the entry point's
error handling is what is tested: a message and exit, or the test fails on
the exception.
"""
import os
import runpy
import subprocess
import sys
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image

import data.batch
import model as vlm
from data.batch import Example, choice_batch, choice_scores
from data.scienceqa import ANSWER_PREFIX, build_prompt
from data.tokenizer import EOT, get_encoding
from fuser import FuserConfig
from llm import GPT, GPTConfig
from vit import preprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION, OPTIONS = "What colour is the circle?", ["red", "blue", "green"]


def tiny_checkpoint(path, mode):
    torch.manual_seed(0)
    vit, gpt = vlm.build_backbones("tiny-random", "tiny-random")
    model = vlm.VLM(vit, gpt, mode, FuserConfig(pool=1))
    if mode == "dehvf":
        with torch.no_grad():  # as if trained: layers prefer some ViT layers, the memory is switched on
            model.fuser.layer_bias.normal_(0, 1.0)
            model.fuser.gate.fill_(0.5)
    state = vlm.checkpoint_state(model, "tiny-random", "tiny-random")
    state.update(step=10, best=50.0, train_args={"dataset": "shapes", "answer": "text", "loss": "choices",
                                                  "mode": mode, "llm": "tiny-random", "vit": "tiny-random"})
    torch.save(state, path)
    return state


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    state = tiny_checkpoint(d / "dehvf.pt", "dehvf")
    tiny_checkpoint(d / "prefix.pt", "prefix")
    noise = np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(d / "x.png")  # noise: half the file really is half the image
    (d / "cut.png").write_bytes((d / "x.png").read_bytes()[:6000])
    (d / "text.jpg").write_text("not a picture\n")
    torch.save({"lr": 0.1, "steps": 3}, d / "plain.pt")
    torch.save(GPT(GPTConfig.tiny()).state_dict(), d / "gpt2.pt")  # GPT-2's key names and layout
    (d / "corrupt.pt").write_bytes((d / "dehvf.pt").read_bytes()[:4000])
    nan = {**state, "model": OrderedDict(state["model"])}
    nan["model"]["fuser.gate"] = torch.full_like(state["model"]["fuser.gate"], float("nan"))  # a diverged run
    torch.save(nan, d / "nan.pt")
    Image.new("1", (1, 300000)).save(d / "strip.png")  # 661 bytes; resized whole, 45 GB
    (d / "folder.png").mkdir()
    torch.save({**state, "model": OrderedDict(state["model"], **{"fuser.up.weight": torch.zeros(3, 3)})},
               d / "misfit.pt")
    return d


@pytest.fixture(scope="module", autouse=True)
def cli(files):
    """The three subprocess runs, started together before this file's first test (each pays
    torch's import; the in-process tests run meanwhile). cli(name) -> (returncode, stdout, stderr)."""
    base = [sys.executable, "sample.py", "--device", "cpu", "--image", str(files / "x.png"),
            "--checkpoint", str(files / "dehvf.pt")]
    runs = {
        "answer": base + ["--question", QUESTION, "--options", ",".join(OPTIONS),
                          "--show_fusion", str(files / "fusion.png")],
        "generate": base + ["--prompt", "A picture of " * 100, "--max_new_tokens", "8"],
        "text_file": base[:4] + ["--image", str(files / "text.jpg")] + base[6:],
    }
    env = dict(os.environ, OMP_NUM_THREADS="1")  # three tiny runs at once: one thread each
    procs = {k: subprocess.Popen(v, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, v in runs.items()}
    done = {}

    def result(name):
        if name not in done:
            out, err = procs[name].communicate(timeout=300)
            done[name] = procs[name].returncode, out, err
        return done[name]

    yield result
    for p in procs.values():
        p.kill()
        p.communicate()


def run_main(argv, monkeypatch, capsys):
    """sample.py's __main__ block in this process: (exit code or message, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["sample.py", "--device", "cpu", *argv])
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # the script sets its own
    code = 0
    try:
        runpy.run_path(os.path.join(ROOT, "sample.py"), run_name="__main__")
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


BAD = [  # (arguments, words the message must contain); {d} is the folder of test files. The inputs
    # (x.png, dehvf.pt) must come out unchanged: an output never overwrites an input
    (["--image", "{d}/missing.png"], "no image file at"),
    (["--image", "{d}/cut.png"], "cannot read image"),
    (["--image", "{d}/text.jpg"], "cannot identify image file"),
    (["--checkpoint", "{d}/missing.pt"], "no checkpoint at"),
    (["--checkpoint", "{d}/plain.pt"], "not a nanoDEHVF checkpoint"),
    (["--checkpoint", "{d}/gpt2.pt"], "not a nanoDEHVF checkpoint"),
    (["--checkpoint", "{d}/corrupt.pt"], "not a readable checkpoint"),
    (["--checkpoint", "{d}/misfit.pt"], "fuser.up.weight has shape (3, 3), expected"),
    (["--question", "Which?", "--options", "red"], "2 to 26"),
    (["--question", "Which?", "--options", ",".join("abcdefghijklmnopqrstuvwxyz0")], "2 to 26"),
    (["--question", "Which?", "--options", "red,,blue"], "non-empty"),
    (["--question", "Which?"], "go together"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--top_k", "0"], "--top_k"),
    (["--max_new_tokens", "0"], "--max_new_tokens"),
    (["--max_new_tokens", "100000"], "at most 256"),
    (["--prompt", ""], "--prompt is empty"),
    (["--checkpoint", "{d}/prefix.pt", "--show_fusion", "{d}/f.png"], "needs a mode with a fuser"),
    (["--show_fusion", "{d}/no/such/folder/f.png"], "in a folder that exists"),
    (["--show_fusion", "{d}/folder.png"], "name a PNG file"),
    (["--show_fusion", ""], "name a PNG file"),
    (["--show_fusion", "{d}/dehvf.pt"], "is an input"),
    (["--show_fusion", "{d}/./x.png"], "is an input"),
    (["--show_fusion", "/proc/f.png"], "cannot write --show_fusion /proc/f.png"),
    (["--image", "{d}/strip.png"], "1 x 300000 pixels, longer than 100:1"),
    (["--image", "{d}/folder.png"], "(it is a folder)"),
    (["--checkpoint", "{d}/nan.pt"], "holds NaN or infinite weights (fuser.gate"),
    (["--temperature", "1e-45"], "must be 0 (greedy) or from 0.001"),
    (["--top_k", "-5"], "--top_k: must be at least 1"),
    (["--seed", str(2 ** 70)], "--seed: must be from 0"),
    (["--device", "potato"], "'potato' is not a device"),
    (["--device", "cuda:99"], "no such device here"),
    (["--question", " ", "--options", "red,blue"], "--question is empty"),
    (["--question", "Which?", "--options", "red, red ,blue"], "each option must differ"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a)[:40] for a, _ in BAD])
def test_bad_input_is_one_message_and_an_exit(argv, message, files, monkeypatch, capsys):
    inputs = {f: (files / f).read_bytes() for f in ("x.png", "dehvf.pt")}
    argv = ["--image", str(files / "x.png"), "--checkpoint", str(files / "dehvf.pt")] + \
           [a.format(d=files) for a in argv]  # later flags win
    code, out, err = run_main(argv, monkeypatch, capsys)
    if code == 2:  # argparse: its usage block, then one line "sample.py: error: ..."
        *usage, code = err.strip().splitlines()
        assert usage[0].startswith("usage:") and all(line.startswith(" ") for line in usage[1:]), err
    assert isinstance(code, str) and "error: " in code and "\n" not in code, code
    assert message in code, code
    assert not os.path.exists(files / "f.png") and not [p for p in os.listdir(files) if f".tmp{os.getpid()}" in p]
    assert all((files / f).read_bytes() == data for f, data in inputs.items())


def test_a_long_question_is_cut_from_the_left_with_a_warning(files, monkeypatch, capsys):
    monkeypatch.setattr(data.batch, "_warned_truncation", False)
    with pytest.warns(UserWarning, match="cut from the left"):
        code, out, err = run_main(["--image", str(files / "x.png"), "--checkpoint", str(files / "dehvf.pt"),
                                   "--question", "Which?", "--options", "red,blue", "--context", "long " * 300],
                                  monkeypatch, capsys)
    assert code == 0 and f"Response:{ANSWER_PREFIX} " in out


def test_letter_answers_score_the_option_letters(files, monkeypatch, capsys):
    code, out, _ = run_main(["--image", str(files / "x.png"), "--checkpoint", str(files / "dehvf.pt"),
                             "--question", QUESTION, "--options", ",".join(OPTIONS), "--answer", "letter"],
                            monkeypatch, capsys)
    answer = out.split(f"Response:{ANSWER_PREFIX} ")[1][:2]
    assert code == 0 and answer in ("A.", "B.", "C.")
    assert f"({answer[0]}) {OPTIONS['ABC'.index(answer[0])]}" in out.split("Response:")[1] and "<-" in out


def test_help_shows_the_defaults(monkeypatch, capsys):
    code, out, _ = run_main(["--help"], monkeypatch, capsys)
    out = " ".join(out.split())
    assert code == 0 and "(default: out/best.pt)" in out and "(default: A picture of)" in out
    assert "(default: 30)" in out and "--show_fusion PNG" in out


# ----------------------------------------------------------------------------- the subprocess runs

def test_answers_a_question_with_the_training_scorer(files, cli):
    rc, out, err = cli("answer")
    assert rc == 0 and "Traceback" not in err, err
    # the same question through the path train.py evaluates with, in this process; the checkpoint says
    # dataset=shapes, answer=text, so the options follow the prefix that shapes' problems train on
    model = vlm.from_checkpoint(str(files / "dehvf.pt")).eval()
    prefix = " The circle is"
    ex = Example("q", build_prompt(QUESTION, None, OPTIONS), "", str(files / "x.png"), prefix,
                 [f" {o}" for o in OPTIONS])
    batch = choice_batch([ex], get_encoding(), lambda img: preprocess(img, 64), model.block_size)
    with torch.no_grad():
        logits, _ = model(batch["images"], batch["idx"], batch["score_targets"], batch["prompt_mask"])
    probs = choice_scores(logits, batch)[0].softmax(-1).tolist()
    best = OPTIONS[int(np.argmax(probs))]
    assert out.startswith(f"Question: {QUESTION}\nContext: N/A\nOptions: (A) red (B) blue (C) green\n")
    assert f"Response:{prefix} {best}.\n" in out
    printed = [float(line.split()[2]) for line in out.splitlines() if line.startswith("  (")]
    assert printed == pytest.approx(probs, abs=1e-3) and sum(printed) == pytest.approx(1, abs=3e-3)


def test_show_fusion_writes_a_heat_map(files, cli):
    assert cli("answer")[0] == 0
    with Image.open(files / "fusion.png") as img:
        assert img.format == "PNG" and img.mode == "RGB" and img.width > 200 and img.height > 150
        pixels = np.asarray(img)
    # the cells are shaded: dark blue for the heavy weights, not a blank page
    assert (pixels[..., 2].astype(int) - pixels[..., 0] > 60).sum() > 500
    assert not [p for p in os.listdir(files) if ".tmp" in p]  # the temp file was renamed into place


def test_generates_from_a_prompt_cut_to_the_context(files, cli):
    rc, out, err = cli("generate")
    assert rc == 0 and "Traceback" not in err, err
    model, enc = vlm.from_checkpoint(str(files / "dehvf.pt")).eval(), get_encoding()
    ids = enc.encode_ordinary("A picture of " * 100)
    room = 256 + 1 - 8  # the context less the new tokens; the last new token is never fed back
    lines = err.strip().splitlines()
    # one line: the cut (no "trained to answer questions" note: shapes checkpoints caption too)
    assert f"warning: the prompt's {len(ids)} tokens are cut from the left to {room}" in err and len(lines) == 1, err
    # greedy, stopped at EOT: the same text as model.generate in this process
    ids = ids[-room:]
    with Image.open(files / "x.png") as img:
        pixels = preprocess(img, 64)[None]
    new = model.generate(pixels, torch.tensor([ids]), 8)[0, len(ids):].tolist()
    assert out == enc.decode(ids + (new[:new.index(EOT)] if EOT in new else new)) + "\n"


def test_a_text_file_named_jpg_is_one_line_and_an_exit(cli):
    rc, out, err = cli("text_file")
    assert rc == 1 and out == "" and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("error:") and "cannot read image" in err and "text.jpg" in err
