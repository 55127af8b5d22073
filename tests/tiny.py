"""Tiny models and calls that several test files share: a CLIP text encoder small enough to
build in milliseconds, and a seeded 64² image of a built-in tiny pipeline."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import CLIPTextConfig, CLIPTextModel


def tiny_clip() -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        bos_token_id=0,
        eos_token_id=1,
    )
    return CLIPTextModel(config).eval()


def tiny_image(pipe: Any) -> np.ndarray:
    """ "a cat" at 64², 2 steps, seed 0, as a numpy array."""
    with torch.no_grad():
        output = pipe(
            prompt="a cat",
            num_inference_steps=2,
            width=64,
            height=64,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        )
    return np.asarray(output.images)
