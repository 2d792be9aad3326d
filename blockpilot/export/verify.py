"""``blockpilot verify BUNDLE``: the bundle's ONNX Runtime backend against the torch backend on the
same checkpoint (or on a ``blockpilot quantize`` output, its quantizers restored: the reference an fp8 bundle was
exported from), over observations chosen by the bundle's schema: held-out generated driving scenes for a
driving bundle, frames of a LeRobot dataset (``--dataroot``) for an action-chunk bundle. Reported, not
hidden: per-plan answer equality, the prefill's top-1 agreement and the largest probability difference,
and for an action-chunk bundle the action L1 and largest absolute difference between the two backends'
chunks. Where TensorRT and a GPU that runs the bundle's engines are present, the engines are compared
with their ONNX graphs through Polygraphy instead (:mod:`blockpilot.export.verify_trt`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import require_extra
from ..runtime.backend import BUNDLE_BACKENDS
from ..vla.plans import ActionChunkSchema

if TYPE_CHECKING:
    from ..runtime.sources import RestoreQuantized
    from .verify_trt import EngineVerifyReport

DEFAULT_PROB_TOLERANCE = 1e-4
VERIFY_BACKENDS = ("auto", *BUNDLE_BACKENDS)


@dataclass(frozen=True)
class VerifyReport:
    bundle: str
    reference: str
    samples: int
    identical_plans: int
    prefill_top1_agreement: float
    max_prefill_prob_diff: float
    tolerance: float
    note: str = ""  # why the engines were not compared instead (auto, on a bundle with engines)
    samples_from: str = "generated driving scenes"
    action_l1: float | None = None  # action-chunk bundles: mean |onnxruntime - torch| over the chunks' values
    action_max_abs_diff: float | None = None
    reference_kind: str = "checkpoint"  # or "quantized": a quantize output, planned with its quantizers restored

    @property
    def passed(self) -> bool:
        return self.identical_plans == self.samples and self.prefill_top1_agreement == 1.0 and \
            self.max_prefill_prob_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "backend": "onnxruntime", "reference_backend": "torch", "passed": self.passed}

    @property
    def reference_words(self) -> str:
        return "torch" if self.reference_kind == "checkpoint" else "torch, quantize output's quantizers restored"

    def text(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        note = f"tensorrt not compared: {self.note}\n" if self.note else ""
        actions = "" if self.action_l1 is None or self.action_max_abs_diff is None else (
            f"actions  L1 {self.action_l1:.2e}, max |diff| {self.action_max_abs_diff:.2e} between the backends' "
            "chunks\n")
        return (f"verify   {self.bundle} (onnxruntime) against {self.reference} ({self.reference_words})\n"
                f"plans    {self.identical_plans}/{self.samples} identical answers (scaffold decoder)\n"
                f"prefill  top-1 agreement {self.prefill_top1_agreement:.2%}, max |prob diff| "
                f"{self.max_prefill_prob_diff:.2e} (tolerance {self.tolerance:.0e})\n{actions}"
                f"samples  {self.samples_from}\n{note}{verdict}")


ORT_GRAPH_FACTOR = 1.1  # ONNX Runtime's peak over the graph files' bytes (1.5B: 7.12 GiB for 6.5 GB of graphs)


def verify_bundle(bundle: str | Path, checkpoint: str | Path | None = None, *, samples: int = 8,
                  tolerance: float = DEFAULT_PROB_TOLERANCE, backend: str = "auto",
                  trusted_keys: Sequence[str | Path] = (),
                  dataroot: str | Path | None = None,
                  restore_quantized: RestoreQuantized | None = None) -> VerifyReport | EngineVerifyReport:
    """``backend="onnxruntime"``: compare the bundle on ONNX Runtime with the torch planner of ``checkpoint``
    (default: the bundle's own ``model/`` when it was exported ``--with-weights``), which may be a quantize output:
    its recorded checkpoint in float32 with its quantizers restored by ``restore_quantized`` (default
    :func:`blockpilot.quant.apply.load_quantized`), the reference of the fp8 bundle exported from it.
    ``"tensorrt"``: compare the bundle's engines for this GPU with their ONNX graphs
    (:func:`blockpilot.export.verify_trt.verify_engines`; raises
    :class:`~blockpilot.export.verify_trt.EngineVerifyError` where that cannot run). ``"auto"``: the engines where
    they can run here, else ONNX Runtime against torch (the report says why). ``trusted_keys`` (public key files):
    the bundle must be signed by one of them (:func:`blockpilot.runtime.bundle_planner.open_bundle`).
    ``dataroot``: the LeRobot dataset an action-chunk bundle is verified on (:func:`verify_observations`)."""
    from ..formats.bundle import BundleError
    from ..runtime.bundle_planner import open_bundle
    from ..runtime.plan_types import DecoderSettings, for_model
    from ..runtime.sources import PlannerSource, detect_source, open_planner
    from .verify_trt import EngineVerifyError, tensorrt_unavailable, verify_engines

    if backend not in VERIFY_BACKENDS:
        raise BundleError(f"verify backend {backend!r}: choose one of {', '.join(VERIFY_BACKENDS)}")
    # before the bundle's hashes: a --checkpoint that is neither a checkpoint nor a quantize output is refused first
    given = None if checkpoint is None else detect_source(checkpoint, kinds=("checkpoint", "quantized"),
                                                          flag="--checkpoint")
    loaded = open_bundle(bundle, trusted_keys=trusted_keys)
    note = ""
    if backend != "onnxruntime":
        why = tensorrt_unavailable(loaded)
        if why is None:
            return verify_engines(loaded, samples=samples)
        if backend == "tensorrt":
            raise EngineVerifyError(f"verify --backend tensorrt: {why}")
        note = why if loaded.engines() else ""
    reference = Path(checkpoint) if checkpoint is not None else loaded.path / "model"
    found = given or PlannerSource("checkpoint", reference, reference)
    weights = found.checkpoint or reference
    if not any(weights.glob("*.safetensors")):
        raise BundleError(f"{weights}: no weights to compare against; pass --checkpoint or export --with-weights")
    if found.kind == "quantized" and restore_quantized is None:
        from ..quant.apply import load_quantized as restore_quantized
    require_extra("torch", "torch", "verify on ONNX Runtime (against the torch planner)")
    from ..vla.memory_budget import check_fits

    # Both planners are held at once: refuse before either loads when the pair cannot fit.
    graphs = sum(f.stat().st_size for a in loaded.graphs("decomposed") for f in (loaded.path / a.path).parent.iterdir()
                 if f.name.startswith(Path(a.path).name))
    check_fits(weights, ("load",), "float32", what="verify (ONNX Runtime against torch float32)",
               also=(int(graphs * ORT_GRAPH_FACTOR), "the bundle's ONNX Runtime session"))
    settings = DecoderSettings(name="scaffold")
    ort = open_planner(loaded.path, backend="onnxruntime", decoder=settings, kinds=("bundle",), flag="bundle",
                       trusted_keys=trusted_keys)
    observations, described = verify_observations(ort.schema, samples, dataroot)
    # The bundle's schema (it may have been exported with --schema), not the checkpoint's own.
    torch_planner = open_planner(found, backend="torch", decoder=settings, schema=ort.schema, flag="--checkpoint",
                                 cameras=max([1, *(len(o.images) for o in observations)]),
                                 restore_quantized=restore_quantized)
    identical, agree, worst, diffs = 0, [], 0.0, []
    for observation in observations:
        obs = for_model(_bundle_sized(observation, ort.image_policy), torch_planner.config)  # text-only: no camera
        a_plan, b_plan = ort.plan(obs), torch_planner.plan(obs)
        identical += int(np.array_equal(a_plan.tokens, b_plan.tokens))
        if a_plan.actions is not None and b_plan.actions is not None:
            diffs.append(np.abs(np.asarray(a_plan.actions) - np.asarray(b_plan.actions)).ravel())
        prompt, _ = torch_planner.prompt(obs)
        a, b = ort.backend.prefill(prompt), torch_planner.backend.prefill(prompt)
        agree.append(float((a.top1 == b.top1).mean()))
        worst = max(worst, float(np.abs(a.prob - b.prob).max()))
    robot = isinstance(ort.schema, ActionChunkSchema)
    every = np.concatenate(diffs) if diffs else np.zeros(0)
    return VerifyReport(str(loaded.path), str(reference), len(observations), identical, float(np.mean(agree)), worst,
                        tolerance, note, described,
                        float(every.mean()) if robot and every.size else None,
                        float(every.max()) if robot and every.size else None, found.kind)


def verify_observations(schema: Any, samples: int, dataroot: str | Path | None) -> tuple[list[Any], str]:
    """Up to ``samples`` observations for a planner answering in ``schema``, and what they are: frames evenly spaced
    over the LeRobot dataset ``dataroot`` for an action-chunk schema (required: :class:`BundleError` naming
    ``--dataroot`` without it), held-out generated scenes for a driving one (``dataroot`` must then be None)."""
    from ..formats.bundle import BundleError

    if isinstance(schema, ActionChunkSchema):
        if dataroot is None:
            raise BundleError("this bundle plans action chunks and is verified on robot observations: pass "
                              "--dataroot DATASET (a LeRobot dataset recorded for its schema)")
        from ..calibration.robot import LeRobotCalibrationSource, build_robot_calibration_set

        picked = build_robot_calibration_set(LeRobotCalibrationSource(dataroot, schema, flag="--dataroot"), samples)
        return [s.observation() for s in picked.samples], f"{len(picked)} frames of the LeRobot dataset {dataroot}"
    if dataroot is not None:
        raise BundleError(f"--dataroot {dataroot}: this bundle plans driving and is verified on generated scenes; "
                          "--dataroot goes with an action-chunk bundle")
    from ..eval.synthetic import heldout_keyframes, observation

    frames = heldout_keyframes(max(1, (samples + 9) // 10), stride=4)[:samples]
    return [observation(f) for f in frames], f"{len(frames)} held-out generated driving scenes"


def _bundle_sized(observation: Any, policy: Any) -> Any:
    """``observation`` with each frame resized to the size the bundle's vision graphs take (its policy's target
    size), so both backends see the same pixels and image tokens; a recorded frame has the dataset's own size."""
    import dataclasses

    from ..vla.image import resize_bicubic

    if policy is None or not observation.images:
        return observation
    images = []
    for image in observation.images:
        height, width = policy.target_size(*image.shape[:2])
        images.append(image if image.shape[:2] == (height, width) else resize_bicubic(image, height, width))
    return dataclasses.replace(observation, images=images)
