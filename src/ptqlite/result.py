"""What a conversion did, tensor by tensor: the data behind the CLI summary and the debug reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx


@dataclass
class QuantizedTensor:
    tensor: str
    op_type: str
    nodes: tuple[str, ...]
    shape: tuple[int, ...]
    bits: int
    scheme: str  # e.g. "asymmetric per-channel axis 0"
    storage: str  # encoding or runtime form, e.g. "packed", "indexed", "DequantizeLinear int8"
    bytes_before: int
    bytes_after: int
    relative_error: float
    # Parameters per channel (one entry for per-tensor), for quant_param.csv
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    correction_var: np.ndarray | None = None
    correction_mean: np.ndarray | None = None


@dataclass
class SkippedTensor:
    tensor: str
    op_type: str
    nodes: tuple[str, ...]
    reason: str


@dataclass
class OutputCheck:
    """One graph output of the quantized model against the float model's, over the verification samples."""

    name: str
    kind: str  # "cosine" (float outputs) or "agreement" (integer and bool outputs: fraction of equal elements)
    mean: float
    min: float
    non_finite: int = 0  # samples where the output has NaN/Inf where the float model's is finite
    shape_mismatch: int = 0  # samples where the output's shape differs from the float model's
    # The lowest cosine of a slice along a short axis (verify.slice_cosines) and where, e.g. "axis 1 index 8 of 22";
    # None when the output has no such axis (or is not float)
    slice_min: float | None = None
    slice_where: str = ""
    collapsed: bool = False


@dataclass
class Verification:
    """What the verification gate (verify.py) found before the conversion reported success."""

    inputs: str  # where the inputs came from, e.g. "8 calibration samples"
    samples: int
    floor: float  # the min output cosine below which an output counts as collapsed
    outputs: list[OutputCheck] = field(default_factory=list)
    skipped: str = ""  # why the comparison with the float model did not run ("" when it did)
    # Why the gate did not load the output at all ("" when it did): the output is NOT verified
    not_loaded: str = ""
    # Why the gate ran the output in a session without constant folding ("" when it used ONNX Runtime's defaults):
    # loading it with the defaults needs more memory than is available
    unfolded: str = ""
    # When the float model was too large to run: the samples the output ran on alone, and its float outputs that held
    # NaN/Inf, with on how many of them
    ran_alone: int = 0
    non_finite: dict[str, int] = field(default_factory=dict)
    # With --inputShape: the other input shapes the output was also run at, e.g. "x:2,8,32" ("" when not run), and
    # what went wrong there ("" when it ran like the float model).
    other_shapes: str = ""
    shape_problem: str = ""

    @property
    def collapsed(self) -> list[OutputCheck]:
        return [o for o in self.outputs if o.collapsed]


@dataclass
class ConversionResult:
    model: onnx.ModelProto
    quant_type: str
    quantized: list[QuantizedTensor] = field(default_factory=list)
    skipped: list[SkippedTensor] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # what the user must hear even with --quiet (printed on stderr), e.g. that nothing was quantized
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # (temp folder, debug_info_save_path) while the debug reports wait for the model to be written
    pending_reports: tuple[Path, Path] | None = None
    verification: Verification | None = None  # None: convert() ran with verify=False
    # A streaming conversion's output files under temp names until convert.publish_output (a stream.StagedOutput)
    staged_output: object | None = None
    # (node name, input slot) -> (scale, offset): what that node reads in the quantized model, times scale plus
    # offset (None: 0), is the float model's value there. Activation smoothing divides an input by s and multiplies
    # the weight rows by s; WEIGHT_QUANT feeds MatMul/Gather the codes and maps their outputs instead.
    input_maps: dict[tuple[str, int], tuple[np.ndarray, np.ndarray | None]] = field(default_factory=dict)
    # The float graph the debug reports compare against, in the names the conversion used (unnamed nodes named,
    # Constant nodes as initializers; FULL_QUANT: as prepared, BatchNormalization folded, equalised when
    # per_channel=false). Set only when debug reports are asked for.
    float_model: onnx.ModelProto | None = None
    # convert(keep_checked_copy=True): the input checks' copy of the float model (validate.validate_with_copy), for
    # the caller's gate to run, until convert.discard_checked_copy
    checked_copy: Path | None = None
