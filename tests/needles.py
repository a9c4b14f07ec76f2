"""Needle-in-a-haystack prompts with exact token positions (no test functions here).

A RULER-style "special magic" needle (``One of the special magic numbers for gusty-walrus is:
5883691.``) is placed in a haystack at a depth fraction, the model is asked for it, and the
answer is started for it (plain completion text, no chat template, like ``tests/passkey.py``).
Prompts are built **as token ids** (segments tokenized separately and concatenated), so the
needle's token positions are exact and a needle can be placed to *straddle a FreeKV page
boundary* on purpose: ``split="tail"`` puts the needle value's last token alone on the next
page, ``split="mid"`` splits the value in the middle, ``split=None`` leaves the nominal place.

Needle shapes (:data:`SHAPES`): ``digits5`` .. ``digits9`` (numbers without a leading zero),
``uuid`` (UUID-like ``8hex-4hex``), ``phrase`` (four words), ``two`` (two 7-digit needles with
different keys half a haystack apart; the question asks for the first, the second is a
distractor of the same form: both compete for the same query). Haystacks
(:data:`HAYSTACKS`): ``repeat`` (the passkey filler sentences) and ``varied`` (Newton's
*Opticks*, a plain-text book shipped inside the venv by ``tvm_ffi``; a seeded synthetic text
when that file is missing).

Every haystack of one (haystack, context, seed) is a *prefix of one token stream*, so prompts
that differ only in needle depth or shape share the haystack before their needle (the radix
cache reuses it). :func:`exact_match` is the score: the whole needle value, bounded by
non-alphanumerics, appears in the output (``" 588369."`` does not match ``5883691``).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from tests.passkey import FILLER_SENTENCES, load_tokenizer

SHAPES = ("digits5", "digits6", "digits7", "digits8", "digits9", "uuid", "phrase", "two")
HAYSTACKS = ("repeat", "varied")
SPLITS = (None, "tail", "mid")

INTRO = ("Some special magic {noun}s are hidden within the following text. Make sure to "
         "memorize them. I will quiz you about the {noun}s afterwards.\n")
NEEDLE = " One of the special magic {noun}s for {key} is: {value}."
QUESTION = "\nWhat is the special magic {noun} for {key} mentioned in the provided text?"
ANSWER = " The special magic {noun} for {key} mentioned in the provided text is"

_ADJ = ("gusty", "amused", "silent", "brave", "lucky", "quiet", "rapid", "gentle", "bright",
        "clever", "fancy", "jolly", "proud", "witty", "calm", "eager")
_NOUN = ("walrus", "tuba", "harbor", "lantern", "meadow", "falcon", "pebble", "canyon",
         "violin", "orchard", "glacier", "compass", "thimble", "beacon", "parrot", "saddle")
_PHRASE = (("silver", "crimson", "hollow", "frozen", "golden", "rusty"),
           ("fox", "kettle", "river", "engine", "mirror", "tower"),
           ("sleeps", "sings", "waits", "turns", "burns", "drifts"),
           ("quietly", "slowly", "forever", "tonight", "alone", "twice"))
_OPTICKS = "tvm_ffi/3rdparty/libbacktrace/Isaac.Newton-Opticks.txt"


@dataclass(frozen=True)
class NeedlePrompt:
    input_ids: tuple[int, ...]  # the whole prompt (send as input_ids)
    values: tuple[str, ...]  # the value(s) the answer must contain whole (the asked needle)
    shape: str
    haystack: str
    depth: float  # requested depth fraction of the (first) needle in the haystack
    split: str | None
    value_spans: tuple[tuple[int, int], ...]  # [start, end) token positions: asked, distractor
    noun: str = "number"
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    def pages(self, page_size: int = 32) -> list[tuple[int, ...]]:
        """Logical pages each value's tokens lie on."""
        return [tuple(sorted({t // page_size for t in range(a, b)})) for a, b in
                self.value_spans]

    def max_new_tokens(self) -> int:
        a, b = self.value_spans[0]
        return b - a + 6


def make_value(shape: str, rng: random.Random) -> tuple[str, str]:
    """(noun, value) of one needle of ``shape``."""
    if shape.startswith("digits"):
        n = int(shape[len("digits"):])
        return "number", str(rng.randint(10 ** (n - 1), 10**n - 1))
    if shape == "two":
        return "number", str(rng.randint(10**6, 10**7 - 1))
    if shape == "uuid":
        hexs = "0123456789abcdef"
        return "uuid", ("".join(rng.choice(hexs) for _ in range(8)) + "-"
                        + "".join(rng.choice(hexs) for _ in range(4)))
    if shape == "phrase":
        return "phrase", " ".join(rng.choice(words) for words in _PHRASE)
    raise ValueError(f"unknown needle shape {shape!r} (known: {', '.join(SHAPES)})")


def make_key(rng: random.Random) -> str:
    return f"{rng.choice(_ADJ)}-{rng.choice(_NOUN)}"


def _varied_text(min_chars: int, seed: int) -> str:
    import importlib.util

    spec = importlib.util.find_spec("tvm_ffi")
    path = (Path(spec.origin).parent.parent / _OPTICKS) if spec and spec.origin else None
    if path is not None and path.is_file():
        raw = path.read_text(errors="replace")
        body = raw[raw.find("ADVERTISEMENT"):] if "ADVERTISEMENT" in raw else raw
        paras = [" ".join(p.split()) for p in body.split("\n\n")]
        paras = [p for p in paras if len(p) > 200]  # prose, not headings or tables
        start = random.Random(seed).randrange(len(paras) // 2)
        out, i = [], start
        while sum(map(len, out)) < min_chars:
            out.append(paras[i % len(paras)])
            i += 1
        return " ".join(out)
    # Fallback: seeded sentences from small word lists (not natural, but not repetitive).
    rng = random.Random(seed)
    subj = ("The old miller", "A young sailor", "The village clerk", "My neighbour",
            "The tired baker", "A travelling merchant", "The schoolteacher", "Her cousin")
    verb = ("carried", "painted", "repaired", "sold", "forgot", "described", "found", "wrapped")
    obj = ("a wooden chair", "the broken clock", "three baskets of apples", "a map of the coast",
           "the blue lantern", "an old violin", "the garden gate", "a letter from home")
    tail = ("before the rain started", "on a cold morning", "near the river", "after supper",
            "without a word", "in the market square", "for the second time", "at dawn")
    out = []
    while sum(map(len, out)) < min_chars:
        out.append(f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)} "
                   f"{rng.choice(tail)}.")
    return " ".join(out)


@lru_cache(maxsize=16)
def haystack_stream(model_path: str, haystack: str, n_tokens: int, seed: int
                    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(token ids of at least ``n_tokens``, sentence-end positions) of one haystack."""
    tok = load_tokenizer(model_path)
    chars = n_tokens * 6 + 2000
    if haystack == "repeat":
        k, rot = len(FILLER_SENTENCES), seed % len(FILLER_SENTENCES)
        sents, i = [], 0
        while sum(map(len, sents)) < chars:
            sents.append(FILLER_SENTENCES[(rot + i) % k])
            i += 1
        text = " ".join(sents)
    elif haystack == "varied":
        text = _varied_text(chars, seed)
    else:
        raise ValueError(f"unknown haystack {haystack!r} (known: {', '.join(HAYSTACKS)})")
    ids = tok(" " + text, add_special_tokens=False).input_ids
    if len(ids) < n_tokens:
        raise ValueError(f"haystack {haystack!r} too short: {len(ids)} < {n_tokens} tokens")
    ends = tuple(i + 1 for i, t in enumerate(ids) if tok.decode([t]).rstrip().endswith("."))
    return tuple(ids), ends


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def _needle_ids(tok, noun: str, key: str, value: str) -> tuple[list[int], tuple[int, int]]:
    """Token ids of the needle sentence and the [start, end) span of its value tokens."""
    text = NEEDLE.format(noun=noun, key=key, value=value)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    a = text.index(value)
    b = a + len(value)
    toks = [i for i, (s, e) in enumerate(enc.offset_mapping) if s < b and e > a and e > s]
    # a leading-space token (" ") before the value belongs to the value's span too only if
    # it carries value characters; offsets decide.
    return list(enc.input_ids), (toks[0], toks[-1] + 1)


def _place(base: int, nominal: int, span: tuple[int, int], split: str | None, page_size: int,
           ends: tuple[int, ...], lo: int, hi: int) -> int:
    """Number of haystack tokens before the needle: near ``nominal``, at a sentence end when
    one fits, such that the value's page split is ``split``. ``base`` = tokens before the
    haystack; ``span`` = value span inside the needle; result in ``[lo, hi]``."""
    a, b = span
    if split is None:
        cands = [e for e in ends if lo <= e <= hi]
        return min(cands, key=lambda e: abs(e - nominal)) if cands else min(max(nominal, lo), hi)
    # the boundary must fall right before value token `cut` (tail: the last one)
    cut = b - 1 if split == "tail" else a + max(1, (b - a) // 2)

    def ok(nb: int) -> bool:
        return (base + nb + cut) % page_size == 0

    near = [e for e in ends if lo <= e <= hi and abs(e - nominal) <= page_size and ok(e)]
    if near:
        return min(near, key=lambda e: abs(e - nominal))
    # no sentence end fits: cut the haystack mid-sentence at the exact position
    nb = nominal - ((base + nominal + cut) % page_size)
    if nb < lo:
        nb += page_size
    if nb > hi:
        nb -= page_size * (-(-(nb - hi) // page_size))
    assert lo <= nb <= hi and ok(nb), (nb, lo, hi)
    return nb


def build_needle_prompt(
    model_path: str,
    context: int,
    depth: float,
    shape: str = "digits7",
    haystack: str = "repeat",
    split: str | None = "tail",
    seed: int = 0,
    page_size: int = 32,
    stream_seed: int | None = None,
) -> NeedlePrompt:
    """A prompt of at most ``context`` tokens (within one page of it) with a needle at
    ``depth`` (fraction of the haystack before it), its value split across a page boundary
    as ``split`` says. ``seed`` picks key and value; ``stream_seed`` (default: 0) the
    haystack, so prompts of one (haystack, context) share their haystack prefix."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    tok = load_tokenizer(model_path)
    rng = random.Random(f"{shape}-{seed}")
    noun, value = make_value(shape, rng)
    key = make_key(rng)
    values, keys, distractor = [value], [key], ""
    if shape == "two":
        _, v2 = make_value("two", rng)
        k2 = make_key(rng)
        while k2 == key:
            k2 = make_key(rng)
        keys.append(k2)
        distractor = v2
    head = _encode(tok, INTRO.format(noun=noun))
    tail = _encode(tok, QUESTION.format(noun=noun, key=key))
    tail += _encode(tok, ANSWER.format(noun=noun, key=key))
    needles = [_needle_ids(tok, noun, k, v) for k, v in zip(keys, values + [distractor][
        : len(keys) - 1])]
    n_hay = context - len(head) - len(tail) - sum(len(n[0]) for n in needles)
    if n_hay < 2 * page_size:
        raise ValueError(f"context {context} is too short for a haystack")
    stream, ends = haystack_stream(model_path, haystack, n_hay + 8 * page_size,
                                   0 if stream_seed is None else stream_seed)
    n_hay -= page_size  # room to move the needle by up to one page
    nominal = round(depth * n_hay)
    base, lo, hi = len(head), 0, n_hay
    inserts = []
    if shape == "two":  # the second needle half a haystack away, at a sentence end
        want = round(((depth + 0.5) % 1.0) * n_hay)
        far = [e for e in ends if e <= n_hay and abs(e - nominal) >= 3 * page_size]
        nb2 = min(far, key=lambda e: abs(e - want)) if far else n_hay
        inserts.append((nb2, 1))
        if nb2 <= nominal:  # needle 0 comes after needle 1: its tokens shift
            base, lo = base + len(needles[1][0]), nb2
        else:
            hi = nb2
    inserts.append((_place(base, nominal, needles[0][1], split, page_size, ends, lo, hi), 0))
    inserts.sort()
    ids, spans, prev = list(head), [(0, 0)] * len(needles), 0
    for pos, i in inserts:
        ids += stream[prev:pos]
        a, b = needles[i][1]
        spans[i] = (len(ids) + a, len(ids) + b)
        ids += needles[i][0]
        prev = pos
    ids += stream[prev:n_hay]
    ids += tail
    return NeedlePrompt(
        input_ids=tuple(ids), values=tuple(values), shape=shape, haystack=haystack,
        depth=depth, split=split, value_spans=tuple(spans), noun=noun,
        meta={"keys": keys, "distractor": distractor},
    )


def _pattern(value: str) -> re.Pattern[str]:
    words = [re.escape(w) for w in value.split()]
    return re.compile(r"(?<![0-9A-Za-z])" + r"\s+".join(words) + r"(?![0-9A-Za-z])",
                      re.IGNORECASE)


def exact_match(output: str, values: tuple[str, ...] | list[str]) -> bool:
    """Every needle value appears whole in ``output`` (non-alphanumeric bounds; case and
    whitespace runs ignored for phrases)."""
    return all(_pattern(v).search(output) for v in values)
