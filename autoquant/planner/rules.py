"""Profiles: the default decision tree and settings, presets, user files and `--set` overrides.

Layers merge in order default < preset/user files (in the order given) < `--set`. Every layer is
validated against the default's keys and types, and each numeric key against its range (RANGES,
which the CLI's argument types share); errors name the file, line and key in one line.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from autoquant.backends import backend_class, backend_classes, backend_names, validate_tier_name
from autoquant.backends.tier import COMPUTE_DTYPES, MEMORY_OPTIONS
from autoquant.core.errors import AutoquantError, ConfigError
from autoquant.core.paths import profiles_dir
from autoquant.core.units import parse_size
from autoquant.models.step_cache import STEP_CACHES
from autoquant.planner.facts import FACTS

# Keys whose default is null (or a list) and the types they accept when set.
_NULLABLE: dict[str, tuple[type, ...]] = {
    "hardware.device": (str,),
    "hardware.vram": (str, int, float),
    "hardware.compute_capability": (str, float),
    "hardware.gpu": (str,),  # a card of profiles/gpus.yaml, by name or alias
    "request.width": (int,),
    "request.height": (int,),
    "force.backend": (str,),
    "force.precision": (str,),
    "force.text_encoders": (str,),  # "backend precision"
}
# What decides among the plans that fit (planner/plan.py says how each one chooses).
OBJECTIVES = ("speed", "balanced", "quality", "card")
# Whether plans compile the denoiser (planner/plan.py _compiled_variants says how each one does).
COMPILE_MODES = ("auto", "always", "never")
_CHOICES: dict[str, tuple[str, ...]] = {
    "planner.optimize": OBJECTIVES,
    "planner.compute_dtype": ("auto", *COMPUTE_DTYPES),
    "planner.compile": COMPILE_MODES,
    "planner.cache": STEP_CACHES,
    "hardware.device": ("cuda", "cpu", "mps"),
    "priorities.quality": ("balanced", "quality_first"),
    "priorities.deployment": ("production", "development"),
    "priorities.target": ("desktop", "edge"),
    "components.quantize_text_encoders": ("auto", "always", "never"),
    "components.cpu_text_encoders": ("auto", "never"),
}
# Sections validated by their own functions rather than key by key.
_FREEFORM = {
    "tree",
    "ladder",
    "precision",
    "force.memory_options",
    "components.text_encoder_formats",
}
# Keys holding a memory size ("8GB"), read by core/units.py's parse_size.
_SIZES = {"hardware.vram"}


@dataclass(frozen=True)
class Range:
    """The values a numeric setting (or the flag that sets it) may take: ``low`` to ``high``
    (None: no upper bound), ``low`` itself excluded when ``above_low``; ``step`` makes it a whole
    multiple of ``step`` (1: any whole number), None any real number."""

    low: float
    high: float | None
    step: int | None = None
    above_low: bool = False

    def contains(self, value: float) -> bool:
        if self.step is not None and (value != int(value) or int(value) % self.step):
            return False
        above = value > self.low if self.above_low else value >= self.low
        return above and (self.high is None or value <= self.high)

    def describe(self) -> str:
        kind = {None: "a number", 1: "a whole number"}.get(self.step, f"a multiple of {self.step}")
        low, high = _number(self.low), None if self.high is None else _number(self.high)
        if self.above_low:
            return f"{kind} greater than {low}" + (f" and at most {high}" if high else "")
        return f"{kind} from {low} to {high}" if high else f"{kind} of at least {low}"


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


# Image sides are multiples of the VAE's scale factor (8 in every supported family); 8192 is far
# past any family's native size (Flux's 1024) and already needs ~170 GB for the VAE decode alone
# (planner/estimate.py: 2,500 bytes per output pixel).
SIDE = Range(8, 8192, step=8)
# Past 1000 steps (SD's and SDXL's training timesteps) diffusers' DDIM-style schedulers refuse
# the call.
STEPS = Range(1, 1000, step=1)
BATCH = Range(1, 1024, step=1)
# Classifier-free guidance: 0 turns it off; past 30 every family's images are burnt out.
GUIDANCE_SCALE = Range(0, 30)
EXPECTED_IMAGES = Range(1, 1_000_000, step=1)
# The first-block cache's threshold: a relative change of the first block's residual.
CACHE_THRESHOLD = Range(0, 1, above_low=True)
# Every numeric key of profiles/default.yaml; "section.*" covers each key of a section.
RANGES: dict[str, Range] = {
    "planner.headroom": Range(0, 1, above_low=True),  # a fraction of free memory
    "planner.balanced_slowdown": Range(1, 100),  # a ratio of predicted times
    "planner.ladder_length": Range(1, 100, step=1),
    # Images a compile is amortized over: past a million, any compile the model prices is free.
    "planner.expected_images": EXPECTED_IMAGES,
    "planner.cache_threshold": CACHE_THRESHOLD,
    "thresholds.*": Range(0, 100_000),  # GB of a card's memory
    "request.width": SIDE,
    "request.height": SIDE,
    "request.batch": BATCH,
    "request.steps": STEPS,
}


def range_of(dotted: str) -> Range | None:
    section = dotted.rpartition(".")[0]
    return RANGES.get(dotted) or RANGES.get(f"{section}.*")


@dataclass(frozen=True)
class Layer:
    """One parsed source of settings, with the line of each dotted key for error messages."""

    name: str
    data: dict[str, Any]
    lines: dict[str, int]


def preset_names() -> list[str]:
    return sorted(p.stem for p in (profiles_dir() / "presets").glob("*.yaml"))


def _index_lines(node: yaml.Node, prefix: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            lines[key] = key_node.start_mark.line + 1
            _index_lines(value_node, key, lines)


def parse_yaml(text: str, name: str) -> Layer:
    """Parse one YAML document into a Layer; malformed YAML → ConfigError naming file and line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{name}:{mark.line + 1}" if mark is not None else name
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{name}:1: a profile must be a mapping of keys, not {type(data).__name__}"
        )
    lines: dict[str, int] = {}
    if node is not None:
        _index_lines(node, "", lines)
    return Layer(name, data, lines)


def load_layer(spec: str) -> Layer:
    """A user file path, or the name of a shipped preset (`rtx4060-8gb`)."""
    path = Path(spec).expanduser()
    if not path.is_file():
        preset = profiles_dir() / "presets" / f"{spec.removesuffix('.yaml')}.yaml"
        if not preset.is_file():
            names = ", ".join(preset_names())
            raise ConfigError(f"profile {spec!r}: no such file or preset (presets: {names})")
        path = preset
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"profile {spec!r}: cannot read it: {err}") from None
    return parse_yaml(text, str(path))


def parse_set(items: Iterable[str]) -> Layer:
    """`--set a.b=value` overrides; values are read as YAML scalars (true, 0.8, null, [a, b])."""
    data: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: write it as dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is set twice in different shapes")
        node[parts[-1]] = value
    return Layer("--set", data, {})


def default_layer() -> Layer:
    path = profiles_dir() / "default.yaml"
    return parse_yaml(path.read_text(encoding="utf-8"), str(path))


def _where(layer: Layer, key: str) -> str:
    line = layer.lines.get(key)
    return f"{layer.name}:{line}" if line else layer.name


def _check_keys(layer: Layer, data: dict[str, Any], schema: dict[str, Any], prefix: str) -> None:
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in schema:
            close = difflib.get_close_matches(str(key), [str(k) for k in schema], n=1)
            hint = (
                f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            )
            known = "" if hint else f" (known: {', '.join(map(str, schema))})"
            raise ConfigError(f"{_where(layer, dotted)}: unknown key {dotted!r}{hint}{known}")
        if dotted in _FREEFORM:
            continue
        expected = schema[key]
        if isinstance(expected, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{_where(layer, dotted)}: {dotted!r} must be a mapping")
            _check_keys(layer, value, expected, dotted)
            continue
        _check_value(layer, dotted, value, expected)


def _check_value(layer: Layer, dotted: str, value: Any, default: Any) -> None:
    if value is None:
        if dotted in _NULLABLE:
            return
        raise ConfigError(f"{_where(layer, dotted)}: {dotted!r} cannot be null")
    allowed: tuple[type, ...]
    valid = range_of(dotted)
    if dotted in _NULLABLE:
        allowed = _NULLABLE[dotted]
    elif isinstance(default, bool):
        allowed = (bool,)
    elif isinstance(default, (int, float)):
        # A whole-number setting is used as a count or a size: 6.0 would break slicing later.
        allowed = (int,) if valid is not None and valid.step is not None else (int, float)
    else:
        allowed = (type(default),)
    if isinstance(value, bool) and bool not in allowed:
        allowed_ok = False
    else:
        allowed_ok = isinstance(value, allowed)
    if not allowed_ok:
        names = " or ".join(t.__name__ for t in allowed)
        raise ConfigError(
            f"{_where(layer, dotted)}: {dotted!r} must be {names}, not {type(value).__name__} "
            f"({value!r})"
        )
    choices = _CHOICES.get(dotted)
    if choices and value not in choices:
        raise ConfigError(
            f"{_where(layer, dotted)}: {dotted!r} is {value!r}; choose one of {', '.join(choices)}"
        )
    if valid is not None and not valid.contains(value):
        raise ConfigError(
            f"{_where(layer, dotted)}: {dotted!r} is {value!r}; it must be {valid.describe()}"
        )
    if dotted in _SIZES:
        try:
            parse_size(str(value))
        except AutoquantError as err:
            raise ConfigError(f"{_where(layer, dotted)}: {dotted!r}: {err}") from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "precision":
            out[key] = _merge(out[key], value)
        elif isinstance(value, dict) and key == "precision":
            merged = dict(out.get(key, {}))
            merged.update(copy.deepcopy(value))
            out[key] = merged
        else:
            out[key] = copy.deepcopy(value)
    return out


def _parse_tier(text: Any, where: str) -> tuple[str, str]:
    if not isinstance(text, str) or len(text.split()) != 2:
        raise ConfigError(f"{where}: ladder entries are 'backend precision', e.g. 'gguf q4_0'")
    backend, precision = text.split()
    try:
        validate_tier_name(backend, precision)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    return backend, precision


def _parse_encoder_format(entry: tuple[str, str], where: str) -> tuple[str, str]:
    """A text-encoder format: a backend that quantizes text encoders, at a precision of its."""
    if not backend_class(entry[0]).quantizes_text_encoders():
        able = ", ".join(b.name for b in backend_classes() if b.quantizes_text_encoders())
        raise ConfigError(f"{where}: {entry[0]} does not quantize text encoders (choose {able})")
    return entry


def encoder_formats(settings: dict[str, Any]) -> list[tuple[str, str]]:
    """components.text_encoder_formats as (backend, precision) pairs."""
    return [
        _parse_tier(e, "components.text_encoder_formats")
        for e in settings["components"]["text_encoder_formats"]
    ]


def _check_sections(settings: dict[str, Any], layers: Sequence[Layer]) -> None:
    def where(key: str) -> str:
        for layer in reversed(layers):
            if key in layer.lines or _has(layer.data, key):
                return _where(layer, key)
        return "profile"

    thresholds = settings["thresholds"]
    tree = settings["tree"]
    if not isinstance(tree, list) or not tree:
        raise ConfigError(f"{where('tree')}: 'tree' must be a non-empty list of rules")
    last_floor: float | None = None
    last_rule = ""
    for index, rule in enumerate(tree):
        here = f"{where('tree')} (rule {index + 1})"
        if not isinstance(rule, dict) or "backend" not in rule:
            raise ConfigError(f"{here}: each rule needs 'backend' (and optional 'rule', 'when')")
        unknown = set(rule) - {"rule", "when", "backend"}
        if unknown:
            raise ConfigError(f"{here}: unknown key(s) {sorted(unknown)} in a tree rule")
        try:
            validate_tier_name(rule["backend"], None)
        except ValueError as err:
            raise ConfigError(f"{here}: {err}") from None
        when = rule.get("when") or {}
        if not isinstance(when, dict):
            raise ConfigError(f"{here}: 'when' must be a mapping of fact: condition")
        for fact, cond in when.items():
            if fact not in FACTS:
                close = difflib.get_close_matches(str(fact), list(FACTS), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(FACTS)})"
                raise ConfigError(f"{here}: unknown fact {fact!r}{hint}")
            if isinstance(cond, dict):
                bad = set(cond) - {"at_least", "below"}
                if bad:
                    raise ConfigError(f"{here}: conditions are at_least/below, not {sorted(bad)}")
                for bound in cond.values():
                    resolve_bound(bound, thresholds, here)
                if fact == "vram_gb" and "at_least" in cond:
                    floor = resolve_bound(cond["at_least"], thresholds, here)
                    if last_floor is not None and floor > last_floor:
                        bound = cond["at_least"]
                        if isinstance(bound, str):
                            here = where(f"thresholds.{bound}")
                        name = rule.get("rule", index + 1)
                        raise ConfigError(
                            f"{here}: thresholds out of order: rule {name!r} "
                            f"needs vram_gb >= {floor:g} after {last_rule!r} took >= "
                            f"{last_floor:g}, so it can never fire"
                        )
                    last_floor, last_rule = floor, str(rule.get("rule", index + 1))

    for backend, spec in settings["precision"].items():
        here = where(f"precision.{backend}")
        if backend not in backend_names():
            raise ConfigError(f"{here}: unknown backend {backend!r} in 'precision'")
        if not isinstance(spec, dict) or "by" not in spec:
            raise ConfigError(f"{here}: precision.{backend} needs 'by: <priority>' and choices")
        if spec["by"] not in settings["priorities"]:
            raise ConfigError(f"{here}: precision.{backend}.by must name a priority")
        for choice, precision in spec.items():
            if choice == "by":
                continue
            try:
                validate_tier_name(backend, precision)
            except ValueError as err:
                raise ConfigError(f"{here}: {err}") from None

    ladder = settings["ladder"]
    if not isinstance(ladder, list) or not ladder:
        raise ConfigError(f"{where('ladder')}: 'ladder' must be a non-empty list")
    for entry in ladder:
        _parse_tier(entry, where("ladder"))
    formats = settings["components"]["text_encoder_formats"]
    here = where("components.text_encoder_formats")
    if not isinstance(formats, list):
        raise ConfigError(
            f"{here}: components.text_encoder_formats is a list of 'backend precision'"
        )
    for entry in formats:
        _parse_encoder_format(_parse_tier(entry, here), here)

    force = settings["force"]
    if force["precision"] is not None and force["backend"] is None:
        raise ConfigError(f"{where('force.precision')}: force.precision needs force.backend")
    if force["backend"] is not None:
        try:
            validate_tier_name(force["backend"], force["precision"])
        except ValueError as err:
            raise ConfigError(f"{where('force.backend')}: {err}") from None
    if force["text_encoders"] is not None:
        here = where("force.text_encoders")
        if force["backend"] is None:
            raise ConfigError(f"{here}: force.text_encoders needs force.backend")
        _parse_encoder_format(_parse_tier(force["text_encoders"], here), here)
    options = force["memory_options"]
    if not isinstance(options, list) or any(o not in MEMORY_OPTIONS for o in options):
        raise ConfigError(
            f"{where('force.memory_options')}: force.memory_options is a list of "
            f"{', '.join(MEMORY_OPTIONS)}"
        )


def _has(data: dict[str, Any], dotted: str) -> bool:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def resolve_bound(bound: Any, thresholds: dict[str, Any], where: str) -> float:
    """A condition's bound: a number, or the name of a key under `thresholds`."""
    if isinstance(bound, bool):
        raise ConfigError(f"{where}: a bound must be a number or a threshold name, not {bound}")
    if isinstance(bound, (int, float)):
        return float(bound)
    if isinstance(bound, str) and bound in thresholds:
        return float(thresholds[bound])
    raise ConfigError(f"{where}: unknown threshold {bound!r} (known: {', '.join(thresholds)})")


def load_settings(profiles: Sequence[str] = (), overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Effective settings: default.yaml, then each profile (preset name or file), then `--set`."""
    default = default_layer()
    layers = [default, *(load_layer(p) for p in profiles), parse_set(overrides)]
    settings: dict[str, Any] = {}
    for layer in layers:
        _check_keys(layer, layer.data, default.data, "")
        settings = _merge(settings, layer.data)
    _check_sections(settings, layers)
    return settings


def ladder_entries(settings: dict[str, Any]) -> list[tuple[str, str]]:
    return [_parse_tier(e, "ladder") for e in settings["ladder"]]
