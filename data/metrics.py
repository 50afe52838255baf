"""Caption metrics written from scratch: BLEU-1..4 (Papineni et al., 2002) and
CIDEr-D (Vedantam et al., 2015), numerically the same as the COCO caption
evaluation code (pycocoevalcap's Bleu(4) and Cider(); tests/test_metrics.py
checks it to 1e-6), with the same inputs:

    refs  {id: [reference, ...]}     cands {id: [candidate]}

each string already tokenised into space-separated words. `tokenize` and
`ptb_tokenize` split raw captions as the COCO evaluation does (pycocoevalcap's
PTBTokenizer, Stanford CoreNLP 3.4.1 run in java), ported to Python: the tests
compare the tokens with the real one's. `caption_scores` does the tokenising and
returns the numbers train.py reports.
"""
import functools
import math
import re
from collections import Counter

import numpy as np


# ---- tokenising as the COCO caption evaluation does ------------------------------------------------------
# pycocoevalcap writes the captions of one call one a line, runs Stanford CoreNLP 3.4.1's PTBTokenizer on them
# (-preserveLines -lowerCase) and drops the tokens in PUNCTUATIONS. PTBTokenizer is a JFlex lexer
# (src/edu/stanford/nlp/process/PTBLexer.flex at tag v3.4.1): at each position the rule with the longest match
# wins, a rule's trailing context (rule a/b: a, where b follows) counting in its length, and a tie goes to the
# earlier rule. _ptb_rules are its rules, in its order, with its regular expressions and names; left out: HTML
# entities other than &amp;, and the rules that only add a second "." (which PUNCTUATIONS drops). The lexer is
# caseless except inside [character classes], hence (?i:...) around the literals only.

PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                "...", ";"}  # pycocoevalcap's list, compared with lower-cased tokens: "-lrb-" stays
# BMP letters and digits newer than Unicode 6.0 (up to Python 3.11's 14.0): JFlex's tables (Java 7) don't know
# them, so CoreNLP drops them; found by running every BMP character through the real tokenizer
_NEWER = ("037f 0528-052f 0560 0588 05ef 0860-086a 0870-0887 0889-088e 08a1 08ad-08c9 0978 0980 09fc 0af9 0c34 "
          "0c5a 0c5d 0c80 0cdd 0d04 0d54-0d56 0d5f 0de6-0def 0e86 0e89 0e8c 0e8e-0e93 0e98 0ea0 0ea8-0ea9 0eac "
          "13f5 13f8-13fd 16f1-16f8 170d 171f 1878 191d-191e 19b0-19c0 19c8-19c9 1b4c 1c80-1c88 1c90-1cba "
          "1cbd-1cbf 1cf2-1cf3 1cfa 2c2f 2c5f 312e-312f 31bb-31bf 4db6-4dbf 9fcd-9fff a698-a69d a78f a794-a79f "
          "a7ab-a7ca a7d0-a7d1 a7d3 a7d5-a7d9 a7f2-a7f7 a8fd-a8fe a9e0-a9e4 a9e6-a9fe aa7e-aa7f ab30-ab5a "
          "ab5c-ab69 ab70-abbf")


def _char_class(pred):
    """A regex character class of the BMP characters where pred holds, less _NEWER. (JFlex 1.4 reads UTF-16
    units: a character beyond the BMP matches no rule and is dropped.)"""
    newer = set()
    for run in _NEWER.split():
        a, b = (run.split("-") * 2)[:2]
        newer.update(range(int(a, 16), int(b, 16) + 1))
    runs, start = [], None
    for c in range(0x10001):
        if c < 0x10000 and c not in newer and pred(chr(c)):
            start = c if start is None else start
        elif start is not None:
            runs.append(re.escape(chr(start)) + ("-" + re.escape(chr(c - 1)) if c - 1 > start else ""))
            start = None
    return "[" + "".join(runs) + "]"


def _ptb_rules():
    """[(patterns, action)], PTBLexer.flex's rules in order. action(token, trailing context) -> the token's
    text, or (text, characters consumed) where CoreNLP pushes characters back."""
    # [:letter:], [:digit:]; U+1885, U+1886 were letters in Unicode 6.0, marks now
    letter = _char_class(lambda ch: ch.isalpha() or ch in "\u1885\u1886")
    digit = _char_class(str.isdecimal)
    L = ("(?:" + letter + "|[\u00ad\u0237-\u024f\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff\u0300-\u036f\u0370-\u037d"
         "\u0384\u0385\u03cf\u03f6\u03fc-\u03ff\u0483-\u0487\u04cf\u04f6-\u04ff\u0510-\u0525\u055a-\u055f\u0591-"
         "\u05bd\u05bf\u05c1\u05c2\u05c4\u05c5\u05c7\u0615-\u061a\u063b-\u063f\u064b-\u065e\u0670\u06d6-\u06ef"
         "\u06fa-\u06ff\u070f\u0711\u0730-\u074f\u0750-\u077f\u07a6-\u07b1\u07ca-\u07f5\u07fa\u0900-\u0903\u093c"
         "\u093e-\u094e\u0951-\u0955\u0962-\u0963\u0981-\u0983\u09bc-\u09c4\u09c7\u09c8\u09cb-\u09cd\u09d7\u09e2"
         "\u09e3\u0a01-\u0a03\u0a3c\u0a3e-\u0a4f\u0a81-\u0a83\u0abc-\u0acf\u0b82\u0bbe-\u0bc2\u0bc6-\u0bc8\u0bca-"
         "\u0bcd\u0c01-\u0c03\u0c3e-\u0c56\u0d3e-\u0d44\u0d46-\u0d48\u0e30-\u0e3a\u0e47-\u0e4e\u0eb1-\u0ebc\u0ec8-"
         "\u0ecd])")  # LETTER: also soft hyphen, combining marks
    D = f"(?:{digit}|[\u07c0-\u07c9])"
    LD, JLD = f"(?:{L}|{D})", f"(?:{letter}|{D})"
    APOS, APOSETC = "['\u0092\u2019]", "['\u0092\u2019`\u0091\u2018\u201b]"  # APOSETCETERA: also inside words
    SPACE = "[ \t\u00a0\u2000-\u200a\u3000]"
    SPACENL = f"(?:{SPACE}|\r?\n|[\r\u2028\u2029\x0b\x0c\x85])"
    REDAUX = APOS + "(?:[msdMSD]|(?i:re|ve|ll))"  # 's 'm 'd 're 've 'll
    SREDAUX = "(?i:n)" + APOSETC + "(?i:t)"  # n't
    WORD = f"{L}{LD}*(?:[.!?]{L}{LD}*)*"  # cafe, f?g, dog.The
    ACRO = r"(?i:canada|sino|korean|eu|japan|non)-(?i:u\.s)|(?i:u\.s\.-(?:u\.k|u\.s\.s\.r))|[A-Za-z](?:\.[A-Za-z])*"
    HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:[A-Za-z](?:\.[A-Za-z])+\.|[A-Za-z0-9\u00ad]+))+"  # t-shirt
    THING1 = f"(?:[dDoOlL]{APOSETC}{JLD})?{JLD}+"  # o'clock
    THING = f"{THING1}(?:[-_\u058a\u2010\u2011]{THING1})*"  # any letters: cafe-bar, 4x4, well_known
    THINGA = r"[A-Z]+(?:(?:[+&]|(?i:&amp;))[A-Z]+)+"  # AT&T (upper case only)
    INSENTP = "[,;:\u3001]"
    ABBREV1 = (  # usually followed by a lower-case word: months, days, states, company words, etc.
        "(?:(?i:jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thu|thurs|fri|ala|ariz|calif|colo"
        "|conn|ct|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb|nev|okla|penn|tenn|va|vt|wisc?|wyo|inc|cos?"
        "|corp|ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys|tel|est|ext|sq|jr|sr|bros|ed\\.d|ph\\.d|blvd|rd|esq"
        "|etc|al|seq|bldg)|(?i:pp?t)[ye](?i:s)?|A(?i:z|rk)|D(?i:el)|I(?i:ll)|L(?i:a)|M(?i:ass|iss)|O(?i:re)"
        "|P(?i:a)|T(?i:ex)|W(?i:ash))\\.")
    ABBREV4 = (  # ABBREV2 less its ".": usually followed by an upper-case word: titles, acronyms, vs., cf.
        "(?:(?i:mrs?|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt|cpl|pvt|capt|ste?"
        "|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|mt|ft|adj|adv|asst|assoc|ens|insp|mlle|mme|msgr|sfc"
        "|vs|alex|wm|jos|cie|a\\.k\\.a|cf|treas|ph|invt|elec|natl|dept)|(?i:m)[ft](?i:g)|M(?i:iss))")
    ABBREV4 = [ABBREV4, f"(?:{ACRO})"]  # two patterns: the longer wins (a Python alternation takes the first)
    SENTENCE_START = "|".join(w[0] + "(?i:" + re.escape(w[1:]) + ")" for w in (  # after an acronym's "."
        "About According Additionally After An A As At But Earlier He Her Here However If In It Last Many More "
        "Mr. Ms. Now Once One Other Our She Since So Some Such That The Their Then There These They This We When "
        "While What Yet You").split())
    FILENAME_EXT = ("bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|mp3|pdf|php"
                    "|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip")
    SGML_NAME = r"[A-Za-z][A-Za-z0-9_:.-]*"
    SGML = (r"<(?:[!?][A-Za-z-][^>\r\n]*|" + SGML_NAME + "(?: +(?:" + SGML_NAME + " *= *(?:'[^']*'|\"[^\"]*\")|"
            + SGML_NAME + "))* */?|/" + SGML_NAME + ") *>")
    URL_PATH = r'(?:/[^ \t\n\f\r"<>|()]+[^ \t\n\f\r"<>|.!?(){},-])?'
    MISCSYMBOL = ("[+%&~^|\\\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00ba\u00d7\u00f7\u0387\u05be"
                  "\u05c0\u05c3\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c\u0614\u061b\u061e\u066a\u066d"
                  "\u0703-\u070d\u07f6-\u07f8\u0964\u0965\u0e4f\u1fbd\u2016\u2017\u2020-\u2023\u2030-\u2038\u203b"
                  "\u203e-\u2042\u2044\u207a-\u207f\u208a-\u208e\u2100-\u214f\u2190-\u21ff\u2200-\u2bff\u3012"
                  "\u30fb\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]")
    BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
    CURRENCY = {"\u00a2": "cents", "\u00a3": "#", "\u00a4": "$", "\u0080": "$", "\u20a0": "$", "\u20ac": "$"}
    FRACTION = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}

    keep = None  # the matched text as it is

    def word(t, c):  # removeSoftHyphens
        return t.replace("\u00ad", "") or "-"

    def amp(t, c):  # normalizeAmpersandEntity
        return re.sub("(?i:&amp;)", "&", t)

    def parens(t, c):
        return t.replace("(", "-LRB-").replace(")", "-RRB-")

    def spaces(t, c):  # normalizeSpace: a token keeps its spaces as no-break spaces
        return t.replace(" ", "\u00a0")

    def acronym(t, c):  # "U.S." before "The": "U.S." then "." again; "I." before "The": "I" then "."
        return (t[0], 1) if len(t) == 2 else (t, len(t) - 1)

    def quotes(t, c, left=False):  # latexQuotes: ' " as ` `` if probably opening, else ' ''; curly by shape
        if left:
            t = t.replace("'", "`").replace('"', "``")
        return "".join({'"': "''", "\u0091": "`", "\u2018": "`", "\u201b": "`", "\u2039": "`", "\u0092": "'",
                        "\u2019": "'", "\u203a": "'", "\u0093": "``", "\u201c": "``", "\u00ab": "``",
                        "\u0094": "''", "\u201d": "''", "\u00bb": "''"}.get(ch, ch) for ch in t)

    return [
        (r"(?i:c\+\+|[cf]#)", keep),
        (r"(?i:cannot)", lambda t, c: (t[:3], 3)),  # can not
        (r"'(?i:twas|tis)", lambda t, c: (t[:2], 2)),  # 't was
        (r"(?i:gonna|gotta|lemme|gimme|wanna)", lambda t, c: (t[:-2], len(t) - 2)),  # gon na
        (SGML, spaces),
        ("[\u0096\u0097\u2013\u2014\u2015]", lambda t, c: "--"),  # SPMDASH
        (r"(?i:&amp;)", amp),  # SPAMP
        (f"{WORD}(?=({REDAUX}))", word),  # WORD/REDAUX: man|'s
        (f"[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*(?=({SREDAUX}))", word),  # SWORD/SREDAUX: do|n't
        (WORD, word),
        ([f"{APOS}(?i:n){APOS}?", f"[lLdDjJ]{APOS}", f"(?i:dunkin|somethin|ol){APOS}", f"{APOS}(?i:em|till?|cause)",
          f"[A-HJ-XZn]{APOSETC}{letter}{letter}{letter}*", f"{APOS}[2-9]0(?i:s)",
          f"{letter}{letter}*[aeiouyAEIOUY]{APOSETC}[aeiouA-Z]{letter}*",
          r"(?i:cont'd\.?|'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)", f"(?i:o){APOSETC}(?i:o)"],
         keep),  # APOWORD: O'Brien, 'em, '90s, rock'n'roll
        (f"(?i:y){APOS}(?=({letter}))", keep),  # APOWORD2: y'all
        (r'https?://[^ \t\n\f\r"<>|(){}]+[^ \t\n\f\r"<>|.!?(){},-]', keep),  # FULLURL
        ([r'(?i:www)\.(?:[^ \t\n\f\r"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}' + URL_PATH,
          r'(?:[^ \t\n\f\r"`\'<>|.!?(){},-_$]+\.)+(?i:com|net|org|edu)' + URL_PATH], keep),  # LIKELYURL
        (r'(?:<|(?i:&lt;))?[a-zA-Z0-9][^ \t\n\f\r"<>|()\u00a0{}]*@(?:[^ \t\n\f\r"<>|(){}.\u00a0]+\.)*'
         r'[^ \t\n\f\r"<>|(){}.\u00a0]+(?:>|(?i:&gt;))?', keep),  # EMAIL
        (f"@[a-zA-Z_][a-zA-Z_0-9]*|#{L}+", keep),  # TWITTER
        ([f"{REDAUX}(?=([^A-Za-z]))", f"{SREDAUX}(?=([^A-Za-z]))"], quotes),
        (f"{D}{{1,2}}[-/]{D}{{1,2}}[-/]{D}{{2,4}}", keep),  # DATE
        (f"[-+]?(?:{D}+(?:[.:,\u00ad\u066b\u066c]{D}+)*|(?:[.:,\u00ad\u066b\u066c]{D}+)+)", word),  # NUMBER: 3.5
        ("[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)", keep),
        (f"(?:{D}{{1,4}}[- \u00a0])?{D}{{1,4}}(?:\\\\?/|\u2044){D}{{1,4}}", spaces),  # FRAC: "3 1/2" one token
        ("[\u00bc\u00bd\u00be\u2153-\u215e]", lambda t, c: FRACTION.get(t, t)),  # FRAC2
        (rf"(?i:-(?:rrb|lrb|rcb|lcb|rsb|lsb)-|c\.d\.s|pro-|anti-|s(?:&|&amp;)p-500|s(?:&|&amp;)ls|cap{APOS}n"
         rf"|c{APOS}est)", amp),  # TBSPEC
        (r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", keep),  # THING3: and/or
        (r"[A-Z]*\$|#", keep),  # DOLSIGN
        ("[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]",
         lambda t, c: CURRENCY.get(t, t)),  # DOLSIGN2
        (f"(?:{ACRO})\\.(?=({SPACENL}+(?:{SENTENCE_START}){SPACENL}))", acronym),  # ACRONYM before a sentence
        (r"(?i:ca|figs?|prop|nos?|art|bldg|pp|op)\." + f"(?=({SPACENL}?{D}))", keep),  # ABBREV3: fig. 3
        (f"(?:(?i:pt)[eyEY]|(?i:co))\\.(?=({SPACE}(?i:ltd|lim)))", keep),  # Pty. Ltd.
        (f"{ABBREV1}(?=((?s:..))?)", keep),  # ABBREV1 (a "." added before a sentence end is dropped anyway)
        ([p + "\\." for p in ABBREV4], keep),  # ABBREV2
        ([p + f"(?=({SPACE}))" for p in ABBREV4], keep),  # ABBREV4/SPACE
        (f"(?:{ACRO})(?=({SPACENL}))", keep),  # ACRO/SPACENL
        (f"{APOS}{D}{D}(?=({SPACENL}))", keep),  # TBSPEC2: '90
        (f"{LD}+(?:\\.{LD}+)*\\.(?:{FILENAME_EXT})(?=({SPACENL}|[.?!,]))", keep),  # FILENAME
        (f"{WORD}\\.(?=({INSENTP}))", word),
        ([r"(?:\([0-9]{2,3}\)[ \u00a0]?|(?:\+\+?)?(?:[0-9]{2,4}[- \u00a0])?[0-9]{2,4}[- \u00a0])[0-9]{3,4}"
          r"[- \u00a0]?[0-9]{3,5}", r"(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}"],
         lambda t, c: parens(spaces(t, c), c)),  # PHONE
        ('"(?=([A-Za-z0-9$]))?', lambda t, c: quotes(t, c, left=c is not None)),  # DBLQUOT
        ("<<|>>|<|>", keep),  # LESSTHAN GREATERTHAN FAKEDUCKFEET
        (r"[<>]?[:;=][-o*']?[()DPdpO\\{@|\[\]](?=([^A-Za-z0-9]))", parens),  # SMILEY
        ([r"[\^x=~<>]\.\[\^(?i:x)=~<>\]", r"[-^x=~<>']_[-^x=~<>']", r"\([-^x=~<>'][_.]?[-^x=~<>']\)",
          r"\([\^x=~<>']-[\^x=~<>'`]\)"], parens),  # ASIANSMILEY
        (r"[{}\[\]()]", lambda t, c: BRACKETS[t]),
        (r"-+", lambda t, c: "--" if 3 <= len(t) <= 4 else t),  # HYPHENS
        ("\\.{3,5}|(?:\\.[ \u00a0]){2,4}\\.|[\u0085\u2026]", lambda t, c: "..."),  # LDOTS
        (r"@+|#+|_+|\*+|(?:\\\*){1,3}|[,;:\u3001]|[?!]+|=|/", keep),  # FNMARKS ASTS INSENTP ...
        ("[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]", keep),
        ([HTHING, f"{HTHING}\\.(?=({INSENTP}))"], word),
        ([THING, f"{THING}\\.(?=({INSENTP}))"], keep),
        ([THINGA, f"{THINGA}\\.(?=({INSENTP}))"], amp),
        ("'(?=([A-Za-z][^ \t\n\r\u00a0]))", lambda t, c: "`"),  # a quote that probably opens
        ([REDAUX, SREDAUX, "''|[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091-\u0094\u201e\u201f\u2039\u203a"
          "\u00ab\u00bb]{1,2}|" + APOS], quotes),  # QUOTES
        (MISCSYMBOL, keep),
        ("[ \t\u00a0\u2000-\u200a\u3000]+|[\u200b\u200e\u200f\ufeff\0]", lambda t, c: ""),  # SPACES
    ]


@functools.cache
def _ptb_lexer():
    """[(compiled patterns, action)]; a pattern's one group, if any, is its trailing context."""
    rules = [([re.compile(p) for p in ([ps] if isinstance(ps, str) else ps)], action) for ps, action in _ptb_rules()]
    assert all(rx.groups <= 1 for rxs, _ in rules for rx in rxs)
    return rules


def ptb_tokenize(captions):
    """[caption] -> [tokens joined by " "], equal to pycocoevalcap's PTBTokenizer on the same list.

    One caption is one line of one text, as there, so a caption's tokens may depend on the next one (a one-letter
    acronym "A." before a line that starts "The ..."). A line break inside a caption (\\r, U+2028, ...) becomes a
    space here, where pycocoevalcap's output lines would shift by one. Known difference: Java lower-cases a capital
    sigma next to a digit or "_" by word boundaries ("Σ5" -> "ς5"), Python by Unicode's context ("σ5").
    """
    if not captions:
        return []
    rules = _ptb_lexer()
    text = "\n".join(re.sub("[\r\n\u2028\u2029\x0b\x0c]", " ", c) for c in captions)
    lines, pos = [[]], 0
    spaces = re.compile("[ \t\u00a0\u2000-\u200a\u3000]+")
    plain = re.compile(r"[A-Za-z]+(?=[ \t\n]|$)")  # fast path: every rule gives this word as it is, but these:
    assimilations = {"cannot", "gonna", "gotta", "lemme", "gimme", "wanna"}
    while pos < len(text):
        if text[pos] == "\n":
            lines.append([])
            pos += 1
            continue
        if text[pos] in " \t":  # no rule but SPACES starts here
            pos = spaces.match(text, pos).end()
            continue
        m = plain.match(text, pos)
        if m and m.group().lower() not in assimilations:
            lines[-1].append(m.group())
            pos = m.end()
            continue
        best, best_n = None, 0
        for rxs, action in rules:  # the longest match, context included; the earliest rule on a tie
            for rx in rxs:
                if m := rx.match(text, pos):
                    context = m.group(1) if rx.groups else None
                    n = m.end() - pos + len(context or "")
                    if n > best_n:
                        best, best_n = (m.group(), context, action), n
        if best is None:  # a character no rule knows: CoreNLP drops it
            pos += 1
            continue
        tok, context, action = best
        out = tok if action is None else action(tok, context)
        out, used = (out, len(tok)) if isinstance(out, str) else out
        if out:
            lines[-1].append(out)
        pos += used
    # as pycocoevalcap: Java lower-cases each token, the line is rstripped, split on " ", punctuation dropped
    return [" ".join(w for w in " ".join(t.lower() for t in line).rstrip().split(" ") if w not in PUNCTUATIONS)
            for line in lines]


def tokenize(caption):
    """One caption as the COCO evaluation tokenises it: "A man's T-shirt." -> "a man 's t-shirt"."""
    return ptb_tokenize([caption])[0]


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
