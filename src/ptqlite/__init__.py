"""ptqlite: post-training quantization of ONNX models, configured like converter_lite.

Python API (docs in README.md, "Python API"): `convert` / `quantize` take a model path or ModelProto, a config
(QuantConfig, INI path or text, or a dict of sections) and in-memory calibration data.
"""

from .api import CalibrationData, convert, quantize
from .config import (
    CommonQuantParam,
    DataPreprocessParam,
    DynamicQuantParam,
    FullQuantParam,
    MixedBitWeightQuantParam,
    QuantConfig,
    WeightQuantParam,
    config_from_dict,
    load_config,
    parse_config,
)
from .errors import PtqError
from .model import load_model, save_model
from .result import ConversionResult, QuantizedTensor, SkippedTensor

__all__ = [
    "CalibrationData", "CommonQuantParam", "ConversionResult", "DataPreprocessParam", "DynamicQuantParam",
    "FullQuantParam", "MixedBitWeightQuantParam", "PtqError", "QuantConfig", "QuantizedTensor", "SkippedTensor",
    "WeightQuantParam", "config_from_dict", "convert", "load_config", "load_model", "parse_config", "quantize",
    "save_model",
]
__version__ = "0.1.0"
