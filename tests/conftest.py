"""Shared fixtures: tiny random transformers models saved in the official layouts.

They are the reference implementations of the parity tests and the checkpoints
the loading tests read (built from a config, never downloaded).
"""
import os
import sys

# one torch thread, here and in the scripts the tests start: the tiny models' ops are too small
# to gain from two, and a busy second core makes two-thread runs many times slower
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its warnings about random configs are noise here


@pytest.fixture(scope="session")
def hf_gpt2(tmp_path_factory):
    """A tiny random GPT2LMHeadModel and the directory save_pretrained wrote it to."""
    import transformers
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=101,
                                     bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="session")
def hf_clip(tmp_path_factory):
    """A tiny random full CLIPModel (text and vision towers) and its save_pretrained directory."""
    import transformers
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=99, max_position_embeddings=16),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    model = transformers.CLIPModel(config).eval()
    path = tmp_path_factory.mktemp("hf_clip")
    model.save_pretrained(path)
    return model, path
