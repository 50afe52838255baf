"""Caption metrics written from scratch: BLEU-1..4 (Papineni et al., 2002) and
CIDEr-D (Vedantam et al., 2015), numerically the same as the COCO caption
evaluation code (pycocoevalcap's Bleu(4) and Cider(); tests/test_metrics.py
checks it to 1e-6), with the same inputs:

    refs  {id: [reference, ...]}     cands {id: [candidate]}

each string already tokenised into space-separated words (use `tokenize`).
`caption_scores` does the tokenising and returns the numbers train.py reports.
"""
import math
import re
from collections import Counter

import numpy as np


def tokenize(s):
    """Lower-case, drop punctuation, single spaces: "A Dog, running." -> "a dog running"."""
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z0-9]+)*", s.lower()))


def ngrams(words, n=4):
    """Counter of every k-gram (as a tuple), k = 1..n."""
    return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _check(refs, cands):
    if refs.keys() != cands.keys():
        raise ValueError("refs and cands must have the same ids")
    for i in refs:
        if not isinstance(cands[i], list) or len(cands[i]) != 1 or not isinstance(refs[i], list) or not refs[i]:
            raise ValueError(f"id {i}: expected one candidate in a list and a non-empty list of references")


def bleu(refs, cands, n=4):
    """Corpus BLEU-1..n and per-id BLEU-1..n, as pycocoevalcap's Bleu(n).compute_score.

    Corpus level: clipped n-gram matches and candidate n-grams summed over ids;
    the brevity penalty compares the total candidate length with the total of,
    per id, the reference length closest to the candidate's (ties: the shorter).
    `tiny` and `small` keep zero counts finite, exactly as the reference code does.
    """
    _check(refs, cands)
    tiny, small = 1e-15, 1e-9
    correct, guess, testlen, reflen = [0] * n, [0] * n, 0, 0
    per_id = [[] for _ in range(n)]
    for i in refs:
        words = cands[i][0].split()
        counts = ngrams(words, n)
        ref_lens, max_ref = [], Counter()
        for r in refs[i]:
            r = r.split()
            ref_lens.append(len(r))
            max_ref |= ngrams(r, n)  # | keeps the max count of each n-gram
        closest = min((abs(length - len(words)), length) for length in ref_lens)[1]
        c = [0] * n
        for g, k in counts.items():
            c[len(g) - 1] += min(k, max_ref[g])
        g = [max(0, len(words) - k) for k in range(n)]
        score = 1.0
        for k in range(n):  # per-id score: cumulative geometric mean of the precisions
            score *= (c[k] + tiny) / (g[k] + small)
            per_id[k].append(score ** (1.0 / (k + 1)))
        ratio = (len(words) + tiny) / (closest + small)
        if ratio < 1:
            for k in range(n):
                per_id[k][-1] *= math.exp(1 - 1 / ratio)
        correct = [a + b for a, b in zip(correct, c)]
        guess = [a + b for a, b in zip(guess, g)]
        testlen, reflen = testlen + len(words), reflen + closest
    scores, score = [], 1.0
    for k in range(n):
        score *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(score ** (1.0 / (k + 1)))
    ratio = (testlen + tiny) / (reflen + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores, per_id


def cider(refs, cands, n=4, sigma=6.0):
    """Corpus CIDEr-D and per-id CIDEr-D, as pycocoevalcap's Cider().compute_score.

    Each sentence becomes, for every k, a tf-idf vector over its k-grams (idf
    from the document frequency over the ids' reference sets). Per reference:
    the cosine of the candidate's vector, clipped to the reference's counts,
    with the reference's, times a Gaussian penalty on the length difference
    (lengths counted in bigrams, as the reference code does); averaged over
    k = 1..n and the references, times 10.
    """
    _check(refs, cands)
    ids = list(refs)
    ref_counts = [[ngrams(r.split(), n) for r in refs[i]] for i in ids]
    df = Counter(g for counts in ref_counts for g in set().union(*counts))  # ids whose references hold g
    log_n = np.log(float(len(ids)))

    def vec(counts):
        v, norm, length = [{} for _ in range(n)], [0.0] * n, 0
        for g, tf in counts.items():
            k = len(g) - 1
            v[k][g] = float(tf) * (log_n - np.log(max(1.0, df[g])))
            norm[k] += v[k][g] ** 2
            if k == 1:
                length += tf
        return v, [np.sqrt(x) for x in norm], length

    def sim(hyp, ref):
        (vh, nh, lh), (vr, nr, lr) = hyp, ref
        val = np.zeros(n)
        for k in range(n):
            for g, w in vh[k].items():
                val[k] += min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0)
            if nh[k] != 0 and nr[k] != 0:
                val[k] /= nh[k] * nr[k]
            val[k] *= np.e ** (-(float(lh - lr) ** 2) / (2 * sigma ** 2))
        return val

    scores = []
    for i, counts in zip(ids, ref_counts):
        hyp = vec(ngrams(cands[i][0].split(), n))
        total = sum(sim(hyp, vec(c)) for c in counts)  # (n,)
        scores.append(np.mean(total) / len(counts) * 10.0)
    return float(np.mean(scores)), np.array(scores)


def caption_scores(refs, cands):
    """refs {id: [raw captions]}, cands {id: raw caption} -> {"BLEU-1".."BLEU-4", "CIDEr"}."""
    refs = {i: [tokenize(r) for r in rs] for i, rs in refs.items()}
    cands = {i: [tokenize(cands[i])] for i in refs}
    b, _ = bleu(refs, cands)
    c, _ = cider(refs, cands)
    return {**{f"BLEU-{k + 1}": b[k] for k in range(4)}, "CIDEr": c}
