"""vit.py: parity with transformers' CLIP vision tower and CLIPImageProcessor; every size read
from config.json; PIL modes; EXIF."""
import io
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from data.batch import to_rgb
from vit import CLIP_STD, HF_FIELDS, PUBLIC, ViT, ViTConfig, preprocess
from weights import CheckpointError


def max_diff(a, b):
    return (a - b).abs().max().item()


def assert_hidden_states_match(model, hf, pixels):
    ours = model(pixels)
    theirs = hf(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs) == model.config.layers + 1
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape
        assert max_diff(a, b) <= 1e-4, f"h_{i}"


@torch.no_grad()
@pytest.mark.parametrize("layout", ["CLIPModel", "CLIPVisionModel", "vision_model.* bin"])
def test_vit_parity_tiny(hf_clip, tmp_path, layout):
    """The vision tower of a full CLIPModel checkpoint, of a CLIPVisionModel one, and of a
    pickled state dict with only the `vision_model.*` keys (older CLIPVisionModel files)."""
    from transformers import CLIPVisionModel
    clip, path = hf_clip
    if layout == "CLIPVisionModel":
        vision = CLIPVisionModel(clip.config.vision_config)
        vision.load_state_dict(clip.vision_model.state_dict())
        vision.save_pretrained(tmp_path)
        assert not any(k.startswith("vision_model.") for k in vision.state_dict())
        path = tmp_path
    if layout == "vision_model.* bin":
        state = {k: v for k, v in clip.state_dict().items() if k.startswith("vision_model.")}
        torch.save(state, tmp_path / "pytorch_model.bin")
        clip.config.vision_config.to_json_file(tmp_path / "config.json")
        path = tmp_path
    model = ViT.from_pretrained(str(path)).eval()
    c = clip.config.vision_config
    assert (model.config.image_size, model.config.patch_size, model.config.width, model.config.layers,
            model.config.heads) == (32, 8, 64, 3, 4)
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, c.image_size, c.image_size)
    assert_hidden_states_match(model, clip.vision_model, pixels)  # the text tower is ignored


@torch.no_grad()
def test_vit_parity_gelu_variant(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    hf = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=24, patch_size=6,
                                          hidden_act="gelu")).eval()
    hf.save_pretrained(tmp_path)
    model = ViT.from_pretrained(str(tmp_path)).eval()
    assert model.config.act == "gelu"
    assert_hidden_states_match(model, hf, torch.randn(1, 3, 24, 24))


@torch.no_grad()
def test_vit_parity_b16_shape(tmp_path):
    """The real ViT-B/16 shape (224 px, 16 px patches, 12 layers, 768 wide), random weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    hf = CLIPVisionModel(CLIPVisionConfig(patch_size=16)).eval()
    hf.save_pretrained(tmp_path)
    model = ViT.from_pretrained(str(tmp_path)).eval()
    assert model.config == ViTConfig()  # the defaults are ViT-B/16's
    assert_hidden_states_match(model, hf, torch.randn(1, 3, 224, 224))


def test_vit_tiny_config_runs():
    config = ViTConfig.tiny()
    hidden = ViT(config)(torch.randn(2, 3, config.image_size, config.image_size))
    assert len(hidden) == config.layers + 1
    assert all(h.shape == (2, 1 + config.grid ** 2, config.width) for h in hidden)


def edited_vision_config(saved, path, **changes):
    """A copy of the CLIPModel folder saved, its config.json's vision_config changed (None: deleted)."""
    shutil.copytree(saved, path)
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        config["vision_config"].pop(key, None) if value is None else config["vision_config"].update({key: value})
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("key", HF_FIELDS.values())
def test_config_without_a_size_is_an_error_not_a_guess(hf_clip, tmp_path, key):
    """Each setting that shapes the tower comes from config.json: missing, it is a clear error (the
    head count used to be guessed as hidden_size // 64: a silently wrong model)."""
    path = edited_vision_config(hf_clip[1], tmp_path / "clip", **{key: None})
    with pytest.raises(CheckpointError) as e:
        ViT.from_pretrained(str(path))
    assert str(e.value).startswith(f"{path / 'config.json'} has no {key}: the model cannot be built without it")


def test_config_values_are_read_and_checked(hf_clip, tmp_path, monkeypatch):
    _, saved = hf_clip
    model = ViT.from_pretrained(str(edited_vision_config(saved, tmp_path / "eps", layer_norm_eps=1e-6)))
    assert model.config.layer_norm_eps == model.layers[0].layer_norm1.eps == 1e-6
    for name, changes, message in [("relu", dict(hidden_act="relu"), "hidden_act is 'relu', not quick_gelu or gelu"),
                                   ("odd", dict(num_attention_heads=3), "num_attention_heads 3 does not divide"),
                                   ("text", dict(patch_size="8"), "patch_size is '8', not a positive int")]:
        path = edited_vision_config(saved, tmp_path / name, **changes)
        with pytest.raises(CheckpointError, match="^" + re.escape(f"{path / 'config.json'}: {message}")):
            ViT.from_pretrained(str(path))
    # a public name: what its (downloaded) config.json lacks comes from our table of its sizes
    monkeypatch.setenv("NANODEHVF_CACHE", str(tmp_path / "cache"))
    edited_vision_config(saved, tmp_path / "cache" / "openai/clip-vit-base-patch32", layer_norm_eps=None)
    model = ViT.from_pretrained("openai/clip-vit-base-patch32")  # in the cache: nothing to download
    assert model.config.layer_norm_eps == PUBLIC["openai/clip-vit-base-patch32"].layer_norm_eps
    assert model.config.heads == 4  # the rest from the file


def drawing(size, seed=0):
    """An RGB picture with structure (a gradient, shapes, text): what a photo or diagram has."""
    w, h = size
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    base = np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2)  # (h, w, 3)
    image = Image.fromarray((base * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        box = [x0, y0, x0 + rng.integers(4, w // 2 + 5), y0 + rng.integers(4, h // 2 + 5)]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    draw.text((w // 10, h // 3), "Abc 123", fill=(0, 0, 0))
    return image


def with_alpha(image):
    alpha = Image.new("L", image.size, 255)
    ImageDraw.Draw(alpha).ellipse([0, 0, image.width // 2, image.height // 2], fill=0)  # see-through
    ImageDraw.Draw(alpha).rectangle([image.width // 2, 0, image.width, image.height // 3], fill=100)
    image = image.convert("RGBA")
    image.putalpha(alpha)
    return image


def transparent_png(image):
    """A palette PNG whose colour 0 is see-through (the `transparency` key, no alpha band)."""
    image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=0)
    image = Image.open(io.BytesIO(buffer.getvalue()))
    assert image.mode == "P" and image.info["transparency"] == 0
    return image


IMAGES = {  # name -> a PIL image of that mode and size
    "RGB landscape": lambda: drawing((640, 480)),
    "RGB portrait": lambda: drawing((300, 500), seed=1),
    "RGB small": lambda: drawing((50, 30), seed=2),
    "RGB exact": lambda: drawing((224, 224), seed=3),
    "L": lambda: drawing((256, 320), seed=4).convert("L"),
    "1": lambda: drawing((240, 240), seed=5).convert("1"),
    "P": lambda: drawing((320, 240), seed=6).convert("P", palette=Image.Palette.ADAPTIVE),
    "CMYK": lambda: drawing((230, 260), seed=7).convert("CMYK"),
    "RGBA opaque": lambda: drawing((260, 200), seed=8).convert("RGBA"),
    "RGBA": lambda: with_alpha(drawing((260, 200), seed=9)),
    "P transparent": lambda: transparent_png(drawing((180, 250), seed=11)),
    "LA": lambda: with_alpha(drawing((200, 300), seed=10)).convert("LA"),
}


@pytest.fixture(scope="module")
def clip_processor():
    from transformers import CLIPImageProcessor
    return CLIPImageProcessor()  # the openai/clip-vit-* defaults: 224, bicubic, CLIP mean/std


@pytest.mark.parametrize("name", IMAGES)
def test_preprocess_matches_clip_image_processor(clip_processor, name):
    image = IMAGES[name]()
    ours = preprocess(to_rgb(image))
    theirs = clip_processor(images=image, return_tensors="pt").pixel_values[0]
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert ours.dtype == torch.float32
    assert max_diff(ours, theirs) <= 1e-2


def test_preprocess_other_size(clip_processor):
    from transformers import CLIPImageProcessor
    image = drawing((500, 333))
    hf = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    assert max_diff(preprocess(image, size=336), hf(images=image, return_tensors="pt").pixel_values[0]) <= 1e-2


@pytest.mark.parametrize("size", [(60, 600), (700, 50), (30, 900)])
def test_a_long_strip_is_cropped_before_it_is_resized(clip_processor, size):
    """Past 2:1 only the source box that becomes the centre square is resized: CLIP's picture within
    one 8-bit level, in size x size memory (a 1 x 300000 strip resized whole would need 45 GB)."""
    image = drawing(size, seed=3)
    ours, theirs = preprocess(image), clip_processor(images=image, return_tensors="pt").pixel_values[0]
    assert max_diff(ours, theirs) <= 1.01 / 255 / min(CLIP_STD) and (ours - theirs).abs().mean() < 1e-4
    assert preprocess(to_rgb(Image.new("1", (1, 300000)))).shape == (3, 224, 224)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16 from PNG"])
def test_16_bit_grey_keeps_its_range(mode):
    """A 16-bit ramp must stay a ramp, not clip to white past 255 as PIL's convert does."""
    ramp = np.linspace(0, 65535, 256).astype(np.uint16)[None].repeat(256, axis=0)  # (256, 256), dark to bright
    image = Image.fromarray(ramp.astype(">u2") if mode == "I;16B" else ramp)
    if mode == "I;16 from PNG":
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        image = Image.open(io.BytesIO(buffer.getvalue()))
    assert image.mode.startswith("I;16")
    rgb = np.asarray(to_rgb(image)).astype(int)  # (64, 256, 3)
    assert rgb.shape == (256, 256, 3)
    assert (rgb == rgb[..., :1]).all()  # grey
    row = rgb[0, :, 0]
    assert row[0] == 0 and row[-1] == 255
    assert (np.diff(row) >= 0).all() and abs(row[128] - 128) <= 2  # still a linear ramp
    x = preprocess(to_rgb(image))
    assert x.shape == (3, 224, 224) and torch.isfinite(x).all()
    assert x[:, :, :20].mean() < -1 and x[:, :, -20:].mean() > 1  # dark left, bright right


def test_exif_orientation_is_applied():
    """A camera stores the upright picture rotated and tags it: to_rgb must turn it back."""
    upright = Image.new("RGB", (160, 240), (0, 0, 255))  # portrait: red top half, blue bottom
    ImageDraw.Draw(upright).rectangle([0, 0, 160, 120], fill=(255, 0, 0))
    stored = upright.rotate(90, expand=True)  # what the sensor wrote: landscape, red on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif, quality=95)

    tagged = Image.open(io.BytesIO(buffer.getvalue()))
    assert tagged.getexif()[0x0112] == 6 and tagged.size == (240, 160)
    x = preprocess(to_rgb(tagged))
    # what the JPEG decodes to, without the tag (PIL copies .info along), turned upright by hand
    plain = Image.fromarray(np.asarray(Image.open(io.BytesIO(buffer.getvalue()))))
    assert torch.equal(x, preprocess(plain.transpose(Image.Transpose.ROTATE_270)))
    assert not torch.equal(x, preprocess(plain))  # the tag does make a difference
    red = torch.tensor([(1 - 0.48145466) / 0.26862954, -0.4578275 / 0.26130258, -0.40821073 / 0.27577711])
    assert max_diff(x[:, 10:100, 10:-10].mean(dim=(1, 2)), red) < 0.1  # red is on top again
