"""auto_tune for mixed bit: the init_scale whose quantized model keeps output cosine similarity near 0.995.

The whole model's output is compared with the float model's on the user's calibration data when
[data_preprocess_param] is given; otherwise on seeded uniform [0.1, 1] inputs (the reference's choice, which
is not representative, so a note says so). The search is coarse then fine: starting at the configured
init_scale it doubles or halves until the target is bracketed, then bisects the bracket on a log scale. Each
evaluation (passes/mixed_bit.py, tune_init_scale) quantizes every layer at one init_scale and runs the substituted model in ONNX Runtime, so the
number of model evaluations is bounded by MAX_COARSE + MAX_FINE.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from .config import QuantConfig
from .errors import DataError
from .runtime import REFERENCE_VALUES, cosine_similarity, cpu_session, model_input_specs, synthetic_inputs

TARGET_COSINE = 0.995
TOLERANCE = 0.001  # the fine search stops once the cosine lies in [target, target + TOLERANCE]
MAX_COARSE = 8
MAX_FINE = 8
SCALE_LIMITS = (1e-4, 0.9)  # init_scale must stay in (0, 1)
RANDOM_SAMPLES = 4


_PURPOSE = "for auto_tune"


class OutputComparer:
    """Float outputs on fixed inputs, computed once; scores candidate models against them."""

    def __init__(self, model: onnx.ModelProto, inputs: list[dict[str, np.ndarray]]):
        self.inputs = inputs
        session = cpu_session(model, _PURPOSE)
        self.reference = [session.run(None, feed) for feed in inputs]

    def __call__(self, candidate: onnx.ModelProto) -> float:
        """Mean over samples and outputs of the cosine similarity to the float outputs."""
        session = cpu_session(candidate, _PURPOSE)
        scores = [cosine_similarity(ref, out)
                  for feed, refs in zip(self.inputs, self.reference)
                  for ref, out in zip(refs, session.run(None, feed))]
        return float(np.mean(scores))


def random_inputs(model: onnx.ModelProto, samples: int = RANDOM_SAMPLES) -> list[dict[str, np.ndarray]]:
    """Seeded uniform [0.1, 1] inputs shaped like the model's inputs (the reference's, unknown dims taken as 1)."""
    specs = model_input_specs(model)
    for spec in specs:
        if not np.issubdtype(spec.dtype, np.floating):
            raise DataError(f"auto_tune: input '{spec.name}' is {spec.dtype}, so random inputs cannot stand in "
                            "for data; give calibration data in [data_preprocess_param]")
    return synthetic_inputs(specs, REFERENCE_VALUES, samples)


def evaluation_inputs(model: onnx.ModelProto, config: QuantConfig, input_format: str | None,
                      samples=None) -> tuple[list[dict[str, np.ndarray]], str]:
    """The inputs auto_tune compares outputs on (in-memory `samples` first, then the calibration files), and a
    phrase saying what they are."""
    if samples is not None:
        inputs = list(samples)
        return inputs, f"{len(inputs)} in-memory calibration samples"
    if config.data.calibrate_path:
        from .data import calibration_set

        data = calibration_set(config, model, input_format)
        return list(data), f"{len(data)} calibration samples"
    return random_inputs(model), (f"{RANDOM_SAMPLES} seeded uniform [0.1, 1] random inputs, since no "
                                  "[data_preprocess_param] is given (not representative of real data)")


@dataclass
class TuneResult:
    init_scale: float
    cosine: float
    history: list[tuple[float, float]] = field(default_factory=list)  # (init_scale, cosine), in order


def search_scale(evaluate: Callable[[float], float], start: float, target: float = TARGET_COSINE,
                 tolerance: float = TOLERANCE, max_coarse: int = MAX_COARSE,
                 max_fine: int = MAX_FINE) -> TuneResult:
    """The largest init_scale whose cosine is >= target: coarse (x2 or /2 steps), then fine (log bisection).

    `evaluate` maps init_scale to cosine, which falls as init_scale grows. If even the smallest scale tried
    misses the target, that smallest scale is returned.
    """
    lo_limit, hi_limit = SCALE_LIMITS
    history: list[tuple[float, float]] = []

    def score(scale: float) -> float:
        cosine = evaluate(scale)
        history.append((scale, cosine))
        return cosine

    def close(cosine: float) -> bool:
        return target <= cosine <= target + tolerance

    scale = min(max(start, lo_limit), hi_limit)
    cosine = score(scale)
    good, bad = (scale, math.inf) if cosine >= target else (0.0, scale)
    # Coarse: walk by factors of two until the target lies between a good and a bad scale.
    for _ in range(max_coarse - 1):
        if close(cosine) or (good > 0 and math.isfinite(bad)):
            break
        scale = min(good * 2, hi_limit) if cosine >= target else max(bad / 2, lo_limit)
        if scale in (good, bad):
            break  # at a limit
        cosine = score(scale)
        if cosine >= target:
            good = scale
        else:
            bad = scale
    # Fine: bisect between the good and the bad scale on a log scale.
    if good > 0 and math.isfinite(bad) and not close(cosine):
        for _ in range(max_fine):
            scale = math.sqrt(good * bad)
            cosine = score(scale)
            if cosine >= target:
                good = scale
            else:
                bad = scale
            if close(cosine):
                break
    if good > 0:
        return TuneResult(good, dict(history)[good], history)
    smallest = min(s for s, _ in history)
    return TuneResult(smallest, dict(history)[smallest], history)
