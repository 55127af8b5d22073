"""Checks that need a CUDA GPU. CI has none: they skip there, and their GPU evidence is
committed under docs/runs/ (scripts/gpu_checks.sh). On a GPU machine they run with the suite."""

from __future__ import annotations

import pytest
import torch

from autoquant.execute.tuning import TuneOptions, tune

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_bitsandbytes_nf4_runs_on_the_gpu() -> None:
    result = tune(
        TuneOptions(
            model="builtin:tiny-sd",
            backend="bitsandbytes",
            precision="nf4",
            progress=False,
            use_cache=False,
        )
    )
    assert result.chosen.tier.backend == "bitsandbytes" and result.plan.device.startswith("cuda")
    assert result.attempts[-1].peak_bytes and result.attempts[-1].peak_bytes > 0


def test_a_cap_below_the_first_tier_falls_back_in_process() -> None:
    result = tune(
        TuneOptions(
            model="builtin:sd15",
            backend="none",
            precision="fp32",
            vram_limit="2GB",
            progress=False,
            use_cache=False,
            width=256,
            height=256,
        )
    )
    first = result.attempts[0]
    assert (first.outcome, first.phase) == ("oom", "load")
    assert result.attempts[-1].outcome == "chosen"
    assert (first.memory_after_free_bytes or 0) < 64 * 2**20
