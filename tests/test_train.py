"""train.py end to end on a tiny shapes set: checkpoints and log, exact resume,
torchrun (gloo, CPU) equal to one process, the feature cache, the test split and
--eval_only, bad input; and its parts: the defaults per dataset, the lr schedule,
the optimiser's groups, what each freeze mode trains and saves."""
import json
import math
import os
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

import train
from data.shapes import ensure_shapes
from model import FREEZE, VLM, build_backbones, checkpoint_state, from_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return ensure_shapes(str(tmp_path_factory.mktemp("data") / "shapes"), n_train=48, n_val=12)


def base_args(shapes_dir, out_dir, *extra):
    return ["--data_dir", shapes_dir, "--n_train", "48", "--n_val", "12", "--out_dir", str(out_dir),
            "--llm", "tiny-random", "--vit", "tiny-random",
            "--batch_size", "4", "--eval_interval", "3", "--warmup", "2", "--seed", "7", *extra]


def losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [e["loss"] for e in map(json.loads, f) if "loss" in e]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_run_writes_loadable_checkpoint_and_log(shapes_dir, tmp_path):
    train.main(base_args(shapes_dir, tmp_path, "--max_steps", "4"))
    assert len(losses(tmp_path)) == 4 and all(l > 0 for l in losses(tmp_path))
    with open(tmp_path / "log.jsonl") as f:
        evals = [e for e in map(json.loads, f) if "Avg" in e]
    assert [e["step"] for e in evals] == [0, 3, 4] and all("colour" in e for e in evals)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 4 and os.path.isfile(tmp_path / "best.pt")
    model = from_checkpoint(str(tmp_path / "ckpt.pt"))
    assert model.mode == "dehvf" and model.fuser.gate.abs().sum() > 0  # trained: the gates left 0
    with open(tmp_path / "test.json") as f:  # best.pt scored on the test split
        test = json.load(f)
    assert test["split"] == "test" and test["examples"] > 12 and "colour" in test and "caption" in test  # + captions
    assert "likelihood" not in test  # text answers: scored by likelihood alone


def test_resume_continues_exactly(shapes_dir, tmp_path):
    # the feature cache is off, so every step also reads its images: resume must restore all of it
    common = ("--max_steps", "8", "--cache_features", "off")
    train.main(base_args(shapes_dir, tmp_path / "straight", *common))
    train.main(base_args(shapes_dir, tmp_path / "split", "--max_steps", "3", "--cache_features", "off"))
    first = losses(tmp_path / "split")
    train.main(base_args(shapes_dir, tmp_path / "split", *common, "--resume"))
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert len(first) == 3 and len(resumed) == 8
    assert resumed == straight  # bit-for-bit: same data order, same weights, same optimiser state


def test_feature_cache_gives_the_same_losses(shapes_dir, tmp_path):
    train.main(base_args(shapes_dir, tmp_path / "off", "--max_steps", "4", "--cache_features", "off"))
    train.main(base_args(shapes_dir, tmp_path / "mem", "--max_steps", "4", "--cache_features", "memory"))
    train.main(base_args(shapes_dir, tmp_path / "disk", "--max_steps", "4", "--cache_features", "disk"))
    off, mem, disk = (losses(tmp_path / d) for d in ("off", "mem", "disk"))
    assert max(abs(a - b) for a, b in zip(off, mem)) <= 1e-5
    assert max(abs(a - b) for a, b in zip(off, disk)) <= 1e-2  # fp16 on disk: close, not equal
    assert len([f for f in os.listdir(tmp_path / "disk") if f.startswith("features-")]) == 1


def test_torchrun_two_processes_equal_one(shapes_dir, tmp_path):
    one = run_cli("train.py", *base_args(shapes_dir, tmp_path / "one", "--max_steps", "3", "--batch_size", "8"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                  *base_args(shapes_dir, tmp_path / "two", "--max_steps", "3", "--batch_size", "4"),
                  env={"OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 3 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-5


@pytest.mark.parametrize("extra, message", [
    (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["--mode", "cross-attention"], "invalid choice: 'cross-attention'"),
    (["--dataset", "scienceqa", "--data_dir", "/nonexistent/sqa"], "python -m data.scienceqa --download"),
    (["--resume", "--out_dir", "/nonexistent/out"], "no checkpoint at /nonexistent/out/ckpt.pt"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--freeze", "none", "--cache_features", "memory"], "needs a frozen ViT"),
])
def test_bad_input_one_clear_line(extra, message):
    result = run_cli("train.py", *extra)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_public_name_offline_says_how(shapes_dir, tmp_path):
    # no network here: the download fails and the message says where to put the file, or to use tiny
    result = run_cli("train.py", *base_args(shapes_dir, tmp_path, "--llm", "gpt2"),
                     env={"NANODEHVF_CACHE": str(tmp_path / "cache"), "HTTPS_PROXY": "http://127.0.0.1:9"})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "huggingface.co/openai-community/gpt2" in result.stderr and "--llm tiny --vit tiny" in result.stderr


def test_resume_refuses_another_run_and_other_files(shapes_dir, tmp_path):
    train.main(base_args(shapes_dir, tmp_path, "--max_steps", "1"))
    with pytest.raises(train.CheckpointError, match="--mode dehvf"):
        train.main(base_args(shapes_dir, tmp_path, "--max_steps", "2", "--mode", "memvp", "--resume"))
    torch.save({"wte.weight": torch.zeros(2, 2)}, tmp_path / "ckpt.pt")  # a checkpoint of something else
    with pytest.raises(train.CheckpointError, match="not a nanoDEHVF checkpoint"):
        train.main(base_args(shapes_dir, tmp_path, "--max_steps", "2", "--resume"))


def test_interrupted_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    train.save({"step": 1}, path)

    def dies_halfway(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        train.save({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1} and os.listdir(tmp_path) == ["ckpt.pt"]


def test_scienceqa_is_scored_both_ways_and_on_test(shapes_dir, tmp_path, capsys):
    # the shapes folder is in ScienceQA's layout: train it as ScienceQA, scored as published
    args = base_args(shapes_dir, tmp_path, "--dataset", "scienceqa", "--max_steps", "2")
    args = args[:args.index("--warmup")] + args[args.index("--warmup") + 2:]  # 2 epochs of 12 steps: 24
    train.main(args)
    out = capsys.readouterr().out  # the resolved settings come first: MemVP's, lr scaled to a batch of 4
    assert "scienceqa settings" in out and "lr 0.0001406" in out and "beta2 0.95" in out and "warmup 24" in out
    with open(tmp_path / "log.jsonl") as f:
        evals = {e["step"]: e for e in map(json.loads, f) if "Avg" in e}
    assert list(evals) == [0, 2]
    for e in evals.values():  # both protocols in every evaluation: the metric is the published one
        assert e["metric"] == e["Avg"] and 0 <= e["invalid"] <= 100 and "Avg" in e["likelihood"]
    with open(tmp_path / "test.json") as f:
        test = json.load(f)
    assert test["split"] == "test" and test["examples"] == 12
    assert test["step"] == torch.load(tmp_path / "best.pt", weights_only=True)["step"]
    assert set(test) >= {"NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg", "invalid", "likelihood"}
    os.remove(tmp_path / "test.json")
    train.main(args + ["--eval_only"])  # no training: best.pt scored again, the same numbers
    with open(tmp_path / "test.json") as f:
        assert json.load(f) == test
    with pytest.raises(train.CheckpointError, match="--eval_only: .* --dataset scienceqa"):
        train.main(base_args(shapes_dir, tmp_path, "--eval_only"))  # shapes settings: another task


def test_the_split_is_scored_with_best_pt(shapes_dir, tmp_path, monkeypatch):
    # a spy on evaluate records the gates of every evaluation and ranks the first one best, so best.pt
    # (step 0, the gates at their initial 0) surely differs from the last step's weights
    seen, real = [], train.evaluate

    def spy(model, *args, **kwargs):
        seen.append(model.fuser.gate.detach().clone())
        return {**real(model, *args, **kwargs), "metric": 100.0 - len(seen)}
    monkeypatch.setattr(train, "evaluate", spy)
    args = base_args(shapes_dir, tmp_path, "--max_steps", "3", "--split", "val")
    train.main(args)
    best, last = (torch.load(tmp_path / name, weights_only=True) for name in ("best.pt", "ckpt.pt"))
    assert (best["step"], last["step"], len(seen)) == (0, 3, 3)  # evaluations at steps 0 and 3, then val
    assert not torch.equal(best["model"]["fuser.gate"], last["model"]["fuser.gate"])
    assert torch.equal(seen[-1], best["model"]["fuser.gate"])  # the split was scored with best.pt's weights
    with open(tmp_path / "log.jsonl") as f:
        logged = next(e for e in map(json.loads, f) if "Avg" in e and e["step"] == 0)
    with open(tmp_path / "val.json") as f:
        val = json.load(f)
    assert val["step"] == 0 and all(val[k] == v for k, v in logged.items() if k not in ("step", "lr", "metric"))
    os.remove(tmp_path / "val.json")
    train.main(args + ["--eval_only"])  # the same from a fresh process's point of view: best.pt, scored again
    assert torch.equal(seen[-1], best["model"]["fuser.gate"])
    with open(tmp_path / "val.json") as f:
        assert json.load(f) == val


def test_defaults_per_dataset(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    sqa = train.get_args(["--dataset", "scienceqa"])  # MemVP's recipe, lr scaled to our batch of 32
    assert sqa.lr == pytest.approx(9e-3 * 32 / 256) and sqa.gate_lr == sqa.lr and sqa.min_lr == 0
    assert (sqa.epochs, sqa.warmup, sqa.warmup_epochs, sqa.weight_decay) == (20, None, 2, 0.02)
    assert (sqa.beta1, sqa.beta2, sqa.grad_clip, sqa.answer, sqa.loss) == (0.9, 0.95, 0, "letter", "lm")
    assert train.get_args(["--dataset", "scienceqa", "--batch_size", "8", "--grad_accum", "2"]).lr == \
        pytest.approx(9e-3 * 16 / 256)
    mine = train.get_args(["--dataset", "scienceqa", "--lr", "5e-4", "--beta2", "0.999", "--warmup", "7"])
    assert (mine.lr, mine.gate_lr, mine.beta2, mine.warmup, mine.warmup_epochs) == (5e-4, 5e-4, 0.999, 7, None)
    coco = train.get_args(["--dataset", "coco"])  # ADEM-VL's COCO command
    assert (coco.epochs, coco.warmup_epochs, coco.weight_decay, coco.beta2) == (5, 0.1, 0.02, 0.95)
    shp = train.get_args([])
    assert (shp.lr, shp.gate_lr, shp.min_lr, shp.warmup, shp.epochs, shp.beta2, shp.grad_clip, shp.answer) == \
        (6e-3, pytest.approx(6e-2), pytest.approx(6e-4), 50, 2.5, 0.99, 1.0, "text")
    assert train.get_args(["--warmup_epochs", "1"]).warmup is None  # given in epochs: no step count from the table
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun: the global batch is 4 x 32
    assert train.get_args(["--dataset", "scienceqa"]).lr == pytest.approx(9e-3 * 128 / 256)


def test_lr_schedule():
    args = Namespace(lr=1.0, min_lr=0.1, warmup=10)
    lrs = [train.lr_at(step, 110, args) for step in range(111)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warm-up to the peak
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55) and lrs[110] == pytest.approx(0.1)
    assert lrs[35] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))  # cosine, a quarter of the way
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # never rises after the warm-up
    assert train.lr_at(200, 110, args) == pytest.approx(0.1)  # past the end: min_lr


def tiny_vlm(freeze="all"):
    torch.manual_seed(0)
    vit, gpt = build_backbones("tiny-random", "tiny-random")
    return VLM(vit, gpt, "dehvf", freeze=freeze)


def test_optimizer_groups():
    model = tiny_vlm()
    args = Namespace(lr=0.01, gate_lr=0.1, weight_decay=0.02, beta1=0.8, beta2=0.95)
    opt = train.make_optimizer(model, args)
    name = {id(p): n for n, p in model.named_parameters()}
    groups = {tuple(sorted(name[id(p)] for p in g["params"])): g for g in opt.param_groups}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(n for names in groups for n in names) == sorted(trainable)  # each trainable weight once
    for names, g in groups.items():
        assert g["betas"] == (0.8, 0.95)
        if names == ("fuser.gate",):  # the gates: their own lr, no decay
            assert g["lr_scale"] == pytest.approx(10) and g["weight_decay"] == 0
        else:
            assert g["lr_scale"] == 1
            dims = {model.get_parameter(n).dim() for n in names}
            # decay on matrices only: weights of linear maps, slot embeddings; not gains, biases, gates
            assert dims == ({2} if g["weight_decay"] == 0.02 else {1}) and g["weight_decay"] in (0.02, 0)
    assert len(groups) == 3


@pytest.mark.parametrize("freeze", FREEZE)
def test_freeze_modes_train_and_save(freeze):
    model = tiny_vlm(freeze)
    gpt_trains, vit_trains = freeze in ("vit", "none"), freeze in ("llm", "none")
    trains = {n.split(".")[0]: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        part = n.split(".")[0]
        assert p.requires_grad == {"fuser": True, "gpt": gpt_trains, "vit": vit_trains}[part], n
    assert set(trains) == {"fuser", "gpt", "vit"}
    # backbones named by a public checkpoint are saved only when trained (nothing is downloaded here)
    keys = checkpoint_state(model, "gpt2", "openai/clip-vit-base-patch16")["model"].keys()
    assert any(k.startswith("gpt.") for k in keys) == gpt_trains
    assert any(k.startswith("vit.") for k in keys) == vit_trains
    assert {k for k in keys if k.startswith("fuser.")} == {n for n, _ in model.fuser.named_parameters(prefix="fuser")}
    # backbones made here cannot be had by name: always saved
    made_here = checkpoint_state(model, "tiny-random", "tiny-random")["model"]
    assert {k.split(".")[0] for k in made_here} == {"fuser", "gpt", "vit"}
