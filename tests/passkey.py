"""Passkey-retrieval prompts for long-context tests and benchmarks (no test functions here).

A 5-digit key is hidden at a depth fraction inside repeated filler sentences and the model is
asked for it. Prompts are built with the model's own tokenizer so their token count is exact,
and are deterministic from a seed (the seed picks the key and the filler's rotation).

Two shapes share one layout:

* :func:`build_passkey_prompt` returns text for SGLang's ``/generate``: by default plain text
  (no chat template) ending with the question and the started answer ``"The pass key is"``,
  so that even a 135M model answers with the digits first. With greedy decoding, dense
  attention through SGLang finds the key in this format at ~3K and ~5K tokens at depths
  0.15 / 0.5 / 0.85 (the chat-template variant, ``fmt="chat_prefix"``, misses some).
* :func:`build_passkey_messages` returns the same haystack as ``messages`` for
  ``/v1/chat/completions`` (no assistant prefix: the chat endpoint cannot pre-fill it).

:func:`found_key` is the check: the five digits appear in the generated text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

FILLER_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there."
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    text: str  # the full prompt (chat template applied for /generate), or the user message
    key: str  # the five digits
    depth: float  # requested depth fraction of the needle inside the filler
    n_tokens: int  # prompt length in tokens (as the server will count it)
    input_ids: tuple[int, ...]  # token ids of `text` (send as input_ids for exact control)


@lru_cache(maxsize=4)
def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def make_key(seed: int) -> str:
    return f"{random.Random(seed).randint(10000, 99999)}"


def _filler(n_sentences: int, rotation: int) -> str:
    k = len(FILLER_SENTENCES)
    return " ".join(FILLER_SENTENCES[(rotation + i) % k] for i in range(n_sentences))


def _user_message(n_sentences: int, depth: float, key: str, rotation: int) -> str:
    before = round(n_sentences * depth)
    after = n_sentences - before
    parts = [INTRO, ""]
    if before:
        parts.append(_filler(before, rotation))
    parts.append(NEEDLE.format(key=key))
    if after:
        parts.append(_filler(after, rotation + before))
    parts += ["", QUESTION]
    return "\n".join(parts)


def _render(tok, user: str, fmt: str) -> str:
    if fmt == "raw":  # plain completion: the question, then the started answer
        return f"{user} {ANSWER_PREFIX}"
    text = tok.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    return text + ANSWER_PREFIX if fmt == "chat_prefix" else text


def _count(tok, text: str) -> int:
    # SGLang tokenizes /generate text the same way (special tokens are plain text in the template).
    return len(tok(text, add_special_tokens=False).input_ids)


def _build(
    tok, target_tokens: int, depth: float, seed: int, key: str | None, fmt: str
) -> tuple[PasskeyPrompt, str]:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = key or make_key(seed)
    rotation = seed % len(FILLER_SENTENCES)

    def size(n: int) -> int:
        return _count(tok, _render(tok, _user_message(n, depth, key, rotation), fmt))

    base = size(0)
    if target_tokens < base:
        raise ValueError(f"target_tokens={target_tokens} is below the empty prompt ({base})")
    # ~5 tokens per filler sentence: estimate, then walk to the largest n not above the target.
    per = max(1.0, (size(50) - base) / 50)
    n = max(0, int((target_tokens - base) / per))
    while n > 0 and size(n) > target_tokens:
        n -= 1
    while size(n + 1) <= target_tokens:
        n += 1
    user = _user_message(n, depth, key, rotation)
    text = _render(tok, user, fmt)
    ids = tuple(tok(text, add_special_tokens=False).input_ids)
    return PasskeyPrompt(text=text, key=key, depth=depth, n_tokens=len(ids), input_ids=ids), user


def build_passkey_prompt(
    model_path: str,
    target_tokens: int,
    depth: float,
    seed: int = 0,
    key: str | None = None,
    fmt: str = "raw",
) -> PasskeyPrompt:
    """Prompt text for ``/generate``, ending with the started answer ``"The pass key is"``.

    ``fmt="raw"`` (default): plain text, no chat template. ``fmt="chat_prefix"``: the model's
    chat template around the haystack, the assistant turn started with the answer prefix (the
    135M model then misses more keys, e.g. at depth 0.15 of ~3K tokens).
    ``n_tokens`` is at most ``target_tokens`` and within a filler sentence (~5 tokens) of it.
    """
    if fmt not in ("raw", "chat_prefix"):
        raise ValueError(f"fmt must be 'raw' or 'chat_prefix', got {fmt!r}")
    return _build(load_tokenizer(model_path), target_tokens, depth, seed, key, fmt)[0]


def build_passkey_messages(
    model_path: str, target_tokens: int, depth: float, seed: int = 0, key: str | None = None
) -> tuple[list[dict], PasskeyPrompt]:
    """``messages`` for ``/v1/chat/completions`` with the same haystack (no answer prefix)."""
    tok = load_tokenizer(model_path)
    p, user = _build(tok, target_tokens, depth, seed, key, fmt="chat")
    return [{"role": "user", "content": user}], p


def filler_prompt(model_path: str, target_tokens: int, seed: int = 0) -> PasskeyPrompt:
    """A haystack with no question-specific needle, for load tests and benchmarks."""
    return build_passkey_prompt(model_path, target_tokens, depth=0.5, seed=seed)


def found_key(output_text: str, key: str) -> bool:
    return key in output_text
