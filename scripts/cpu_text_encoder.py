"""What a text encoder's pass costs on this CPU: the calibration behind profiles/latency.yaml's
``cpu.text_encoder_seconds_per_unit`` (text encoders placed on the CPU beside a GPU denoiser).

    python scripts/cpu_text_encoder.py --out DIR [--model builtin:flux-dev] [--dtypes fp32,bf16]
        [--layers 1,3] [--repeats 3] [--force]

Each text encoder of the built-in model is built from its shipped config with random weights,
cut to each count of --layers, and its forward over the tokens the latency model charges it (77
for CLIP, 512 for T5) timed (the median of --repeats, after one untimed call). The step between
the two layer counts is one layer's time: the full encoder's seconds are the shorter cut's plus
the layers it lacks, so the figure is the full model's without building it (T5-XXL's 4.8 B
parameters would not fit a small host at fp32). The figure is core-seconds per unit, units being
the full encoder's parameters × tokens, as autoquant/planner/latency.py counts them.

Writes DIR/cpu-text-encoder.json (every timing, the host) and DIR/cpu-text-encoder.md; exits 2
if DIR already holds the JSON (unless --force).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

RESULT_JSON = "cpu-text-encoder.json"
RESULT_MD = "cpu-text-encoder.md"
_LAYER_KEYS = ("num_layers", "num_hidden_layers")  # T5's, CLIP's


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--model", default="builtin:flux-dev")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--layers", default="1,3", help="two layer counts, the smaller first")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    layers = [int(n) for n in args.layers.split(",")]
    if len(layers) != 2 or not 0 < layers[0] < layers[1]:
        parser.error("--layers takes two counts, the smaller first, e.g. 1,3")
    if not args.model.startswith("builtin:"):
        parser.error("--model takes a built-in model (builtin:NAME): its configs are shipped")
    if (args.out / RESULT_JSON).exists() and not args.force:
        print(f"{args.out / RESULT_JSON} exists: pass --force to measure again", file=sys.stderr)
        sys.exit(2)
    return args


def _timed(model: Any, ids: Any, repeats: int) -> float:
    import torch

    with torch.no_grad():
        model(ids)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    args = _arguments()
    import torch
    import transformers

    from autoquant.backends.base import torch_dtype
    from autoquant.models import inventory, resolve
    from autoquant.models.builtin import load_builtin
    from autoquant.planner.latency import cpu_kind, text_tokens
    from autoquant.probe.host import probe_host

    name = args.model.removeprefix("builtin:")
    spec = load_builtin(name)
    model_inventory = inventory(resolve(args.model))
    cpu = probe_host().cpu
    threads = torch.get_num_threads()
    small, large = (int(n) for n in args.layers.split(","))
    rows: list[dict[str, Any]] = []
    for component in model_inventory.text_encoders:
        config = dict(spec.components[component.name])
        key = next(k for k in _LAYER_KEYS if k in config)
        full_layers = int(config[key])
        tokens = text_tokens(component)
        model_class = getattr(transformers, component.class_name)
        config_class = model_class.config_class
        for dtype in args.dtypes.split(","):
            seconds = {}
            for layers in (small, large):
                torch.manual_seed(0)
                model = model_class(config_class(**{**config, key: layers}))
                model = model.to(torch_dtype(dtype)).eval()
                ids = torch.randint(0, int(config["vocab_size"]), (1, tokens))
                seconds[layers] = _timed(model, ids, args.repeats)
                print(f"{component.name} {dtype} {layers} layers: {seconds[layers]:.3f} s")
                del model
            per_layer = (seconds[large] - seconds[small]) / (large - small)
            full = seconds[small] + per_layer * (full_layers - small)
            units = component.params * tokens
            rows.append(
                {
                    "component": component.name,
                    "class": component.class_name,
                    "dtype": dtype,
                    "tokens": tokens,
                    "params": component.params,
                    "layers": full_layers,
                    "seconds_by_layers": seconds,
                    "full_seconds": full,
                    "core_seconds_per_unit": full * threads / units,
                }
            )
    result = {
        "model": args.model,
        "host": {
            "machine": platform.machine(),
            "cpu_model": cpu.model,
            "cores": cpu.cores,
            "torch_threads": threads,
            "kind": cpu_kind(cpu),
            "bf16_units": cpu.bf16,
            "torch": torch.__version__,
        },
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / RESULT_JSON).write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Text encoders on the CPU: {args.model}",
        "",
        f"{cpu.model}, {cpu.cores} cores ({cpu_kind(cpu)}), {threads} torch threads, "
        f"torch {torch.__version__}.",
        "",
        "| encoder | dtype | tokens | full layers | s (full, extrapolated) | core-s per unit |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['class']} | {row['dtype']} | {row['tokens']} | {row['layers']} | "
            f"{row['full_seconds']:.2f} | {row['core_seconds_per_unit']:.3e} |"
        )
    (args.out / RESULT_MD).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
