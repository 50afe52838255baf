"""train.py end to end on a tiny shapes set: checkpoints and log, exact resume,
torchrun (gloo, CPU) equal to one process, the feature cache, and bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train
from data.shapes import ensure_shapes
from model import from_checkpoint

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
