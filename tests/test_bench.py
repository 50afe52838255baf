"""bench.py: runs end to end at tiny shapes (so it cannot rot), writes its JSON and table,
refuses bad input clearly, and its CPU memory method counts tensor bytes. No timing assertions."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = {"step", "step_cached", "prefill", "prefill_cached", "vit", "cache_speedup", "whole_run", "memory"}


def run(*args):
    return subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_bench_tiny_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    p = run("--llm", "tiny-random", "--vit", "tiny-random", "--B", "2", "--T", "12,20", "--answer", "4", "--reps", "1",
            "--decode_prompt", "6", "--new_tokens", "3", "--threads", "1", "--profile", "3", "--json", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["config"]["threads"] == 1 and data["config"]["precision"] == "fp32"
    assert "profiler" in data["config"]["memory_method"]
    assert set(data["results"]) == {"12", "20"}
    for res in data["results"].values():
        assert list(res) == ["dehvf", "static", "memvp", "prefix", "none"]
        for mode, r in res.items():
            assert set(r) == METRICS, mode
            assert all(len(m["reps"]) == 1 for m in r.values())
            assert r["step"]["median"] > 0 and r["memory"]["median"] > 0
        assert all(m["x"] == 1 for m in res["dehvf"].values() if m["median"])  # ratios are to dehvf
        assert res["none"]["vit"]["median"] == 0  # `none` has no features: cached == uncached
        # prefix puts 17 visual positions before the text, so its step allocates more than none's
        assert res["prefix"]["memory"]["median"] > res["none"]["memory"]["median"]
    assert set(data["decode"]) == {"dehvf"}
    assert data["decode"]["dehvf"]["kv_tok_s"] > 0 and data["decode"]["dehvf"]["recompute_tok_s"] > 0
    for line in ("1 threads", "T=12", "T=20", "T sweep", "decode, dehvf", "prefix, T=20, a cached step", "wrote"):
        assert line in p.stdout, line
    rows = [line.split()[0] for line in p.stdout.splitlines() if re.match(r"(dehvf|static|memvp|prefix|none) +[0-9]", line)]
    assert rows == ["dehvf", "static", "memvp", "prefix", "none"] * 2  # one table row per mode and T


def test_bench_help_and_bad_input(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0 and "--json" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        bench.main(["--modes", "prefix,none"])
    assert "include dehvf" in str(e.value.code)
    with pytest.raises(SystemExit) as e:  # 300 + 17 visual positions > the tiny context of 256
        bench.main(["--llm", "tiny-random", "--vit", "tiny-random", "--T", "300"])
    assert "exceed the decoder's context" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        bench.main(["--llm", "no/such-model"])
    assert "no/such-model" in str(e.value.code)


def test_cpu_peak_memory_counts_tensor_bytes():
    def fn():
        a = torch.ones(1 << 20, dtype=torch.uint8)  # 1 MiB live ...
        b = torch.ones(1 << 21, dtype=torch.uint8)  # ... plus 2 MiB: the peak, 3 MiB
        del a, b
        torch.ones(1 << 20, dtype=torch.uint8)  # after the peak: does not raise it
    peak = bench.peak_memory(fn, torch.device("cpu"))
    assert 3 << 20 <= peak < (3 << 20) + 4096
