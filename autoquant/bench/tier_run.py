"""Measure ONE tier in this process and write its JSON. command.py starts a fresh process per
tier, so one tier's out-of-memory error, leak or crash cannot spoil the next.

    python -m autoquant.bench.tier_run --model builtin:tiny-sd --spec gguf:q4_0 --out DIR \\
        --size 64x64 [--batch N --steps N --repeats N --seed S] [--reference] [--no-fidelity] \\
        [--vram-cap BYTES] [--result FILE]

Steps, in order:
1. build the tier with the executor's ``build_tier`` (a GGUF conversion is timed apart: cached);
2. a 2-step generation that records the denoiser's first call — its real inputs at the request's
   latent size and batch, CFG doubling included — and warms everything up;
3. with +compile, the denoiser is compiled now, as the executor compiles it
   (execute/compile.py; its first call is timed as compile time); a +first_block_cache tier's
   direct forwards (4, 6) run without its cache, its timed generation (5) with it, counting the
   steps that ran in full;
4. --repeats denoiser forwards on the recorded inputs, after two warm-up forwards (then every
   component goes back where a pipeline call leaves it: with model offload, off the GPU);
5. the timed generation: end-to-end seconds, peak memory, the image;
6. fidelity (fidelity.py): the denoiser on the reference's saved inputs, the image against the
   reference's, per-layer error against the fp32 weights on disk. The reference tier runs first
   and saves its inputs, output and image in DIR/reference/ (safetensors and npz, no pickles).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from autoquant.backends import backend_class
from autoquant.bench import TierSpec, bench_device
from autoquant.cli.args import quiet_libraries, width_height
from autoquant.core.errors import error_line
from autoquant.core.fsutil import atomic_file, write_text_atomic
from autoquant.execute import memory
from autoquant.execute.smoke import full_forwards
from autoquant.planner.estimate import Estimate, Request, estimate
from autoquant.probe.types import HardwareProfile

if TYPE_CHECKING:
    import torch

    from autoquant.models.types import ModelInventory

TIERS_DIR = "tiers"
REFERENCE_DIR = "reference"
WARMUP_FORWARDS = 2
# The first generation warms up and records the denoiser's first call: a short one will do (the
# first step's inputs do not depend on the step count for these schedulers).
WARMUP_STEPS = 2


def tier_result_path(out: Path, spec: TierSpec) -> Path:
    return out / TIERS_DIR / f"{spec.file_stem}.json"


@dataclass
class DenoiserCall:
    """One call of the denoiser. Tensors are kept apart from the rest of the arguments so that
    both can be saved without pickling: tensors as safetensors, the layout as JSON."""

    layout: dict[str, Any]  # {"args": [..], "kwargs": {..}}, leaves {"tensor": key} | {"value": v}
    tensors: dict[str, torch.Tensor]

    @classmethod
    def record(cls, args: tuple[Any, ...], kwargs: dict[str, Any]) -> DenoiserCall:
        tensors: dict[str, torch.Tensor] = {}
        layout = {
            "args": [_encode(a, f"args.{i}", tensors) for i, a in enumerate(args)],
            "kwargs": {k: _encode(v, f"kwargs.{k}", tensors) for k, v in kwargs.items()},
        }
        return cls(layout, tensors)

    def arguments(self) -> tuple[list[Any], dict[str, Any]]:
        args = [_decode(node, self.tensors) for node in self.layout["args"]]
        kwargs = {k: _decode(node, self.tensors) for k, node in self.layout["kwargs"].items()}
        return args, kwargs

    def shaped_like(self, own: DenoiserCall) -> DenoiserCall:
        """These inputs with each tensor on the device and in the dtype this tier's own call
        used at the same place (the reference may run in fp32 on another device)."""
        moved = {}
        for key, tensor in self.tensors.items():
            if key not in own.tensors:
                raise ValueError(f"the reference's denoiser call has {key!r}; this tier's has not")
            like = own.tensors[key]
            dtype = like.dtype if tensor.is_floating_point() else tensor.dtype
            moved[key] = tensor.to(device=like.device, dtype=dtype)
        return DenoiserCall(self.layout, moved)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save

        data = save({k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()})
        with atomic_file(folder / "denoiser_inputs.safetensors") as handle:
            handle.write(data)
        write_text_atomic(folder / "denoiser_inputs.json", json.dumps(self.layout, indent=1))

    @classmethod
    def load(cls, folder: Path) -> DenoiserCall:
        from safetensors.torch import load_file

        layout = json.loads((folder / "denoiser_inputs.json").read_text())
        return cls(layout, load_file(str(folder / "denoiser_inputs.safetensors")))


def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    import torch

    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().clone()
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": {k: _encode(v, f"{key}.{k}", tensors) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return {"list": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"cannot record denoiser argument {key} of type {type(value).__name__}")


def _decode(node: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "dict" in node:
        return {k: _decode(v, tensors) for k, v in node["dict"].items()}
    if "list" in node:
        return [_decode(v, tensors) for v in node["list"]]
    return node["value"]


def _first_output(output: Any) -> torch.Tensor:
    """The denoised tensor of a UNet/transformer call (dataclass output or return_dict=False)."""
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def time_forwards(
    forward: Callable[[], Any], device: str, repeats: int
) -> tuple[list[float], float]:
    """(milliseconds of each timed forward, seconds of the first warm-up forward). CUDA events
    on a CUDA device, wall clock with a synchronize elsewhere."""
    import torch

    first = 0.0
    for index in range(WARMUP_FORWARDS):
        started = time.perf_counter()
        forward()
        _synchronize(device)
        if index == 0:
            first = time.perf_counter() - started
    samples = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            forward()
            end.record()
            torch.cuda.synchronize()
            samples.append(float(start.elapsed_time(end)))
        else:
            started = time.perf_counter()
            forward()
            _synchronize(device)
            samples.append((time.perf_counter() - started) * 1000)
    return samples, first


def latency_summary(samples_ms: Sequence[float]) -> dict[str, Any]:
    q1, median, q3 = (float(v) for v in np.percentile(samples_ms, [25, 50, 75]))
    return {
        "median": median,
        "min": float(min(samples_ms)),
        "max": float(max(samples_ms)),
        "q1": q1,
        "q3": q3,
        "repeats": len(samples_ms),
        "samples": [float(v) for v in samples_ms],
    }


def hardware_row(profile: HardwareProfile, device: str, backend: str) -> dict[str, Any]:
    """The machine and versions, repeated in every row as llama-bench does."""
    import torch

    gpu = profile.primary_gpu if profile.has_gpu else None
    versions = {name: status.version for name, status in profile.backends.items()}
    distribution = backend_class(backend).distribution
    return {
        "device": device,
        "card": gpu.name if gpu else None,
        "card_memory_bytes": gpu.total_bytes if gpu else None,
        "compute_capability": gpu.compute_capability if gpu else None,
        "driver": profile.driver,
        "cuda": torch.version.cuda,
        "cpu": profile.cpu.model,
        "cpu_cores": profile.cpu.cores,
        "cpu_bf16": profile.cpu.bf16,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": versions.get("diffusers"),
        "transformers": metadata.version("transformers"),
        "backend": backend,
        "backend_version": versions.get(distribution) if distribution else None,
    }


def estimate_error_pct(est: Estimate, record: dict[str, Any], on_cuda: bool) -> float | None:
    """(estimate − measured) / measured in percent. On CUDA: the higher of the load and run
    peaks inside the allocator; elsewhere: the estimate's required memory (runtime included)
    against the process's peak RSS."""
    if record["peak_bytes"] is None:
        return None
    if on_cuda:
        measured = max(record["peak_bytes"], record["load_peak_bytes"] or 0)
        estimated = max(est.peak_bytes, est.load_peak_bytes)
    else:
        measured, estimated = record["peak_bytes"], est.required_bytes
    return 100.0 * (estimated - measured) / measured


@dataclass(frozen=True)
class RunOptions:
    model: str
    spec: TierSpec
    out: Path
    width: int | None
    height: int | None
    batch: int
    steps: int
    repeats: int
    seed: int
    reference: bool
    fidelity: bool
    vram_cap: int | None
    result: Path


class _TierRun:
    """The state one measurement builds up; each step fills part of ``record``."""

    def __init__(self, options: RunOptions, profile: HardwareProfile) -> None:
        from autoquant import models
        from autoquant.planner.plan import compute_dtype_for
        from autoquant.planner.rules import load_settings

        self.options = options
        self.device = bench_device(profile)
        source = models.resolve(options.model)
        self.inventory: ModelInventory = models.inventory(source)
        self.folder = models.materialize(source, progress=False)
        settings = load_settings()
        compute_dtype = compute_dtype_for(profile, settings["planner"]["compute_dtype"])
        self.tier = options.spec.tier(self.inventory, compute_dtype)
        side = self.inventory.default_size
        self.request = Request(
            width=options.width or side,
            height=options.height or side,
            batch=options.batch,
            steps=options.steps,
        )
        self.estimate = estimate(
            self.inventory, self.tier, self.request, on_gpu=self.device != "cpu"
        )
        self.pipe: Any = None
        self.call: DenoiserCall | None = None
        self.image: np.ndarray | None = None
        label = self.tier.label
        self.record: dict[str, Any] = {
            "spec": options.spec.name,
            "label": label,
            "reference": options.reference,
            "tier": self.tier.to_dict(),
            "compile": options.spec.compile,
            "model": self.inventory.source.spec,
            "family": self.inventory.family,
            "device": self.device,
            "request": self.request.to_dict(),
            "seed": options.seed,
            "vram_cap_bytes": options.vram_cap,
            "status": "ok",
            "phase": None,
            "error": None,
            "convert_seconds": None,
            "convert_cached": None,
            "load_seconds": None,
            "compile_seconds": None,
            "compiled_how": None,  # "regional (…blocks…)" or "whole" (execute/compile.py)
            "memory_measure": "CUDA allocator" if self.device == "cuda" else "process RSS",
            "weights_bytes": None,
            "load_peak_bytes": None,
            "peak_bytes": None,
            "latency_ms": None,
            "e2e_seconds": None,
            # With +first_block_cache: its threshold, and the timed generation's forwards and
            # those that ran in full.
            "first_block_cache": None,
            "denoiser_file": None,
            "denoiser_file_bytes": None,
            "estimate": self.estimate.to_dict(),
            "estimate_error_pct": None,
            "fidelity": None,
            "hardware": hardware_row(profile, self.device, self.tier.backend),
            "probe": profile.to_dict(),
        }

    @property
    def denoiser(self) -> Any:
        return getattr(self.pipe, self.inventory.denoiser.name)

    def build(self) -> None:
        from autoquant.execute.build import build_tier
        from autoquant.planner.plan import PlannedTier

        tier, device = self.tier, self.device
        backend = backend_class(tier.backend)
        if backend.writes_files:  # converting is timed apart from loading (it is cached)
            converted = backend.convert(self.folder, tier.precision, progress=False)
            self.record["convert_seconds"] = converted.seconds
            self.record["convert_cached"] = converted.cache_hit
            self.record["denoiser_file"] = backend.name
            self.record["denoiser_file_bytes"] = converted.file_bytes
        else:
            component_dir = self.folder / self.inventory.denoiser.name
            self.record["denoiser_file"] = "safetensors"
            self.record["denoiser_file_bytes"] = sum(
                p.stat().st_size for p in component_dir.glob("*.safetensors")
            )
        if self.options.vram_cap:
            memory.cap_process_memory(device, self.options.vram_cap)
        self._import_libraries()
        memory.reset_peak(device)
        before = memory.allocated(device)
        started = time.perf_counter()
        # Built eager: a +compile tier is compiled after its first generation (time_denoiser).
        self.pipe = build_tier(
            PlannedTier(dataclasses.replace(tier, compiled=False), self.estimate, fits=True),
            folder=self.folder,
            inventory=self.inventory,
            device=device,
            progress=False,
        )
        _synchronize(device)
        self.record["load_seconds"] = time.perf_counter() - started
        self.record["weights_bytes"] = memory.allocated(device) - before
        self.record["load_peak_bytes"] = memory.peak(device)
        memory.reset_peak(device)

    def _import_libraries(self) -> None:
        """Import what loading will import, so that neither the load time nor the RSS delta
        counts the import of diffusers' pipeline classes or of the backend."""
        import importlib

        import diffusers

        from autoquant.models.inventory import import_component_class

        getattr(diffusers, self.inventory.pipeline_class)
        for component in self.inventory.components:
            import_component_class(component.library, component.class_name)
        module = backend_class(self.tier.backend).module
        if module:
            importlib.import_module(module)

    def _generate(self, steps: int) -> np.ndarray:
        import torch

        from autoquant.execute.build import pipeline_call_kwargs
        from autoquant.execute.smoke import SMOKE_PROMPT

        request = self.request
        with torch.no_grad():
            output = self.pipe(
                **pipeline_call_kwargs(
                    self.inventory,
                    self.pipe,
                    prompt=SMOKE_PROMPT,
                    num_inference_steps=steps,
                    width=request.width,
                    height=request.height,
                    num_images_per_prompt=request.batch,
                    generator=torch.Generator("cpu").manual_seed(self.options.seed),
                    output_type="np",
                )
            )
        images = np.asarray(output.images)
        if not np.isfinite(images).all():
            raise RuntimeError("the generation produced non-finite pixels")
        return np.asarray((np.clip(images[0], 0.0, 1.0) * 255).round(), dtype=np.uint8)

    def first_generation(self) -> None:
        """Warm up and record the denoiser's first call of a real generation."""
        calls: list[DenoiserCall] = []

        def record_call(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not calls:
                calls.append(DenoiserCall.record(args, kwargs))

        hook = self.denoiser.register_forward_pre_hook(record_call, with_kwargs=True)
        try:
            self._generate(min(WARMUP_STEPS, self.request.steps))
        finally:
            hook.remove()
        self.call = calls[0]

    def _forward(self, call: DenoiserCall) -> Any:
        import torch

        args, kwargs = call.arguments()
        with torch.no_grad():
            return self.denoiser(*args, **kwargs)

    @contextmanager
    def _every_block(self) -> Iterator[None]:
        """The denoiser without its first-block cache while it is called directly (the timed
        forwards, the fidelity forward): outside a pipeline call there is no cache context, and
        the step time is the format's full forward. What the cache saves is in the timed
        generation."""
        from autoquant.execute.build import enable_first_block_cache

        threshold = self.tier.first_block_cache
        if threshold is None:
            yield
            return
        self.denoiser.disable_cache()
        try:
            yield
        finally:
            enable_first_block_cache(self.pipe, self.inventory, threshold)

    def time_denoiser(self) -> None:
        assert self.call is not None
        if self.options.spec.compile:
            from autoquant.execute.compile import compile_denoiser
            from autoquant.planner.latency import compile_figure

            figure = compile_figure(
                self.inventory, self.tier, on_gpu=self.device != "cpu", nearest=True
            )
            assert figure is not None  # nearest always gives one
            scope, mode = self.options.spec.compile_scope_mode or (figure.scope, figure.mode)
            self.record["compiled_how"] = compile_denoiser(self.denoiser, scope=scope, mode=mode)
        own = self.call
        with self._every_block():
            samples, first = time_forwards(
                lambda: self._forward(own), self.device, self.options.repeats
            )
        self.record["latency_ms"] = latency_summary(samples)
        if self.options.spec.compile:
            self.record["compile_seconds"] = first
        # Under model CPU offload the direct forwards leave the denoiser on the GPU, and the
        # next generation would load the text encoders beside it (SDXL: +1.1 GB over a real
        # run's peak). Put every component back where a pipeline call leaves it.
        self.pipe.maybe_free_model_hooks()

    def timed_generation(self) -> None:
        started = time.perf_counter()
        with full_forwards(self.denoiser) as counts:
            self.image = self._generate(self.request.steps)
        self.record["e2e_seconds"] = time.perf_counter() - started
        if self.tier.first_block_cache is not None:
            self.record["first_block_cache"] = {
                "threshold": self.tier.first_block_cache,
                "forwards": counts.forwards,
                "full_forwards": counts.full,
            }
        self.record["peak_bytes"] = memory.peak(self.device)
        self.record["estimate_error_pct"] = estimate_error_pct(
            self.estimate, self.record, on_cuda=self.device == "cuda"
        )

    def fidelity(self) -> dict[str, Any]:
        """Against the reference (its saved artifacts), and per layer against the weights on
        disk. Each part that fails is reported and the others still run."""
        from autoquant.backends.base import torch_dtype
        from autoquant.bench import fidelity

        assert self.call is not None and self.image is not None
        reference_dir = self.options.out / REFERENCE_DIR
        if self.options.reference:
            reference_dir.mkdir(parents=True, exist_ok=True)
            self.call.save(reference_dir)
            with atomic_file(reference_dir / "image.npz") as handle:
                np.savez_compressed(handle, image=self.image)
        result: dict[str, Any] = {"errors": {}}
        try:
            from safetensors.torch import load_file, save

            inputs = DenoiserCall.load(reference_dir).shaped_like(self.call)
            with self._every_block():
                output = _first_output(self._forward(inputs)).float().cpu()
            if self.options.reference:
                with atomic_file(reference_dir / "denoiser_output.safetensors") as handle:
                    handle.write(save({"output": output.contiguous()}))
            expected = load_file(str(reference_dir / "denoiser_output.safetensors"))["output"]
            result["denoiser_output_error"] = fidelity.relative_error(output, expected)
        except Exception as err:
            result["errors"]["denoiser_output"] = error_line(err)
        try:
            with np.load(reference_dir / "image.npz", allow_pickle=False) as saved:
                result.update(fidelity.image_fidelity(self.image, saved["image"]))
        except Exception as err:
            result["errors"]["image"] = error_line(err)
        try:
            layers = fidelity.linear_layer_errors(
                self.denoiser,
                self.folder / self.inventory.denoiser.name,
                device=self.device,
                dtype=torch_dtype(self.tier.compute_dtype),
                seed=self.options.seed,
            )
            result.update(layers.summary())
        except Exception as err:
            result["errors"]["per_layer"] = error_line(err)
        return result


def measure(options: RunOptions, profile: HardwareProfile) -> dict[str, Any]:
    """Run the steps in order; the first that fails ends the run with what was measured so far."""
    run = _TierRun(options, profile)
    steps = (
        ("load", run.build),
        ("generate", run.first_generation),
        ("latency", run.time_denoiser),
        ("generate", run.timed_generation),
    )
    failure: tuple[str, str, bool] | None = None  # phase, error, out of memory?
    for phase, step in steps:
        try:
            step()
        except Exception as err:
            failure = (phase, error_line(err), memory.is_oom(err))
            break
    if failure is not None:
        phase, error, oom = failure
        run.record["status"] = "oom" if oom else "error"
        run.record["phase"], run.record["error"] = phase, error
    elif options.fidelity:
        run.record["fidelity"] = run.fidelity()
    run.record["finished_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    return run.record


def parse_args(argv: Sequence[str] | None) -> RunOptions:
    parser = argparse.ArgumentParser(prog="python -m autoquant.bench.tier_run")
    parser.add_argument("--model", required=True)
    parser.add_argument("--spec", required=True, help="backend:precision[+extra...]")
    parser.add_argument("--out", type=Path, required=True, help="the sweep's output folder")
    parser.add_argument("--size", type=width_height, help="WIDTHxHEIGHT (default: the model's own)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference", action="store_true", help="save the reference artifacts")
    parser.add_argument("--no-fidelity", dest="fidelity", action="store_false")
    parser.add_argument("--vram-cap", type=int, help="cap the CUDA allocator at this many bytes")
    parser.add_argument("--result", type=Path, help="write the JSON here (default: OUT/tiers/)")
    args = parser.parse_args(argv)
    spec = TierSpec.parse(args.spec)
    width, height = args.size if args.size else (None, None)
    return RunOptions(
        model=args.model,
        spec=spec,
        out=args.out,
        width=width,
        height=height,
        batch=args.batch,
        steps=args.steps,
        repeats=args.repeats,
        seed=args.seed,
        reference=args.reference,
        fidelity=args.fidelity,
        vram_cap=args.vram_cap,
        result=args.result or tier_result_path(args.out, spec),
    )


def main(argv: Sequence[str] | None = None) -> int:
    from diffusers.utils import logging as diffusers_logging

    from autoquant.probe import probe

    quiet_libraries()
    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" on every tier
    options = parse_args(argv)
    record = measure(options, probe())
    write_text_atomic(options.result, json.dumps(record, indent=1) + "\n")
    status = record["status"]
    print(f"{options.spec.name}: {status}" + (f" ({record['error']})" if record["error"] else ""))
    return 0 if status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
