"""`plan(profile, model, rules, request) -> Plan`: price every tier that fits, choose by the
objective (planner.optimize: the fastest plan at the fidelity asked for, or the design card's
tree), and lay out the fallback ladder. Pure: no I/O beyond reading the model's configs and the
shipped tables."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from autoquant.backends import UNQUANTIZED, backend_class
from autoquant.backends.tier import GROUP_OFFLOAD_OPTIONS, OFFLOAD_OPTIONS, EncoderFormat, Tier
from autoquant.core.errors import AutoquantError
from autoquant.core.units import format_bytes
from autoquant.models.step_cache import NOT_COMPILED, first_block_cache_refusal
from autoquant.models.types import ModelInventory, ModelSource
from autoquant.planner.estimate import Estimate, Request, component_format, estimate
from autoquant.planner.facts import machine_facts
from autoquant.planner.fidelity import fidelity_class, fidelity_rank
from autoquant.planner.latency import Latency, compile_figure, predict
from autoquant.planner.rules import encoder_formats, ladder_entries, load_settings, resolve_bound
from autoquant.probe.types import HardwareProfile

# The design card's order of memory options by what they cost in speed, cheapest first (the card
# objective's ladder): falling down it tries every tier at one cost before any tier at the next:
# model offload moves each component once per generation, group offload streams the weights on
# every step. On an H200, a Flux-dev torchao int8 transformer forward took 8.0 s with group
# offload, while with model offload a forward costs what it does resident (quanto int8: 233 ms;
# gguf q5_1: 473 ms). The other objectives rank by the latency model instead.
_OFFLOAD_COSTS = (None, "model_cpu_offload", "group_offload_streams", "group_offload")
# Where a denoiser is compiled: CUDA (the GPU figures, profiles/latency.yaml compile) and the CPU
# (torch.compile ran there: docs/runs/compile-cache-cpu/). Not ROCm, XPU or MPS: never measured.
_COMPILES_ON = ("cuda", "cpu")


@dataclass(frozen=True)
class PlannedTier:
    """A tier with the memory options that make it fit, and its estimate."""

    tier: Tier
    estimate: Estimate
    fits: bool
    device_map: str | None = None  # "balanced": components spread over several GPUs
    latency: Latency | None = None  # None: a format the latency model has no figure for here
    fidelity: str = ""  # its fidelity class (planner/fidelity.py)
    # Each component's format, placement and weight bytes (_parts).
    parts: dict[str, dict[str, Any]] = field(default_factory=dict)
    compile_weight: float = 1.0  # compile_weight(): its compile's share a generation carries

    @property
    def label(self) -> str:
        return self.tier.label + (" (balanced over GPUs)" if self.device_map else "")

    @property
    def seconds(self) -> float:
        """Predicted seconds of one generation; unpriced tiers rank last."""
        return self.latency.seconds if self.latency else float("inf")

    @property
    def ranked_seconds(self) -> float:
        """What the objectives rank: one generation, plus its share of the compile."""
        if self.latency is None:
            return float("inf")
        return self.latency.seconds + self.latency.compile_seconds * self.compile_weight

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.tier.to_dict(),
            "device_map": self.device_map,
            "fits": self.fits,
            "fidelity": self.fidelity,
            "estimate_bytes": self.estimate.required_bytes,
            "estimate": self.estimate.to_dict(),
            "latency": self.latency.to_dict() if self.latency else None,
            "parts": self.parts,
        }


def compile_generations(settings: dict[str, Any], batch: int) -> int:
    """Generations a compile is spread over: the images expected (planner.expected_images),
    ``batch`` a generation."""
    images = int(settings["planner"]["expected_images"])
    return max(-(-images // batch), 1)


def compile_weight(settings: dict[str, Any], batch: int) -> float:
    """The share of its compile's seconds each generation carries in the ranking: 1 over the
    generations expected; 0 under planner.compile always, where the user has accepted it."""
    if str(settings["planner"]["compile"]) == "always":
        return 0.0
    return 1 / compile_generations(settings, batch)


@dataclass(frozen=True)
class Plan:
    model: str
    family: str
    device: str  # "cuda", "cpu", "mps", …: where the pipeline runs
    budget_bytes: int  # memory the plan may use on that device
    chosen: PlannedTier
    ladder: tuple[PlannedTier, ...]  # chosen first, then each needing less memory
    path: tuple[str, ...]  # every rule that fired, with the facts it compared
    request: Request
    settings: dict[str, Any]

    @property
    def forced(self) -> bool:
        """Whether the user forced the first tier (`--backend`, `force.backend`)."""
        return bool(self.settings["force"]["backend"])

    @property
    def objective(self) -> str:
        return str(self.settings["planner"]["optimize"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "family": self.family,
            "device": self.device,
            "budget_bytes": self.budget_bytes,
            "chosen": self.chosen.to_dict(),
            "ladder": [t.to_dict() for t in self.ladder],
            "path": list(self.path),
            "request": self.request.to_dict(),
            "settings": self.settings,
        }


@dataclass
class _Context:
    profile: HardwareProfile
    inventory: ModelInventory
    settings: dict[str, Any]
    request: Request
    compute_dtype: str
    budget: int
    path: list[str]
    warm_compiles: frozenset[str] = frozenset()  # labels of tiers with a compile cache here

    @property
    def on_gpu(self) -> bool:
        return self.profile.has_gpu

    @property
    def objective(self) -> str:
        return str(self.settings["planner"]["optimize"])

    @property
    def step_cache(self) -> float | None:
        """The first-block cache's threshold every plan gets (planner.cache), or None."""
        planner = self.settings["planner"]
        return float(planner["cache_threshold"]) if planner["cache"] == "first-block" else None

    @property
    def compile_mode(self) -> str:
        # A cached denoiser is not compiled: _check_step_cache says why.
        return "never" if self.step_cache is not None else str(self.settings["planner"]["compile"])

    @property
    def compile_generations(self) -> int:
        return compile_generations(self.settings, self.request.batch)

    def planned(self, tier: Tier, device_map: str | None = None) -> PlannedTier:
        """``tier`` estimated, judged against the budget, priced and classed."""
        est = estimate(self.inventory, tier, self.request, on_gpu=self.on_gpu)
        warm = tier.compiled and tier.label in self.warm_compiles
        return PlannedTier(
            tier,
            est,
            _fits(self, est, device_map),
            device_map,
            predict(self.inventory, tier, self.request, est, self.profile, warm=warm),
            fidelity_class(tier),
            _parts(self.inventory, tier, est),
            compile_weight(self.settings, self.request.batch),
        )


def _parts(inventory: ModelInventory, tier: Tier, est: Estimate) -> dict[str, dict[str, Any]]:
    """What each component of ``tier`` is: its format (the backend's precision where the tier
    quantizes it, else the dtype the backend loads it in), its placement and its weight bytes."""
    backend = backend_class(tier.backend)
    out: dict[str, dict[str, Any]] = {}
    for component in inventory.components:
        quantized = component_format(tier, component)
        if component.name in est.cpu_components:
            out[component.name] = {
                "format": tier.compute_dtype,
                "placement": "cpu",
                "bytes": est.cpu_components[component.name],
            }
            continue
        if quantized is not None:
            fmt = " ".join(quantized)
        elif component.role == "vae":
            fmt = backend.vae_dtype(tier.precision, tier.compute_dtype)
        else:
            fmt = backend.load_dtype(tier.precision, tier.compute_dtype)
        out[component.name] = {
            "format": fmt,
            "placement": tier.placement,
            "bytes": est.components[component.name],
        }
    return out


def compute_dtype_for(profile: HardwareProfile, setting: str) -> str:
    """bf16 where the target has bf16 units; else fp16 on a GPU and fp32 on a CPU."""
    if setting != "auto":
        return setting
    if profile.bf16:
        return "bf16"
    return "fp16" if profile.has_gpu else "fp32"


def _budget(profile: HardwareProfile, headroom: float) -> int:
    gpu = profile.primary_gpu
    if profile.has_gpu and gpu is not None:
        return int(gpu.free_bytes * headroom)
    return int(profile.ram_available_bytes * headroom)


def _match(
    when: dict[str, Any], facts: dict[str, Any], thresholds: dict[str, Any]
) -> tuple[bool, str]:
    """Whether a rule's conditions hold, and the comparison in words."""
    said: list[str] = []
    for fact, cond in when.items():
        value = facts[fact]
        if isinstance(cond, dict):
            for op, bound in cond.items():
                limit = resolve_bound(bound, thresholds, "tree")
                holds = value >= limit if op == "at_least" else value < limit
                sign = (">=" if holds else "<") if op == "at_least" else ("<" if holds else ">=")
                said.append(f"{fact} {value:g} {sign} {limit:g}")
                if not holds:
                    return False, "; ".join(said)
        else:
            said.append(f"{fact} is {value}" if value == cond else f"{fact} is {value}, not {cond}")
            if value != cond:
                return False, "; ".join(said)
    return True, "; ".join(said) or "always"


def _unusable_reason(ctx: _Context, backend: str, precision: str) -> str | None:
    declared = backend_class(backend)
    accelerator = ctx.profile.accelerator if ctx.on_gpu else "cpu"
    gpu = ctx.profile.primary_gpu
    refused = declared.refusal(accelerator, precision, fp8=bool(ctx.on_gpu and gpu and gpu.fp8))
    if refused:
        return refused
    if declared.distribution is None:
        return None  # nothing to install
    status = ctx.profile.backends.get(declared.distribution)
    if status is None or not status.usable:
        return (status.reason if status else None) or f"{backend} is not installed"
    return None


def _base_tier(ctx: _Context, backend: str, precision: str) -> Tier:
    inv = ctx.inventory
    if backend == UNQUANTIZED:
        return Tier(UNQUANTIZED, precision, precision)
    components: tuple[str, ...] = (inv.denoiser.name,)
    policy = ctx.settings["components"]["quantize_text_encoders"]
    if policy == "always" and backend_class(backend).quantizes_text_encoders():
        components += tuple(c.name for c in inv.text_encoders)
    return Tier(backend, precision, ctx.compute_dtype, components)


def _with_encoders(ctx: _Context, base: Tier, backend: str, precision: str) -> Tier:
    """``base`` with its text encoders quantized by ``backend`` at ``precision`` instead."""
    names = tuple(c.name for c in ctx.inventory.text_encoders)
    own = tuple(n for n in base.quantized_components if n not in names)
    encoders = EncoderFormat(backend, precision, names)
    return replace(base, quantized_components=own, encoders=encoders)


def _mixed(ctx: _Context, base: Tier) -> list[Tier]:
    """``base`` with its text encoders in each of components.text_encoder_formats that another
    backend brings, can run here, and that ``base``'s backend declares it ran beside."""
    if not ctx.inventory.text_encoders:
        return []
    if ctx.settings["components"]["quantize_text_encoders"] == "never":
        return []
    declared = backend_class(base.backend).encoder_backends
    return [
        _with_encoders(ctx, base, backend, precision)
        for backend, precision in encoder_formats(ctx.settings)
        if backend != base.backend
        and backend in declared
        and not _unusable_reason(ctx, backend, precision)
    ]


def _variants(ctx: _Context, base: Tier) -> list[tuple[Tier, str | None, str]]:
    """Ways to make a tier smaller, cheapest in speed first: (tier, device_map, what changed),
    each with the memory options the user required (force.memory_options without
    force.backend: `--cpu-offload`, `--vae-tiling`, `--vae-slicing`), duplicates dropped."""
    base = replace(base, compiled=False)  # compiled or not is decided below, per variant
    required = ctx.settings["force"]["memory_options"]
    if ctx.settings["force"]["backend"] or not required:
        return _compiled_variants(ctx, _shrinking(ctx, base))
    placement = next((o for o in reversed(required) if o in OFFLOAD_OPTIONS), None)
    if placement and not ctx.on_gpu:
        raise AutoquantError(
            f"{placement.replace('_', ' ')} moves weights between a GPU and the CPU: this plan "
            "is for the CPU (drop --cpu-offload, or plan for a GPU)"
        )
    # A required group offload is met by either kind: streams are its faster form.
    placements = GROUP_OFFLOAD_OPTIONS if placement == "group_offload" else (placement,)
    others = [o for o in required if o not in OFFLOAD_OPTIONS]
    out: list[tuple[Tier, str | None, str]] = []
    for tier, device_map, change in _shrinking(ctx, base):
        tier = tier.with_options(*others)
        if placement and tier.placement not in placements:
            continue
        if all((tier, device_map) != (t, d) for t, d, _ in out):
            out.append((tier, device_map, change))
    return _compiled_variants(ctx, out)


def _can_compile(ctx: _Context, tier: Tier, device_map: str | None) -> bool:
    """Whether ``tier``'s denoiser may be compiled here: resident on one device where
    torch.compile works. Offloaded plans never are: fp8 with CPU offload breaks compiled
    (pytorch#141548), and no offloaded plan was measured compiled."""
    accelerator = ctx.profile.accelerator if ctx.on_gpu else "cpu"
    return accelerator in _COMPILES_ON and tier.placement == "resident" and device_map is None


def _compiled_only(tier: Tier) -> bool:
    return tier.precision in backend_class(tier.backend).compiled_only


def _compiled_variants(
    ctx: _Context, variants: list[tuple[Tier, str | None, str]]
) -> list[tuple[Tier, str | None, str]]:
    """``variants`` (all eager) as planner.compile has them: auto adds a compiled twin after
    each that can be compiled and whose format has a compiled measurement; always compiles each
    that can be; never compiles none. A format that pays only compiled (a backend's
    ``compiled_only``: torchao float8) is never offered eager."""
    mode = ctx.compile_mode
    out: list[tuple[Tier, str | None, str]] = []
    for tier, device_map, change in variants:
        compiled = replace(tier, compiled=True)
        can = mode != "never" and _can_compile(ctx, tier, device_map)
        if can and mode == "auto":
            can = compile_figure(ctx.inventory, tier, on_gpu=ctx.on_gpu) is not None
        if not _compiled_only(tier) and not (can and mode == "always"):
            out.append((tier, device_map, change))
        if can:
            out.append((compiled, device_map, f"{change}, compiled"))
    return out


def _shrinking(ctx: _Context, base: Tier) -> list[tuple[Tier, str | None, str]]:
    """Ways to make a tier smaller, cheapest in speed first: (tier, device_map, what changed)."""
    inv = ctx.inventory
    backend = backend_class(base.backend)
    out: list[tuple[Tier, str | None, str]] = [(base, None, "as is")]
    tier = base
    policy = ctx.settings["components"]["quantize_text_encoders"]
    if (
        policy == "auto"
        and backend.quantizes_text_encoders()
        and inv.text_encoders
        and not base.encoders_quantized
    ):
        names = base.quantized_components + tuple(c.name for c in inv.text_encoders)
        tier = replace(base, quantized_components=names)
        out.append((tier, None, "with the text encoders quantized"))
    tier = tier.with_options("vae_slicing", "vae_tiling")
    out.append((tier, None, "with VAE slicing and tiling"))
    if (
        ctx.on_gpu
        and inv.text_encoders
        and ctx.objective != "card"
        and ctx.settings["components"]["cpu_text_encoders"] == "auto"
        and ctx.compute_dtype == "bf16"
        and ctx.profile.cpu.bf16
        and backend.beside_cpu_text_encoders
    ):
        # Unquantized, at the compute dtype (bitsandbytes refuses the CPU, and a CPU without
        # bf16 units runs bf16 5.7x slower than fp32: docs/runs/cpu-text-encoder/): so only on a
        # CPU with bf16 units. The pipelines cast the encoders' outputs to the encoders' dtype,
        # which must then be the denoiser's.
        encoder_names = {c.name for c in inv.text_encoders}
        alone = replace(
            base,
            quantized_components=tuple(
                n for n in base.quantized_components if n not in encoder_names
            ),
            encoders=None,
            cpu_text_encoders=True,
        ).with_options("vae_slicing", "vae_tiling")
        out.append((alone, None, "with the text encoders on the CPU"))
    # The card's tree quantizes before it offloads; priced by time, offloading the unquantized
    # model competes too (Flux-dev bf16 streamed, against a 4-bit model resident).
    if not ctx.on_gpu or (base.backend == UNQUANTIZED and ctx.objective == "card"):
        return out
    if len(ctx.profile.gpus) > 1 and ctx.settings["planner"]["allow_multi_gpu"]:
        out.append((tier, "balanced", f"spread over {len(ctx.profile.gpus)} GPUs"))
    if not ctx.settings["planner"]["allow_offload"]:
        return out
    changes = {
        "model_cpu_offload": "with model CPU offload",
        "group_offload_streams": "with group offload on CUDA streams",
        "group_offload": "with group offload",
    }
    for option, change in changes.items():
        # CUDA streams: not on MPS, whose group offload copies synchronously.
        if option == "group_offload_streams" and ctx.profile.accelerator == "mps":
            continue
        # Every backend of the tier must survive it: a mixed plan's text encoders too
        # (bitsandbytes' fail under group offload, whoever quantizes the denoiser).
        if all(backend_class(part.backend).survives(option) for part in tier.parts):
            out.append((tier.with_options(option), None, change))
    return out


def _fits(ctx: _Context, est: Estimate, device_map: str | None) -> bool:
    if est.host_bytes > ctx.profile.ram_available_bytes:
        return False
    if device_map == "balanced":
        headroom = ctx.settings["planner"]["headroom"]
        budgets = [int(g.free_bytes * headroom) - est.overhead_bytes for g in ctx.profile.gpus]
        largest = max(est.components.values())
        return sum(budgets) >= max(est.peak_bytes, est.load_peak_bytes) and max(budgets) >= largest
    return est.required_bytes <= ctx.budget


def _offload_cost(tier: Tier) -> int:
    """Index in _OFFLOAD_COSTS of the costliest offloading the tier uses."""
    return max(
        (i for i, option in enumerate(_OFFLOAD_COSTS) if option in tier.memory_options), default=0
    )


@dataclass(frozen=True)
class _Fit:
    """The first variant of a tier that fits (or the smallest tried, marked not fitting), and
    every variant tried on the way there with what changed, so the path can tell it."""

    planned: PlannedTier
    tried: tuple[tuple[PlannedTier, str], ...]


def _fit(
    ctx: _Context,
    backend: str,
    precision: str,
    *,
    allow_shrink: bool = True,
    max_offload_cost: int = len(_OFFLOAD_COSTS) - 1,
) -> _Fit:
    """The first variant of a tier that fits the budget (offloading at most as costly as
    ``max_offload_cost``), or the smallest one tried, marked not fitting."""
    tried: list[tuple[PlannedTier, str]] = []
    for tier, device_map, change in _variants(ctx, _base_tier(ctx, backend, precision)):
        if _offload_cost(tier) > max_offload_cost:
            break
        planned = ctx.planned(tier, device_map)
        tried.append((planned, change))
        if planned.fits or not allow_shrink:
            break
    assert tried
    return _Fit(tried[-1][0], tuple(tried))


def _describe_fit(ctx: _Context, planned: PlannedTier) -> str:
    need = format_bytes(planned.estimate.required_bytes)
    where = "GPU" if ctx.on_gpu else "RAM"
    verdict = "fits" if planned.fits else "does not fit"
    return f"{planned.label}: needs ~{need} {verdict} the {where} budget {format_bytes(ctx.budget)}"


def _tree_choice(ctx: _Context) -> tuple[str, str]:
    settings = ctx.settings
    facts = machine_facts(ctx.profile)
    thresholds = settings["thresholds"]
    for rule in settings["tree"]:
        name = rule.get("rule", rule["backend"])
        ok, said = _match(rule.get("when") or {}, facts, thresholds)
        backend = rule["backend"]
        if not ok:
            ctx.path.append(f"tree '{name}': {said} → not {backend}")
            continue
        reason = _unusable_reason(ctx, backend, _precision_for(ctx, backend, say=False))
        if reason:
            ctx.path.append(f"tree '{name}': {said} → {backend}, but it cannot run here: {reason}")
            continue
        ctx.path.append(f"tree '{name}': {said} → {backend}")
        return backend, _precision_for(ctx, backend)
    raise AutoquantError("no rule of the decision tree applies here and can run: check 'tree'")


def _precision_for(ctx: _Context, backend: str, *, say: bool = True) -> str:
    if backend == UNQUANTIZED:
        return ctx.compute_dtype
    spec = ctx.settings["precision"].get(backend)
    if spec is None:
        raise AutoquantError(f"profile has no 'precision.{backend}' entry to pick a precision")
    by = spec["by"]
    value = ctx.settings["priorities"][by]
    if value not in spec:
        raise AutoquantError(f"precision.{backend} has no choice for {by}={value!r}")
    precision = str(spec[value])
    if say:
        ctx.path.append(f"priority {by}={value} → {backend} {precision}")
    return precision


def _from_file(ctx: _Context) -> tuple[PlannedTier, tuple[PlannedTier, ...]]:
    """--gguf: the denoiser's weights are the user's file, so only how the pipeline is built
    around it is planned — memory options, placement, the text encoders' format — chosen by the
    objective among the file's tier's variants, with the fallbacks among them too (any other
    tier would put other weights in the file's place)."""
    force = ctx.settings["force"]
    ctx.path.append(f"--gguf {force['gguf']}: the denoiser's weights are the file's")
    base = _forced_base(ctx, force["backend"], force["precision"])
    # Unless forced, the text encoders as its own backend leaves them, or in another's format.
    bases = [base] if force["text_encoders"] else [base, *_mixed(ctx, base)]
    tried = [ctx.planned(t, device_map) for b in bases for t, device_map, _ in _variants(ctx, b)]
    if any(p.fits for p in tried):
        chosen = _timed_choice(ctx, tried)
        return chosen, _timed_ladder(ctx, chosen, tried)
    chosen = min(tried, key=lambda p: p.estimate.required_bytes)
    ctx.path.append(f"forced: {_describe_fit(ctx, chosen)}")
    ctx.path.append("warning: no memory option makes the file's tier fit; trying it anyway")
    return chosen, (chosen,)


def _forced_base(ctx: _Context, backend: str, precision: str) -> Tier:
    """The forced tier before its compile is decided: force.memory_options on, and the text
    encoders in force.text_encoders' format when one is given (a pair the backend does not
    declare is warned of in the path)."""
    force = ctx.settings["force"]
    base = _base_tier(ctx, backend, precision).with_options(*force["memory_options"])
    if not force["text_encoders"]:
        return base
    encoder_backend, encoder_precision = force["text_encoders"].split()
    if encoder_backend not in (*backend_class(backend).encoder_backends, backend):
        ctx.path.append(
            f"warning: {backend} does not declare text encoders of {encoder_backend} beside "
            "it (no run has shown the pair)"
        )
    return _with_encoders(ctx, base, encoder_backend, encoder_precision)


def _forced(ctx: _Context) -> PlannedTier:
    force = ctx.settings["force"]
    backend = force["backend"]
    precision = force["precision"] or _precision_for(ctx, backend)
    base = _forced_base(ctx, backend, precision)
    mode = ctx.compile_mode
    if _can_compile(ctx, base, None) and (
        mode == "always" or (mode == "auto" and _compiled_only(base))
    ):
        base = replace(base, compiled=True)
    elif _compiled_only(base):
        ctx.path.append(
            f"warning: {backend} {precision} pays only compiled, and this plan cannot compile "
            f"it (planner.compile {mode}, placement {base.placement}): it runs eager, slower "
            "than unquantized"
        )
    chosen = ctx.planned(base)
    ctx.path.append(f"forced: {chosen.label}")
    for part in base.parts:
        reason = _unusable_reason(ctx, part.backend, part.precision)
        if reason:
            ctx.path.append(
                f"warning: {part.backend} cannot run here ({reason}); it will be recorded"
            )
    if not chosen.fits:
        ctx.path.append(f"warning: {_describe_fit(ctx, chosen)}; falling back on OOM")
    return chosen


def _card_choice(ctx: _Context) -> PlannedTier:
    """The design card's tree: memory classes first, then the first variant that fits."""
    settings = ctx.settings
    if settings["planner"]["skip_if_fits"] and ctx.on_gpu:
        unquantized = _fit(ctx, UNQUANTIZED, ctx.compute_dtype, allow_shrink=True).planned
        ctx.path.append(f"fits unquantized? {_describe_fit(ctx, unquantized)}")
        if unquantized.fits:
            ctx.path.append("→ no quantization: it only costs speed when the model fits")
            return unquantized
    elif ctx.on_gpu:
        ctx.path.append("planner.skip_if_fits is false → follow the decision tree")

    backend, precision = _tree_choice(ctx)
    fit = _fit(ctx, backend, precision)
    for planned, change in fit.tried:
        est = planned.estimate
        parts = ", ".join(f"{name} {format_bytes(size)}" for name, size in est.components.items())
        ctx.path.append(f"{backend} {precision} {change}: {_describe_fit(ctx, planned)} ({parts})")
    chosen = fit.planned
    if chosen.fits:
        return chosen
    for cost in range(len(_OFFLOAD_COSTS)):
        for entry in _card_entries(ctx):
            if _unusable_reason(ctx, *entry):
                continue
            candidate = _fit(ctx, *entry, max_offload_cost=cost).planned
            if candidate.fits:
                ctx.path.append(f"→ falling down the ladder: {_describe_fit(ctx, candidate)}")
                return candidate
    raise AutoquantError(
        f"no tier of {ctx.inventory.source.spec} fits the memory budget "
        f"{format_bytes(ctx.budget)} at {ctx.request.width}x{ctx.request.height}: the smallest, "
        f"{_describe_fit(ctx, chosen)}; use a smaller --size, a machine with more memory, "
        "or force a tier with --backend/--precision"
    )


def _seconds(planned: PlannedTier) -> str:
    if planned.latency is None:
        return "not priced"
    if planned.latency.compile_seconds and planned.compile_weight:
        return f"~{planned.seconds:.3g} s (~{planned.ranked_seconds:.3g} s with its compile)"
    return f"~{planned.seconds:.3g} s"


def _compiling(ctx: _Context, planned: PlannedTier) -> str:
    """What the chosen plan's compile costs, in words ("" for an eager plan)."""
    if not planned.tier.compiled or planned.latency is None:
        return ""
    warm = "warm: its compile cache is here" if planned.tier.label in ctx.warm_compiles else "cold"
    spread = (
        "asked for (planner.compile always)"
        if ctx.compile_mode == "always"
        else f"spread over {ctx.compile_generations} generations (planner.expected_images "
        f"{ctx.settings['planner']['expected_images']})"
    )
    seconds = planned.latency.compile_seconds
    return f"; compiling ~{seconds:.0f} s on its first call ({warm}), {spread}"


def _say_compiled(ctx: _Context, planned: list[PlannedTier]) -> None:
    """The path's line on which plans are compiled, and why not more."""
    compiled = [p for p in planned if p.tier.compiled]
    mode = ctx.compile_mode
    where = "GPU" if ctx.on_gpu else "CPU"
    accelerator = ctx.profile.accelerator if ctx.on_gpu else "cpu"
    if accelerator not in _COMPILES_ON:
        ctx.path.append(f"compile ({mode}): nothing is compiled on {accelerator} (not measured)")
    elif mode == "never":
        ctx.path.append("compile never: no plan is compiled (compiled-only formats left out)")
    else:
        which = "resident" if mode == "always" else "resident, of formats measured compiled"
        stand_ins: set[str] = set()
        for p in compiled:
            figure = compile_figure(ctx.inventory, p.tier, on_gpu=ctx.on_gpu, nearest=True)
            if figure is not None and figure.stands_in:
                stand_ins.add(f"{p.tier.backend} {p.tier.precision} at {figure.stands_in}'s")
        unmeasured = f"; not measured compiled: {', '.join(sorted(stand_ins))}" if stand_ins else ""
        ranked = (
            "ranked without their compile seconds (asked for)"
            if mode == "always"
            else f"each ranked with its compile spread over {ctx.compile_generations} generations"
        )
        ctx.path.append(
            f"compile {mode}: {len(compiled)} of {len(planned)} plans compiled ({which}, on the "
            f"{where}), {ranked}{unmeasured}"
        )


def _priced(ctx: _Context) -> list[PlannedTier]:
    """Every memory variant of every tier the plan space holds — unquantized at the compute
    dtype, then the profile's ladder tiers that can run here — estimated and priced."""
    bases = [(UNQUANTIZED, ctx.compute_dtype)]
    skipped: list[str] = []
    for backend, precision in ladder_entries(ctx.settings):
        if backend == UNQUANTIZED or (backend, precision) in bases:
            continue  # unquantized runs at the compute dtype; another dtype only costs speed
        if _unusable_reason(ctx, backend, precision):
            skipped.append(f"{backend} {precision}")
        else:
            bases.append((backend, precision))
    if skipped:
        ctx.path.append(f"left out what cannot run here: {', '.join(skipped)}")
    tiers = [_base_tier(ctx, backend, precision) for backend, precision in bases]
    tiers += [mixed for tier in tiers for mixed in _mixed(ctx, tier)]
    return [
        ctx.planned(tier, device_map)
        for base in tiers
        for tier, device_map, _ in _variants(ctx, base)
    ]


def _timed_choice(ctx: _Context, priced: list[PlannedTier]) -> PlannedTier:
    """Among the plans that fit, the one the objective asks for: the fastest (speed); the fastest
    of the best fidelity class (quality); the fastest of the best class among the plans within
    planner.balanced_slowdown of the fastest (balanced)."""
    _say_compiled(ctx, priced)
    fitting = [p for p in priced if p.fits]  # unpriced ones rank last (PlannedTier.seconds)
    if not fitting:
        smallest = min(priced, key=lambda p: p.estimate.required_bytes)
        raise AutoquantError(
            f"no tier of {ctx.inventory.source.spec} fits the memory budget "
            f"{format_bytes(ctx.budget)} at {ctx.request.width}x{ctx.request.height}: the "
            f"smallest, {_describe_fit(ctx, smallest)}; use a smaller --size, a machine with "
            "more memory, or force a tier with --backend/--precision"
        )
    by_time = sorted(fitting, key=lambda p: (p.ranked_seconds, p.estimate.required_bytes))
    fastest = by_time[0]
    objective = ctx.objective
    ctx.path.append(
        f"objective {objective}: {len(fitting)} of {len(priced)} plans fit; the fastest is "
        f"{fastest.label} {_seconds(fastest)} ({fastest.fidelity} class)"
    )
    pool = by_time
    if objective == "balanced":
        slowdown = float(ctx.settings["planner"]["balanced_slowdown"])
        limit = fastest.ranked_seconds * slowdown
        pool = [p for p in by_time if p.ranked_seconds <= limit] or by_time
        ctx.path.append(
            f"balanced: {len(pool)} plans within {slowdown:g}x of it (<= {limit:.3g} s)"
        )
    if objective != "speed":
        best = min(fidelity_rank(p.fidelity) for p in pool)
        pool = [p for p in pool if fidelity_rank(p.fidelity) == best]
    chosen = pool[0]
    loading = (
        f"; loading ~{chosen.latency.first_call_seconds:.0f} s the first time"
        if chosen.latency
        else ""
    )
    ctx.path.append(
        f"→ {chosen.label}: {_seconds(chosen)} an image, {chosen.fidelity} class, needs "
        f"~{format_bytes(chosen.estimate.required_bytes)} of {format_bytes(ctx.budget)}{loading}"
        f"{_compiling(ctx, chosen)}"
    )
    runner_up = next((p for p in by_time if p is not chosen), None)
    if runner_up is not None:
        ctx.path.append(
            f"runner-up: {runner_up.label} {_seconds(runner_up)} ({runner_up.fidelity} class)"
        )
    return chosen


def _timed_ladder(
    ctx: _Context, chosen: PlannedTier, priced: list[PlannedTier]
) -> tuple[PlannedTier, ...]:
    """The chosen plan first, then each next-fastest plan that fits needing less memory than the
    one before: what to fall back on after an out-of-memory."""
    ladder = [chosen]
    # Among plans as fast, the better fidelity class first: a fallback keeps what it can.
    by_time = sorted(
        (p for p in priced if p.fits),
        key=lambda p: (p.ranked_seconds, fidelity_rank(p.fidelity), p.estimate.required_bytes),
    )
    while len(ladder) < ctx.settings["planner"]["ladder_length"]:
        need = ladder[-1].estimate.required_bytes
        smaller = next((p for p in by_time if p.estimate.required_bytes < need), None)
        if smaller is None:
            break
        ladder.append(smaller)
    return tuple(ladder)


def _card_entries(ctx: _Context) -> list[tuple[str, str]]:
    """The profile's ladder for the card's tree, its unquantized entry at the compute dtype (as
    the timed plan space has it): "none bf16" on a device without bf16 would compute emulated
    (a CPU without bf16 units ran T5-XXL 5.7x slower at bf16 than fp32:
    docs/runs/cpu-text-encoder/)."""
    entries: list[tuple[str, str]] = []
    for backend, precision in ladder_entries(ctx.settings):
        entry = (backend, ctx.compute_dtype if backend == UNQUANTIZED else precision)
        if entry not in entries:
            entries.append(entry)
    return entries


def _card_ladder(ctx: _Context, chosen: PlannedTier) -> tuple[PlannedTier, ...]:
    """The chosen tier first, then every smaller way to run that fits: the chosen tier's own
    memory-saving variants and the profile's ladder tiers, each needing less than the one before.
    """
    candidates: list[PlannedTier] = []
    skipped: list[str] = []
    bases = [chosen.tier]
    for backend, precision in _card_entries(ctx):
        reason = _unusable_reason(ctx, backend, precision)
        if reason:
            skipped.append(f"{backend} {precision}")
        elif (backend, precision) != (chosen.tier.backend, chosen.tier.precision):
            bases.append(_base_tier(ctx, backend, precision))
    # Every memory-saving variant of the chosen tier; of the others, the first variant that fits.
    for index, base in enumerate(bases):
        for tier, device_map, _ in _variants(ctx, base):
            planned = ctx.planned(tier, device_map)
            if planned.fits:
                candidates.append(planned)
                if index:
                    break
    # Stable sort: among equal estimates the profile's order (and the chosen backend) wins.
    candidates.sort(key=lambda p: -p.estimate.required_bytes)
    ladder = [chosen]
    for candidate in candidates:
        if len(ladder) == ctx.settings["planner"]["ladder_length"]:
            break
        if candidate.estimate.required_bytes < ladder[-1].estimate.required_bytes:
            ladder.append(candidate)
    if skipped:
        ctx.path.append(f"ladder: left out what cannot run here: {', '.join(skipped)}")
    return tuple(ladder)


def _check_step_cache(ctx: _Context) -> None:
    """planner.cache first-block: only on a denoiser diffusers can cache, and never compiled
    (models/step_cache.py NOT_COMPILED)."""
    if ctx.step_cache is None:
        return
    refusal = first_block_cache_refusal(ctx.inventory)
    if refusal:
        raise AutoquantError(refusal)
    if ctx.settings["planner"]["compile"] == "always":
        raise AutoquantError(
            f"--cache first-block cannot be compiled ({NOT_COMPILED}): drop --compile always, "
            "or the cache"
        )
    ctx.path.append(
        f"step cache: first-block, threshold {ctx.step_cache:g}, on every plan (lossy, opt-in; "
        "not priced: the steps it skips depend on the weights and the prompt); nothing compiled"
    )


def _with_step_cache(ctx: _Context, planned: PlannedTier) -> PlannedTier:
    return replace(planned, tier=replace(planned.tier, first_block_cache=ctx.step_cache))


def _as_inventory(model: str | ModelSource | ModelInventory) -> ModelInventory:
    if isinstance(model, ModelInventory):
        return model
    from autoquant.models import inventory, resolve

    return inventory(model if isinstance(model, ModelSource) else resolve(model))


def plan(
    profile: HardwareProfile,
    model: str | ModelSource | ModelInventory,
    rules: dict[str, Any] | None = None,
    request: Request | None = None,
    warm_compiles: frozenset[str] = frozenset(),
) -> Plan:
    """Decide how to build ``model`` on the machine ``profile`` describes. ``warm_compiles``:
    the labels of the tiers whose compile cache is on this machine (execute/compile.py
    warm_labels), priced at a warm compile's seconds."""
    settings = rules if rules is not None else load_settings()
    inv = _as_inventory(model)
    if request is None:
        req = settings["request"]
        request = Request(
            width=req["width"] or inv.default_size,
            height=req["height"] or inv.default_size,
            batch=req["batch"],
            steps=req["steps"],
        )
    headroom = settings["planner"]["headroom"]
    ctx = _Context(
        profile=profile,
        inventory=inv,
        settings=settings,
        request=request,
        compute_dtype=compute_dtype_for(profile, settings["planner"]["compute_dtype"]),
        budget=_budget(profile, headroom),
        path=[],
        warm_compiles=warm_compiles,
    )
    _check_step_cache(ctx)
    where = "GPU free memory" if ctx.on_gpu else "available RAM"
    ctx.path.append(
        f"budget: {where} × headroom {headroom:g} = {format_bytes(ctx.budget)}; compute dtype "
        f"{ctx.compute_dtype}; estimate for {request.width}x{request.height}, batch {request.batch}"
    )
    required = settings["force"]["memory_options"]
    if required and not settings["force"]["backend"]:
        said = ", ".join(o.replace("_", " ") for o in required)
        ctx.path.append(f"required: {said} (every plan below has it)")
    if settings["force"].get("gguf"):  # set by execute/tuning.py's settings_for (--gguf)
        chosen, ladder = _from_file(ctx)
    elif ctx.objective == "card":
        chosen = _forced(ctx) if settings["force"]["backend"] else _card_choice(ctx)
        ladder = _card_ladder(ctx, chosen)
    else:
        priced = _priced(ctx)
        chosen = _forced(ctx) if settings["force"]["backend"] else _timed_choice(ctx, priced)
        ladder = _timed_ladder(ctx, chosen, priced)
    if ctx.step_cache is not None:
        chosen, ladder = (
            _with_step_cache(ctx, chosen),
            tuple(_with_step_cache(ctx, p) for p in ladder),
        )
    gpu = profile.primary_gpu
    device = profile.accelerator if profile.has_gpu else "cpu"
    if device == "rocm":
        device = "cuda"  # ROCm builds of PyTorch address the GPU as "cuda"
    return Plan(
        model=inv.source.spec,
        family=inv.family,
        device=f"{device}:{gpu.index}" if gpu and profile.has_gpu and device == "cuda" else device,
        budget_bytes=ctx.budget,
        chosen=chosen,
        ladder=ladder,
        path=tuple(ctx.path),
        request=request,
        settings=settings,
    )
