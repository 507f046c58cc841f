"""Quantization config file (converter_lite INI format) -> frozen QuantConfig.

Parsing follows the reference reader: lines are trimmed, lines of two characters or fewer and lines starting with
'#' are skipped, a key splits from its value at the first '=', a repeated key keeps its first value and a repeated
section is dropped. An empty value (`bit_num=`) counts as not given, as in the reference. Every error names the file, line, section and key, the bad value, and what is allowed.
docs/spec.md documents each key.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .paths import path_problem

log = logging.getLogger(__name__)

QUANT_TYPES = ("WEIGHT_QUANT", "FULL_QUANT", "DYNAMIC_QUANT")
ACTIVATION_METHODS = ("MAX_MIN", "KL", "REMOVAL_OUTLIER")
TARGET_DEVICES = ("CPU", "NVGPU", "DSP", "ASCEND")
INPUT_TYPES = ("IMAGE", "BIN")
IMAGE_FORMATS = ("RGB", "BGR", "GRAY")
RESIZE_METHODS = ("LINEAR", "NEAREST", "CUBIC")
DYNAMIC_STRATEGIES = ("ALWC", "ACWL")
DEQUANT_STRATEGIES = ("ON_THE_FLY",)


@dataclass(frozen=True)
class CommonQuantParam:
    quant_type: str = ""
    bit_num: int = 8
    min_quant_weight_size: int = 0
    min_quant_weight_channel: int = 16
    skip_quant_node: tuple[str, ...] = ()  # exact node names and fnmatch patterns (extension)
    debug_info_save_path: str = ""
    enable_encode: bool = True
    skip_quant_op_type: tuple[str, ...] = ()  # extension: every node of these op types stays float


@dataclass(frozen=True)
class MixedBitWeightQuantParam:
    init_scale: float = 0.02
    auto_tune: bool = False


@dataclass(frozen=True)
class WeightQuantParam:
    per_channel: bool = True
    bias_correction: bool = True
    # "DEFAULT" decodes weights to float when the runtime loads the model; "ON_THE_FLY" keeps them integer.
    dequant_strategy: str = "DEFAULT"
    # Extension: 0 = one scale per output channel; else one per block of this many elements along the input axis.
    block_size: int = 0
    # Extension: with block_size, tables that are only gathered get at least this many bits (0: bit_num).
    gather_min_bit_num: int = 6
    # Extension: with block_size and calibration data, the block search weights each input channel's error by its
    # activations' mean square (activation_weights.py); false searches by the weight error alone.
    activation_weighted: bool = True


@dataclass(frozen=True)
class FullQuantParam:
    activation_quant_method: str = "MAX_MIN"
    bias_correction: bool = True
    per_channel: bool = True
    target_device: str = "CPU"
    latency_aware: bool = True  # extension (docs/spec.md)


@dataclass(frozen=True)
class DataPreprocessParam:
    calibrate_path: tuple[tuple[str, str], ...] = ()
    calibrate_size: int = 0
    input_type: str = ""
    image_to_format: str = ""
    normalize_mean: tuple[float, ...] = ()
    normalize_std: tuple[float, ...] = ()
    resize_width: int = 0
    resize_height: int = 0
    resize_method: str = ""
    center_crop_width: int = 0
    center_crop_height: int = 0


@dataclass(frozen=True)
class DynamicQuantParam:
    quant_strategy: str = "ALWC"
    latency_aware: bool = True  # extension (docs/spec.md)


@dataclass(frozen=True)
class QuantConfig:
    common: CommonQuantParam = field(default_factory=CommonQuantParam)
    mixed_bit: MixedBitWeightQuantParam = field(default_factory=MixedBitWeightQuantParam)
    weight: WeightQuantParam = field(default_factory=WeightQuantParam)
    full: FullQuantParam = field(default_factory=FullQuantParam)
    data: DataPreprocessParam = field(default_factory=DataPreprocessParam)
    dynamic: DynamicQuantParam = field(default_factory=DynamicQuantParam)
    ascend_context: tuple[tuple[str, str], ...] = ()
    # Sections the file actually contained: some rules only apply when a section is present.
    sections: tuple[str, ...] = ()
    source: str = "<config>"

    @property
    def quant_type(self) -> str:
        return self.common.quant_type

    @property
    def is_mixed_bit(self) -> bool:
        return self.quant_type == "WEIGHT_QUANT" and self.common.bit_num == 0


# ---------------------------------------------------------------- value parsers
# Each returns the parsed value or raises ValueError with the "expected ..." half of the message.


_INT = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: int() would also take other scripts' digits
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")  # decimal, no inf/nan/underscores


def _number(text: str) -> float:
    if not _NUMBER.fullmatch(text):
        raise ValueError(text)
    return float(text)


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not _INT.fullmatch(text):
            raise ValueError(f"expected an integer in [{lo}, {hi}]")
        value = int(text)
        if not lo <= value <= hi:
            raise ValueError(f"expected an integer in [{lo}, {hi}]")
        return value

    return parse


def _float_open(lo: float, hi: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = _number(text)
        except ValueError:
            raise ValueError(f"expected a number in ({lo:g}, {hi:g})") from None
        if not (math.isfinite(value) and lo < value < hi):
            raise ValueError(f"expected a number in ({lo:g}, {hi:g})")
        return value

    return parse


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered not in ("true", "false"):
        raise ValueError("expected true or false")
    return lowered == "true"


def _choice(*choices: str, aliases: dict[str, str] | None = None) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if aliases and text in aliases:
            return aliases[text]
        if text not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return text

    return parse


def _block_size(text: str) -> int:
    expected = "expected 0 (per channel) or a power of two in [16, 256]"
    if not _INT.fullmatch(text):
        raise ValueError(expected)
    value = int(text)
    if value != 0 and not (16 <= value <= 256 and value & (value - 1) == 0):
        raise ValueError(expected)
    return value


def _directory(text: str) -> str:
    problem = path_problem(text) if text else None
    if problem:
        raise ValueError(problem)
    # The reports go into this folder (created when missing); an existing file there could never hold them.
    if Path(text).is_file():
        raise ValueError("expected a directory path, not an existing file")
    return text


def _name_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise ValueError("expected comma-separated node names")
    return names


def _op_types(text: str) -> tuple[str, ...]:
    import difflib

    from onnx import defs

    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise ValueError("expected comma-separated ONNX op types, e.g. Conv,Gemm")
    known = sorted({schema.name for schema in defs.get_all_schemas()})
    for name in names:
        if name not in known:
            by_case = [k for k in known if k.lower() == name.lower()]
            near = by_case or difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ValueError(f"expected ONNX op types (exact case), e.g. Conv,Gemm; '{name}' is not one{hint}")
    return names


def _vector(text: str) -> tuple[float, ...]:
    match = re.fullmatch(r"\[(.*)\]", text)
    if not match:
        raise ValueError("expected a vector like [127.5, 127.5, 127.5]")
    try:
        values = tuple(_number(part.strip()) for part in match.group(1).split(","))
    except ValueError:
        raise ValueError("expected a vector of numbers like [127.5, 127.5, 127.5]") from None
    # One value per image channel: 1 (GRAY) or 3 (RGB/BGR).
    if len(values) not in (1, 3) or not all(math.isfinite(v) for v in values):
        raise ValueError("expected 1 or 3 finite numbers like [127.5, 127.5, 127.5]")
    return values


def _calibrate_path(text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for part in text.split(","):
        part = part.strip()
        # The last ':' separates the input name from the directory, as in the reference reader.
        name, sep, directory = part.rpartition(":")
        if not sep or not name or not directory:
            raise ValueError("expected input_name:directory[,input_name:directory...]")
        pairs.append((name.strip(), directory.strip()))
    return tuple(pairs)


_U16 = _int_in(1, 65535)

# section -> key -> (dataclass field, parser)
_SCHEMA: dict[str, dict[str, tuple[str, Callable[[str], Any]]]] = {
    "common_quant_param": {
        "quant_type": ("quant_type", _choice(*QUANT_TYPES)),
        "bit_num": ("bit_num", _int_in(0, 16)),
        "min_quant_weight_size": ("min_quant_weight_size", _int_in(0, 65535)),
        "min_quant_weight_channel": ("min_quant_weight_channel", _int_in(0, 65535)),
        "skip_quant_node": ("skip_quant_node", _name_list),
        "debug_info_save_path": ("debug_info_save_path", _directory),
        "enable_encode": ("enable_encode", _bool),
        "skip_quant_op_type": ("skip_quant_op_type", _op_types),
    },
    "mixed_bit_weight_quant_param": {
        "init_scale": ("init_scale", _float_open(0.0, 1.0)),
        "auto_tune": ("auto_tune", _bool),
    },
    "weight_quant_param": {
        "per_channel": ("per_channel", _bool),
        "bias_correction": ("bias_correction", _bool),
        "dequant_strategy": ("dequant_strategy", _choice(*DEQUANT_STRATEGIES)),
        "block_size": ("block_size", _block_size),
        "gather_min_bit_num": ("gather_min_bit_num", _int_in(0, 16)),
        "activation_weighted": ("activation_weighted", _bool),
    },
    "full_quant_param": {
        "activation_quant_method": (
            "activation_quant_method",
            _choice(*ACTIVATION_METHODS, aliases={"RemovalOutlier": "REMOVAL_OUTLIER"}),
        ),
        "bias_correction": ("bias_correction", _bool),
        "per_channel": ("per_channel", _bool),
        "target_device": ("target_device", _choice(*TARGET_DEVICES)),
        "latency_aware": ("latency_aware", _bool),
    },
    "data_preprocess_param": {
        "calibrate_path": ("calibrate_path", _calibrate_path),
        "calibrate_size": ("calibrate_size", _U16),
        "input_type": ("input_type", _choice(*INPUT_TYPES)),
        "image_to_format": ("image_to_format", _choice(*IMAGE_FORMATS)),
        "normalize_mean": ("normalize_mean", _vector),
        "normalize_std": ("normalize_std", _vector),
        "resize_width": ("resize_width", _U16),
        "resize_height": ("resize_height", _U16),
        "resize_method": ("resize_method", _choice(*RESIZE_METHODS)),
        "center_crop_width": ("center_crop_width", _U16),
        "center_crop_height": ("center_crop_height", _U16),
    },
    "dynamic_quant_param": {
        "quant_strategy": ("quant_strategy", _choice(*DYNAMIC_STRATEGIES)),
        "latency_aware": ("latency_aware", _bool),
    },
}
_FREE_FORM_SECTIONS = ("ascend_context",)
_SECTION_CLASSES = {
    "common_quant_param": ("common", CommonQuantParam),
    "mixed_bit_weight_quant_param": ("mixed_bit", MixedBitWeightQuantParam),
    "weight_quant_param": ("weight", WeightQuantParam),
    "full_quant_param": ("full", FullQuantParam),
    "data_preprocess_param": ("data", DataPreprocessParam),
    "dynamic_quant_param": ("dynamic", DynamicQuantParam),
}


@dataclass
class _Entry:
    value: Any
    raw: str
    line: int


class _Reader:
    """Holds what was read, so cross-key rules can name the line of the key at fault."""

    def __init__(self, source: str):
        self.source = source
        self.entries: dict[str, dict[str, _Entry]] = {}
        self.section_lines: dict[str, int] = {}

    def fail(self, section: str, key: str, expected: str, *, line: int | None = None) -> ConfigError:
        entry = self.entries.get(section, {}).get(key)
        if entry is not None and entry.value is not None:
            return ConfigError(f"{self.source}:{entry.line}: [{section}] {key}={entry.raw}: {expected}")
        if entry is not None:  # given with an empty value: point at that line
            line = entry.line
        where = f"{self.source}:{line}" if line else self.source
        return ConfigError(f"{where}: [{section}] {key}: {expected}")

    def has(self, section: str, key: str) -> bool:
        entry = self.entries.get(section, {}).get(key)
        return entry is not None and entry.value is not None


def parse_config(text: str, source: str = "<config>", *, samples_given: bool = False) -> QuantConfig:
    """Parse config text; `source` is the name used in error messages. `samples_given`: the caller passes
    calibration samples in memory (Python API), so FULL_QUANT needs no calibrate_path / calibrate_size /
    input_type."""
    reader = _Reader(source)
    section: str | None = None
    skipping_repeat = False
    for number, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if len(line) <= 2 or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            skipping_repeat = section in reader.section_lines
            if skipping_repeat:
                log.warning("%s:%d: section [%s] repeated; the repeat is ignored", source, number, section)
            elif section in _SCHEMA or section in _FREE_FORM_SECTIONS:
                reader.section_lines[section] = number
                reader.entries[section] = {}
            else:
                log.warning("%s:%d: unknown section [%s] ignored", source, number, section)
            continue
        if section is None:
            raise ConfigError(f"{source}:{number}: '{line}': expected a [section] header before the first key")
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ConfigError(f"{source}:{number}: [{section}] '{line}': expected key=value")
        if skipping_repeat or section not in reader.entries:
            continue
        if key in reader.entries[section]:
            log.warning("%s:%d: [%s] %s repeated; the first value is kept", source, number, section, key)
            continue
        if section in _FREE_FORM_SECTIONS:
            reader.entries[section][key] = _Entry(value, value, number)
            continue
        spec = _SCHEMA[section].get(key)
        if spec is None:
            allowed = ", ".join(_SCHEMA[section])
            raise ConfigError(f"{source}:{number}: [{section}] {key}={value}: {key} is not supported in "
                              f"[{section}]; expected one of {allowed}")
        if not value:
            # The reference treats an empty value as "not given"; the entry still blocks later duplicates.
            reader.entries[section][key] = _Entry(None, value, number)
            continue
        try:
            parsed = spec[1](value)
        except ValueError as exc:
            raise ConfigError(f"{source}:{number}: [{section}] {key}={value}: {exc}") from None
        reader.entries[section][key] = _Entry(parsed, value, number)
    return _build(reader, samples_given)


def load_config(path: str | Path, *, samples_given: bool = False) -> QuantConfig:
    """Read and validate a config file (`samples_given` as for parse_config)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a byte-order mark
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc})") from None
    return parse_config(text, source=str(path), samples_given=samples_given)


def config_from_dict(sections: Mapping[str, Mapping[str, Any]], source: str = "config dict", *,
                     samples_given: bool = False) -> QuantConfig:
    """A config given as {section: {key: value}}, shaped like the INI file and checked by the same rules with the
    same messages (without line numbers). Values may be INI strings or Python values: bools, numbers, lists of
    numbers or names (skip_quant_node, normalize_mean, ...), {input name: folder} for calibrate_path."""
    if not isinstance(sections, Mapping):
        raise ConfigError(f"{source}: expected {{section: {{key: value}}}}, got {type(sections).__name__}")
    lines = []
    for section, keys in sections.items():
        if not isinstance(keys, Mapping):
            raise ConfigError(f"{source}: [{section}]: expected a dict of key: value, got {type(keys).__name__}")
        lines.append(f"[{section}]")
        lines += [f"{key}={_ini_value(key, value)}" for key, value in keys.items()]
    try:
        return parse_config("\n".join(lines) + "\n", source, samples_given=samples_given)
    except ConfigError as exc:
        # the line numbers are those of the INI text made from the dict: meaningless to its author
        raise ConfigError(re.sub(rf"^{re.escape(source)}:\d+: ", f"{source}: ", str(exc))) from None


def _ini_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):  # calibrate_path
        return ",".join(f"{name}:{folder}" for name, folder in value.items())
    if isinstance(value, (list, tuple)):
        text = ",".join(str(v) for v in value)
        return f"[{text}]" if key in _VECTOR_KEYS else text
    return str(value)


_VECTOR_KEYS = ("normalize_mean", "normalize_std")


def _build(reader: _Reader, samples_given: bool = False) -> QuantConfig:
    parts: dict[str, Any] = {}
    for section, (attr, cls) in _SECTION_CLASSES.items():
        values = {_SCHEMA[section][k][0]: e.value for k, e in reader.entries.get(section, {}).items()
                  if e.value is not None}
        parts[attr] = cls(**values)
    ascend = tuple((k, e.value) for k, e in reader.entries.get("ascend_context", {}).items())
    config = QuantConfig(
        **parts, ascend_context=ascend, sections=tuple(reader.section_lines), source=reader.source
    )
    _check_rules(config, reader, samples_given)
    return config


def _check_rules(config: QuantConfig, reader: _Reader, samples_given: bool = False) -> None:
    common = config.common
    cq = "common_quant_param"
    if not common.quant_type:
        raise reader.fail(cq, "quant_type", "required; expected one of " + ", ".join(QUANT_TYPES),
                          line=reader.section_lines.get(cq))
    if common.quant_type in ("FULL_QUANT", "DYNAMIC_QUANT") and common.bit_num != 8:
        raise reader.fail(cq, "bit_num", f"expected 8 for quant_type={common.quant_type}")
    if common.quant_type == "WEIGHT_QUANT" and not common.enable_encode and common.bit_num not in (8, 16):
        raise reader.fail(
            cq, "enable_encode", f"expected true when bit_num is not 8 or 16 (bit_num={common.bit_num}): "
            "only 8 and 16 bits have a plain integer storage"
        )
    if config.is_mixed_bit and config.weight.dequant_strategy == "ON_THE_FLY":
        raise reader.fail("weight_quant_param", "dequant_strategy",
                          "expected a fixed bit_num in [1, 16] with ON_THE_FLY, not mixed bit (bit_num=0)")
    if common.quant_type == "WEIGHT_QUANT" and config.weight.block_size:
        wq = "weight_quant_param"
        if config.is_mixed_bit:
            raise reader.fail(wq, "block_size", "expected 0 with mixed bit (bit_num=0): block-wise scales need a "
                              "fixed bit_num in [1, 16]")
        if not config.weight.per_channel:
            raise reader.fail(wq, "block_size", "expected 0 with per_channel=false (blocks split output channels)")
    if common.quant_type == "FULL_QUANT" and not samples_given:
        dp = "data_preprocess_param"
        # Without a [data_preprocess_param] section, point at the quant_type line.
        line = reader.section_lines.get(dp) or reader.entries[cq]["quant_type"].line
        for key in ("calibrate_path", "calibrate_size", "input_type"):
            if not reader.has(dp, key):
                raise reader.fail(dp, key, "required for quant_type=FULL_QUANT", line=line)
    _check_preprocess(config.data, reader)


def _check_preprocess(data: DataPreprocessParam, reader: _Reader) -> None:
    dp = "data_preprocess_param"
    if reader.has(dp, "calibrate_path"):
        names = [name for name, _ in data.calibrate_path]
        if len(set(names)) != len(names):
            raise reader.fail(dp, "calibrate_path", "expected each input name at most once")
        for key in ("calibrate_size", "input_type"):
            if not reader.has(dp, key):
                raise reader.fail(dp, key, "required when calibrate_path is given", line=reader.section_lines[dp])
    if data.resize_method or data.resize_width or data.resize_height:
        for key in ("resize_width", "resize_height", "resize_method"):
            if not reader.has(dp, key):
                raise reader.fail(dp, key, "required when resizing (resize_width, resize_height and "
                                  "resize_method go together)", line=reader.section_lines[dp])
    if bool(data.center_crop_width) != bool(data.center_crop_height):
        missing = "center_crop_height" if data.center_crop_width else "center_crop_width"
        raise reader.fail(dp, missing, "required when the other center_crop key is given",
                          line=reader.section_lines[dp])
    if bool(data.normalize_mean) != bool(data.normalize_std):
        missing = "normalize_std" if data.normalize_mean else "normalize_mean"
        raise reader.fail(dp, missing, "required when the other normalize key is given",
                          line=reader.section_lines[dp])
    if data.normalize_mean:
        # Images decode to 3 channels; only GRAY leaves one.
        fmt = data.image_to_format or "BGR (the default)"
        channels = 1 if data.image_to_format == "GRAY" else 3
        for key, values in (("normalize_mean", data.normalize_mean), ("normalize_std", data.normalize_std)):
            if len(values) != channels:
                raise reader.fail(dp, key, f"expected {channels} value(s), one per channel of image_to_format={fmt}")
        if any(v == 0 for v in data.normalize_std):
            raise reader.fail(dp, "normalize_std", "expected non-zero values (they divide the image)")
    if data.input_type == "BIN":
        for key in ("image_to_format", "normalize_mean", "normalize_std", "resize_width", "resize_height",
                    "resize_method", "center_crop_width", "center_crop_height"):
            if reader.has(dp, key):
                log.warning("%s: [%s] %s is ignored with input_type=BIN", reader.source, dp, key)
