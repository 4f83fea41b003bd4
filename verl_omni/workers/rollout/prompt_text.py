"""A request's prompt as text, for every rollout backend: servers take prompt text or the tokenizer's ids."""

from __future__ import annotations

import numbers
from typing import Any


def prompt_text(prompt_ids: Any, tokenizer: Any) -> str:
    """The prompt as text: a string as is, token ids decoded with ``tokenizer`` (the pipeline's first one).

    Raises ``ValueError`` naming the bad value for anything else, or for ids outside the tokenizer's vocabulary.
    """
    if isinstance(prompt_ids, str):
        return prompt_ids
    if hasattr(prompt_ids, "tolist") and not isinstance(prompt_ids, list | tuple):  # torch / numpy arrays
        prompt_ids = prompt_ids.tolist()
    if not isinstance(prompt_ids, list | tuple):
        raise ValueError(f"prompt_ids={prompt_ids!r} must be the prompt text (str) or a list of token ids")
    vocab = len(tokenizer)
    for i, tok in enumerate(prompt_ids):
        if not isinstance(tok, numbers.Integral) or isinstance(tok, bool) or not 0 <= int(tok) < vocab:
            raise ValueError(f"prompt_ids[{i}]={tok!r} is not a token id of the model's tokenizer (size {vocab})")
    return tokenizer.decode([int(t) for t in prompt_ids], skip_special_tokens=True)
