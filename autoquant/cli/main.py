"""The `autoquant` command. Errors a user can act on print one line and exit 2."""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from autoquant import __version__
from autoquant.cli.args import (
    EXIT_USAGE,
    Parser,
    add_memory_arguments,
    add_model_argument,
    add_profile_arguments,
    add_tier_arguments,
    add_tuning_arguments,
    batch_size,
    generator_seed,
    guidance_scale,
    options_from_args,
    quiet_libraries,
    size_text,
    step_count,
    tuning_options,
    width_height,
)
from autoquant.cli.validate import validate
from autoquant.core.console import progress_log
from autoquant.core.errors import AutoquantError
from autoquant.core.units import format_bytes, parse_size


def _add_machine(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vram", type=size_text, help="plan for a GPU of this size (8GB, 8GiB, 8192MB)")
    p.add_argument("--device", choices=("cuda", "cpu", "mps"), help="plan for this device kind")
    p.add_argument("--compute-capability", help="with an emulated CUDA GPU, e.g. 8.9 (default 8.6)")
    p.add_argument(
        "--gpu",
        metavar="NAME",
        help='plan for this card of profiles/gpus.yaml, e.g. "RTX 4060" (alone: it is the machine)',
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="autoquant",
        description="Hardware-aware quantization tuning for diffusers pipelines.",
    )
    parser.add_argument("--version", action="version", version=f"autoquant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("probe", help="show what this machine has")
    _add_machine(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("models", help="list the built-in models")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("plan", help="decide a tier without building anything")
    add_model_argument(p)
    _add_machine(p)
    add_profile_arguments(p)
    add_tier_arguments(p)
    add_memory_arguments(p)
    p.add_argument("--size", type=width_height, help="WIDTHxHEIGHT the estimate is for")
    p.add_argument("--batch", type=batch_size, help="images per prompt the estimate is for")
    p.add_argument(
        "--steps", type=step_count, help="denoising steps the times are for (default 20)"
    )
    p.add_argument(
        "--json", action="store_true", help="print the Plan, and the machine it is for, as JSON"
    )

    p = sub.add_parser("run", help="probe, plan, build, smoke-test, generate, report")
    add_tuning_arguments(p, size_help="WIDTHxHEIGHT (default: the model's native size)")
    p.add_argument("--prompt", default="a photo of an astronaut riding a horse on the moon")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument(
        "--steps",
        type=step_count,
        default=None,
        help="denoising steps (default: request.steps, 20)",
    )
    p.add_argument("--seed", type=generator_seed, default=0, help="0 to 2**64-1 (default 0)")
    p.add_argument(
        "--guidance-scale",
        type=guidance_scale,
        help="classifier-free guidance, 0 to 30 (default: the pipeline's own; Flux 4.0)",
    )
    p.add_argument(
        "--out",
        "--output",
        "-o",
        type=Path,
        default=Path("autoquant-out"),
        help="output folder (diffusers-cli's --output/-o; default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="quiet; print the report as JSON")

    p = sub.add_parser("cache", help="the saved tuning decisions")
    cache = p.add_subparsers(dest="cache_command", required=True, parser_class=Parser)
    q = cache.add_parser("list", help="one line per saved decision")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q = cache.add_parser("show", help="one saved decision in full (JSON)")
    q.add_argument("key")
    q = cache.add_parser("clear", help="forget one saved decision, or all of them")
    q.add_argument("key", nargs="?")
    q = cache.add_parser("export", help="write a YAML profile that reproduces a decision")
    q.add_argument("key")
    q.add_argument(
        "--out", type=Path, required=True, help="profile file to write (never overwritten)"
    )

    from autoquant.serve.command import add_parser as add_serve_parser

    add_serve_parser(sub)

    from autoquant.bench.command import add_parser as add_bench_parser

    add_bench_parser(sub)

    p = sub.add_parser("convert", help="write a GGUF of the model's denoiser")
    p.add_argument("model", help="builtin:NAME or a local diffusers folder")
    p.add_argument("--to", required=True, dest="qtype", help="q8_0, q5_1, q5_0, q4_1 or q4_0")
    p.add_argument("--out", type=Path, help="write here instead of the cache (never overwrites)")
    p.add_argument("--json", action="store_true", help="quiet; print the result as JSON")
    return parser


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def cmd_probe(args: argparse.Namespace) -> int:
    from autoquant.probe import describe, probe

    profile = probe(
        vram=parse_size(args.vram) if args.vram else None,
        device=args.device,
        compute_capability=args.compute_capability,
        gpu=args.gpu,
    )
    if args.json:
        print(profile.to_json())
    else:
        print(describe(profile))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from autoquant.models import list_builtins

    entries = list_builtins()
    if args.json:
        _print_json(entries)
        return 0
    for entry in entries:
        total = sum(c["params"] for c in entry["components"])
        print(f"builtin:{entry['name']}  {entry['pipeline_class']}  {total / 1e9:.3f} B params")
        print(f"    {entry['description']}")
        for c in entry["components"]:
            print(
                f"    {c['name']:<16} {c['class_name']:<30} {c['params']:>15,} params "
                f"({c['linear_params'] / max(c['params'], 1):.0%} in nn.Linear)"
            )
    return 0


def _print_plan(the_plan: Any) -> None:
    data = the_plan.to_dict()
    print(f"model {data['model']} on {data['device']}, budget {format_bytes(data['budget_bytes'])}")
    print("why:")
    for step in data["path"]:
        print(f"  - {step}")
    request = the_plan.request
    print(
        f"ladder (chosen first; seconds predicted for one generation of {request.steps} steps at "
        f"{request.width}x{request.height}, loading apart):"
    )
    for index, planned in enumerate(the_plan.ladder):
        est = planned.estimate
        seconds = f"~{planned.seconds:.3g} s" if planned.latency else "not priced"
        print(
            f"  {index + 1}. {planned.label:<70} {seconds:>10}, {planned.fidelity} class, "
            f"needs ~{format_bytes(est.required_bytes)} (weights {format_bytes(est.weights_bytes)}"
            f", peak {format_bytes(est.peak_bytes)})"
        )


def cmd_plan(args: argparse.Namespace) -> int:
    from autoquant.execute.tuning import make_plan

    options = options_from_args(
        args,
        vram=args.vram,
        compute_capability=args.compute_capability,
        gpu=args.gpu,
        batch=args.batch,
        steps=args.steps,
    )
    started = time.perf_counter()
    the_plan, profile, _ = make_plan(options)
    if args.json:
        _print_json({**the_plan.to_dict(), "probe": profile.to_dict()})
    else:
        gpu = profile.primary_gpu if profile.has_gpu else None
        if gpu is not None:
            position = profile.gpus.index(gpu)
            emulated = " (emulated)" if f"gpus[{position}].total_bytes" in profile.emulated else ""
            print(f"for {gpu.name}{emulated}, compute capability {gpu.compute_capability}")
        _print_plan(the_plan)
        print(f"planned in {time.perf_counter() - started:.2f} s")
    return 0


class StepClock:
    """The real generation's seconds per denoising step, from diffusers' step-end callback: the
    gap between two step ends is one whole step (denoiser forwards and scheduler step) with none
    of the prompt encoding or VAE decode in it."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.ends: list[float] = []

    def __call__(
        self, _pipe: Any, step: int, _timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        if step == 0:
            self.ends.clear()  # generate() called the pipeline again after an OOM: start over
        _synchronize()
        self.ends.append(self._clock())
        return callback_kwargs

    def step_seconds(self) -> float | None:
        """The median step, or None for a one-step generation (it has no gap to time)."""
        gaps = [later - earlier for earlier, later in itertools.pairwise(self.ends)]
        return statistics.median(gaps) if gaps else None


def _synchronize() -> None:
    """Wait for queued GPU work, on every GPU (device_map="balanced" spreads components), so a
    timestamp marks work done rather than work queued."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)


def _seconds_per_step(value: float | None) -> str:
    return f"{value:.3f} s/step" if value is not None else "no step time (one step)"


def cmd_run(args: argparse.Namespace) -> int:
    import torch
    from diffusers.utils import logging as diffusers_logging

    from autoquant.cli.outputs import write_run
    from autoquant.execute.recover import generate
    from autoquant.execute.smoke import full_forwards
    from autoquant.execute.tuning import tune

    log = progress_log(not args.json)
    diffusers_logging.disable_progress_bar()  # per-component bars; the executor logs per tier
    options = tuning_options(args, steps=args.steps, progress=not args.json)
    started = time.perf_counter()
    result = tune(options, log=log)
    tuned = time.perf_counter() - started
    request = result.plan.request
    steps = request.steps
    log(f"generating {request.width}x{request.height}, {steps} steps …")
    clock = StepClock()
    gen_started = time.perf_counter()
    with full_forwards(getattr(result.pipeline, result.inventory.denoiser.name)) as forwards:
        output = generate(
            result,
            log,
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            num_inference_steps=steps,
            width=request.width,
            height=request.height,
            generator=torch.Generator("cpu").manual_seed(args.seed),
            callback_on_step_end=clock,
            **({} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}),
        )
    report = result.report()
    report["tuning_seconds"] = tuned
    report["generation"] = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "steps": steps,
        "width": request.width,
        "height": request.height,
        "seed": args.seed,
        "guidance_scale": args.guidance_scale,
        "seconds": time.perf_counter() - gen_started,
        "step_seconds": clock.step_seconds(),
        # The denoiser's forwards and those that ran every block (a first-block cache skips
        # the rest); None when a recovery rebuilt the pipeline mid-generation.
        "forwards": forwards.forwards or None,
        "full_forwards": forwards.full if forwards.forwards else None,
    }
    paths = write_run(args.out, output.images[0], report)
    report["files"] = {k: str(v) for k, v in paths.items()}
    if args.json:
        _print_json(report)
        return 0
    measured, estimate, generation = report["measured"], report["estimate"], report["generation"]
    print(f"chosen: {report['chosen']['label']} — {report['chosen']['description']}")
    for attempt in report["tried"][:-1]:
        print(f"  tried {attempt['label']}: {attempt['outcome']} ({attempt['error']})")
    print(
        f"generation: {steps} steps at {request.width}x{request.height}, "
        f"{_seconds_per_step(generation['step_seconds'])}, {generation['seconds']:.2f} s in all; "
        f"smoke test {_seconds_per_step(measured['smoke_step_seconds'])}; "
        f"load {measured['load_seconds']:.2f} s"
    )
    if report["chosen"]["first_block_cache"] is not None and generation["forwards"]:
        print(
            f"first-block cache: {generation['full_forwards']} of {generation['forwards']} "
            "denoiser forwards ran every block"
        )
    print(
        f"peak ({measured['peak_scope']}, load + smoke test): "
        f"measured {format_bytes(measured['peak_bytes'] or 0)}, "
        f"estimated {format_bytes(estimate['peak_bytes'])}; "
        f"estimated need {format_bytes(estimate['required_bytes'])} = "
        f"{format_bytes(estimate['allocator_peak_bytes'])} allocator peak + "
        f"{format_bytes(estimate['overhead_bytes'])} {estimate['overhead']}"
    )
    if report["predicted"]:
        predicted = report["predicted"]["seconds"]
        print(
            f"predicted {predicted:.2f} s for the generation, measured {generation['seconds']:.2f}"
            f" s ({generation['seconds'] / predicted:.2f}x); {report['chosen']['fidelity']} class,"
            f" chosen by --optimize {report['chosen']['objective']}"
        )
    if report["cache"] and report["cache"]["hit"]:
        print(f"tuning cache hit ({report['cache']['key']}): went straight to the saved tier")
    for warning in report["warnings"]:
        print(f"warning: {warning}")
    print(f"wrote {paths['image']}, {paths['report_json']}, {paths['report_md']}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from autoquant.core.fsutil import write_text_atomic
    from autoquant.execute.tuning_entry import export_profile
    from autoquant.store.tuning_store import TuningStore

    store = TuningStore(warn=lambda message: print(message, file=sys.stderr))
    if args.cache_command == "list":
        entries = store.entries()
        if args.json:
            _print_json(entries)
            return 0
        if not entries:
            print(f"no saved tuning in {store.path}")
        for digest, entry in sorted(entries.items(), key=lambda item: item[1]["updated"]):
            key = entry["key"]
            where = key.get("gpu") or key.get("cpu")
            print(
                f"{digest}  {entry['updated']}  {entry['model']} {key['width']}x{key['height']} "
                f"on {where} → {entry['chosen']['label']}"
            )
        return 0
    if args.cache_command == "clear":
        removed = store.remove(args.key)
        print(f"removed {removed} saved decision(s)")
        return 0
    entry = store.get(args.key)
    if entry is None:
        raise AutoquantError(f"no tuning cache entry {args.key!r} (see `autoquant cache list`)")
    if args.cache_command == "show":
        _print_json(entry)
        return 0
    try:
        write_text_atomic(args.out, export_profile(entry), overwrite=False)
    except FileExistsError:
        raise AutoquantError(
            f"{args.out} exists: pick another --out (it is never overwritten)"
        ) from None
    print(f"wrote {args.out}; reproduce with: autoquant run --profile {args.out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from autoquant import models
    from autoquant.backends import converter_for

    converter = converter_for(args.qtype)
    source = models.resolve(args.model)
    folder = models.materialize(source, progress=not args.json)
    result = converter.convert(folder, args.qtype, out=args.out, progress=not args.json)
    if args.json:
        _print_json({k: str(v) if isinstance(v, Path) else v for k, v in vars(result).items()})
        return 0
    state = (
        "cache hit"
        if result.cache_hit
        else ("rebuilt (cached file was corrupt or stale)" if result.rebuilt else "written")
    )
    print(
        f"{state}: {result.path} ({format_bytes(result.file_bytes)}; "
        f"{result.quantized_tensors} tensors quantized, {result.kept_tensors} kept)"
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from autoquant.bench.command import run

    return run(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from autoquant.serve.command import run

    return run(args)


_COMMANDS = {
    "probe": cmd_probe,
    "models": cmd_models,
    "plan": cmd_plan,
    "run": cmd_run,
    "convert": cmd_convert,
    "cache": cmd_cache,
    "serve": cmd_serve,
    "bench": cmd_bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    quiet_libraries()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        validate(args)
        return _COMMANDS[args.command](args)
    except AutoquantError as err:
        print(f"autoquant: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("autoquant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
