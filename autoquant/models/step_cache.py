"""Step caching: which denoisers diffusers can cache between steps, and the one cache autoquant
offers, diffusers' first-block cache (hooks/first_block_cache.py). It runs the denoiser's first
transformer block at every step and skips the others while that block's residual changed by
less than the threshold (mean |r_t - r_prev| / mean |r_prev|) since the last step computed in
full, reusing their cached residual instead. It is lossy, so it is opt-in (planner.cache) and
never chosen by the planner; the bench measures what it costs in fidelity (docs/benchmarks.md).
"""

from __future__ import annotations

from autoquant.models.types import ModelInventory

STEP_CACHES = ("none", "first-block")
# Denoiser classes of diffusers 0.42.1 that take enable_cache (models/cache_utils.py CacheMixin)
# with a FirstBlockCacheConfig: their blocks are in hooks/_helpers.py's TransformerBlockRegistry.
# UNets (SD 1.5, SDXL) and SD3's transformer have no enable_cache. tests/test_step_cache.py checks
# the list against the installed diffusers.
FIRST_BLOCK_CACHE_DENOISERS = frozenset(
    {"FluxTransformer2DModel", "Flux2Transformer2DModel", "QwenImageTransformer2DModel"}
)


# Why a cached denoiser is never compiled: diffusers 0.42.1's skip test
# (FBCHeadBlockHook._should_compute_remaining_blocks) is torch.compiler.disable'd, and
# fullgraph=True stops there ("Skip inlining `torch.compiler.disable()`d function",
# builtin:tiny-flux on the CPU).
NOT_COMPILED = "torch.compile(fullgraph=True) cannot trace the cache's skip test"


def first_block_cache_refusal(
    inventory: ModelInventory, asked_by: str = "--cache first-block"
) -> str | None:
    """Why ``inventory``'s denoiser cannot take a first-block cache, or None when it can;
    ``asked_by`` names what asked for it (a flag, a bench extra)."""
    denoiser = inventory.denoiser.class_name
    if denoiser in FIRST_BLOCK_CACHE_DENOISERS:
        return None
    able = ", ".join(sorted(FIRST_BLOCK_CACHE_DENOISERS))
    return (
        f"{asked_by}: {inventory.source.spec}'s denoiser ({denoiser}) has no "
        f"first-block cache in diffusers; it works on {able} (e.g. builtin:flux-dev, "
        "builtin:tiny-flux)"
    )
