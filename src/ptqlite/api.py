"""The Python API: `ptqlite.convert` / `ptqlite.quantize` take a model path or ModelProto, a config in any of the
forms a user has at hand, and calibration data in memory.

    import ptqlite
    result = ptqlite.convert("model.onnx", {"common_quant_param": {"quant_type": "FULL_QUANT", "bit_num": 8}},
                             calibration=batches)
    ptqlite.save_model(result.model, "model_int8.onnx")

`config`: a QuantConfig (its section classes are exported too), a path to an INI file, INI text, or a dict
shaped like the INI ({section: {key: value}}) checked by the same rules with the same messages.
`calibration`: anything iterable again and again (a list, a Dataset-like object), or a callable that returns a
fresh iterator (so a generator function works; a generator object is read once and kept in memory), of
- dicts {input name: array},
- single arrays, for models with one input,
- batches of either (arrays whose first axis is a batch are split into samples of one),
optionally mapped through `transform` first (NNCF's transform_fn); arrays may be numpy arrays or anything with
.numpy() (torch tensors, without importing torch). The samples serve FULL_QUANT's calibration, auto_tune, the
activation-weighted block search of WEIGHT_QUANT with block_size, and the debug reports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from . import convert as _convert_module
from . import lite_flags
from .config import QuantConfig, config_from_dict, load_config, parse_config
from .errors import DataError, UsageError
from .frontends import fmk_for_path
from .model import load_model, parse_input_shapes
from .result import ConversionResult
from .runtime import model_input_specs

ModelLike = str | Path | onnx.ModelProto
ConfigLike = QuantConfig | str | Path | Mapping[str, Mapping[str, Any]]


def convert(model: ModelLike, config: ConfigLike, calibration: Any = None, *,
            transform: Callable[[Any], Any] | None = None, input_format: str | None = None,
            progress: bool | None = None, alwc_weights: str = "int8",
            input_shapes: str | Mapping[str, Sequence[int]] | None = None, verify: bool = True,
            verify_floor: float | None = None, fp16: bool = False, input_data_type: str = "FLOAT32",
            output_data_type: str = "FLOAT32") -> ConversionResult:
    """Quantize `model` as `config` says; the model (file or object) is never modified. See the module doc for
    the accepted forms. `input_format` ("NHWC"/"NCHW") is how calibration images lay out a 4-D input when read
    from files; `progress` shows bars (default: on a terminal); `alwc_weights` is DYNAMIC_QUANT's ALWC weight
    storage ("int8" or "uint8"). `input_shapes` ({name: dims} or --inputShape's text) fix input shapes for
    calibration and analysis only; the output keeps the model's own. `verify` runs the verification gate
    (result.verification; docs/spec.md "Verification": an output too large to load in the memory available is
    returned unverified, result.verification.not_loaded saying why, with a warning in result.warnings);
    `verify_floor` in (0, 1] makes a collapse below it a ConversionError instead of a warning. converter_lite's flags, with their values and messages: `fp16`
    (--fp16=on) stores the float32 constants left unquantized as float16; `input_data_type` /
    `output_data_type` "INT8" or "UINT8" (--inputDataType / --outputDataType, FULL_QUANT only) make the float
    graph inputs / outputs integer codes, their scales in result.notes and metadata_props (io_types.py)."""
    path = Path(model) if isinstance(model, (str, Path)) else None
    proto = _model(model)
    quant_config = _config(config, samples_given=calibration is not None)
    lite = lite_flags.from_keywords(fp16, input_data_type, output_data_type)
    lite_flags.check_for_config(lite, quant_config, keywords=True)
    if verify_floor is not None and not 0.0 < verify_floor <= 1.0:  # also refuses nan
        raise UsageError(f"verify_floor={verify_floor}: expected a number in (0, 1]")
    shapes = parse_input_shapes(input_shapes) if isinstance(input_shapes, str) else input_shapes
    options: dict[str, Any] = {"input_format": input_format, "progress": progress, "verify": verify,
                               "verify_floor": verify_floor,
                               "input_shapes": {name: [int(d) for d in dims] for name, dims in shapes.items()}
                               if shapes else None}
    if quant_config.quant_type == "DYNAMIC_QUANT":
        options["alwc_weights"] = alwc_weights
    if calibration is not None:
        options["samples"] = CalibrationData(calibration, proto, transform)
    result = _convert_module.convert(proto, quant_config, model_path=path, float16=lite.fp16, **options)
    if lite.input_type or lite.output_type:
        lite_flags.integer_boundaries(result, proto, quant_config, lite, options["input_shapes"], input_format,
                                      options.get("samples"))
    return result


def quantize(model: ModelLike, config: ConfigLike, calibration: Any = None, *,
             transform: Callable[[Any], Any] | None = None, input_format: str | None = None,
             progress: bool | None = None, alwc_weights: str = "int8",
             input_shapes: str | Mapping[str, Sequence[int]] | None = None, verify: bool = True,
             verify_floor: float | None = None, fp16: bool = False, input_data_type: str = "FLOAT32",
             output_data_type: str = "FLOAT32") -> onnx.ModelProto:
    """Like convert(), returning only the quantized model."""
    return convert(model, config, calibration, transform=transform, input_format=input_format, progress=progress,
                   alwc_weights=alwc_weights, input_shapes=input_shapes, verify=verify, verify_floor=verify_floor,
                   fp16=fp16, input_data_type=input_data_type, output_data_type=output_data_type).model


def _model(model: ModelLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, Path)):  # .tflite, .pb or a SavedModel folder: the TF front-ends (ptqlite[tf])
        return load_model(model, fmk_for_path(model))
    raise TypeError(f"model: expected a path or an onnx.ModelProto, got {type(model).__name__}")


def _config(config: ConfigLike, samples_given: bool) -> QuantConfig:
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, Mapping):
        return config_from_dict(config, samples_given=samples_given)
    if isinstance(config, Path) or (isinstance(config, str) and "\n" not in config and "[" not in config):
        return load_config(config, samples_given=samples_given)
    if isinstance(config, str):
        return parse_config(config, "<config text>", samples_given=samples_given)
    raise TypeError("config: expected a QuantConfig, a path to an INI file, INI text or a dict of sections, got "
                    f"{type(config).__name__}")


class CalibrationData:
    """Calibration samples for the passes: re-iterable, each a dict of batch-1 float arrays keyed by input name."""

    def __init__(self, source: Any, model: onnx.ModelProto, transform: Callable[[Any], Any] | None = None):
        if isinstance(source, (np.ndarray, Mapping)) or _is_tensor(source):
            source = [source]  # one batch (or one sample)
        elif not callable(source) and not isinstance(source, Iterable):
            raise TypeError(f"calibration: expected an iterable of samples or a callable returning one, got "
                            f"{type(source).__name__}")
        elif not callable(source) and iter(source) is source:  # a generator or iterator: read once, kept
            source = list(source)
        self.source = source
        self.transform = transform
        self.inputs = model_input_specs(model)
        self.count: int | None = None  # samples in one full pass, once one was read

    def __length_hint__(self) -> int:
        """The sample count for the progress bars' totals: exact after a full pass; before one, for a sized
        source (a list, a Dataset-like object), its length times the samples its first item splits into."""
        if self.count is not None:
            return self.count
        if callable(self.source) or not hasattr(self.source, "__len__"):
            return NotImplemented
        size = len(self.source)
        if size == 0:
            return 0
        first = self.source[0] if isinstance(self.source, Sequence) else next(iter(self.source))
        if self.transform is not None:
            first = self.transform(first)
        return size * len(self._samples(first, 0))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        items = self.source() if callable(self.source) else self.source
        count = 0
        for item in items:
            if self.transform is not None:
                item = self.transform(item)
            for sample in self._samples(item, count):
                count += 1
                yield sample
        if count == 0:
            raise DataError("calibration: no samples (the iterable or the callable's iterator was empty)")
        self.count = count

    def _samples(self, item: Any, index: int) -> list[dict[str, np.ndarray]]:
        if isinstance(item, Mapping):
            arrays = {str(name): _array(value, f"calibration sample {index}, input '{name}'")
                      for name, value in item.items()}
        else:
            if len(self.inputs) != 1:
                names = ", ".join(spec.name for spec in self.inputs)
                raise DataError(f"calibration sample {index}: the model has {len(self.inputs)} inputs ({names}): "
                                "give each sample as a dict {input name: array}")
            arrays = {self.inputs[0].name: _array(item, f"calibration sample {index}")}
        specs = {spec.name: spec for spec in self.inputs}
        batch = None
        for name, value in list(arrays.items()):
            spec = specs.get(name)
            if spec is None:
                continue
            if value.ndim == len(spec.shape) - 1:  # one sample without its batch axis
                value = value[None]
            value = value.astype(spec.dtype, copy=False)
            arrays[name] = value
            if value.ndim == len(spec.shape) and value.ndim and value.shape[0] > 1 and spec.shape[0] == 1:
                if batch not in (None, value.shape[0]):
                    raise DataError(f"calibration sample {index}: inputs have different batch sizes")
                batch = value.shape[0]
        if batch is None:
            return [arrays]
        return [{name: (value[i:i + 1] if name in specs and value.ndim == len(specs[name].shape) else value)
                 for name, value in arrays.items()} for i in range(batch)]


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "numpy") and hasattr(value, "shape") and not isinstance(value, np.ndarray)


def _array(value: Any, what: str) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensors: no import of torch needed
        value = value.detach().cpu().numpy()
    elif _is_tensor(value):
        value = value.numpy()
    try:
        return np.asarray(value)
    except Exception as exc:  # noqa: BLE001 -- whatever the object's own conversion raises
        raise DataError(f"{what}: cannot be read as an array ({exc})") from None
