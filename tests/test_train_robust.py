"""train.py under bad input, faults and concurrent runs: one clear line and a non-zero
exit, never a traceback, a silent success, or a file of an earlier run lost; kill -9 mid-save
still resumes exactly and leaves nothing behind."""
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import outdir
import train
from data.batch import DataError
from model import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args(shapes_dir, out_dir, *extra):
    return ["--data_dir", shapes_dir, "--n_train", "40", "--n_val", "10", "--out_dir", str(out_dir),
            "--llm", "tiny-random", "--vit", "tiny-random", "--batch_size", "4", "--eval_interval", "2", "--warmup", "2", "--max_steps", "4", "--seed", "3", *extra]


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    from data.shapes import ensure_shapes
    return ensure_shapes(str(tmp_path_factory.mktemp("data") / "shapes"), n_train=40, n_val=10)


@pytest.fixture(scope="module")
def finished(shapes_dir, tmp_path_factory):
    """out_dir of a finished 4-step run, to be copied, never changed."""
    out = tmp_path_factory.mktemp("finished") / "out"
    train.main(args(shapes_dir, out))
    return out


@pytest.fixture
def run_dir(finished, tmp_path):
    return shutil.copytree(finished, tmp_path / "out")


def digests(folder):
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in os.listdir(folder) if f != ".lock"}


def run_cli(*argv, limit=None):
    """train.py in a subprocess, optionally under a file-size limit (a real EFBIG, as a full disk gives ENOSPC)."""
    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=set_limit if limit else None)


def error_lines(stderr):
    return [line for line in stderr.splitlines() if "error" in line.lower()]


# ---------------------------------------------------------------- silent successes and tracebacks at parse time

@pytest.mark.parametrize("extra, message", [
    (["--lr", "nan"], "--lr must be above 0"), (["--lr", "inf"], "--lr must be above 0"),
    (["--lr", "1e30"], "at most 10"), (["--gate_lr", "nan"], "--gate_lr"), (["--weight_decay", "nan"], "--weight_decay"),
    (["--min_lr", "-1"], "--min_lr"), (["--epochs", "inf"], "--epochs"), (["--grad_clip", "nan"], "--grad_clip"),
    (["--eval_samples", "-1"], "--eval_samples"), (["--eval_samples", "0"], "--eval_samples"),
    (["--pool", "0"], "--pool must be at least 1"), (["--batch_size", "1000000"], "--batch_size"),
    (["--grad_accum", "0"], "--grad_accum"), (["--max_steps", str(10 ** 30)], "--max_steps"),
    (["--seed", str(2 ** 70)], "--seed"), (["--seed", "-1"], "--seed"), (["--rank", "10000000"], "--rank"),
    (["--vit_layers", "a,b"], "comma-separated layer numbers"), (["--vit_layers", "-1"], "comma-separated"),
    (["--vit_layers", ""], "comma-separated"), (["--device", "potato"], "not a device name"),
    (["--device", "cuda:99"], "no such device here"), (["--device", "meta"], "no such device here"),
    (["--out_dir", ""], "--out_dir must name a folder"), (["--data_dir", __file__], "is a file, not a dataset folder"),
    (["--resume", "--overwrite"], "choose one"),
    (["--loss", "choices"], "shapes has captions"), (["--dataset", "coco", "--loss", "choices"], "coco has captions"),
])
def test_bad_numbers_are_refused_at_parse_time(extra, message, capsys):
    with pytest.raises(SystemExit) as exit:
        train.get_args(extra)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and len(error_lines(err)) == 1


@pytest.mark.parametrize("extra, message", [
    (["--vit_layers", "99"], "distinct layers in 1..4"), (["--vit_layers", "1,1"], "distinct layers in 1..4"),
    (["--pool", "5"], "at most the 4x4 patch grid"), (["--pool", "1000"], "at most the 4x4 patch grid"),
    (["--batch_size", "1000"], r"more than the \d+ training examples"),
])
def test_settings_that_need_the_model_or_data(shapes_dir, tmp_path, extra, message):
    with pytest.raises(outdir.RunError, match=message):
        train.main(args(shapes_dir, tmp_path / "out", *extra))


@pytest.mark.parametrize("split", ["train", "val"])
def test_an_empty_split_is_an_error(shapes_dir, tmp_path, split):
    data = shutil.copytree(shapes_dir, tmp_path / "shapes")
    splits = json.loads((data / "pid_splits.json").read_text())
    (data / "pid_splits.json").write_text(json.dumps({**splits, split: []}))
    # the loader names the empty split first (train.py's own "no training examples" check stays behind it)
    with pytest.raises(DataError, match=f"split '{split}' must be a non-empty list of pids"):
        train.main(args(str(data), tmp_path / "out", "--dataset", "scienceqa"))  # the shapes tree is in its layout


def test_a_non_finite_loss_stops_before_anything_is_saved(shapes_dir, run_dir):
    ckpt = torch.load(run_dir / "ckpt.pt", weights_only=True)
    for name, w in ckpt["model"].items():
        if name.startswith("fuser."):
            w.fill_(float("nan"))
    torch.save(ckpt, run_dir / "ckpt.pt")
    before = digests(run_dir)
    with pytest.raises(outdir.RunError, match="the loss is nan at step 4"):  # step 4 trains before step 6 saves
        train.main(args(shapes_dir, run_dir, "--resume", "--max_steps", "8", "--eval_interval", "3"))
    assert digests(run_dir) == before  # the log too: it is rewritten with the first new entry, and there was none


# ---------------------------------------------------------------- data loss: an out_dir belongs to one run

@pytest.mark.parametrize("keep", [("ckpt.pt", "best.pt", "log.jsonl"), ("log.jsonl",), ("best.pt",)])
def test_a_used_out_dir_is_refused_without_resume(shapes_dir, run_dir, keep):
    for f in {"ckpt.pt", "best.pt", "log.jsonl"} - set(keep):
        os.remove(run_dir / f)
    before = digests(run_dir)
    with pytest.raises(outdir.RunError, match="continue it with --resume, replace it with --overwrite"):
        train.main(args(shapes_dir, run_dir, "--seed", "4"))
    assert digests(run_dir) == before


def test_overwrite_replaces_the_run(shapes_dir, run_dir):
    train.main(args(shapes_dir, run_dir, "--seed", "4", "--max_steps", "1", "--overwrite"))
    assert torch.load(run_dir / "ckpt.pt", weights_only=True)["train_args"]["seed"] == 4
    assert torch.load(run_dir / "best.pt", weights_only=True)["train_args"]["seed"] == 4
    assert max(e["step"] for e in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())) == 1


def test_a_second_run_into_a_locked_out_dir_stops_at_once(shapes_dir, run_dir):
    # another process holds the lock, as a running train.py does
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); f.truncate(0); f.write('4242'); f.flush(); print('locked', flush=True); "
                               "time.sleep(60)", str(run_dir / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = digests(run_dir)
        for extra in (["--resume"], ["--overwrite"]):
            with pytest.raises(outdir.RunError, match=f"another run \\(pid 4242\\) is writing to {run_dir}"):
                train.main(args(shapes_dir, run_dir, *extra))
        assert digests(run_dir) == before
    finally:
        holder.kill()
        holder.wait()
    train.main(args(shapes_dir, run_dir, "--resume", "--max_steps", "5"))  # the holder died: its lock went with it


def test_resume_past_the_end_keeps_the_log(shapes_dir, run_dir):
    before = digests(run_dir)
    with pytest.raises(outdir.RunError, match="at step 4, past the run's 2 steps"):
        train.main(args(shapes_dir, run_dir, "--resume", "--max_steps", "2"))
    assert digests(run_dir) == before


# ---------------------------------------------------------------- resume: the log parsed first, the checkpoint checked

def test_a_half_last_log_line_is_dropped_on_resume(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.5}\n{"step": 2, "lo')  # killed mid-write
    assert outdir.read_log(str(log), 2) == [b'{"step": 0, "loss": 1.0}\n', b'{"step": 1, "loss": 0.5}\n']
    assert outdir.read_log(str(log), 1) == [b'{"step": 0, "loss": 1.0}\n']


@pytest.mark.parametrize("bad", [b"garbage", b"\0" * 40, b"[1, 2]", b'{"loss": 1.0}', b'{"step": "3"}'])
def test_a_damaged_log_line_is_named_and_the_log_kept(shapes_dir, run_dir, bad):
    lines = (run_dir / "log.jsonl").read_bytes().split(b"\n")
    (run_dir / "log.jsonl").write_bytes(b"\n".join(lines[:2] + [bad] + lines[2:]))
    before = digests(run_dir)
    with pytest.raises(outdir.RunError, match="log.jsonl line 3 is not a log entry"):
        train.main(args(shapes_dir, run_dir, "--resume", "--max_steps", "6"))
    assert digests(run_dir) == before


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("rng"), "has no valid rng"),
    (lambda c: c.update(rng=torch.zeros(3, dtype=torch.uint8)), "has no valid step or rng"),
    (lambda c: c.update(optimizer="x"), "has no valid optimizer"),
    (lambda c: c.update(optimizer=None), "holds no optimizer state for this model"),
    (lambda c: c.update(optimizer={"state": {}, "param_groups": []}), "holds no optimizer state"),
    (lambda c: c.update(step="4"), "has no valid step"),
    (lambda c: c.update(step=-1), "has no valid step or rng"),
    (lambda c: c.pop("train_args"), "has no valid train_args"),
    (lambda c: c.update(args=5), "its model arguments or weights are missing or malformed"),
    (lambda c: c.update(model={"fuser.gate": "x"}), "its model arguments or weights are missing or malformed"),
])
def test_a_damaged_checkpoint_is_one_clear_error(shapes_dir, run_dir, edit, message):
    ckpt = torch.load(run_dir / "ckpt.pt", weights_only=True)
    edit(ckpt)
    torch.save(ckpt, run_dir / "ckpt.pt")
    before = digests(run_dir)
    with pytest.raises(train.CheckpointError, match=message) as e:
        train.main(args(shapes_dir, run_dir, "--resume", "--max_steps", "6"))
    assert "\n" not in str(e.value) and digests(run_dir) == before


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["malicious", "random bytes", "truncated"])
def test_an_untrusted_checkpoint_is_one_line_that_never_advises_unsafe_loading(run_dir, kind):
    path, marker = run_dir / "ckpt.pt", run_dir / "ran"
    if kind == "malicious":
        torch.save({"nanodehvf": 1, "model": RunsCode(marker)}, path)
    elif kind == "random bytes":
        path.write_bytes(bytes(range(256)) * 64)
    else:
        path.write_bytes(path.read_bytes()[:50000])
    with pytest.raises(train.CheckpointError, match="is not a readable checkpoint") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value) and not marker.exists()


# ---------------------------------------------------------------- OSError: space, a file where a folder should be

@pytest.mark.parametrize("extra, limit, culprit", [
    ([], 8_000_000, "best.pt"),  # the first checkpoint (33 MB; best.pt is written before ckpt.pt) does not fit
    (["--cache_features", "disk"], 100_000, "features-"),  # nor the feature cache (~0.9 MB)
])
def test_a_full_disk_is_reported_as_such(shapes_dir, tmp_path, extra, limit, culprit):
    result = run_cli(*args(shapes_dir, tmp_path / "out", *extra), limit=limit)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr and last.startswith("error: ")
    assert str(tmp_path / "out" / culprit) in last and "File too large" in last
    assert not [f for f in os.listdir(tmp_path / "out") if ".tmp" in f]


def test_out_dir_under_a_file_is_one_line(shapes_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    result = run_cli(*args(shapes_dir, tmp_path / "file" / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'file' / 'out'}: Not a directory"


# ---------------------------------------------------------------- kill -9 mid-save: exact resume, nothing left behind

def test_kill_mid_save_resumes_exactly_and_leaves_nothing(shapes_dir, finished, tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f"features-0.npy.tmp{dead.stdout.strip()}"  # a writer that is gone
    live = out / f"ckpt.pt.tmp{os.getppid()}"  # a writer that still runs (pytest's parent) is left alone
    proc = subprocess.Popen([sys.executable, "train.py", *args(shapes_dir, out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 120:
        if (out / "ckpt.pt").exists() and any(".tmp" in f for f in os.listdir(out)):  # the second save is under way
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed mid-save"
    stale.write_text("x")
    live.write_text("x")
    train.main(args(shapes_dir, out, "--resume"))
    with open(finished / "log.jsonl") as f, open(out / "log.jsonl") as g:
        straight, resumed = ([(e["step"], e.get("loss"), e.get("Avg")) for e in map(json.loads, h)] for h in (f, g))
    assert resumed == straight  # bit for bit
    assert sorted(f for f in os.listdir(out) if ".tmp" in f) == [live.name]
