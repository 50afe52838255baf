"""features.py: the frozen-ViT feature cache gives what the ViT gives, and a cache made
for other images, another ViT or another pooling is never reused."""
import os

import torch
from PIL import Image

from data.batch import Example
from features import FeatureCache
from fuser import FuserConfig
from model import VLM, build_backbones
from vit import preprocess


def make_model(seed=0, pool=1, mode="dehvf"):
    torch.manual_seed(seed)
    vit, gpt = build_backbones("tiny-random", "tiny-random")
    return VLM(vit, gpt, mode, FuserConfig(pool=pool))


def make_examples(folder, n=3):
    examples = []
    for i in range(n):
        path = str(folder / f"{i}.png")
        Image.new("RGB", (80, 64), (40 * i, 200 - 30 * i, 90)).save(path)
        examples.append(Example(id=str(i), prompt="Q", target=" A", image=path))
    return examples + [Example(id="text", prompt="Q", target=" A", image=None)]


def cache_files(folder):
    return sorted(f for f in os.listdir(folder) if f.startswith("features-"))


def test_cached_features_equal_the_vit(tmp_path):
    model, examples = make_model(), make_examples(tmp_path)
    transform = lambda img: preprocess(img, model.vit.config.image_size)
    paths = [ex.image for ex in examples]
    with torch.no_grad():
        direct = model.features(torch.stack([transform(Image.open(p)) for p in paths[:3]]))  # (3, K, N, D)
    in_memory = FeatureCache(model, examples, transform)(paths, "cpu")
    assert torch.equal(in_memory[:3], direct)  # fp32 in memory: exactly the ViT's output
    on_disk = FeatureCache(model, examples, transform, out_dir=str(tmp_path))(paths, "cpu")
    assert torch.allclose(on_disk[:3], direct, atol=2e-2, rtol=1e-2) and not torch.equal(on_disk[:3], direct)  # fp16
    prefix = make_model(mode="prefix")
    assert FeatureCache(prefix, examples, transform)(paths, "cpu").shape == (4, 16, 128)  # the 4 x 4 patches


@torch.no_grad()
def test_cache_with_text_only_examples(tmp_path):
    """A text-only example's row of the cache is a placeholder the model never reads: a mixed batch
    gives the same logits with the cache as with the images; a set without images needs no cache."""
    model, examples = make_model(), make_examples(tmp_path)
    model.fuser.gate.fill_(1.0)  # gates open: the memory matters
    transform = lambda img: preprocess(img, model.vit.config.image_size)
    paths = [ex.image for ex in examples]  # three images, then None
    has_image = torch.tensor([p is not None for p in paths])
    images = torch.stack([transform(Image.open(p)) if p else torch.zeros(3, 64, 64) for p in paths])
    idx = torch.randint(0, 1000, (4, 6), generator=torch.Generator().manual_seed(0))
    direct, _ = model(images, idx, has_image=has_image)
    cached, _ = model(None, idx, has_image=has_image, features=FeatureCache(model, examples, transform)(paths, "cpu"))
    assert torch.equal(cached, direct)
    assert not torch.equal(direct[3], model.gpt(idx)[0][3])  # the text-only row: its learned slots act
    text_only = FeatureCache(model, examples[3:], transform)
    assert text_only([None], "cpu") is None
    alone, _ = model(None, idx[3:], has_image=has_image[3:])  # no features, no ViT
    assert (alone - direct[3:]).abs().max() <= 1e-5  # (up to batch-size effects in the matmuls)


def test_stale_caches_are_rebuilt_not_reused(tmp_path):
    model, examples = make_model(), make_examples(tmp_path)
    transform = lambda img: preprocess(img, model.vit.config.image_size)
    out = str(tmp_path / "out")
    os.makedirs(out)
    FeatureCache(model, examples, transform, out_dir=out)
    assert len(cache_files(out)) == 1
    FeatureCache(model, examples, transform, out_dir=out)  # same everything: reused
    assert len(cache_files(out)) == 1
    FeatureCache(make_model(pool=2), examples, transform, out_dir=out)  # another pooling
    assert len(cache_files(out)) == 2
    FeatureCache(make_model(seed=1), examples, transform, out_dir=out)  # another ViT
    assert len(cache_files(out)) == 3
    Image.new("RGB", (80, 64), (255, 255, 255)).save(examples[0].image)  # an image changed on disk
    os.utime(examples[0].image, ns=(1, 1))
    fresh = FeatureCache(model, examples, transform, out_dir=out)
    assert len(cache_files(out)) == 4
    with torch.no_grad():
        expected = model.features(transform(Image.open(examples[0].image))[None])[0]
    assert torch.allclose(fresh([examples[0].image], "cpu")[0], expected, atol=2e-2, rtol=1e-2)
