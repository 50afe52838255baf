"""data/metrics.py against the COCO caption evaluation code (pycocoevalcap)."""
import random
import shutil

import numpy as np
import pytest

from data.metrics import bleu, caption_scores, cider, ptb_tokenize, tokenize

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
    # PTB tokens as pycocoevalcap's PTBTokenizer gives them (checked with java; the tests below compare in bulk)
    assert tokenize("A Dog, running.  On the BEACH!") == "a dog running on the beach"
    assert tokenize("the man's hat") == "the man 's hat"
    assert tokenize("I don't see a T-shirt (red) for $3.50 at the café, left/right.") == \
        "i do n't see a t-shirt -lrb- red -rrb- for $ 3.50 at the café left/right"
    assert ptb_tokenize(["Mr. Smith", "", "cannot"]) == ["mr. smith", "", "can not"] and ptb_tokenize([]) == []
    refs = {"1": ["A red circle.", "a red circle left of a blue square"], "2": ["Two shapes: a star and a cube"]}
    perfect = caption_scores(refs, {"1": "a red circle", "2": "two shapes a star and a cube"})
    wrong = caption_scores(refs, {"1": "zebra", "2": "zebra"})
    assert perfect["BLEU-1"] == pytest.approx(1.0) and perfect["CIDEr"] > wrong["CIDEr"]
    assert wrong["BLEU-4"] < 1e-6 and wrong["CIDEr"] == 0.0


# ---- tokenising: data/metrics.py's port against pycocoevalcap's PTBTokenizer (CoreNLP 3.4.1 in java) ----

COCO_WORDS = ("a man woman dog cat sitting on the bench with two red umbrellas near street sign table pizza plate "
              "of food kitchen toilet sink giraffe zebra skateboard surfboard wave beach train station bus traffic "
              "light baseball player tennis racket frisbee kite laptop clock tower snow horse it is that there he "
              "she they we you i the an in at but if so one our").split()
PIECES = {
    "contractions": ["man's", "don't", "can't", "won't", "cannot", "Cannot", "gonna", "wanna", "gotta", "I'm", "we're",
                     "they've", "she'll", "he'd", "it's", "let's", "ain't", "o'clock", "O'Brien", "y'all", "'em",
                     "rock'n'roll", "'til", "'90s", "'twas", "'tis", "THEY'RE", "DON'T", "man’s", "isn’t", "dogs'",
                     "James'", "c'mon"],
    "hyphens": ["t-shirt", "T-Shirt", "x-ray", "well-known", "3-year-old", "two-story", "café-bar", "self_portrait",
                "e-mail", "anti-", "pro-", "-", "--", "---", "-----", "–", "—", "non-U.S.", "S&P-500", "10-12",
                "long-haired", "-LRB-"],
    "numbers": ["3.5", "1,000", "10,000,000", "3:30", "-5", "+5", ".5", "12/25/2010", "1/2", "3 1/2", "3-1/2", "½",
                "¼", "⅓", "x²", "$5", "US$5", "€5", "£5", "¢", "¥100", "#1", "5%", "No. 5", "fig. 3", "ca. 1900",
                "1990s", "4x4", "2nd", "(555) 123-4567", "10 200 3000", "192.168.1.1", "'90"],
    "unicode": ["café", "naïve", "résumé", "Zürich", "東京", "Москва", "São Paulo", "cafe\u0301", "ﬁsh", "İstanbul",
                "οδός", "straße", "soft\u00adhyphen", "a\u00a0b", "x\u200by", "★", "→", "°", "©", "×", "•", "·",
                "™", "😀", "ꞔ", "Ⅻ", "①", "\u3000", "Ünïcödé"],
    "slashes": ["left/right", "and/or", "a/b/c", "in/out-door", "café/bar", "1/2/3", "w/", "/", "//", "\\",
                "http://x.com/a", "www.example.com", "pizza.com", "image.jpg", "file.txt", "me@example.com",
                "@home", "#hashtag", "c++", "C#"],
    "brackets": ["(", ")", "[", "]", "{", "}", "<", ">", "<<", ">>", "(red)", "[sic]", "{x}", "<b>", "</b>", ":)",
                 ";)", ":(", ":D", ":-)", "^_^", "(^_^)"],
    "quotes": ['"', "“", "”", "‘", "’", "«", "»", "`", "``", "''", "'", '"stop"', "“yield”", "'hello'", "‘no’"],
    "punctuation": [".", ",", ";", ":", "!", "?", "...", "..", ". . .", "…", "?!", "!!", "&", "&amp;", "AT&T", "R&B",
                    "A+B", "*", "=", "+", "~", "^", "|", "_", "@", "##", "%", "e.g.", "i.e.", "a.m.", "U.S.", "U.S.A.",
                    "Mr.", "Dr.", "St.", "etc.", "Inc.", "Co.", "vs.", "a.k.a.", "Ph.D.", "Jan.", "Ill.", "dog.cat",
                    "hello!world", "A.", "I."],
}
TRICKY = [  # the cases, then captions whose tokens depend on the next one ("A." before "The")
    "A man's hat.", "I don't know.", "A boy in a T-shirt.", "A 3.5 inch screen.", "A café on a corner.",
    "Turn left/right.", "Two dogs (one brown) on a [blue] mat {outside}.", '"Stop," says the sign.',
    "Mr. Smith met Dr. Jones on St. Mark's Place.", "Cats, dogs, etc. are here", "You cannot; we're gonna wait...",
    "An AT&T store & a Q&A sign", "The letter A.", "The dog runs.", "Plan B.", "two dogs", "See fig.", "3 dogs",
    "A U.S. flag.", "He waves.", "Made in the U.S.A.", "They play", "A sign reading 'No'", "In the '90s",
]


def ptb_captions():
    """Several hundred captions: the tricky ones, COCO-like captions with pieces of each kind above (loose or
    glued to a word), and a sweep of single characters across the Basic Multilingual Plane."""
    rng, caps = random.Random(0), list(TRICKY)
    for pieces in PIECES.values():
        for _ in range(60):
            words = rng.choices(COCO_WORDS, k=rng.randint(3, 10))
            for _ in range(rng.randint(1, 3)):
                i = rng.randint(0, len(words))
                if 0 < i and rng.random() < 0.3:
                    words[i - 1] += rng.choice(pieces)
                else:
                    words.insert(i, rng.choice(pieces))
            cap = " ".join(words)
            caps.append((cap[0].upper() + cap[1:] if rng.random() < 0.7 else cap) + rng.choice([".", "", " .", "!"]))
    # U+03A3: Java lower-cases a capital sigma by word boundaries, Python by its neighbours (see README)
    sweep = [chr(c) for c in range(0x21, 0x10000, 97) if not 0xd800 <= c < 0xe000 and c != 0x3a3]
    return caps + [f"a{c}b 1{c}2 {c}{c} x {c}" for c in sweep]


def score_corpus():
    """60 images, 5 references and a candidate each, variations of one caption with pieces of every kind."""
    rng, refs, cands = random.Random(1), {}, {}
    all_pieces = [p for pieces in PIECES.values() for p in pieces]
    for k in range(60):
        base = rng.choices(COCO_WORDS, k=rng.randint(5, 10))

        def variant():
            words = [w for w in base if rng.random() < 0.85]
            for _ in range(rng.randint(0, 3)):
                words.insert(rng.randint(0, len(words)), rng.choice(all_pieces))
            return " ".join(words).capitalize() + rng.choice([".", "", "!"])
        refs[k] = [variant() for _ in range(5)]
        cands[k] = variant()
    return refs, cands


@pytest.fixture(scope="session")
def coco_tokens():
    """pycocoevalcap's PTBTokenizer, run once (java is slow to start) on every caption the tests below use."""
    if shutil.which("java") is None:
        pytest.skip("no java on PATH: pycocoevalcap's PTBTokenizer runs Stanford CoreNLP 3.4.1 in java")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    refs, cands = score_corpus()
    captions = ptb_captions() + [r for k in refs for r in refs[k]] + [cands[k] for k in cands]
    out = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    return captions, [out[i][0] for i in range(len(captions))]


def test_ptb_tokens_equal_pycocoevalcap(coco_tokens):
    captions, theirs = coco_tokens
    ours = ptb_tokenize(captions)
    diff = [(c, a, b) for c, a, b in zip(captions, ours, theirs) if a != b]
    print(f"{len(captions) - len(diff)} of {len(captions)} captions tokenised as pycocoevalcap does")
    assert len(ours) == len(theirs) and not diff, diff[:5]
    # the set exercises what the issue named: clitics, assimilations, hyphens, numbers, unicode, slashes, brackets
    tokens = set(" ".join(theirs).split(" "))
    assert {"'s", "n't", "do", "ca", "can", "not", "gon", "t-shirt", "3.5", "1,000", "café", "left/right", "-lrb-",
            "-rsb-", "mr.", "u.s.", "etc.", "$", "cents", "1/2", "at&t", "c++", "www.example.com", ":-rrb-"} <= tokens
    assert [theirs[TRICKY.index(c)].split()[-1] for c in ("The letter A.", "Plan B.", "See fig.")] == ["a", "b.", "fig."]


def test_caption_scores_equal_pycocoevalcap_with_its_tokenizer(coco_tokens):
    captions, theirs = coco_tokens
    refs, cands = score_corpus()
    n_refs = sum(len(r) for r in refs.values())
    flat = iter(theirs[len(captions) - n_refs - len(cands):])
    gts = {k: [next(flat) for _ in refs[k]] for k in refs}
    res = {k: [next(flat)] for k in cands}
    b, _ = pycoco_bleu.Bleu(4).compute_score(gts, res, verbose=0)
    c, _ = pycoco_cider.Cider().compute_score(gts, res)
    ours = caption_scores(refs, cands)
    print(f"BLEU-4 {100 * ours['BLEU-4']:.2f} vs {100 * b[3]:.2f}, CIDEr-D {100 * ours['CIDEr']:.2f} vs {100 * c:.2f}")
    assert all(abs(ours[f"BLEU-{k + 1}"] - b[k]) < 1e-6 for k in range(4)) and abs(ours["CIDEr"] - c) < 1e-6
    assert 0.1 < b[3] < 0.9 and c > 0.5  # a real comparison, not two zeros
