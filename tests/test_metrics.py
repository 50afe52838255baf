"""data/metrics.py against the COCO caption evaluation code (pycocoevalcap)."""
import random

import numpy as np
import pytest

from data.metrics import bleu, caption_scores, cider, tokenize

pycoco_bleu = pytest.importorskip("pycocoevalcap.bleu.bleu")
pycoco_cider = pytest.importorskip("pycocoevalcap.cider.cider")


def random_corpus(rng):
    """A few ids with references and one candidate each: varied lengths, repeated
    words, candidates sharing nothing with their references, empty candidates."""
    vocab = [f"w{i}" for i in range(rng.choice([3, 8, 30]))]
    refs, cands = {}, {}
    for i in range(rng.randint(1, 8)):
        refs[i] = [" ".join(rng.choices(vocab, k=rng.randint(1, 15))) for _ in range(rng.randint(1, 5))]
        kind = rng.random()
        if kind < 0.1:
            cand = ""
        elif kind < 0.25:  # no overlap at all
            cand = " ".join(f"x{rng.randint(0, 5)}" for _ in range(rng.randint(1, 12)))
        elif kind < 0.4:  # a copy of one reference, maybe with a repeated tail
            cand = rng.choice(refs[i][:1] + refs[i]) + " " + " ".join([rng.choice(vocab)] * rng.randint(0, 4))
        else:
            cand = " ".join(rng.choices(vocab, k=rng.randint(1, 20)))
        cands[i] = [cand.strip()]
    return refs, cands


def test_bleu_and_cider_equal_pycocoevalcap_on_250_corpora():
    rng = random.Random(0)
    worst_bleu, worst_cider = 0.0, 0.0
    for _ in range(250):
        refs, cands = random_corpus(rng)
        ours, ours_per_id = bleu(refs, cands)
        theirs, theirs_per_id = pycoco_bleu.Bleu(4).compute_score(refs, cands, verbose=0)
        worst_bleu = max(worst_bleu, np.abs(np.array(ours) - np.array(theirs)).max(),
                         np.abs(np.array(ours_per_id) - np.array(theirs_per_id)).max())
        ours_c, ours_c_per_id = cider(refs, cands)
        theirs_c, theirs_c_per_id = pycoco_cider.Cider().compute_score(refs, cands)
        worst_cider = max(worst_cider, abs(ours_c - theirs_c), np.abs(ours_c_per_id - theirs_c_per_id).max())
    print(f"max |diff|: BLEU {worst_bleu:.3g}, CIDEr-D {worst_cider:.3g}")
    assert worst_bleu < 1e-6 and worst_cider < 1e-6


def test_large_corpus_matches_and_scores_are_not_trivial():
    rng = random.Random(1)
    refs, cands = {}, {}
    for i in range(300):
        r, c = random_corpus(rng)
        refs[i], cands[i] = r[0], c[0]
    b, _ = bleu(refs, cands)
    c, _ = cider(refs, cands)
    tb, _ = pycoco_bleu.Bleu(4).compute_score(refs, cands, verbose=0)
    tc, _ = pycoco_cider.Cider().compute_score(refs, cands)
    assert np.allclose(b, tb, atol=1e-6, rtol=0) and abs(c - tc) < 1e-6
    assert 0.05 < b[0] < 1 and c > 0.1  # a real, non-degenerate comparison


def test_hand_computed_values():
    # one id, candidate "a b c d" vs reference "a b c e": precisions 3/4, 2/3, 1/2, 0/1
    b, _ = bleu({0: ["a b c e"]}, {0: ["a b c d"]})
    assert b[0] == pytest.approx(0.75, abs=1e-8)
    assert b[1] == pytest.approx((0.75 * 2 / 3) ** 0.5, abs=1e-8)
    assert b[3] < 1e-3  # no 4-gram matches
    # CIDEr-D of a perfect copy is 10 when the idf is the same for every n-gram
    refs = {0: ["red circle"], 1: ["blue square"]}
    c, per_id = cider(refs, {0: ["red circle"], 1: ["blue square"]})
    assert c == pytest.approx(10 * 2 / 4)  # the 3- and 4-gram parts are empty, so 2 of 4 orders score 1
    assert per_id[0] == pytest.approx(per_id[1])


def test_tokenize_and_caption_scores():
    assert tokenize("A Dog, running.  On the BEACH!") == "a dog running on the beach"
    assert tokenize("the man's hat") == "the man's hat"
    refs = {"1": ["A red circle.", "a red circle left of a blue square"], "2": ["Two shapes: a star and a cube"]}
    perfect = caption_scores(refs, {"1": "a red circle", "2": "two shapes a star and a cube"})
    wrong = caption_scores(refs, {"1": "zebra", "2": "zebra"})
    assert perfect["BLEU-1"] == pytest.approx(1.0) and perfect["CIDEr"] > wrong["CIDEr"]
    assert wrong["BLEU-4"] < 1e-6 and wrong["CIDEr"] == 0.0
