"""Public checkpoints: fetch them into a local cache and read their tensors.

`vit.py` and `llm.py` call `hf_checkpoint(name_or_path, repo)` to get a state
dict (and the config.json next to it, when there is one) from a Hugging Face
model repository, a local directory in that layout, or a single weights file,
and `read_config` to take the model's sizes from that config.json (the head
count, for one, cannot be read off the weights).
Reading .safetensors needs no extra package: the format is an 8-byte
little-endian header length, a JSON header giving each tensor's dtype, shape
and byte range, then the raw bytes.
"""
import http.client
import json
import math
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("NANODEHVF_CACHE", Path.home() / ".cache" / "nanodehvf"))


def fetch(url: str, dest: Path, missing_ok: bool = False) -> Path | None:
    """Download url to dest with a progress bar, resuming a partial file; atomic.
    With missing_ok, a 404 returns None instead of raising."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            if response.status != 206:  # the server ignored the range: start over
                have = 0
            total = have + int(response.headers.get("Content-Length", 0))
            with open(part, "ab" if have else "wb") as f, tqdm(
                total=total or None, initial=have, unit="B", unit_scale=True, desc=dest.name
            ) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
            if total and part.stat().st_size != total:  # read() just stops when the server hangs up
                raise OSError(f"connection closed after {part.stat().st_size} of {total} bytes")
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        if isinstance(e, urllib.error.HTTPError) and e.code == 404 and missing_ok:
            return None
        if isinstance(e, urllib.error.HTTPError) and e.code == 416 and have:  # .part complete but not renamed
            part.unlink()
            return fetch(url, dest, missing_ok)
        reason = f"HTTP {e.code}" if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        raise CheckpointError(
            f"could not download {url} ({reason}). If this machine is offline, download that file "
            f"elsewhere and place it at {dest}"
        ) from None
    os.replace(part, dest)
    return dest


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path) -> dict:
    data = np.memmap(path, dtype=np.uint8, mode="r") if os.path.getsize(path) else np.zeros(0, np.uint8)
    if len(data) < 8:
        raise CheckpointError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
    n = int.from_bytes(data[:8].tobytes(), "little")
    try:
        header = json.loads(data[8:8 + n].tobytes()) if 8 + n <= len(data) else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (bad or truncated JSON header)")
    header.pop("__metadata__", None)
    body = data[8 + n:]
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(n) for n in info["shape"]], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: bad header entry for tensor {name}") from None
        if dtype not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        if end > len(body):
            raise CheckpointError(f"{path} is truncated: tensor {name} ends past the end of the file")
        if (end - begin) != (size := math.prod(shape) * _DTYPES[dtype].itemsize):
            raise CheckpointError(f"{path}: tensor {name} has {end - begin} bytes, but {dtype} {shape} needs {size}")
        raw = bytearray(body[begin:end])  # frombuffer refuses an empty buffer
        raw = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        tensors[name] = raw.view(_DTYPES[dtype]).reshape(shape)
    return tensors


def load_state_dict(path) -> dict:
    """Tensors of a .safetensors or a torch-pickled (.bin / .pt) weights file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    state = torch_load(path, "PyTorch checkpoint")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state.get("state_dict", state)


def torch_load(path, what):
    """torch.load of tensors and plain data only (weights_only). Any failure is one line, without
    torch's advice to retry with weights_only=False: for a file from elsewhere that could run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [line.strip() for line in str(e).splitlines() if line.strip() and not line.startswith(boilerplate)]
        detail = " ".join(lines)
        if str(e).startswith(boilerplate[0]):
            detail += " (only tensors and plain data are ever loaded)"
        raise CheckpointError(f"{path} is not a readable {what} ({type(e).__name__}: {detail[:300]})") from None


def hf_checkpoint(name_or_path: str, repo: str | None = None):
    """(state_dict, config dict or None, config.json's path) from a local dir/file, or the public
    Hugging Face repo."""
    path = Path(name_or_path)
    if repo is None and not path.exists():
        raise CheckpointError(f"{name_or_path} is neither a local checkpoint nor a known model name")
    if repo is not None:  # a public name: download into the cache once
        path = cache_dir() / repo
        base = f"https://huggingface.co/{repo}/resolve/main"
        try:
            fetch(f"{base}/config.json", path / "config.json")
            if not any((path / f).exists() for f in WEIGHT_FILES):
                # older repos only have the pickled weights
                if fetch(f"{base}/{WEIGHT_FILES[0]}", path / WEIGHT_FILES[0], missing_ok=True) is None:
                    fetch(f"{base}/{WEIGHT_FILES[1]}", path / WEIGHT_FILES[1])
        except CheckpointError as e:  # name every file the folder needs, not only the first that failed
            raise CheckpointError(f"{e} (a complete folder holds {base}/config.json and "
                                  f"{base}/{WEIGHT_FILES[0]}, or a local path can be given instead)") from None
    if path.is_dir():
        files = [path / f for f in WEIGHT_FILES if (path / f).exists()]
        if not files:
            raise CheckpointError(f"{path} has no {' or '.join(WEIGHT_FILES)}")
        config_file, weights_file = path / "config.json", files[0]
    else:
        config_file, weights_file = path.parent / "config.json", path
    config = None
    if config_file.exists():
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_file} is not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_file} is not a model config (a JSON object of settings)")
    return load_state_dict(weights_file), config, config_file


def read_config(config, config_file, fields, defaults, known=None):
    """{field: value} from a Hugging Face config dict, for fields = {our field: its config.json key,
    or a tuple of keys in order of preference}; defaults: our config dataclass, for each field's type.
    known: a public name's config from our table, for what its config.json lacks. Otherwise a missing
    or malformed field is a CheckpointError naming it and the file: never a guessed size."""
    if config is None and known is None:
        raise CheckpointError(f"{config_file} not found: the model's sizes (its head count, for one) "
                              f"come from the config.json saved with its weights; put it there")
    out = {}
    for field, keys in fields.items():
        keys = (keys,) if isinstance(keys, str) else keys
        key = next((k for k in keys if (config or {}).get(k) is not None), None)
        if key is None and known is None:
            raise CheckpointError(f"{config_file} has no {' or '.join(keys)}: the model cannot be built without "
                                  f"it (it cannot be read off the weights); use the config.json saved with them")
        if key is None:
            out[field] = getattr(known, field)
            continue
        value, kind = config[key], type(getattr(defaults, field))
        if kind is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is not str and value <= 0):
            raise CheckpointError(f"{config_file}: {key} is {value!r}, not a positive {kind.__name__}")
        out[field] = value
    return out


def copy_state(model, state: dict, source, transposed=(), in_place=()):
    """Copy state (already renamed to the model's keys) into model, asserting every key and shape.
    Keys that start with a prefix in `in_place` (a backbone already loaded by name) are left as they are."""
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith(in_place)}
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    if missing or unexpected:
        short = lambda keys: ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "") or "none"
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: "
                              f"missing keys: {short(missing)}; unexpected keys: {short(unexpected)}")
    with torch.no_grad():
        for key, value in state.items():
            if key.endswith(transposed):
                value = value.t()
            if value.shape != ours[key].shape:
                raise CheckpointError(f"{source}: {key} has shape {tuple(value.shape)}, "
                                      f"expected {tuple(ours[key].shape)}")
            ours[key].copy_(value)
