"""ptqlite: post-training quantization of ONNX models, configured like converter_lite."""

from .config import QuantConfig, load_config, parse_config
from .convert import convert, quantize
from .errors import PtqError

__all__ = ["PtqError", "QuantConfig", "convert", "load_config", "parse_config", "quantize"]
__version__ = "0.1.0"
