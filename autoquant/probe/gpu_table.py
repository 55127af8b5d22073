"""The GPUs autoquant knows by name (profiles/gpus.yaml): what lets it plan for a card this
machine does not have (`--gpu "RTX 4060"`, `hardware.gpu`), and read a detected card's
bandwidth and throughput by the name its driver reports.

The table is data, validated as it loads like the profiles are: a malformed entry is one line
naming the file, the entry's line and the key.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from autoquant.core.errors import AutoquantError, ConfigError
from autoquant.core.paths import profiles_dir
from autoquant.core.units import parse_size
from autoquant.probe.emulate import CAPABILITY
from autoquant.probe.types import GpuInfo

TABLE_FILE = "gpus.yaml"
# Figures a vendor publishes as real numbers, and the host link's generation and lane count.
_FIGURES = (
    "bandwidth_gb_s",
    "fp16_tflops",
    "bf16_tflops",
    "fp8_tflops",
    "int8_tops",
    "nvlink_gb_s",
)
_COUNTS = ("pcie_gen", "pcie_lanes")
# Every entry holds every key, null where no figure is published: a missing key is a mistake.
_KEYS = ("name", "aliases", "memory", "compute_capability", *_FIGURES, *_COUNTS)


@dataclass(frozen=True)
class GpuSpec:
    """One card as its vendor documents it; None where no figure is published (profiles/gpus.yaml
    says what each field means and where each row's figures come from)."""

    name: str  # as NVML reports it
    aliases: tuple[str, ...]
    memory_bytes: int
    compute_capability: str
    bandwidth_gb_s: float | None
    fp16_tflops: float | None
    bf16_tflops: float | None
    fp8_tflops: float | None
    int8_tops: float | None
    nvlink_gb_s: float | None
    pcie_gen: int | None
    pcie_lanes: int | None

    @property
    def labels(self) -> tuple[str, ...]:
        """Every name the card answers to: its reported name, then its aliases."""
        return (self.name, *self.aliases)


GpuTable = Sequence[GpuSpec]


def table_path() -> Path:
    return profiles_dir() / TABLE_FILE


@functools.cache
def _table_at(path: Path) -> tuple[GpuSpec, ...]:
    """A table read once per process: the planner looks cards up for every plan it prices."""
    return load_gpu_table(path)


def load_gpu_table(path: Path | None = None) -> tuple[GpuSpec, ...]:
    """The cards of ``path`` (default: the shipped profiles/gpus.yaml), in file order."""
    path = path if path is not None else table_path()
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the GPU table: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None
    if not isinstance(data, list) or not isinstance(node, yaml.SequenceNode) or not data:
        raise ConfigError(f"{path}:1: the GPU table must be a list of cards")
    specs: list[GpuSpec] = []
    owners: dict[str, str] = {}  # casefolded label → the card it names
    for position, (entry, entry_node) in enumerate(zip(data, node.value, strict=True)):
        where = f"{path}:{entry_node.start_mark.line + 1}: card {position + 1}"
        spec = _spec(entry, where)
        for label in spec.labels:
            key = label.casefold()
            if key in owners:
                raise ConfigError(f"{where} ({spec.name}): {label!r} already names {owners[key]!r}")
            owners[key] = spec.name
        specs.append(spec)
    return tuple(specs)


def _spec(entry: Any, where: str) -> GpuSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: a card must be a mapping of keys, not {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: 'name' must be the card's name as its driver reports it")
    where = f"{where} ({name})"
    for key in entry:
        if key not in _KEYS:
            close = difflib.get_close_matches(str(key), _KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (keys: {', '.join(_KEYS)})"
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")
    missing = [key for key in _KEYS if key not in entry]
    if missing:
        raise ConfigError(
            f"{where}: missing {', '.join(map(repr, missing))} (null where none is published)"
        )
    aliases = entry["aliases"]
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a.strip() for a in aliases):
        raise ConfigError(f"{where}: 'aliases' must be a list of names (quote numbers: \"4060\")")
    capability = entry["compute_capability"]
    if not isinstance(capability, str) or not CAPABILITY.match(capability):
        raise ConfigError(
            f"{where}: 'compute_capability' must be a quoted MAJOR.MINOR such as \"8.9\", "
            f"not {capability!r}"
        )
    return GpuSpec(
        name=name,
        aliases=tuple(aliases),
        memory_bytes=_memory(entry["memory"], where),
        compute_capability=capability,
        **{key: _figure(entry[key], key, where, whole=False) for key in _FIGURES},
        **{key: _figure(entry[key], key, where, whole=True) for key in _COUNTS},
    )


def _memory(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(f"{where}: 'memory' must be a size such as 8GiB, not {value!r}")
    try:
        return parse_size(str(value))
    except AutoquantError as err:
        raise ConfigError(f"{where}: 'memory': {err}") from None


def _figure(value: Any, key: str, where: str, *, whole: bool) -> Any:
    """``value`` checked: None, or a number above 0 (a whole one if ``whole``); the YAML's own
    value is returned, so it stays an int or a float as written."""
    if value is None:
        return None
    number = isinstance(value, int) or (not whole and isinstance(value, float))
    if isinstance(value, bool) or not number or value <= 0:
        kind = "a whole number" if whole else "a number"
        raise ConfigError(f"{where}: {key!r} must be null or {kind} above 0, not {value!r}")
    return value


def find_gpu(name: str, table: GpuTable | None = None) -> GpuSpec:
    """The card ``name`` names (its reported name or an alias, in any case); an unknown name is
    one line with the closest names."""
    table = table if table is not None else _table_at(table_path())
    wanted = name.strip().casefold()
    for spec in table:
        if wanted in (label.casefold() for label in spec.labels):
            return spec
    labels = {label.casefold(): label for spec in table for label in spec.labels}
    close = difflib.get_close_matches(wanted, list(labels), n=3, cutoff=0.6)
    if close:
        *others, last = [repr(labels[c]) for c in close]
        hint = f"did you mean {', '.join(others) + ' or ' if others else ''}{last}?"
    else:
        hint = "known: " + ", ".join(
            spec.aliases[0] if spec.aliases else spec.name for spec in table
        )
    raise AutoquantError(f"unknown GPU {name!r}: {hint} (the cards are in profiles/{TABLE_FILE})")


def spec_for(gpu: GpuInfo, table: GpuTable | None = None) -> GpuSpec | None:
    """The table's row for a probed (or emulated) card, by the name its driver reports; None for
    a card the table lacks. Memory is not compared: a card capped by --vram-limit is the same card.
    """
    table = table if table is not None else _table_at(table_path())
    reported = gpu.name.strip().casefold()
    return next((spec for spec in table if spec.name.casefold() == reported), None)
