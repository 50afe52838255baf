"""A cache of what the fusion consumes from each image, for a frozen ViT.

With the ViT frozen, the pooled hidden states the fuser reads (or the tokens
prefix mode reads) are the same every epoch, so `train.py --cache_features`
computes them once, in a pre-pass, and afterwards never opens an image or runs
the ViT again. The cache lives in out_dir as an fp16 memory-mapped file named
by a fingerprint of everything the features depend on: the image files (path,
size, modification time), the ViT's weights, the mode, the fuser's layers and
pooling, and the layout of the features (FORMAT). Anything else gives another
fingerprint, so a stale cache is rebuilt, never silently reused.
"""
import hashlib
import json
import os

import numpy as np
import torch
from tqdm import tqdm

from data.batch import load_image

FORMAT = 2  # 2: prefix's tokens are the patches only (no class token); pooling may overhang the grid


def fingerprint(model, paths):
    h = hashlib.sha256()
    fuser = getattr(model, "fuser", None)
    fuser_args = [fuser.layers, fuser.config.pool] if fuser else None
    h.update(json.dumps([FORMAT, model.mode, fuser_args]).encode())
    for name, tensor in model.vit.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


class FeatureCache:
    """features of every image of the given examples, looked up by path. file=None keeps
    them in memory (fp32: training is exactly as without the cache); a file path under
    out_dir keeps them on disk (fp16, memory-mapped: for sets too big for memory)."""

    def __init__(self, model, examples, transform, out_dir=None, batch_size=64, device="cpu"):
        self.paths = sorted({ex.image for ex in examples if ex.image is not None})
        self.row = {p: i for i, p in enumerate(self.paths)}
        self.store = None
        if not self.paths:
            return
        file = os.path.join(out_dir, f"features-{fingerprint(model, self.paths)}.npy") if out_dir else None
        if file and os.path.isfile(file):
            self.store = np.load(file, mmap_mode="r")
            return
        parts = []
        with torch.no_grad():
            for i in tqdm(range(0, len(self.paths), batch_size), desc="caching features"):
                images = torch.stack([transform(load_image(p, p)) for p in self.paths[i:i + batch_size]])
                parts.append(model.features(images.to(device)).float().cpu().numpy())
        self.store = np.concatenate(parts)  # (n_images, ...)
        if file:
            tmp = f"{file}.tmp{os.getpid()}.npy"
            np.save(tmp, self.store.astype(np.float16))
            os.replace(tmp, file)  # complete or absent, never half-written
            self.store = np.load(file, mmap_mode="r")

    def __call__(self, paths, device):
        """Features of a batch, given its image paths; None if no example has an image. A path
        None (no image) gets some image's features as a placeholder: the model reads none of them."""
        if self.store is None:
            return None
        rows = [self.row[p] if p is not None else 0 for p in paths]
        return torch.from_numpy(self.store[rows]).to(device, torch.float32)  # fancy indexing copies
