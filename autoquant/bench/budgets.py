"""Budgets: which measured tiers fit each VRAM budget, what the planner chose there, and how its
choice compares with the fastest tier that fits in the same fidelity class or a better one
(planner/fidelity.py).

Budgets are in GB = 10^9 bytes, as ``--vram 8GB`` reads them (a card sold as "8 GB").
"""

from __future__ import annotations

from typing import Any

from autoquant.backends.tier import Tier
from autoquant.bench import TierSpec
from autoquant.core.errors import AutoquantError
from autoquant.core.units import GB
from autoquant.models.types import ModelInventory
from autoquant.planner.estimate import CUDA_CONTEXT_BYTES, Estimate, Request, estimate
from autoquant.planner.fidelity import fidelity_class, fidelity_rank
from autoquant.planner.plan import compile_weight, plan
from autoquant.probe.emulate import emulate
from autoquant.probe.types import HardwareProfile

DEFAULT_BUDGETS = "4,6,8,12,16,24,48,80"

GPU_FIT_RULE = (
    "a tier fits a budget when its measured peak (the higher of the load and run peaks in the "
    "CUDA allocator) plus 0.65 GiB of CUDA context is at most the budget"
)
CPU_FIT_RULE = (
    "CPU run (no CUDA GPU): there is no GPU memory cap to emulate, so a tier 'fits' a budget "
    "when the planner's GPU estimate for it (required bytes, 0.65 GiB CUDA context included) is "
    "at most the budget — an estimate, not a measurement; the plan is for an emulated CUDA GPU "
    "of that size, so it may choose tiers that cannot run on this CPU (bitsandbytes)"
)


def parse_budgets(text: str) -> list[float]:
    """``4,6,8`` → [4.0, 6.0, 8.0] (GB), sorted, duplicates dropped."""
    budgets: set[float] = set()
    for item in text.split(","):
        item = item.strip().removesuffix("GB").removesuffix("gb")
        try:
            value = float(item)
        except ValueError:
            raise AutoquantError(
                f"--budgets {text!r}: write numbers in GB (10^9 bytes), e.g. 4,6,8,12"
            ) from None
        if value <= 0:
            raise AutoquantError(f"--budgets {text!r}: every budget must be greater than zero")
        budgets.add(value)
    return sorted(budgets)


def record_tier(record: dict[str, Any]) -> Tier:
    return Tier.from_dict(record["tier"])


def fit_bytes(record: dict[str, Any], inventory: ModelInventory, on_cuda: bool) -> int | None:
    """The memory a tier needs on a card of the budget's size (see GPU_FIT_RULE/CPU_FIT_RULE);
    None for a tier that did not run."""
    if record.get("status") != "ok":
        return None
    if on_cuda:
        peak = max(record["peak_bytes"], record["load_peak_bytes"] or 0)
        return int(peak + CUDA_CONTEXT_BYTES)
    return record_estimate(record, inventory, on_gpu=True).required_bytes


def record_estimate(record: dict[str, Any], inventory: ModelInventory, *, on_gpu: bool) -> Estimate:
    """Today's estimate for the tier and request a measured record ran."""
    return estimate(inventory, record_tier(record), Request(**record["request"]), on_gpu=on_gpu)


def _fits(need: int | None, limit: int) -> bool:
    return need is not None and need <= limit


def _rank(record: dict[str, Any]) -> int:
    """The fidelity class of the record's tier, 0 the best: the classes the planner chooses by,
    so that the comparison asks the question the objective answers."""
    return fidelity_rank(fidelity_class(record_tier(record)))


def _latency(record: dict[str, Any], compile_weight: float) -> float | None:
    """End-to-end seconds of the tier's generation: what a user waits for. The denoiser's step
    latency hides offloading (the UNet stays resident through the steps) and moves with the host
    CPU between processes on a fast card, so plans are compared on whole generations. A compiled
    tier's generation (timed after its compile) carries the compile's share the planner ranks it
    with (planner/plan.py compile_weight)."""
    seconds = record.get("e2e_seconds")
    if not seconds:
        return None
    return float(seconds) + float(record.get("compile_seconds") or 0.0) * compile_weight


def _measured_as(chosen: TierSpec, records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The measured tier that is the plan's choice: the same spec, else the same spec but for
    VAE slicing/tiling (they change only the decode)."""
    for record in records:
        if record["spec"] == chosen.name:
            return record
    for record in records:
        if TierSpec.parse(record["spec"]).without_vae_options() == chosen.without_vae_options():
            return record
    return None


def budget_rows(
    records: list[dict[str, Any]],
    budgets_gb: list[float],
    *,
    inventory: ModelInventory,
    profile: HardwareProfile,
    settings: dict[str, Any],
    request: Request,
    on_cuda: bool,
) -> list[dict[str, Any]]:
    """One row per budget: the tiers that fit, the plan's choice and its latency ratio."""
    needs = {r["spec"]: fit_bytes(r, inventory, on_cuda) for r in records}
    rows = []
    for budget in budgets_gb:
        limit = int(budget * GB)
        fitting = [r for r in records if _fits(needs[r["spec"]], limit)]
        row: dict[str, Any] = {
            "budget_gb": budget,
            "fits": [r["spec"] for r in fitting],
            "edge": None,
            "plan": None,
            "plan_error": None,
            "plan_measured_as": None,
            "plan_fits_measured": None,
            "plan_e2e_seconds": None,
            "best": None,
            "best_e2e_seconds": None,
            "latency_ratio": None,
        }
        if fitting:
            row["edge"] = max(fitting, key=lambda r: needs[r["spec"]] or 0)["spec"]
        try:
            card = emulate(profile, vram=limit, device="cuda")
            the_plan = plan(card, inventory, settings, request)
        except AutoquantError as err:
            row["plan_error"] = str(err)
            rows.append(row)
            continue
        chosen = TierSpec.of_tier(the_plan.chosen.tier)
        row["plan"] = {
            "spec": chosen.name,
            "label": the_plan.chosen.label,
            "estimate_bytes": the_plan.chosen.estimate.required_bytes,
            "predicted_seconds": the_plan.chosen.latency.seconds
            if the_plan.chosen.latency
            else None,
            "fidelity": the_plan.chosen.fidelity,
            "path": list(the_plan.path),
        }
        measured = _measured_as(chosen, records)
        if measured is not None:
            row.update(_compare(measured, fitting, compile_weight(settings, request.batch)))
        rows.append(row)
    return rows


def _compare(
    measured: dict[str, Any], fitting: list[dict[str, Any]], compile_weight: float
) -> dict[str, Any]:
    """The plan's tier against the fastest fitting tier of its fidelity class or a better one
    whose generation ran as many steps, compiled tiers at their compile's share. Tiers with a
    first-block cache lose more than their class says: they are compared only with the plan's
    tier when it has one too (planner.cache asked for it)."""
    latency = _latency(measured, compile_weight)
    out: dict[str, Any] = {
        "plan_measured_as": measured["spec"],
        "plan_fits_measured": measured in fitting,
        "plan_e2e_seconds": latency,
    }
    if latency is None:
        return out
    # Whole generations compare only at one step count (calls may have run different ones).
    timed = {
        r["spec"]: t
        for r in fitting
        if (t := _latency(r, compile_weight)) is not None
        and _rank(r) <= _rank(measured)
        and r["request"]["steps"] == measured["request"]["steps"]
        and (record_tier(r).first_block_cache is None or record_tier(measured).first_block_cache)
    }
    if timed:
        best = min(timed, key=timed.__getitem__)
        out["best"] = best
        out["best_e2e_seconds"] = timed[best]
        out["latency_ratio"] = latency / timed[best]
    return out


def planned_tiers(
    profile: HardwareProfile,
    inventory: ModelInventory,
    settings: dict[str, Any],
    request: Request,
    budgets_gb: list[float],
) -> list[TierSpec]:
    """Every plan of the planner's ladder at each budget (a card of that size emulated on this
    machine's probe), in budget order, duplicates dropped: the plan space `--tiers planned`
    sweeps, so that each budget's choice and its fallbacks are measured beside the fixed tiers."""
    specs: list[TierSpec] = []
    for budget in budgets_gb:
        card = emulate(profile, vram=int(budget * GB), device="cuda")
        try:
            the_plan = plan(card, inventory, settings, request)
        except AutoquantError:
            continue  # nothing fits this budget
        for entry in the_plan.ladder:
            spec = TierSpec.of_tier(entry.tier)
            if spec not in specs:
                specs.append(spec)
    return specs


def confirm_targets(rows: list[dict[str, Any]]) -> list[tuple[float, str]]:
    """(budget, tier) pairs to rerun under a real cap: each budget's edge tier, once, at the
    smallest budget where it is the edge (the tightest test of it)."""
    seen: set[str] = set()
    targets = []
    for row in rows:
        edge = row["edge"]
        if edge and edge not in seen:
            seen.add(edge)
            targets.append((row["budget_gb"], edge))
    return targets
