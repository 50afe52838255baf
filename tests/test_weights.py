"""weights.py: the safetensors reader, fetching into the cache, and one clear error per bad checkpoint."""
import http.server
import json
import os
import random
import shutil
import socket
import threading

import pytest
import torch
from safetensors.torch import save_file  # tests only: the writer we check our reader against

import weights
from llm import GPT
from vit import ViT
from weights import CheckpointError, fetch, load_state_dict, read_safetensors

# ---------------------------------------------------------------- safetensors


def test_safetensors_round_trip_every_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f64": torch.randn(3, 4, generator=g, dtype=torch.float64),
        "f32": torch.randn(5, 2, 3, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 9, generator=g).bfloat16(),
        "i64": torch.randint(-2 ** 40, 2 ** 40, (4,), generator=g),
        "i32": torch.randint(-2 ** 30, 2 ** 30, (2, 2), generator=g, dtype=torch.int32),
        "i16": torch.randint(-2 ** 15, 2 ** 15, (6,), generator=g, dtype=torch.int16),
        "i8": torch.randint(-128, 128, (3, 1), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 256, (5,), generator=g, dtype=torch.uint8),
        "bool": torch.rand(4, 2, generator=g) > 0.5,
        "scalar": torch.tensor(3.25),  # 0-d
        "empty": torch.zeros(0, 3),  # no bytes at all
        "empty_bf16": torch.zeros(2, 0, dtype=torch.bfloat16),
    }
    path = tmp_path / "all.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    back = read_safetensors(path)
    assert set(back) == set(tensors)  # __metadata__ is not a tensor
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name
    assert torch.equal(load_state_dict(path)["f32"], tensors["f32"])


def safetensors_bytes(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


@pytest.mark.parametrize("case, message", [
    ("shorter than 8 bytes", "is not a safetensors file (shorter than its 8-byte header length)"),
    ("header cut short", "is not a safetensors file (bad or truncated JSON header)"),
    ("data cut short", "is truncated: tensor b ends past the end of the file"),
    ("header not JSON", "is not a safetensors file (bad or truncated JSON header)"),
    ("header a list", "is not a safetensors file (bad or truncated JSON header)"),
    ("no data_offsets", "bad header entry for tensor a"),
    ("size does not fit shape", "tensor a has 12 bytes, but F32 [2, 2] needs 16"),
    ("unknown dtype", "tensor a has unsupported dtype F8_E4M3"),
])
def test_safetensors_bad_files(tmp_path, case, message):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(2, 2), "b": torch.ones(100)}, path)
    good = path.read_bytes()
    n = int.from_bytes(good[:8], "little")
    bad = {
        "shorter than 8 bytes": good[:5],
        "header cut short": good[:8 + n // 2],
        "data cut short": good[:-10],
        "header not JSON": good[:8] + b"\xff" * n + good[8 + n:],
        "header a list": safetensors_bytes([1, 2], b""),  # type: ignore[arg-type]
        "no data_offsets": safetensors_bytes({"a": {"dtype": "F32", "shape": [2, 2]}}, bytes(16)),
        "size does not fit shape": safetensors_bytes({"a": {"dtype": "F32", "shape": [2, 2],
                                                            "data_offsets": [0, 12]}}, bytes(16)),
        "unknown dtype": safetensors_bytes({"a": {"dtype": "F8_E4M3", "shape": [2],
                                                  "data_offsets": [0, 2]}}, bytes(2)),
    }[case]
    path.write_bytes(bad)
    with pytest.raises(CheckpointError) as e:
        read_safetensors(path)
    assert str(e.value).startswith(str(path)) and message in str(e.value)


def test_bin_state_dicts(tmp_path):
    state = {"w": torch.randn(3, 2), "b": torch.zeros(2)}
    torch.save(state, tmp_path / "a.bin")
    torch.save({"state_dict": state, "step": 7}, tmp_path / "b.pt")  # a training checkpoint
    for name in ("a.bin", "b.pt"):
        back = load_state_dict(tmp_path / name)
        assert set(back) == {"w", "b"} and torch.equal(back["w"], state["w"])
    torch.save({"w": torch.ones(1), "code": Exception("not a tensor")}, tmp_path / "c.bin")
    with pytest.raises(CheckpointError, match="c.bin is not a readable PyTorch checkpoint"):
        load_state_dict(tmp_path / "c.bin")  # weights_only: arbitrary pickles are refused
    torch.save([torch.ones(1)], tmp_path / "d.bin")
    with pytest.raises(CheckpointError, match="d.bin holds a list, not a state dict"):
        load_state_dict(tmp_path / "d.bin")


# ---------------------------------------------------------------- bad checkpoints


def error_of(load, path) -> str:
    """The message of the one CheckpointError that load(path) must raise."""
    with pytest.raises(CheckpointError) as e:
        load(str(path))
    return str(e.value)


def copy_dir(src, dst, drop=()):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop))
    return dst


def test_other_architecture(hf_gpt2, hf_clip, tmp_path):
    _, gpt2_dir = hf_gpt2
    _, clip_dir = hf_clip
    assert error_of(GPT.from_pretrained, clip_dir) == f"{clip_dir} is a clip checkpoint, not GPT-2"
    assert error_of(ViT.from_pretrained, gpt2_dir) == f"{gpt2_dir} is a gpt2 checkpoint, not CLIP"
    # the weights alone, without a config.json to tell
    clip_weights = copy_dir(clip_dir, tmp_path / "clip", drop=["config.json"]) / "model.safetensors"
    gpt2_weights = copy_dir(gpt2_dir, tmp_path / "gpt2", drop=["config.json"]) / "model.safetensors"
    assert error_of(GPT.from_pretrained, clip_weights) == \
        f"{clip_weights} is not a GPT-2 checkpoint (no wte/wpe weights)"
    assert error_of(ViT.from_pretrained, gpt2_weights) == \
        f"{gpt2_weights} is not a CLIP vision checkpoint (no patch embedding)"


@pytest.mark.parametrize("cls", [GPT, ViT])
def test_missing_path_and_empty_dir(cls, tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    assert error_of(cls.from_pretrained, missing) == f"{missing} is neither a local checkpoint nor a known model name"
    assert error_of(cls.from_pretrained, tmp_path) == f"{tmp_path} has no model.safetensors or pytorch_model.bin"


@pytest.mark.parametrize("file, message", [
    ("model.safetensors", "is not a safetensors file (bad or truncated JSON header)"),
    ("pytorch_model.bin", "is not a readable PyTorch checkpoint (UnpicklingError: "),
    ("config.json", "is not valid JSON ("),
])
def test_corrupt_files(hf_gpt2, hf_clip, tmp_path, file, message):
    for cls, (_, saved) in ((GPT, hf_gpt2), (ViT, hf_clip)):
        path = copy_dir(saved, tmp_path / cls.__name__, drop=["model.safetensors"])
        garbage = random.Random(0).randbytes(5000)  # fixed bytes: the error must not depend on luck
        (path / file).write_bytes(garbage if file != "config.json" else b'{"model_type": "gp')
        if file == "config.json":  # its weights are fine
            shutil.copy(saved / "model.safetensors", path)
        assert error_of(cls.from_pretrained, path).startswith(f"{path / file} {message}")


def state_of(path):
    return read_safetensors(path / "model.safetensors")


def save_state(state, saved, path):
    path.mkdir()
    shutil.copy(saved / "config.json", path)
    save_file({k: v.contiguous() for k, v in state.items()}, path / "model.safetensors")
    return str(path)


def test_missing_unexpected_and_misshapen_keys(hf_gpt2, hf_clip, tmp_path):
    _, gpt2_dir = hf_gpt2
    _, clip_dir = hf_clip
    state = state_of(gpt2_dir)
    missing = dict(state)
    del missing["transformer.h.1.mlp.c_fc.weight"]
    path = save_state(missing, gpt2_dir, tmp_path / "missing")
    assert error_of(GPT.from_pretrained, path) == \
        f"{path} does not fit GPT: missing keys: transformer.h.1.mlp.c_fc.weight; unexpected keys: none"
    extra = dict(state, **{"transformer.h.0.attn.rotary.weight": torch.ones(3)})
    path = save_state(extra, gpt2_dir, tmp_path / "extra")
    assert error_of(GPT.from_pretrained, path) == \
        f"{path} does not fit GPT: missing keys: none; unexpected keys: transformer.h.0.attn.rotary.weight"
    wrong = dict(state, **{"transformer.h.0.attn.c_proj.bias": torch.zeros(65)})
    path = save_state(wrong, gpt2_dir, tmp_path / "wrong")
    assert error_of(GPT.from_pretrained, path) == \
        f"{path}: transformer.h.0.attn.c_proj.bias has shape (65,), expected (64,)"

    state = state_of(clip_dir)
    del state["vision_model.encoder.layers.2.self_attn.k_proj.bias"]
    state["vision_model.encoder.layers.0.mlp.fc2.bias"] = torch.zeros(63)
    path = save_state(state, clip_dir, tmp_path / "clip")
    assert error_of(ViT.from_pretrained, path) == \
        f"{path} does not fit ViT: missing keys: layers.2.self_attn.k_proj.bias; unexpected keys: none"
    state["vision_model.encoder.layers.2.self_attn.k_proj.bias"] = torch.zeros(64)
    path = save_state(state, clip_dir, tmp_path / "clip2")
    assert error_of(ViT.from_pretrained, path) == f"{path}: layers.0.mlp.fc2.bias has shape (63,), expected (64,)"


# ---------------------------------------------------------------- fetch


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves Handler.files; honours `Range: bytes=N-` unless told not to; can hang up midway."""
    files, requests, honour_range, hang_up_after = {}, [], True, None

    def do_GET(self):
        Handler.requests.append((self.path, self.headers.get("Range")))
        body = Handler.files.get(self.path)
        if body is None:
            return self.send_error(404)
        asked = self.headers.get("Range")
        start = int(asked.removeprefix("bytes=").rstrip("-")) if asked and Handler.honour_range else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if Handler.hang_up_after is not None:  # promise everything, send some, drop the connection
            self.wfile.write(body[start:start + Handler.hang_up_after])
            self.close_connection = True
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Handler.files, Handler.requests, Handler.honour_range, Handler.hang_up_after = {}, [], True, None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_fetch_downloads_and_resumes(server, tmp_path):
    body = os.urandom(3_000_000)  # a few 1 MiB reads
    Handler.files["/w.bin"] = body
    dest = tmp_path / "cache" / "w.bin"
    assert fetch(f"{server}/w.bin", dest) == dest
    assert dest.read_bytes() == body and not dest.with_name("w.bin.part").exists()
    assert Handler.requests == [("/w.bin", None)]
    assert fetch(f"{server}/w.bin", dest) == dest and len(Handler.requests) == 1  # cached: no request

    dest = tmp_path / "resumed.bin"
    dest.with_name("resumed.bin.part").write_bytes(body[:1234])  # an earlier, interrupted run
    fetch(f"{server}/w.bin", dest)
    assert dest.read_bytes() == body
    assert Handler.requests[-1] == ("/w.bin", "bytes=1234-")

    Handler.honour_range = False  # a server that ignores Range sends it all again: start over
    dest = tmp_path / "restarted.bin"
    dest.with_name("restarted.bin.part").write_bytes(b"stale bytes")
    fetch(f"{server}/w.bin", dest)
    assert dest.read_bytes() == body


def test_fetch_interrupted_leaves_no_file_and_resumes(server, tmp_path):
    body = os.urandom(200_000)
    Handler.files["/w.bin"] = body
    dest = tmp_path / "w.bin"
    Handler.hang_up_after = 50_000
    with pytest.raises(CheckpointError, match=f"could not download {server}/w.bin .*place it at {dest}$"):
        fetch(f"{server}/w.bin", dest)
    assert not dest.exists()  # never a half-written file under the real name
    part = dest.with_name("w.bin.part")
    assert part.read_bytes() == body[:50_000]
    Handler.hang_up_after = None
    fetch(f"{server}/w.bin", dest)
    assert Handler.requests[-1] == ("/w.bin", "bytes=50000-")
    assert dest.read_bytes() == body and not part.exists()


def test_fetch_404(server, tmp_path):
    assert fetch(f"{server}/nope", tmp_path / "nope", missing_ok=True) is None
    with pytest.raises(CheckpointError, match=rf"could not download {server}/nope \(HTTP 404\)"):
        fetch(f"{server}/nope", tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fetch_unreachable_names_url_and_destination(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/x"
    dest = tmp_path / "sub" / "x"
    with pytest.raises(CheckpointError) as e:
        fetch(url, dest)
    message = str(e.value)
    assert message.startswith(f"could not download {url} (")
    assert message.endswith(f"If this machine is offline, download that file elsewhere and place it at {dest}")
    assert not dest.exists()


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty NANODEHVF_CACHE and no network: every connection attempt is refused (and logged)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network is blocked in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("NANODEHVF_CACHE", str(tmp_path / "cache"))
    return attempts


@pytest.mark.parametrize("cls, name, repo", [(GPT, "gpt2", "openai-community/gpt2"),
                                             (ViT, "openai/clip-vit-base-patch16", "openai/clip-vit-base-patch16")])
def test_public_name_offline_says_where_to_put_the_file(offline, tmp_path, cls, name, repo):
    assert weights.cache_dir() == tmp_path / "cache"
    with pytest.raises(CheckpointError) as e:
        cls.from_pretrained(name)
    assert offline  # it did try the network
    url = f"https://huggingface.co/{repo}/resolve/main/config.json"
    local = tmp_path / "cache" / repo / "config.json"
    assert str(e.value).startswith(f"could not download {url} (")
    assert f"place it at {local}" in str(e.value)
    assert f"https://huggingface.co/{repo}/resolve/main/model.safetensors" in str(e.value)  # both files named
    assert not local.exists()


def test_public_name_from_the_cache_needs_no_network(offline, hf_gpt2, hf_clip, tmp_path):
    """Files placed where the offline message says are used as they are."""
    for (_, saved), repo in ((hf_gpt2, "openai-community/gpt2"), (hf_clip, "openai/clip-vit-base-patch32")):
        shutil.copytree(saved, tmp_path / "cache" / repo)
    assert GPT.from_pretrained("gpt2").config.n_embd == 64
    assert ViT.from_pretrained("openai/clip-vit-base-patch32").config.width == 64
    assert offline == []
