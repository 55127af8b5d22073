"""Group offload streams text encoders block by block, not whole (checked on the CPU, where
onloading is a no-op: the grouping is what is under test)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from tiny import tiny_clip
from transformers import T5Config, T5EncoderModel

from autoquant.execute.build import enable_group_offload
from autoquant.models.groups import modules_above_blocks


def _group_hook(module: torch.nn.Module) -> object | None:
    registry = getattr(module, "_diffusers_hook", None)
    return registry.get_hook("group_offloading") if registry is not None else None


def _encoders() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    t5 = T5EncoderModel(
        T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4)
    )
    clip = tiny_clip()
    return {"text_encoder": clip.eval(), "text_encoder_2": t5.eval()}


def test_the_path_down_to_the_blocks_is_named() -> None:
    encoders = _encoders()
    assert modules_above_blocks(encoders["text_encoder_2"]) == ["encoder"]  # encoder.block
    assert modules_above_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2))) is None
    assert modules_above_blocks(torch.nn.Linear(2, 2)) is None


def test_each_encoder_layer_is_its_own_group_and_outputs_are_unchanged() -> None:
    encoders = _encoders()
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        before = {name: model(ids).last_hidden_state for name, model in encoders.items()}
    enable_group_offload(SimpleNamespace(components=encoders), torch.device("cpu"), streams=False)

    t5 = encoders["text_encoder_2"]
    blocks = list(t5.encoder.block)  # type: ignore[union-attr]
    # One group per block: streamed, where the pipeline's own call onloaded the encoder whole.
    assert all(_group_hook(block) is not None for block in blocks)
    layers = [m for m in encoders["text_encoder"].modules() if isinstance(m, torch.nn.ModuleList)]
    assert layers and all(_group_hook(layer) is not None for layer in layers[0])
    with torch.no_grad():
        for name, model in encoders.items():
            assert torch.equal(model(ids).last_hidden_state, before[name])
