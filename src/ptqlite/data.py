"""Calibration data ([data_preprocess_param]): BIN and IMAGE files laid out like the model inputs.

calibration_set() checks everything it can up front (directories, input names, file counts, BIN byte sizes) so a
bad data set fails before any work; the files themselves are read one sample at a time while iterating.
docs/calibration.md describes the rules.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnx
from onnx import helper

from .config import DataPreprocessParam, QuantConfig
from .errors import ConfigError, DataError, UsageError
from .model import graph_inputs
from .validate import check_sample_finite

LAYOUTS = ("NCHW", "NHWC")
_RESIZE = {"LINEAR": cv2.INTER_LINEAR, "NEAREST": cv2.INTER_NEAREST, "CUBIC": cv2.INTER_CUBIC}
_SECTION = "[data_preprocess_param]"


@dataclass(frozen=True)
class InputSpec:
    """What one model input expects. `shape` has None for dims the data may choose (IMAGE spatial dims)."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype
    files: tuple[Path, ...]
    layout: str | None = None  # NCHW / NHWC for IMAGE inputs

    @property
    def nbytes(self) -> int:
        return int(np.prod([d or 0 for d in self.shape], dtype=np.int64)) * self.dtype.itemsize


class CalibrationSet:
    """Validated calibration inputs. len() = number of samples; iterating yields one sample at a time, as
    dict[input name -> np.ndarray] shaped exactly like the model input with batch 1 and the model input's dtype.
    Files are read lazily while iterating (never all held in memory); iterating twice gives the same data."""

    def __init__(self, specs: tuple[InputSpec, ...], size: int, param: DataPreprocessParam):
        self.specs = specs
        self.input_names: tuple[str, ...] = tuple(spec.name for spec in specs)
        self.size = size
        self.param = param

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for index in range(self.size):
            yield self.sample(index)

    def sample(self, index: int) -> dict[str, np.ndarray]:
        """Sample `index` alone (read from disk now)."""
        if not 0 <= index < self.size:
            raise IndexError(f"calibration sample {index} out of range 0..{self.size - 1}")
        return {spec.name: self._read(spec, spec.files[index]) for spec in self.specs}

    def files(self, index: int) -> dict[str, Path]:
        """The file each input of sample `index` comes from (for reports)."""
        return {spec.name: spec.files[index] for spec in self.specs}

    def _read(self, spec: InputSpec, path: Path) -> np.ndarray:
        try:
            array = read_bin(path, spec) if self.param.input_type == "BIN" else read_image(path, spec, self.param)
        except OSError as exc:
            raise DataError(f"{path}: cannot read this calibration file ({exc.strerror})") from None
        check_sample_finite({spec.name: array}, str(path))
        return array


def has_calibration_data(config: QuantConfig) -> bool:
    """True when [data_preprocess_param] calibrate_path is set."""
    return bool(config.data.calibrate_path)


def calibration_set(config: QuantConfig, model: onnx.ModelProto, input_format: str | None = None) -> CalibrationSet:
    """Validate config.data against the model and return the set. Raises DataError / ConfigError (one sentence)
    for: a directory that does not exist, calibrate_path names that are not model inputs (list the real ones),
    model inputs with no directory (list them), fewer files than calibrate_size (say how many were found and where),
    and, for BIN, a file whose byte size differs from the input tensor's (name the file, expected and actual
    sizes) -- check sizes up front with stat so the error comes before any work."""
    param = config.data
    where = f"{config.source}: {_SECTION}"
    if not has_calibration_data(config):
        raise ConfigError(f"{where} calibrate_path: required for calibration; expected input_name:directory")
    if input_format not in (None, *LAYOUTS):
        raise UsageError(f"--inputDataFormat={input_format}: expected one of {', '.join(LAYOUTS)}")
    if param.input_type not in ("BIN", "IMAGE"):
        raise ConfigError(f"{where} input_type: required with calibrate_path; expected IMAGE or BIN")
    if param.calibrate_size < 1:
        raise ConfigError(f"{where} calibrate_size: required with calibrate_path; expected an integer >= 1")
    inputs = {value.name: value for value in graph_inputs(model)}
    directories = dict(param.calibrate_path)
    unknown = [name for name in directories if name not in inputs]
    if unknown:
        raise ConfigError(f"{where} calibrate_path names {_names(unknown)} which the model does not have; "
                          f"its inputs are {_names(inputs)}")
    missing = [name for name in inputs if name not in directories]
    if missing:
        raise ConfigError(f"{where} calibrate_path gives no directory for model input(s) {_names(missing)}; "
                          "expected one input_name:directory pair per model input")
    specs = []
    for name, value in inputs.items():  # model input order, so samples feed the model in its own order
        files = _list_files(name, directories[name], param.calibrate_size, config.source)
        spec = _input_spec(value, files, param.input_type, input_format, param)
        if param.input_type == "BIN":
            _check_bin_sizes(spec)
        specs.append(spec)
    return CalibrationSet(tuple(specs), param.calibrate_size, param)


# ---------------------------------------------------------------- validation helpers


def _names(names: Iterable[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def _list_files(name: str, directory: str, size: int, source: str) -> tuple[Path, ...]:
    # Relative directories are taken from the current working directory, as converter_lite does.
    folder = Path(directory).expanduser().absolute()
    if not folder.is_dir():
        if folder.exists():
            problem = "is not a directory"
        elif os.path.lexists(folder):
            problem = "is a broken symlink or a symlink loop"
        else:
            problem = "does not exist"
        raise DataError(f"{source}: {_SECTION} calibrate_path: directory '{directory}' for input '{name}' "
                        f"{problem} (looked in {folder})")
    # Byte-wise name order, hidden files ignored; the first `size` files are the samples.
    try:
        names = sorted((entry.name for entry in os.scandir(folder)
                        if not entry.name.startswith(".") and _is_file(entry)), key=os.fsencode)
    except OSError as exc:
        raise DataError(f"{source}: {_SECTION} calibrate_path: cannot list {folder} for input '{name}' "
                        f"({exc.strerror})") from None
    if len(names) < size:
        raise DataError(f"{source}: {_SECTION} calibrate_size={size} but only {len(names)} file(s) were found "
                        f"in {folder} for input '{name}'")
    return tuple(folder / n for n in names[:size])


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError as exc:  # a symlink loop: name it rather than drop a sample silently
        raise DataError(f"{entry.path}: calibration file cannot be read ({exc.strerror}); fix or remove it") from None


def _input_spec(value: onnx.ValueInfoProto, files: tuple[Path, ...], input_type: str, input_format: str | None,
                param: DataPreprocessParam) -> InputSpec:
    name = value.name
    tensor_type = value.type.tensor_type
    if not value.type.HasField("tensor_type") or tensor_type.elem_type == onnx.TensorProto.UNDEFINED:
        raise DataError(f"model input '{name}' is not a tensor with a known element type")
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    except (KeyError, TypeError, ValueError):
        dtype = np.dtype(object)
    if dtype.kind not in "biuf":
        raise DataError(f"model input '{name}' has element type "
                        f"{onnx.TensorProto.DataType.Name(tensor_type.elem_type)}; calibration data must be numeric")
    if not tensor_type.HasField("shape"):
        raise DataError(f"model input '{name}' has no shape; give one with --inputShape, "
                        f"e.g. --inputShape=\"{name}:1,3,224,224\"")
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor_type.shape.dim]
    if dims and dims[0] is None:
        dims[0] = 1  # a symbolic batch dim is one sample
    if input_type == "BIN":
        symbolic = [i for i, d in enumerate(dims) if d is None]
        if symbolic:
            raise DataError(f"model input '{name}' has symbolic dim(s) at position(s) "
                            f"{', '.join(map(str, symbolic))}, so a BIN file's shape is unknown; fix them with "
                            f"--inputShape, e.g. --inputShape=\"{name}:{','.join(str(d or 1) for d in dims)}\"")
        return InputSpec(name, tuple(dims), dtype, files)
    if len(dims) != 4:
        raise DataError(f"model input '{name}' has rank {len(dims)}; input_type=IMAGE needs a 4-D NCHW or NHWC "
                        "input (use input_type=BIN for other inputs)")
    channels = 1 if param.image_to_format == "GRAY" else 3
    layout = input_format or _infer_layout(dims, channels)
    return InputSpec(name, tuple(dims), dtype, files, layout)


def _infer_layout(dims: list[int | None], channels: int) -> str:
    """NCHW when dim 1 holds the image's channel count, else NHWC when dim 3 does; NCHW when neither
    (the shape check then reports the mismatch)."""
    if dims[1] == channels:
        return "NCHW"
    if dims[3] == channels:
        return "NHWC"
    return "NCHW"


def _check_bin_sizes(spec: InputSpec) -> None:
    expected = spec.nbytes
    for path in spec.files:
        try:
            actual = path.stat().st_size
        except OSError as exc:
            raise DataError(f"{path}: cannot read this calibration file ({exc.strerror})") from None
        if actual != expected:
            raise DataError(f"{path}: BIN file for input '{spec.name}' has {actual} bytes, expected {expected} "
                            f"({_shape_text(spec.shape)} {spec.dtype.name})")


def _shape_text(shape: Iterable[int | None]) -> str:
    return "x".join("?" if d is None else str(d) for d in shape)


# ---------------------------------------------------------------- readers


def read_bin(path: Path, spec: InputSpec) -> np.ndarray:
    """Raw little-endian bytes of one input tensor in its dtype and layout."""
    data = np.fromfile(path, dtype=spec.dtype.newbyteorder("<"))
    if data.size * spec.dtype.itemsize != spec.nbytes:  # changed since the size check
        raise DataError(f"{path}: BIN file for input '{spec.name}' has {data.nbytes} bytes, expected {spec.nbytes}")
    return data.astype(spec.dtype, copy=False).reshape(spec.shape)


def preprocess_image(path: Path, param: DataPreprocessParam) -> np.ndarray:
    """Decode and preprocess one image in the reference order: colour conversion, normalize, resize, center
    crop. Returns float32 HWC (HW1 for GRAY)."""
    raw = np.fromfile(path, dtype=np.uint8)  # imdecode instead of imread: any file name works
    image = cv2.imdecode(raw, cv2.IMREAD_COLOR) if raw.size else None
    if image is None:
        raise DataError(f"{path}: not a readable image (input_type=IMAGE)")
    if param.image_to_format == "RGB":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    elif param.image_to_format == "GRAY":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)[:, :, None]
    # Work in float32 from here: resizing normalized floats keeps fractions an 8-bit image would round away.
    image = image.astype(np.float32)
    if param.normalize_mean:
        mean = np.asarray(param.normalize_mean, np.float32)
        std = np.asarray(param.normalize_std, np.float32)
        image = (image - mean) / std
    if param.resize_method:
        image = cv2.resize(image, (param.resize_width, param.resize_height),
                           interpolation=_RESIZE[param.resize_method])
        if image.ndim == 2:  # cv2 drops a single channel axis
            image = image[:, :, None]
    if param.center_crop_width:
        height, width = image.shape[:2]
        crop_w, crop_h = param.center_crop_width, param.center_crop_height
        if crop_w > width or crop_h > height:
            raise DataError(f"{path}: center crop {crop_w}x{crop_h} (width x height) is larger than the "
                            f"{width}x{height} image{' after resizing' if param.resize_method else ''}")
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        image = image[top:top + crop_h, left:left + crop_w]
    return np.ascontiguousarray(image)


def read_image(path: Path, spec: InputSpec, param: DataPreprocessParam) -> np.ndarray:
    """One preprocessed image laid out like the model input (batch 1) in its dtype."""
    image = preprocess_image(path, param)
    array = image.transpose(2, 0, 1)[None] if spec.layout == "NCHW" else image[None]
    if any(want is not None and want != got for want, got in zip(spec.shape, array.shape)):
        raise DataError(f"image {path.name} gives {_shape_text(array.shape)} ({spec.layout}) after preprocessing "
                        f"but input '{spec.name}' expects {_shape_text(spec.shape)}; check resize_*, "
                        f"center_crop_*, image_to_format and --inputDataFormat")
    if spec.dtype.kind in "iu":  # integer inputs (e.g. uint8 images): round and saturate
        info = np.iinfo(spec.dtype)
        array = np.clip(np.rint(array), info.min, info.max)
    return np.ascontiguousarray(array.astype(spec.dtype, copy=False))
