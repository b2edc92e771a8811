"""`Caps`: what an upstream model accepts (SPEC §9 `models.<name>.caps`), read by converters.

Owns the flags and their defaults only; converters decide what each flag changes, never by model
name. Imports nothing of the app (config imports it).
"""

from __future__ import annotations

from dataclasses import dataclass

THINKING_MODES = ("budget", "adaptive", "none")


@dataclass(frozen=True, slots=True)
class Caps:
    """Per-model capabilities. Defaults describe a Claude 4.5-class model (everything accepted).

    - `max_output_tokens`: the model's output ceiling; a larger `max_tokens` is clamped to it
      (None: no clamp).
    - `thinking`: how `reasoning_effort` is sent. "budget" = `thinking: {type: enabled,
      budget_tokens}`; "adaptive" = `thinking: {type: adaptive}` + `output_config.effort`;
      "none" = the model cannot think, so a `reasoning_effort` other than "none" is a 400.
    - `sampling_params`: False drops `temperature`, `top_p` and `top_k` (models that refuse
      non-default sampling).
    - `prefill`: False makes a conversation ending with an assistant message a 400 (the model
      rejects prefill) instead of sending it as a prefill.
    - `forced_tool_choice`: False makes `tool_choice` "required" or a named function a 400, and
      forbids emulating `response_format` with a forced tool.
    - `structured_outputs`: True sends `response_format` json_schema as `output_config.format`;
      False emulates it with a forced tool whose input becomes the answer's content.
    - `expose_reasoning`: True asks for summarized thinking (`thinking.display: "summarized"`)
      when thinking is on, for models whose default is to omit it.
    """

    max_output_tokens: int | None = None
    thinking: str = "budget"
    sampling_params: bool = True
    prefill: bool = True
    forced_tool_choice: bool = True
    structured_outputs: bool = True
    expose_reasoning: bool = False

    def __post_init__(self) -> None:
        if self.thinking not in THINKING_MODES:
            raise ValueError(f"thinking must be one of {', '.join(THINKING_MODES)}")
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise ValueError("max_output_tokens must be at least 1")


DEFAULT_CAPS = Caps()
