"""`autoquant bench`: measure every tier in its own process, then judge every VRAM budget.

    autoquant bench --model builtin:sdxl --tiers all --budgets 4,6,8,12 \\
        --out bench-sdxl [--size 1024x1024 --batch 1 --steps 4 --repeats 10] [--resume] \\
        [--compile] [--confirm] [--run-plan] [--time-limit SECONDS] [--report-only]

The reference tier (bf16 on a GPU, fp32 on the CPU) runs first: the others are compared with
it. Each tier's JSON lands in OUT/tiers/ as soon as it finishes and the reports are rewritten
after every tier, so a killed sweep keeps what it measured; --resume skips tiers whose JSON
exists. A tier whose process crashes or times out is recorded as that tier's error.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoquant.backends import UNQUANTIZED, backend_classes
from autoquant.bench import TierSpec, bench_device, parse_tier_list
from autoquant.bench.budgets import (
    CPU_FIT_RULE,
    DEFAULT_BUDGETS,
    GB,
    GPU_FIT_RULE,
    budget_rows,
    confirm_targets,
    fit_bytes,
    parse_budgets,
    planned_tiers,
    record_estimate,
    record_tier,
)
from autoquant.bench.report import write_reports
from autoquant.bench.tier_run import TIERS_DIR, estimate_error_pct, tier_result_path
from autoquant.cli.args import positive_int, width_height
from autoquant.core.console import progress_log
from autoquant.core.errors import AutoquantError
from autoquant.core.fsutil import write_text_atomic
from autoquant.models.step_cache import first_block_cache_refusal
from autoquant.models.types import ModelInventory
from autoquant.planner.estimate import CUDA_CONTEXT_BYTES, Request
from autoquant.planner.fidelity import fidelity_class
from autoquant.planner.latency import predict
from autoquant.probe.types import HardwareProfile

DEFAULT_OUT = Path("autoquant-bench")
# A tier started with less time than this left would only be killed at the time limit.
MIN_TIER_SECONDS = 30
CONFIRM_REPEATS = 3
# One JSON per --confirm / --run-plan entry under OUT (the children's own outputs beside them).
CONFIRM_DIR = "confirm"
RUNS_DIR = "runs"
_TAIL_LINES = 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    from autoquant.execute.tuning import DEFAULT_MODEL

    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help="default: %(default)s")
    p.add_argument(
        "--tiers",
        default="all",
        help="a list of: all (every backend/precision usable here, per the probe), planned "
        "(every plan of the planner's ladder at each budget), or tiers like "
        "none:bf16,gguf:q4_0,quanto:int8+te,none:bf16+model_cpu_offload; extras: te "
        "(quantized text encoders), compile, compile=SCOPE[:MODE] (regional|whole and a "
        "torch.compile mode), vae_slicing, vae_tiling, attention_slicing, model_cpu_offload, "
        "group_offload_streams, group_offload",
    )
    p.add_argument(
        "--budgets",
        default=DEFAULT_BUDGETS,
        help="VRAM budgets in GB = 10^9 bytes, as --vram reads them (default: %(default)s)",
    )
    p.add_argument(
        "--size", type=width_height, help="WIDTHxHEIGHT (default: the model's native size)"
    )
    p.add_argument("--batch", type=positive_int, default=1, help="images per prompt (default 1)")
    p.add_argument(
        "--steps", type=positive_int, default=4, help="steps of the timed generation (default 4)"
    )
    p.add_argument("--repeats", type=positive_int, default=10, help="timed denoiser forwards (10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="default: %(default)s")
    p.add_argument("--resume", action="store_true", help="skip tiers whose JSON exists")
    p.add_argument("--compile", action="store_true", help="torch.compile every tier's denoiser")
    p.add_argument(
        "--confirm", action="store_true", help="GPU: rerun each budget's edge tier under a cap"
    )
    p.add_argument(
        "--run-plan", action="store_true", help="GPU: `autoquant run` under each budget's cap"
    )
    p.add_argument(
        "--time-limit",
        type=float,
        help="seconds for the whole sweep: no tier starts after, a running one is killed",
    )
    p.add_argument(
        "--tier-timeout", type=float, default=1200.0, help="seconds one tier may take (1200)"
    )
    p.add_argument(
        "--report-only", action="store_true", help="rebuild the reports from OUT/tiers/*.json"
    )


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench", help="measure every tier at every VRAM budget; the plan against the sweep"
    )
    add_arguments(p)


_log = progress_log()  # the sweep always reports per tier; results go to OUT


@dataclass
class ChildOutcome:
    returncode: int
    timed_out: bool
    stdout: str
    tail: list[str]  # the last lines of stderr
    seconds: float


def run_child(command: list[str], timeout: float | None) -> ChildOutcome:
    """Run ``command`` in its own session, relaying its stderr as it comes; past ``timeout``
    kill its whole process group (a wedged CUDA call can ignore a plain SIGTERM)."""
    started = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    stdout: list[str] = []

    def relay_stderr() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            tail.append(line.rstrip())
            sys.stderr.write(f"    {line}")

    def collect_stdout() -> None:
        assert process.stdout is not None
        stdout.append(process.stdout.read())

    readers = [threading.Thread(target=f, daemon=True) for f in (relay_stderr, collect_stdout)]
    for reader in readers:
        reader.start()
    timed_out = False
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGKILL)
        returncode = process.wait()
    for reader in readers:
        reader.join(timeout=10)
    return ChildOutcome(
        returncode, timed_out, "".join(stdout), list(tail), time.monotonic() - started
    )


def selected_tiers(
    text: str,
    *,
    profile: HardwareProfile,
    inventory: ModelInventory,
    request: Request,
    budgets: list[float],
) -> list[TierSpec]:
    """`--tiers`: each item a tier spec, `all` (usable_tiers) or `planned` (planned_tiers, the
    plans the planner proposes at the budgets, less those that cannot run on this device), in
    the order given, duplicates dropped."""
    from autoquant.planner.rules import load_settings

    specs: list[TierSpec] = []
    for item in (i.strip() for i in text.split(",")):
        if item == "all":
            found = usable_tiers(profile)
        elif item == "planned":
            runs_here = set(usable_tiers(profile))
            found = [
                s
                for s in planned_tiers(profile, inventory, load_settings(), request, budgets)
                if dataclasses.replace(
                    s,
                    text_encoders=False,
                    memory_options=(),
                    encoders=None,
                    cpu_text_encoders=False,
                )
                in runs_here
                and (s.encoders is None or TierSpec.parse(s.encoders) in runs_here)
                and (profile.has_gpu or not s.offloaded)
            ]
        else:
            found = parse_tier_list(item) if item else []
        specs += [s for s in found if s not in specs]
    if not specs:
        raise AutoquantError(f"--tiers {text!r} names no tier that can run here")
    return specs


def usable_tiers(profile: HardwareProfile) -> list[TierSpec]:
    """`--tiers all`: every backend/precision the probe says can run here."""
    gpu = profile.primary_gpu if profile.has_gpu else None
    accelerator = profile.accelerator if gpu else "cpu"
    specs = []
    for backend in backend_classes():
        if backend.distribution and not profile.backend_usable(backend.distribution):
            continue
        for precision in backend.precisions:
            if not backend.refusal(accelerator, precision, fp8=bool(gpu and gpu.fp8)):
                specs.append(TierSpec(backend.name, precision))
    return specs


@dataclass
class _Sweep:
    args: argparse.Namespace
    profile: HardwareProfile
    device: str
    inventory: ModelInventory
    request: Request
    compute_dtype: str
    reference: TierSpec
    specs: list[TierSpec]  # the reference first
    budgets: list[float]
    deadline: float | None
    pending: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return Path(self.args.out)

    def time_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def child_timeout(self) -> tuple[float, bool]:
        """(seconds the next child may run, whether the time limit is what bounds it)."""
        left = self.time_left()
        if left is not None and left < self.args.tier_timeout:
            return left, True
        return self.args.tier_timeout, False


def _prepare(args: argparse.Namespace) -> _Sweep:
    from autoquant import models
    from autoquant.planner.plan import compute_dtype_for
    from autoquant.planner.rules import load_settings
    from autoquant.probe import probe

    started = time.monotonic()
    profile = probe()
    device = bench_device(profile)
    inventory = models.inventory(models.resolve(args.model))
    width, height = args.size or (inventory.default_size, inventory.default_size)
    request = Request(width=width, height=height, batch=args.batch, steps=args.steps)
    compute_dtype = compute_dtype_for(profile, load_settings()["planner"]["compute_dtype"])
    # The reference: bf16 (the card's compute dtype) on a GPU; fp32 on the CPU.
    reference = TierSpec(UNQUANTIZED, compute_dtype if device != "cpu" else "fp32")
    budgets = parse_budgets(args.budgets)
    specs = selected_tiers(
        args.tiers, profile=profile, inventory=inventory, request=request, budgets=budgets
    )
    if any(s.first_block_cache is not None for s in specs):
        refusal = first_block_cache_refusal(inventory, asked_by="+first_block_cache")
        if refusal:
            raise AutoquantError(refusal)
    if args.compile:  # a cached tier stays eager: it cannot be compiled (TierSpec.parse)
        specs = [
            dataclasses.replace(s, compile=True) if s.first_block_cache is None else s
            for s in specs
        ]
    return _Sweep(
        args=args,
        profile=profile,
        device=device,
        inventory=inventory,
        request=request,
        compute_dtype=compute_dtype,
        reference=reference,
        specs=[reference, *(s for s in specs if s != reference)],
        budgets=budgets,
        deadline=started + args.time_limit if args.time_limit else None,
    )


def _tier_command(
    sweep: _Sweep, spec: TierSpec, repeats: int, extra: Sequence[str] = ()
) -> list[str]:
    request = sweep.request
    return [
        sys.executable,
        "-m",
        "autoquant.bench.tier_run",
        "--model",
        sweep.args.model,
        "--spec",
        spec.name,
        "--out",
        str(sweep.out),
        "--size",
        f"{request.width}x{request.height}",
        "--batch",
        str(request.batch),
        "--steps",
        str(request.steps),
        "--repeats",
        str(repeats),
        "--seed",
        str(sweep.args.seed),
        *extra,
    ]


def _failure_record(sweep: _Sweep, spec: TierSpec, status: str, error: str) -> dict[str, Any]:
    """What stands for a tier whose process died before writing its JSON."""
    return {
        "spec": spec.name,
        "label": spec.name,
        "reference": spec == sweep.reference,
        "tier": spec.tier(sweep.inventory, sweep.compute_dtype).to_dict(),
        "compile": spec.compile,
        "device": sweep.device,
        "status": status,
        "phase": None,
        "error": error,
    }


def _outcome_error(outcome: ChildOutcome) -> str:
    last = next((line for line in reversed(outcome.tail) if line.strip()), "")
    return f"process exited with {outcome.returncode} after {outcome.seconds:.0f} s: {last}"


def _measure_tiers(sweep: _Sweep) -> None:
    sweep.pending = [s.name for s in sweep.specs]
    for spec in sweep.specs:
        path = tier_result_path(sweep.out, spec)
        if sweep.args.resume and path.exists():
            _log(f"{spec.name}: measured before ({path}), skipped (--resume)")
            sweep.pending.remove(spec.name)
            continue
        left = sweep.time_left()
        if left is not None and left < MIN_TIER_SECONDS:
            _log(f"time limit: {len(sweep.pending)} tier(s) not run: {', '.join(sweep.pending)}")
            return
        path.unlink(missing_ok=True)  # a stale result must not stand for this run's
        _log(f"{spec.name}: measuring …")
        extra = ["--reference"] if spec == sweep.reference else []
        timeout, by_deadline = sweep.child_timeout()
        outcome = run_child(_tier_command(sweep, spec, sweep.args.repeats, extra), timeout)
        _log(outcome.stdout.strip() or f"{spec.name}: exit {outcome.returncode}")
        if outcome.timed_out and by_deadline:
            # No JSON: --resume measures it again in the next call.
            _log(f"{spec.name}: stopped at the time limit after {outcome.seconds:.0f} s")
            return
        sweep.pending.remove(spec.name)
        if not path.exists():
            status, error = (
                ("timeout", f"killed after {outcome.seconds:.0f} s (--tier-timeout)")
                if outcome.timed_out
                else ("crashed", _outcome_error(outcome))
            )
            record = _failure_record(sweep, spec, status, error)
            write_text_atomic(path, json.dumps(record, indent=1) + "\n")
        _write(sweep)


def _load_records(sweep: _Sweep) -> list[dict[str, Any]]:
    """Every tier JSON in OUT/tiers: the reference first, then in --tiers order, then others
    (from earlier calls) by name."""
    records = {}
    for path in sorted((sweep.out / TIERS_DIR).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            _log(f"skipping unreadable {path}: {err}")
            continue
        records[record["spec"]] = record
    rank = {s.name: index for index, s in enumerate(sweep.specs)}

    def position(record: dict[str, Any]) -> tuple[bool, int, str]:
        spec = record["spec"]
        return (not record.get("reference"), rank.get(spec, len(rank)), spec)

    return sorted(records.values(), key=position)


def _bench(sweep: _Sweep) -> dict[str, Any]:
    from autoquant.planner.rules import load_settings

    records = _load_records(sweep)
    reference = next((r for r in records if r.get("reference")), None)
    # Plan for the machine the tiers ran on (a --report-only run may be elsewhere).
    probe_data = reference.get("probe") if reference else None
    profile = HardwareProfile.from_dict(probe_data) if probe_data else sweep.profile
    device = reference.get("device", sweep.device) if reference else sweep.device
    on_cuda = device == "cuda"  # measured peaks and real caps exist on CUDA only
    # What the tiers were measured at, which --report-only's flags need not repeat.
    measured_at = reference.get("request") if reference else None
    request = Request(**measured_at) if measured_at else sweep.request
    latency = (reference or {}).get("latency_ms")
    repeats = latency["repeats"] if latency else sweep.args.repeats
    settings = load_settings()
    tiers = []
    for record in records:
        row = {k: v for k, v in record.items() if k != "probe"}
        row["fit_bytes"] = fit_bytes(record, sweep.inventory, on_cuda)
        _refresh_estimate(row, sweep.inventory, profile)
        tiers.append(row)
    return {
        "schema": 1,
        "model": sweep.inventory.source.spec,
        "device": device,
        "request": request.to_dict(),
        "repeats": repeats,
        "seed": sweep.args.seed,
        "reference": reference["spec"] if reference else sweep.reference.name,
        "budgets_gb": sweep.budgets,
        "fit_rule": GPU_FIT_RULE if on_cuda else CPU_FIT_RULE,
        "notes": sweep.notes,
        "hardware": (reference or {}).get("hardware"),
        "probe": profile.to_dict(),
        "tiers": tiers,
        "pending": sweep.pending,
        "budgets": budget_rows(
            tiers,
            sweep.budgets,
            inventory=sweep.inventory,
            profile=profile,
            settings=settings,
            request=request,
            on_cuda=on_cuda,
        ),
        "confirm": _load_entries(sweep.out / CONFIRM_DIR),
        "run_plan": _load_entries(sweep.out / RUNS_DIR),
        "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }


def _refresh_estimate(
    row: dict[str, Any], inventory: ModelInventory, profile: HardwareProfile
) -> None:
    """The estimate and the predicted seconds of today's estimator and latency model: a report
    rebuilt with --report-only after a change compares the new figures with the old
    measurements. What the estimate missed by when the tier was measured stays in
    ``estimate_error_pct_when_measured``."""
    if "request" not in row:  # the tier's process died before it wrote its record
        return
    device = row["device"]
    est = record_estimate(row, inventory, on_gpu=device != "cpu")
    row["estimate"] = est.to_dict()
    latency = predict(inventory, record_tier(row), Request(**row["request"]), est, profile)
    row["predicted_seconds"] = latency.seconds if latency else None
    row["fidelity_class"] = fidelity_class(record_tier(row))
    error = estimate_error_pct(est, row, on_cuda=device == "cuda")
    if error is None:
        return
    if row.get("estimate_error_pct") is not None and abs(row["estimate_error_pct"] - error) > 0.05:
        row["estimate_error_pct_when_measured"] = row["estimate_error_pct"]
    row["estimate_error_pct"] = error


def _write(sweep: _Sweep) -> dict[str, Any]:
    bench = _bench(sweep)
    write_reports(sweep.out, bench)
    return bench


def _load_entries(folder: Path) -> list[dict[str, Any]]:
    """The --confirm or --run-plan entries in ``folder`` (one JSON each, so calls on different
    machines merge by unpacking their folders into one), by budget then tier."""
    entries = []
    for path in folder.glob("*.json"):
        try:
            entries.append(json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            _log(f"skipping unreadable {path}: {err}")
    return sorted(entries, key=lambda e: (e["budget_gb"], e.get("spec", "")))


def _save_entry(path: Path, entry: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(entry, indent=1) + "\n")


def _stopped_by_deadline(
    sweep: _Sweep, outcome: ChildOutcome, by_deadline: bool, flag: str, what: str
) -> bool:
    """A child the sweep's time limit killed did not fail: say so, record no entry.
    ``by_deadline``: whether the time limit, not --tier-timeout, bounded it when it started."""
    if outcome.timed_out and by_deadline:
        sweep.notes.append(
            f"{flag} stopped at the time limit during {what}, {outcome.seconds:.0f} s in"
        )
        return True
    return False


def _confirm(sweep: _Sweep, rows: list[dict[str, Any]]) -> None:
    """Rerun each budget's edge tier with the CUDA allocator capped at the budget less the
    CUDA context (which a real card of that size must also hold)."""
    for budget, name in confirm_targets(rows):
        left = sweep.time_left()
        if left is not None and left < MIN_TIER_SECONDS:
            sweep.notes.append(f"--confirm stopped at the time limit before {name} at {budget:g}")
            return
        spec = TierSpec.parse(name)
        cap = int(budget * GB) - CUDA_CONTEXT_BYTES
        stem = f"{budget:g}GB-{spec.file_stem}"
        entry_path = sweep.out / CONFIRM_DIR / f"{stem}.json"
        record_path = sweep.out / CONFIRM_DIR / "records" / f"{stem}.json"
        for stale in (entry_path, record_path):
            stale.unlink(missing_ok=True)
        _log(f"confirm {name} under a {budget:g} GB card ({cap / GB:.2f} GB allocator cap) …")
        extra = ["--no-fidelity", "--vram-cap", str(cap), "--result", str(record_path)]
        timeout, by_deadline = sweep.child_timeout()
        outcome = run_child(_tier_command(sweep, spec, CONFIRM_REPEATS, extra), timeout)
        if _stopped_by_deadline(
            sweep, outcome, by_deadline, "--confirm", f"{name} at {budget:g} GB"
        ):
            return
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        peaks = [record.get("peak_bytes"), record.get("load_peak_bytes")]
        entry = {
            "budget_gb": budget,
            "spec": name,
            "cap_bytes": cap,
            "status": record.get("status", "timeout" if outcome.timed_out else "crashed"),
            "error": record.get("error") if record else _outcome_error(outcome),
            "peak_bytes": max((p for p in peaks if p is not None), default=None),
        }
        _save_entry(entry_path, entry)
        _write(sweep)


def _run_plan(sweep: _Sweep) -> None:
    """`autoquant run` (tune + one generation) under each budget's cap, in its own process."""
    request = sweep.request
    for budget in sweep.budgets:
        left = sweep.time_left()
        if left is not None and left < MIN_TIER_SECONDS:
            sweep.notes.append(f"--run-plan stopped at the time limit before {budget:g} GB")
            return
        entry_path = sweep.out / RUNS_DIR / f"{budget:g}GB.json"
        entry_path.unlink(missing_ok=True)
        _log(f"autoquant run under a {budget:g} GB cap …")
        command = [
            sys.executable,
            "-m",
            "autoquant",
            "run",
            "--model",
            sweep.args.model,
            "--size",
            f"{request.width}x{request.height}",
            "--steps",
            str(request.steps),
            "--seed",
            str(sweep.args.seed),
            "--vram-limit",
            f"{budget:g}GB",
            "--out",
            str(sweep.out / RUNS_DIR / f"{budget:g}GB"),
            "--json",
        ]
        timeout, by_deadline = sweep.child_timeout()
        outcome = run_child(command, timeout)
        if _stopped_by_deadline(
            sweep, outcome, by_deadline, "--run-plan", f"the {budget:g} GB run"
        ):
            return
        entry: dict[str, Any] = {
            "budget_gb": budget,
            "request": request.to_dict(),
            "completed": False,
            "seconds": outcome.seconds,
            "error": None,
        }
        try:
            report = json.loads(outcome.stdout) if outcome.returncode == 0 else None
        except ValueError:
            report = None
        if report is None:
            entry["error"] = _outcome_error(outcome)
        else:
            entry.update(
                completed=True,
                chosen=report["chosen"]["label"],
                adjustments=report["adjustments"],
                tried=[f"{a['label']}: {a['outcome']}" for a in report["tried"]],
                peak_bytes=report["measured"]["peak_bytes"],
                card=next((g["name"] for g in report["probe"]["gpus"]), None),
            )
        done = f"ended on {entry['chosen']}" if report else "did not complete"
        _log(f"autoquant run under {budget:g} GB: {done} after {outcome.seconds:.0f} s")
        _save_entry(entry_path, entry)
        _write(sweep)


def _check_out(sweep: _Sweep) -> None:
    """OUT's tier records must be of this model: another model's (an --out reused, a warm
    machine's work folder) would be skipped as done under --resume and mixed into the report."""
    spec = sweep.inventory.source.spec
    for path in sorted((sweep.out / TIERS_DIR).glob("*.json")):
        try:
            model = json.loads(path.read_text()).get("model")
        except (OSError, ValueError):
            continue  # unreadable: _load_records says so and skips it
        if model is not None and model != spec:
            raise AutoquantError(
                f"{sweep.out} holds tiers of {model} ({path.name}), not {spec}: give another "
                "--out, or remove its tiers/"
            )


def run(args: argparse.Namespace) -> int:
    sweep = _prepare(args)
    _check_out(sweep)
    sweep.out.mkdir(parents=True, exist_ok=True)
    on_cuda = sweep.device == "cuda"
    if not args.report_only:
        from autoquant import models

        # On a GPU machine materialize first on the GPU (scripts/gpu_bench.sh does): the RNG
        # there is much faster than here, and this process must not hold a CUDA context.
        models.materialize(models.resolve(args.model), progress=True)
        _log(
            f"bench {sweep.inventory.source.spec} on {sweep.device}: {len(sweep.specs)} tiers, "
            f"reference {sweep.reference.name}, into {sweep.out}"
        )
        _measure_tiers(sweep)
    bench = _write(sweep)
    if not on_cuda:
        for flag, wanted in (("--confirm", args.confirm), ("--run-plan", args.run_plan)):
            if wanted:
                sweep.notes.append(f"{flag} skipped: it needs a CUDA GPU to cap ({sweep.device})")
    elif not args.report_only:
        if args.confirm:
            _confirm(sweep, bench["budgets"])
        if args.run_plan:
            _run_plan(sweep)
    bench = _write(sweep)
    _print_summary(bench, sweep.out)
    return 0


def _print_summary(bench: dict[str, Any], out: Path) -> None:
    for row in bench["budgets"]:
        chosen = row["plan"]["label"] if row["plan"] else f"no plan ({row['plan_error']})"
        ratio = row["latency_ratio"]
        said = f", latency ratio {ratio:.2f} vs {row['best']}" if ratio is not None else ""
        print(f"{row['budget_gb']:g} GB: {len(row['fits'])} tiers fit; plan: {chosen}{said}")
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}")
