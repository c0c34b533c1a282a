"""An answer's decoding settings as a backend reads them, derived from GenerationParams in one place
(as vLLM's CompletionRequest.to_sampling_params). Every backend path starts here: the local model's
GenerationConfig, the batch's, transformers serve's generation_config and an OpenAI-compatible
request. No torch: the front end of an inference server uses it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..prompt import BOS, PAD, STOP_IDS
from ..settings import GenerationParams


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    do_sample: bool = False
    # Set only when sampling: greedy decoding (the paper's) reads none of them.
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # 0: off
    repetition_penalty: float = 1.0  # 1: none
    # The seed the caller chose; None when greedy, or when each answer should draw its own.
    seed: int | None = None
    # Orca 2 ends its turn with <|im_end|>; </s> and a new <|im_start|> end it too.
    stop_ids: tuple[int, ...] = STOP_IDS

    @classmethod
    def of(cls, params: GenerationParams) -> Sampling:
        if not params.do_sample:
            return cls(params.max_new_tokens, repetition_penalty=params.repetition_penalty)
        return cls(
            params.max_new_tokens,
            do_sample=True,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            repetition_penalty=params.repetition_penalty,
            seed=params.seed,
        )

    @property
    def batchable(self) -> bool:
        """Whether the batch can answer exactly as generate alone would: its sampling and seed are
        shared by the whole batch and it has no repetition penalty, so only plain greedy qualifies."""
        return not self.do_sample and self.repetition_penalty == 1.0

    def transformers_config(self) -> dict[str, Any]:
        """transformers' GenerationConfig fields: the local model's, the batch's, and transformers
        serve's generation_config (which replaces the model's own, whose do_sample=False would
        otherwise ignore the temperature)."""
        config: dict[str, Any] = dict(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            repetition_penalty=self.repetition_penalty,
            bos_token_id=BOS,
            eos_token_id=list(self.stop_ids),
            pad_token_id=PAD,
        )
        if self.do_sample:
            config.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return config
