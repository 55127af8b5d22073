"""The backends' declarations: each one consistent, and the probe, planner, estimator and bench
reading them (a made-up backend added to the registry alone is seen by all of them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import tomllib
from machines import INSTALLED, made_up_machine

import autoquant.backends as registry
from autoquant.backends import backend_class, backend_classes, validate_tier_name
from autoquant.backends.base import BuildRequest, QuantBackend, WeightFormat
from autoquant.backends.tier import Tier
from autoquant.bench import TierSpec
from autoquant.bench.command import usable_tiers
from autoquant.models import inventory, resolve
from autoquant.planner import load_settings, plan
from autoquant.planner.estimate import Request, estimate
from autoquant.probe.backends import assess_backends

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
EXTRAS = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]


@pytest.mark.parametrize("backend", backend_classes(), ids=lambda b: b.name)
def test_each_backend_declares_consistent_facts(backend: type[QuantBackend]) -> None:
    assert backend.precisions and len(set(backend.precisions)) == len(backend.precisions)
    assert set(backend.formats) <= set(backend.precisions)
    if backend.quantizes:  # a quantizing backend prices every precision it offers
        assert set(backend.formats) == set(backend.precisions)
    for allowed in backend.runs_on.values():
        assert allowed is None or set(allowed) <= set(backend.precisions)
    assert set(backend.fp8_precisions) <= set(backend.precisions)
    if backend.distribution:
        assert backend.module and backend.minimum_version and backend.extra
        assert backend.extra in EXTRAS, f"pyproject.toml has no extra {backend.extra!r}"
        assert backend.install_hint() == f"pip install 'autoquant-diffusers[{backend.extra}]'"
    if set(backend.runs_on) != {"cuda", "rocm", "xpu", "mps", "cpu"}:
        assert backend.refused_on_device, "a refused accelerator needs a reason to show"
    assert set(backend.layer_errors) == set(backend.precisions)
    assert all(error >= 0 for error in backend.layer_errors.values())


@pytest.mark.parametrize(
    ("name", "accelerator", "precision", "fp8", "refused"),
    [
        ("bitsandbytes", "cpu", None, False, "on CPU use"),
        ("bitsandbytes", "cuda", "int8", False, None),
        ("bitsandbytes", "mps", "nf4", False, None),
        ("bitsandbytes", "mps", "int8", False, "4-bit only"),
        ("torchao", "cuda", "float8", False, "compute capability >= 8.9"),
        ("torchao", "cuda", "float8", True, None),
        ("torchao", "cpu", "int8", False, None),
        ("quanto", "cpu", "int4", False, None),
        ("gguf", "cpu", "q4_0", False, None),
        ("none", "mps", "fp16", False, None),
    ],
)
def test_where_each_backend_runs(
    name: str, accelerator: str, precision: str | None, fp8: bool, refused: str | None
) -> None:
    reason = backend_class(name).refusal(accelerator, precision, fp8=fp8)
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason


def test_the_executor_and_the_probe_agree_on_bitsandbytes_on_mps() -> None:
    # The probe calls it usable on MPS (4-bit); the executor then takes 4-bit and refuses 8-bit.
    statuses = assess_backends("mps", INSTALLED)
    assert statuses["bitsandbytes"].usable
    bnb = registry.get_backend("bitsandbytes")
    assert "4-bit only" in (bnb.unavailable_reason("mps", "int8") or "")
    assert bnb.refusal("mps", "nf4") is None


class MadeUp(QuantBackend):
    """A backend that exists only here: registered, it must be seen everywhere."""

    name = "madeup"
    precisions = ("q3",)
    formats: ClassVar[dict[str, WeightFormat]] = {"q3": WeightFormat(3 / 8)}
    distribution = "madeup-quant"
    module = "madeup_quant"
    minimum_version = "1.0"
    extra = "madeup"
    runs_on: ClassVar[dict[str, Any]] = {"cuda": None}
    refused_on_device = "madeup runs on CUDA only"
    quantizes = ("denoiser", "text_encoder")
    survives_group_offload = True
    layer_errors: ClassVar[dict[str, float]] = {"q3": 0.2}

    def describe(self, tier: Tier) -> str:
        return "three bits"


@pytest.fixture
def with_made_up_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry._REGISTRY, MadeUp.name, MadeUp)


@pytest.mark.usefixtures("with_made_up_backend")
def test_a_backend_added_to_the_registry_alone_is_seen_everywhere() -> None:
    validate_tier_name("madeup", "q3")  # profiles, --backend/--precision, bench specs
    packages = {**INSTALLED, "madeup-quant": "1.2"}
    # The probe: installed and usable on a GPU, refused with its own reason on the CPU.
    gpu = made_up_machine(device="cuda", vram=16 * 10**9, packages=packages)
    assert gpu.backends["madeup-quant"].usable
    assert assess_backends("cpu", packages)["madeup-quant"].reason == "madeup runs on CUDA only"
    assert "not installed: pip install 'autoquant-diffusers[madeup]'" in str(
        assess_backends("cuda", INSTALLED)["madeup-quant"].reason
    )
    # The estimator prices it from its format: 3/8 byte per quantized weight.
    inv = inventory(resolve("builtin:sdxl"))
    unet = inv.denoiser.name
    three = estimate(inv, Tier("madeup", "q3", "bf16", (unet,)), Request(1024, 1024), on_gpu=True)
    eight = estimate(
        inv, Tier("torchao", "int8", "bf16", (unet,)), Request(1024, 1024), on_gpu=True
    )
    saved = eight.components[unet] - three.components[unet]
    assert saved == pytest.approx(inv.denoiser.linear_params * (1 - 3 / 8) * 1.01, rel=1e-3)
    # The planner: forced, it quantizes the text encoders too and may stream with group offload.
    forced = ["force.backend=madeup", "force.precision=q3"]
    settings = load_settings([], [*forced, "components.quantize_text_encoders=always"])
    chosen = plan(gpu, inv, settings).chosen.tier
    assert chosen.backend == "madeup" and len(chosen.quantized_components) == 3
    ladder = load_settings([], ["ladder=[madeup q3]", "planner.skip_if_fits=false"])
    small = made_up_machine(device="cuda", vram=3 * 10**9, packages=packages)
    assert any("group_offload" in t.tier.memory_options for t in plan(small, inv, ladder).ladder)
    # The bench: +te is accepted, and `--tiers all` offers it where it runs.
    assert TierSpec.parse("madeup:q3+te").text_encoders
    assert TierSpec("madeup", "q3") in usable_tiers(gpu)


class QuantizesWhileLoading(MadeUp):
    """A backend that, like bitsandbytes, quantizes onto the device while loading: its config is
    None here (a plain load), so the test runs on any CPU."""

    name = "loadsitself"
    formats: ClassVar[dict[str, WeightFormat]] = {
        "q3": WeightFormat(3 / 8, quantizes_on_device=True)
    }

    def quant_mapping(self, request: BuildRequest) -> dict[str, Any]:
        return {c.name: None for c in self._quantized(request)}


def test_an_offloaded_tier_that_quantizes_while_loading_loads_one_component_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from autoquant.models import materialize

    source = resolve("builtin:tiny-sd")
    inv = inventory(source)
    names = ("unet", "text_encoder")
    loaded: list[str] = []
    for model_class in (UNet2DConditionModel, CLIPTextModel):
        real = model_class.from_pretrained.__func__  # type: ignore[attr-defined]

        def spy(cls: Any, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            loaded.append(kwargs.get("subfolder", "by the pipeline"))
            return _real(cls, *args, **kwargs)

        monkeypatch.setattr(model_class, "from_pretrained", classmethod(spy))
    tier = Tier("loadsitself", "q3", "fp32", names, ("model_cpu_offload",))
    request = BuildRequest(folder=Path(materialize(source)), inventory=inv, tier=tier, device="cpu")
    pipe = QuantizesWhileLoading().load(request)
    # Each quantized component alone, in the mapping's order, left on the CPU; the pipeline
    # loads neither again.
    assert sorted(loaded) == sorted(names)
    assert all(getattr(pipe, n).device == torch.device("cpu") for n in names)
    image = pipe("x", num_inference_steps=1, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
