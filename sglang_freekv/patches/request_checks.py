"""Request checks of a FreeKV server (tokenizer manager, launcher process).

Changes (only when ``--kv-policy freekv`` is active):
- ``TokenizerManager._validate_one_request`` (BEFORE): refused with a ``ValueError``, which
  SGLang answers with HTTP 400: an empty prompt (no input ids and no embeddings or multimodal
  data), input ids outside the vocabulary, a negative ``top_logprobs_num``. SGLang 0.5.23
  schedules the first two and its scheduler then crashes in the model's forward (a 0-token
  reshape in the rotary embedding; an embedding index out of range), taking the server down;
  it answers the third with 200.
- ``GenerateReqInput._handle_parallel_sampling`` (AFTER): ``n`` above ``MAX_PARALLEL_SAMPLES``
  is refused before SGLang copies the prompt ``n`` times (``n = 10**6`` took the HTTP server
  to ~8 GB of memory and minutes of CPU).
- ``OpenAIServingChat._validate_request`` (AFTER): a negative ``max_tokens`` or
  ``max_completion_tokens`` is refused naming the field the client sent (SGLang's own
  message names its internal ``max_new_tokens``).
"""

from __future__ import annotations

from typing import Any

from sglang_freekv.patches.server_args import policy_of

_VALIDATE = "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request"
_PARALLEL = "sglang.srt.managers.io_struct.GenerateReqInput._handle_parallel_sampling"
_CHAT = "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._validate_request"
TARGETS = (_VALIDATE, _PARALLEL, _CHAT)
MAX_PARALLEL_SAMPLES = 256


def _check_request(self: Any, obj: Any, input_ids: Any, *args: Any, **kwargs: Any) -> None:
    policy, _ = policy_of()
    if policy != "freekv":
        return None
    has_other = any(getattr(obj, name, None) is not None
                    for name in ("input_embeds", "image_data", "video_data", "audio_data"))
    if input_ids is not None and len(input_ids) == 0 and not has_other:
        raise ValueError("The prompt is empty: send at least one input token (text or "
                         "input_ids).")
    vocab = int(getattr(getattr(self, "model_config", None), "vocab_size", 0) or 0)
    if vocab and input_ids:
        lo, hi = min(input_ids), max(input_ids)
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"input_ids contain the out-of-vocabulary token id {bad}; the "
                             f"valid range is [0, {vocab}).")
    top = getattr(obj, "top_logprobs_num", None)
    tops = top if isinstance(top, list) else [top]
    if any(isinstance(t, int) and t < 0 for t in tops):
        raise ValueError(f"top_logprobs_num={top}: must be >= 0.")
    return None


def _refuse_huge_n(result: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    policy, _ = policy_of()
    n = getattr(self, "parallel_sample_num", 1)
    if policy == "freekv" and isinstance(n, int) and n > MAX_PARALLEL_SAMPLES:
        raise ValueError(f"n={n}: at most {MAX_PARALLEL_SAMPLES} parallel samples per "
                         "request")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        if policy == "freekv":
            raise ValueError(f"n={n!r}: must be an integer >= 1")
    return None


def _check_chat(result: Any, self: Any, request: Any, *args: Any, **kwargs: Any) -> str | None:
    policy, _ = policy_of()
    if result is not None or policy != "freekv":
        return None
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(request, name, None)
        if isinstance(value, int) and value < 0:
            return f"{name}={value}: must be >= 0."
    return None


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(_VALIDATE, _check_request, HookType.BEFORE)
    HookRegistry.register(_PARALLEL, _refuse_huge_n, HookType.AFTER)
    HookRegistry.register(_CHAT, _check_chat, HookType.AFTER)
