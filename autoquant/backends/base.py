"""The interface every quantization backend implements: what it declares, and its lifecycle.

A backend declares its facts on the class — precisions and their bytes per weight, how it is
installed, where it runs, what it can quantize, which memory options it survives, what to tell
the user — and the probe, the planner, the estimator and the bench read those declarations
(docs/architecture.md). Nothing outside the backend's own module keeps a table of it.

Lifecycle per tier (as diffusers' quantizers do it): check the environment → prepare files
(GGUF's conversion, cached) → build the quantization configs → load the pipeline → post-process.
The executor then applies memory options, moves the pipeline to its device and smoke-tests it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from autoquant.backends.tier import Tier
from autoquant.core.errors import AutoquantError
from autoquant.core.packages import module_present
from autoquant.models.types import ComponentInventory, ModelInventory

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

# Accelerator kinds, as the probe names them (probe/types.py's Accelerator).
ANY_ACCELERATOR = ("cuda", "rocm", "xpu", "mps", "cpu")


@dataclass(frozen=True)
class WeightFormat:
    """Bytes a weight costs in memory once loaded, split as quantizers split a model."""

    linear_bytes: float  # per nn.Linear weight parameter the backend quantizes
    # Quantizes only Linear weights whose in_features is a multiple of this (GGUF's blocks).
    block: int = 1
    activation_factor: float = 1.0  # activation memory relative to bf16 compute
    load_peak_factor: float = 0.0  # load peak as a fraction of the bf16 size (0: no spike)
    # Loaded from a file the loader reads whole into host memory and copies every tensor out
    # of before the model takes them: the host's load peak is this many times the file (0: the
    # loader streams). ``file_kept_bytes``: the file's bytes per parameter it does not quantize.
    file_copies_at_load: int = 0
    file_kept_bytes: int = 0
    # Leaves the class's _keep_in_fp32_modules (T5's "wo") unquantized, at compute precision.
    skips_kept_modules: bool = False
    # Quantizes while loading onto the GPU: with offloading, every quantized component is on the
    # GPU at once until the offload hooks move it off.
    quantizes_on_device: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    def quantized_params(self, component: ComponentInventory) -> int:
        """How many of the component's parameters this format quantizes."""
        quantized = component.linear_params_in_blocks(self.block)
        if self.skips_kept_modules:
            quantized -= component.kept_linear_params
        return quantized


@dataclass(frozen=True)
class BuildRequest:
    """Everything a backend needs to build one tier of one model."""

    folder: Path  # a diffusers pipeline folder (model_index.json + components)
    inventory: ModelInventory
    tier: Tier
    device: str  # "cuda:0", "cpu", "mps", …
    device_map: str | None = None  # "balanced": spread components over GPUs
    progress: bool = True
    variant: str | None = None  # the weights variant the folder ships (models/variant.py)
    # The user's GGUF file of the denoiser (--gguf): the gguf backend loads it, converting nothing.
    gguf_file: Path | None = None


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def accelerator_of(device: str) -> str:
    """The accelerator kind of a torch device string ("cuda:0" → "cuda")."""
    return device.split(":")[0]


class QuantBackend(ABC):
    """One way of quantizing a pipeline: its declarations, then the lifecycle steps."""

    # --- what it is -----------------------------------------------------------------------------
    name: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]  # in the order a user would read them
    formats: ClassVar[Mapping[str, WeightFormat]] = {}  # bytes per weight, by precision

    # --- how it is installed (the probe reads these; None: nothing to install) -------------------
    distribution: ClassVar[str | None] = None  # pip distribution, also its name in the probe
    module: ClassVar[str | None] = None  # what must be importable
    minimum_version: ClassVar[str | None] = None  # the oldest release diffusers 0.42 accepts
    extra: ClassVar[str | None] = None  # autoquant's pip extra that installs it
    # Its chatty loggers and warning modules, quieted by the CLI (cli/args.py quiet_libraries).
    loggers: ClassVar[tuple[str, ...]] = ()

    # --- where it runs ---------------------------------------------------------------------------
    # Accelerator kind → the precisions accepted there (None: all of them); absent: refused.
    runs_on: ClassVar[Mapping[str, tuple[str, ...] | None]] = dict.fromkeys(ANY_ACCELERATOR)
    refused_on_device: ClassVar[str] = ""  # why, when an accelerator is refused
    fp8_precisions: ClassVar[tuple[str, ...]] = ()  # need a GPU with fp8 units (cc >= 8.9)
    # Precisions that only pay compiled (the planner offers them compiled only, never eager).
    compiled_only: ClassVar[tuple[str, ...]] = ()
    note_on: ClassVar[Mapping[str, str]] = {}  # accelerator → a caveat the probe shows there

    # --- what it can do --------------------------------------------------------------------------
    # The component kinds (models/types.py's Role) it can quantize.
    quantizes: ClassVar[tuple[str, ...]] = ("denoiser",)
    survives_model_offload: ClassVar[bool] = True
    # Block-level group offload (diffusers 0.42.1) leaves some backends' weights behind.
    survives_group_offload: ClassVar[bool] = False
    # Group offload from pinned memory with CUDA streams (use_stream): off until a GPU run shows
    # the backend survives it (docs/benchmarks.md).
    survives_group_offload_streams: ClassVar[bool] = False
    # Other backends whose quantized text encoders ran beside this backend's denoiser in one
    # pipeline (a mixed plan: Tier.encoders), each pairing shown by a run its comment names.
    encoder_backends: ClassVar[tuple[str, ...]] = ()
    # Its denoiser ran resident beside text encoders kept on the CPU (Tier.cpu_text_encoders),
    # shown by a run its comment names; the planner offers that placement only where it did.
    beside_cpu_text_encoders: ClassVar[bool] = False
    # Measured per-layer relative error of each precision (the bench's metric: median over the
    # denoiser's nn.Linear layers against fp32, docs/benchmarks.md), read by the planner to class
    # a tier's fidelity. A precision without a measurement of its own is declared at the figure
    # of the nearest measured one, and its comment says which.
    layer_errors: ClassVar[Mapping[str, float]] = {}
    caveat: ClassVar[str | None] = None  # told whenever it is probed or used (a deprecation)
    writes_files: ClassVar[bool] = False  # converts the model into its own files (`convert`)
    # A LoRA is fused into its weights (diffusers' fuse_lora, then unload_lora_weights), faster
    # than an active adapter; off where fusing is not measured to keep the LoRA
    # (execute/lora.py keeps it an adapter there, and checks that a fused one took hold).
    fuses_lora: ClassVar[bool] = False

    # --- declarations read by everything else ----------------------------------------------------
    @classmethod
    def install_hint(cls) -> str:
        return f"pip install 'autoquant-diffusers[{cls.extra}]'" if cls.extra else ""

    @classmethod
    def refusal(
        cls, accelerator: str, precision: str | None = None, *, fp8: bool = False
    ) -> str | None:
        """Why this backend (at ``precision``, when given) cannot run on ``accelerator``, in one
        sentence a user can act on; None if it can. ``fp8``: the GPU has fp8 units."""
        if accelerator not in cls.runs_on:
            return cls.refused_on_device
        allowed = cls.runs_on[accelerator]
        if precision is not None and allowed is not None and precision not in allowed:
            return cls.note_on.get(accelerator) or cls.refused_on_device
        if precision in cls.fp8_precisions and not fp8:
            return f"{cls.name} {precision} needs a GPU of compute capability >= 8.9"
        return None

    @classmethod
    def quantizes_text_encoders(cls) -> bool:
        return "text_encoder" in cls.quantizes

    @classmethod
    def probe_note(cls, accelerator: str) -> str | None:
        """What the probe says beside a usable status on ``accelerator``."""
        return cls.note_on.get(accelerator) or cls.caveat

    @classmethod
    def format(cls, precision: str) -> WeightFormat | None:
        return cls.formats.get(precision)

    @classmethod
    def layer_error(cls, precision: str) -> float:
        return cls.layer_errors[precision]

    @classmethod
    def survives(cls, placement: str) -> bool:
        """Whether this backend's weights run under ``placement`` (Tier.placement)."""
        return {
            "resident": True,
            "model_cpu_offload": cls.survives_model_offload,
            "group_offload": cls.survives_group_offload,
            "group_offload_streams": cls.survives_group_offload_streams,
        }[placement]

    @classmethod
    def text_encoder_precision(cls, precision: str) -> str:
        """The precision its text encoders get when a tier at ``precision`` quantizes them."""
        return precision

    @classmethod
    def vae_dtype(cls, precision: str, compute_dtype: str) -> str:
        """The dtype the VAE runs in under this tier (its compute dtype unless declared)."""
        return compute_dtype

    @classmethod
    def load_dtype(cls, precision: str, compute_dtype: str) -> str:
        """The dtype everything it does not quantize is loaded in."""
        return compute_dtype

    @classmethod
    def convert(
        cls, folder: Path, precision: str, *, out: Path | None = None, progress: bool = True
    ) -> Any:
        """Write this format's files of ``folder`` (backends that declare ``writes_files``)."""
        raise AutoquantError(f"{cls.name} writes no files of its own: nothing to convert")

    # --- lifecycle -------------------------------------------------------------------------------
    def unavailable_reason(self, device: str, precision: str | None = None) -> str | None:
        """Why this backend cannot run here, in one sentence a user can act on; None if it can."""
        refused = self.refusal(accelerator_of(device), precision)
        if refused:
            return refused
        if self.module and not module_present(self.module):
            return f"{self.module} is not installed: {self.install_hint()}"
        return None

    def warnings(self) -> list[str]:
        """Caveats to tell the user when this backend is used."""
        return [self.caveat] if self.caveat else []

    def prepare(self, request: BuildRequest) -> Any:
        """Write the files this tier loads from (cached), before loading; None: nothing to do."""
        return None

    def quant_mapping(self, request: BuildRequest) -> dict[str, Any]:
        """Per-component quantization configs (diffusers' for diffusers models, transformers'
        for text encoders), for `PipelineQuantizationConfig(quant_mapping=...)`."""
        return {}

    def components(self, request: BuildRequest) -> dict[str, Any]:
        """Components built outside `from_pretrained` (GGUF's denoiser)."""
        return {}

    def load(
        self, request: BuildRequest, encoders: QuantBackend | None = None
    ) -> DiffusionPipeline:
        """Load the pipeline for this tier. Components land on the CPU (bitsandbytes puts what it
        quantizes on the GPU itself; offloaded, it is moved back to the CPU component by
        component) unless device_map spreads them over GPUs; the executor moves or offloads them
        afterwards. ``encoders``: the backend of a mixed tier's text encoders (Tier.encoders),
        which configures them."""
        from diffusers import DiffusionPipeline
        from diffusers.quantizers import PipelineQuantizationConfig

        tier = request.tier
        kwargs: dict[str, Any] = dict(self.components(request))
        load = self.load_dtype(tier.precision, tier.compute_dtype)
        vae = self.vae_dtype(tier.precision, tier.compute_dtype)
        dtype: Any = torch_dtype(load)
        if vae != load:
            dtype = {"vae": torch_dtype(vae), "default": dtype}
        mapping = self.quant_mapping(request)
        encoder_tier = tier.encoder_tier()
        if encoders is not None and encoder_tier is not None:
            # A mixed plan: the text encoders' own backend configures them.
            mapping |= encoders.quant_mapping(replace(request, tier=encoder_tier))
        if request.device_map:
            kwargs["device_map"] = request.device_map
        if (
            mapping
            and tier.offloaded
            and not request.device_map
            and self._quantizes_on_device(tier, encoders)
        ):
            kwargs.update(self._load_one_at_a_time(request, mapping, dtype))
        elif mapping:
            kwargs["quantization_config"] = PipelineQuantizationConfig(quant_mapping=mapping)
        pipe = DiffusionPipeline.from_pretrained(
            str(request.folder),
            dtype=dtype,
            use_safetensors=True,
            variant=request.variant,
            **kwargs,
        )
        pipe.set_progress_bar_config(disable=True)  # the executor reports per tier instead
        return pipe

    def _quantizes_on_device(self, tier: Tier, encoders: QuantBackend | None) -> bool:
        formats = [self.format(tier.precision)]
        if encoders is not None and tier.encoders is not None:
            formats.append(encoders.format(tier.encoders.precision))
        return any(fmt is not None and fmt.quantizes_on_device for fmt in formats)

    def _load_one_at_a_time(
        self, request: BuildRequest, mapping: dict[str, Any], dtype: Any
    ) -> dict[str, Any]:
        """Load each quantized component alone, quantized onto the GPU, and move it to the CPU
        before the next: an offloaded tier then never holds two of them on the GPU at once
        (loaded together, Flux-dev NF4 with T5 NF4 peaked at 11.24 GB against the 7.32 GB it
        needs to generate: ../shared/notes/speed-levers.md). The offload hooks move them back."""
        import importlib

        import torch

        loaded: dict[str, Any] = {}
        for name, config in mapping.items():
            component = request.inventory.component(name)
            model_class = getattr(importlib.import_module(component.library), component.class_name)
            own_dtype = dtype.get(name, dtype["default"]) if isinstance(dtype, dict) else dtype
            model = model_class.from_pretrained(
                str(request.folder),
                subfolder=name,
                quantization_config=config,
                dtype=own_dtype,
                use_safetensors=True,
                variant=request.variant,
            )
            loaded[name] = model.to("cpu")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return loaded

    def post_process(self, pipe: DiffusionPipeline, request: BuildRequest) -> None:  # noqa: B027
        """Adjust the loaded pipeline before memory options and the smoke test (default: none)."""

    @abstractmethod
    def describe(self, tier: Tier) -> str:
        """What this tier quantizes, in words, for the report."""

    def _quantized(self, request: BuildRequest) -> list[ComponentInventory]:
        """The components of the request's model that its tier quantizes."""
        wanted = request.tier.quantized_components
        return [c for c in request.inventory.components if c.name in wanted]
