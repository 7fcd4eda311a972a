"""Wan Text Encode: prompt + negative prompt -> UMT5 embeddings (stage `T5_Encoding`).

Before encoding, the encoder is put where it runs with a memory check (`memory.prepare_text_encoder`:
its GPU when it fits after other models moved off, else the CPU for device "auto"); it stays there
afterwards, listed with ComfyUI's memory manager, which moves it off when the DiT needs the room.
"""

from __future__ import annotations

from typing import Any

from ..wan_core.config import T5_ENCODE_STAGE
from . import memory
from . import types as T
from .profiler_handle import maybe_profile
from .validation import check_prompt, first_problem, raise_problems

MAX_PROMPT_CHARS = 20000


class WanTextEncode:
    """Encodes the prompt and the negative prompt (empty negative = Wan's default negative prompt)."""

    CATEGORY = T.CATEGORY
    RETURN_TYPES = (T.TEXT_EMBEDS,)
    RETURN_NAMES = ("text_embeds",)
    FUNCTION = "encode"
    RECORDS_STAGES = True  # the workflow observer leaves its stages to the node (maybe_profile)
    DESCRIPTION = "UMT5 embeddings of the prompt and the negative prompt, for Wan Sampler."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "text_encoder": (T.TEXT_ENCODER, {"tooltip": "From Wan Text Encoder Loader."}),
                "prompt": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "What the video shows. Text beyond 512 tokens is cut.",
                    },
                ),
                "negative_prompt": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "What to avoid. Empty = Wan's default negative "
                        "prompt (as in the official pipelines).",
                    },
                ),
            },
            "optional": dict(T.PROFILER_INPUT),
            "hidden": dict(T.HIDDEN_IDS),
        }

    @classmethod
    def VALIDATE_INPUTS(cls, prompt: str | None = None) -> bool | str:
        # Only `prompt` (the message lands on it); the negative prompt is checked when the node runs.
        return first_problem(check_prompt("prompt", prompt, max_chars=MAX_PROMPT_CHARS))

    def encode(
        self,
        text_encoder: Any,
        prompt: str,
        negative_prompt: str,
        profiler: Any = None,
        unique_id: str | None = None,
    ) -> tuple[T.TextEmbeds]:
        raise_problems(check_prompt("prompt", prompt, max_chars=MAX_PROMPT_CHARS), _check_negative(negative_prompt))
        with maybe_profile(profiler, unique_id, [T5_ENCODE_STAGE]):  # encode_pair traces T5_Encoding itself
            facts = memory.prepare_text_encoder(text_encoder)
            context, context_null = text_encoder.encode_pair(prompt, negative_prompt, stage_facts=facts)
        return (
            T.TextEmbeds(
                context=[context], context_null=[context_null], prompt=prompt, negative=negative_prompt
            ),
        )


def _check_negative(value: object) -> str | None:
    """The negative prompt may be empty (Wan's default negative prompt is used) but not too long."""
    if not isinstance(value, str):
        return f"negative_prompt must be text; got {type(value).__name__}"
    if len(value) > MAX_PROMPT_CHARS:
        return (
            f"negative_prompt is {len(value)} characters; at most {MAX_PROMPT_CHARS} "
            "(only 512 tokens are used); shorten it"
        )
    return None
