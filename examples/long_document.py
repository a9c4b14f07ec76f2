"""Several questions about one long document (~6K tokens) with ``fork``.

The program adds the document once, then forks one branch per question. ``fork`` first sends
the document alone (a prefill, no tokens generated), so every branch finds it in SGLang's
radix cache and only its question is new: under ``--kv-policy freekv`` the branches share
the document's host-tier pages and each attends to it through its own small device budget.

The document is synthetic: filler sentences with a pass key hidden at a chosen depth (the
passkey-retrieval task), so whether the model read it is checkable.

    python examples/long_document.py --url http://127.0.0.1:30000 [--tokens 6000]
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import sglang as sgl

FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again.")
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about the important information there.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
# (question, start of the answer): the answer prefix keeps a small model on topic.
QUESTIONS = (
    ("What is the pass key?", "The pass key is"),
    ("What color is the sky in the text?", "In the text, the sky is"),
    ("What color is the grass in the text?", "In the text, the grass is"),
)
TOKENS_PER_SENTENCE = 5  # the filler sentences are ~5 tokens each (SmolLM2, Llama tokenizers)


def build_document(key: str, tokens: int = 6000, depth: float = 0.5, rotation: int = 0) -> str:
    """About ``tokens`` tokens of filler with the pass key on its own line at ``depth``
    (0 = start, 1 = end); ``rotation`` shifts the filler sentences."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    n = max(1, (tokens - 60) // TOKENS_PER_SENTENCE)
    before = round(n * depth)
    filler = [FILLER[(rotation + i) % len(FILLER)] for i in range(n)]
    lines = [INTRO, ""]
    if before:
        lines.append(" ".join(filler[:before]))
    lines.append(NEEDLE.format(key=key))
    if before < n:
        lines.append(" ".join(filler[before:]))
    return "\n".join(lines) + "\n\n"  # the questions follow after a blank line


@sgl.function
def ask_document(s, document: str, questions: tuple[tuple[str, str], ...]):  # type: ignore[no-untyped-def]
    s += document
    # fork() sends the text so far as one prefill (no tokens generated) so that every branch
    # finds it in the radix cache, but it looks at the text before queued `+=` operations
    # have run (SGLang 0.5.23's frontend): read the text first, which waits for them.
    s.text()
    branches = s.fork(len(questions))
    for branch, (question, answer_start) in zip(branches, questions, strict=True):
        branch += f"{question} {answer_start}"
        branch += sgl.gen("answer", max_tokens=12, stop=["\n"], temperature=0)
    # Reading a branch's variable waits for it; the branches run concurrently meanwhile.
    s["answers"] = [b["answer"] for b in branches]
    meta = [b.get_meta_info("answer") for b in branches]
    s["cached_tokens"] = [m["cached_tokens"] for m in meta]
    s["prompt_tokens"] = [m["prompt_tokens"] for m in meta]
    branches.join()


@dataclass(frozen=True)
class DocumentAnswers:
    key: str
    answers: list[str]  # one per QUESTIONS entry
    prompt_tokens: list[int]  # per branch: document + question
    cached_tokens: list[int]  # per branch: tokens the radix cache already held

    @property
    def key_found(self) -> bool:
        return self.key in self.answers[0]


def run(tokens: int = 6000, depth: float = 0.5, seed: int = 0) -> DocumentAnswers:
    """Build a document with a random 5-digit key and ask QUESTIONS about it."""
    key = str(random.Random(seed).randint(10000, 99999))
    document = build_document(key, tokens, depth, rotation=seed)
    state = ask_document.run(document=document, questions=QUESTIONS)
    return DocumentAnswers(key=key, answers=[a.strip() for a in state["answers"]],
                           prompt_tokens=state["prompt_tokens"],
                           cached_tokens=state["cached_tokens"])


if __name__ == "__main__":
    import argparse

    from _common import connect

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:30000")
    ap.add_argument("--tokens", type=int, default=6000, help="document length (tokens)")
    ap.add_argument("--depth", type=float, default=0.5, help="pass key depth in [0, 1]")
    args = ap.parse_args()
    connect(args.url)
    result = run(args.tokens, args.depth)
    rows = zip(QUESTIONS, result.answers, result.cached_tokens, result.prompt_tokens, strict=True)
    for (question, _), answer, cached, prompt in rows:
        print(f"{question:<40} {answer!r:<30} ({cached} of {prompt} prompt tokens cached)")
    print(f"pass key {result.key}: {'found' if result.key_found else 'missed'}")
