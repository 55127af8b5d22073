"""What a run's report says its figures are: the generation's own step time apart from the smoke
test's, and the estimated peak beside the measured one in the same scope, with the overhead
outside it named separately."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from machines import made_up_machine

from autoquant.cli.main import StepClock
from autoquant.cli.outputs import report_markdown
from autoquant.core.units import format_bytes
from autoquant.execute.ladder import Attempt, Result
from autoquant.models import inventory, resolve
from autoquant.planner import plan
from autoquant.planner.estimate import CPU_RUNTIME_BYTES, CUDA_CONTEXT_BYTES


def test_step_clock_times_whole_steps_and_starts_over_on_a_retry() -> None:
    times = iter([10.0, 10.5, 11.5, 12.0, 20.0, 20.2, 20.5])
    clock = StepClock(clock=lambda: next(times))
    state = {"latents": object()}
    for step in range(4):
        assert clock(None, step, None, state) is state  # the pipeline gets its tensors back
    assert clock.step_seconds() == 0.5  # the median of 0.5, 1.0 and 0.5
    for step in range(3):  # generate() called the pipeline again after an OOM
        clock(None, step, None, state)
    assert clock.step_seconds() == pytest.approx(0.25)  # 0.2 and 0.3: the retry's steps only


def test_step_clock_has_no_step_time_for_one_step() -> None:
    clock = StepClock(clock=lambda: 1.0)
    clock(None, 0, None, {})
    assert clock.step_seconds() is None


def _result(device: str) -> Result:
    machine = (
        made_up_machine(device="cuda", vram=24 * 10**9) if device == "cuda" else made_up_machine()
    )
    model = inventory(resolve("builtin:tiny-sd"))
    the_plan = plan(machine, model)
    chosen = the_plan.chosen
    attempt = Attempt(
        chosen.tier.backend,
        chosen.tier.precision,
        chosen.label,
        outcome="chosen",
        load_seconds=2.5,
        weights_bytes=300 * 2**20,
        peak_bytes=700 * 2**20,
        step_seconds=1.131,
        smoke_seconds=2.4,
        estimate_bytes=chosen.estimate.required_bytes,
    )
    # report() reads the plan and the attempts only: no pipeline is needed.
    return Result(None, the_plan, machine, model, Path("."), 0, [attempt])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("device", "scope", "overhead", "overhead_bytes"),
    [
        ("cuda", "allocator", "CUDA context", CUDA_CONTEXT_BYTES),
        ("cpu", "process resident set", "CPU runtime", CPU_RUNTIME_BYTES),
    ],
)
def test_the_estimated_peak_is_in_the_measured_peaks_scope(
    device: str, scope: str, overhead: str, overhead_bytes: int
) -> None:
    result = _result(device)
    report = result.report()
    measured, estimate = report["measured"], report["estimate"]
    planned = result.chosen.estimate
    allocator_peak = max(planned.peak_bytes, planned.load_peak_bytes)
    assert measured["peak_scope"] == scope and measured["peak_bytes"] == 700 * 2**20
    assert estimate["allocator_peak_bytes"] == allocator_peak
    assert (estimate["overhead"], estimate["overhead_bytes"]) == (overhead, overhead_bytes)
    assert estimate["required_bytes"] == allocator_peak + overhead_bytes
    # The allocator's peak leaves the CUDA context out; a process's resident set holds its
    # runtime: each is compared with the estimate of the same thing.
    in_scope = allocator_peak if scope == "allocator" else allocator_peak + overhead_bytes
    assert estimate["peak_bytes"] == in_scope
    assert "estimate_bytes" not in measured  # an estimate is not a measurement
    # The smoke test's step only under its own name: a bare "step_seconds" read as the run's.
    assert measured["smoke_step_seconds"] == 1.131 and "step_seconds" not in measured


def _with_generation(report: dict[str, Any]) -> dict[str, Any]:
    generation = {"steps": 20, "width": 64, "height": 64, "seconds": 1.98, "step_seconds": 0.08}
    return {**report, "generation": generation}


def test_report_md_names_each_figure() -> None:
    report = _with_generation(_result("cuda").report())
    estimate = report["estimate"]
    markdown = report_markdown(report)
    assert "- Generation: 20 steps at 64x64, step: 0.080 s, in all: 1.980 s" in markdown
    assert "- Smoke test: step: 1.131 s, in all: 2.400 s; load: 2.500 s" in markdown
    assert (
        f"- Peak memory (allocator, load + smoke test): measured {format_bytes(700 * 2**20)}, "
        f"estimated {format_bytes(estimate['allocator_peak_bytes'])}; after load: 300.0 MiB"
    ) in markdown
    assert (
        f"- Estimated need: {format_bytes(estimate['required_bytes'])} = "
        f"{format_bytes(estimate['allocator_peak_bytes'])} allocator peak + "
        f"{format_bytes(CUDA_CONTEXT_BYTES)} CUDA context"
    ) in markdown


def test_report_md_of_a_one_step_generation_has_no_step_time() -> None:
    report = _with_generation(_result("cpu").report())
    report["generation"]["step_seconds"] = None
    assert "step: —, in all: 1.980 s" in report_markdown(report)
