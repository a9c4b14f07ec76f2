"""Request checks of a FreeKV server (tokenizer manager, launcher process).

Changes (only when ``--kv-policy freekv`` is active):
- ``TokenizerManager._validate_one_request`` (BEFORE): an empty prompt (no input ids and no
  embeddings or multimodal data) is refused with a ``ValueError``, which SGLang answers with
  HTTP 400. SGLang 0.5.23 schedules such a request and its scheduler then crashes in the
  model's forward (a 0-token reshape in the rotary embedding), taking the server down.
"""

from __future__ import annotations

from typing import Any

from sglang_freekv.patches.server_args import policy_of

_VALIDATE = "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request"
TARGETS = (_VALIDATE,)


def _refuse_empty_prompt(self: Any, obj: Any, input_ids: Any, *args: Any,
                         **kwargs: Any) -> None:
    policy, _ = policy_of()
    if policy != "freekv":
        return None
    has_other = any(getattr(obj, name, None) is not None
                    for name in ("input_embeds", "image_data", "video_data", "audio_data"))
    if input_ids is not None and len(input_ids) == 0 and not has_other:
        raise ValueError("The prompt is empty: send at least one input token (text or "
                         "input_ids).")
    return None


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(_VALIDATE, _refuse_empty_prompt, HookType.BEFORE)
