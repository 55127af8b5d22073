"""How block-level group offload splits a component into groups (diffusers'
hooks/group_offloading.py), shared by the executor, which applies it, and the inventory, which
counts what of each component is on the device at once.

diffusers groups each ModuleList/Sequential among a module's direct children block by block and
puts everything else (the "unmatched" children and the module's own parameters) in one group,
onloaded for the module's whole forward. It recurses only into the children named in
``block_modules``; a diffusers model names its own (``_group_offload_block_modules``, the VAE's
encoder and decoder). transformers' text encoders keep their layers deeper
(T5EncoderModel.encoder.block), so autoquant names the modules on the way down: without that an
encoder is one group, onloaded whole (Flux-dev's int8 T5, 4.9 GB, set a group-offload tier's
peak at 5.18 GB on an H200; streamed, the tier peaked at 0.81 GB).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def _is_block_list(module: nn.Module) -> bool:
    from torch import nn

    return isinstance(module, (nn.ModuleList, nn.Sequential))


def modules_above_blocks(module: nn.Module) -> list[str] | None:
    """Names of the submodules between ``module`` and its shallowest ModuleList/Sequential of
    blocks (None: the blocks are direct children, or there are none)."""
    level: list[tuple[nn.Module, list[str]]] = [(module, [])]
    while level:
        deeper = []
        for parent, path in level:
            for name, child in parent.named_children():
                if _is_block_list(child):
                    return path or None
                deeper.append((child, [*path, name]))
        level = deeper
    return None


def block_modules(module: nn.Module, library: str) -> list[str] | None:
    """The ``block_modules`` group offload runs with for this component."""
    if library == "diffusers":
        return getattr(module, "_group_offload_block_modules", None)
    return modules_above_blocks(module)


def resident_params(module: nn.Module, library: str) -> tuple[int, int]:
    """Parameters on the device during a forward under block-level group offload, one block per
    group: without streams, and with them (diffusers' use_stream).

    Without: every unmatched group on the way down (each onloaded for its module's whole forward)
    plus one block. In a transformer, of the blocks' mean size: every block sees the same
    activations, so the peak comes in whichever runs, and most of Flux's blocks are its 38 single
    blocks, a third the size of its 19 double ones. Measured on an H200 (Flux-dev, torchao int8):
    0.81 GB peak against 0.80 estimated this way (0.93 with the largest block). In a UNet (one
    with ``up_blocks``), the largest: its down blocks' skip activations stay alive through the up
    blocks, so the peak comes with its largest, low-resolution up block on the device. Measured
    on an H200 (SDXL, torchao int8 with text encoders, 1024²): 2.13 GB peak against 1.27 GB with
    the mean block (docs/runs/2026-12-01-h200-sweep/sdxl/).

    With streams: the unmatched groups plus the two largest blocks, the one running and the next
    being copied beside it. Measured on an H200, bf16 at 1024²: SDXL's UNet (whose up_blocks[0]
    holds 1.2 B of its 2.6 B parameters) peaked at 5.11 GB against 5.14 estimated this way;
    Flux-dev's transformer at 1.89 GB against 2.02 (docs/runs/2026-12-01-h200-speed/).

    Tied parameters count once."""
    recurse_into = set(block_modules(module, library) or ())
    counted: set[int] = set()
    blocks: list[int] = []

    def count(params: list[nn.Parameter]) -> int:
        fresh = [p for p in params if id(p) not in counted]
        counted.update(id(p) for p in fresh)
        return sum(p.numel() for p in fresh)

    def always_on(node: nn.Module) -> int:
        total = count(list(node.parameters(recurse=False)))
        for name, child in node.named_children():
            if name in recurse_into:
                total += always_on(child)
            elif _is_block_list(child):
                blocks.extend(count(list(block.parameters())) for block in child.children())
            else:
                total += count(list(child.parameters()))
        return total

    always = always_on(module)
    if not blocks:
        return always, always
    one_block = max(blocks) if hasattr(module, "up_blocks") else sum(blocks) // len(blocks)
    return always + one_block, always + sum(sorted(blocks)[-2:])
