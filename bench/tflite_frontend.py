"""--fmk=TFLITE on a float MobileNet V2 .tflite: the model tf2onnx gives against the TFLite interpreter, and
ptqlite's FULL_QUANT output (calibrated on ../shared/bench ImageNet samples) against the float model.

No pretrained .tflite can be downloaded here, so the float model is built: keras.applications.MobileNetV2
(1001 classes, no softmax), exported as a SavedModel and converted by tf.lite.TFLiteConverter. Its weights are
--weights=shared (default when present): those of ../shared/bench/models/mobilenet_v2_1.0_224_from_qat_tflite.onnx
(the same architecture; batch norm set to the identity plus the ONNX bias), so top-1 on the sample images means
something (caveat of that file: the weights lie on an 8-bit grid); or --weights=random (He-initialised
convolutions, seed 0), where only the cosines mean something. With shared weights the converted graph is also compared with
that ONNX file (same weights, written by another converter).

    PYTHONPATH=src python bench/tflite_frontend.py [--weights shared|random] [--eval 400]

Needs the tf extra (pip install -e '.[tf]') and ../shared/bench/imagenet-samples. Figures: docs/results.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import imagenet  # bench/imagenet.py: the sample images and their preprocessing
import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODEL = imagenet.SHARED / "models" / "mobilenet_v2_1.0_224_from_qat_tflite.onnx.xz"
BN_EPSILON = 1e-3  # keras.applications.MobileNetV2's batch norm epsilon


def shared_weights() -> tuple[list[tuple[np.ndarray, np.ndarray]], onnx.ModelProto]:
    """The shared ONNX MobileNet V2's Conv weights and biases in graph order (52 convolutions + logits), and
    the model."""
    import lzma

    with lzma.open(SHARED_MODEL) as f:
        model = onnx.load_from_string(f.read())
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [(values[n.input[1]], values[n.input[2]]) for n in model.graph.node if n.op_type == "Conv"], model


def build_tflite(folder: Path, weights: str):
    """The float .tflite and, with shared weights, the ONNX model they came from."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    net = keras.applications.MobileNetV2(input_shape=(224, 224, 3), weights=None, classes=1001,
                                         classifier_activation=None)
    reference = None
    if weights == "random":
        # Keras' glorot initialisers shrink the signal through 52 layers (the logits come out near 1e-16): He
        # initialisation keeps activations at a scale where quantization has something to do.
        rng = np.random.default_rng(0)
        for layer in net.layers:
            if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
                kernel = layer.get_weights()[0]
                fan_in = np.prod(kernel.shape[:2]) * (1 if isinstance(layer, keras.layers.DepthwiseConv2D)
                                                      else kernel.shape[2])
                layer.set_weights([rng.normal(0, np.sqrt(2 / fan_in), kernel.shape).astype(np.float32)])
    if weights == "shared":
        convs, reference = shared_weights()
        layers = [layer for layer in net.layers
                  if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense))]
        assert len(layers) == len(convs) == 53, (len(layers), len(convs))
        bns = {id(layer): nxt for layer, nxt in zip(net.layers, net.layers[1:])}
        for layer, (w, b) in zip(layers, convs):
            if isinstance(layer, keras.layers.Dense):
                layer.set_weights([w[:, :, 0, 0].T, b])
                continue
            kernel = w.transpose(2, 3, 0, 1) if isinstance(layer, keras.layers.DepthwiseConv2D) else w.transpose(2, 3, 1, 0)
            layer.set_weights([kernel])
            bn = bns[id(layer)]
            assert isinstance(bn, keras.layers.BatchNormalization), bn.name
            ones = np.ones_like(b)
            bn.set_weights([ones, b, np.zeros_like(b), ones - BN_EPSILON])  # y = x + b
    saved = folder / "saved"
    net.export(str(saved), verbose=False)
    path = folder / "mobilenet_v2.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(saved)).convert())
    return path, reference


def tflite_run(path: Path, batch: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        interpreter = tf.lite.Interpreter(model_path=str(path), num_threads=2)
    interpreter.allocate_tensors()
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    results = []
    for x in batch:
        interpreter.set_tensor(inp["index"], x[None])
        interpreter.invoke()
        results.append(interpreter.get_tensor(out["index"])[0].copy())
    return np.stack(results)


def ort_run(model, batch: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[None]})[0] for x in batch])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(logits.argmax(1) - imagenet.LABEL_OFFSET == labels)) * 100


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", choices=["shared", "random"], default=None,
                        help="default: shared when ../shared/bench has the MobileNet V2 ONNX, else random")
    parser.add_argument("--eval", type=int, default=400, help="evaluation images after the 100 calibration ones")
    args = parser.parse_args()
    weights = args.weights or ("shared" if SHARED_MODEL.exists() else "random")
    paths = imagenet.files()
    calib_dir = paths[0].parent
    evaluate = paths[imagenet.CALIBRATION:imagenet.CALIBRATION + args.eval]
    batch = np.stack([imagenet.preprocess(p).transpose(1, 2, 0) for p in evaluate])  # NHWC, as TFLite takes it
    labels = np.array([imagenet.label(p) for p in evaluate])

    with tempfile.TemporaryDirectory(dir=ROOT / ".cache" if (ROOT / ".cache").is_dir() else None) as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        tflite, reference = build_tflite(folder, weights)
        build_s = time.perf_counter() - start

        from ptqlite.model import load_model

        start = time.perf_counter()
        float_onnx = load_model(tflite, "TFLITE")
        convert_s = time.perf_counter() - start
        name = float_onnx.graph.input[0].name
        config = folder / "full.cfg"
        config.write_text("[common_quant_param]\nquant_type=FULL_QUANT\nbit_num=8\n[data_preprocess_param]\n"
                          f"calibrate_path={name}:{calib_dir}\ncalibrate_size={imagenet.CALIBRATION}\n"
                          + "\n".join(imagenet.CONFIG_LINES)
                          + "\n[full_quant_param]\nactivation_quant_method=MAX_MIN\nper_channel=true\n")
        out = folder / "mobilenet_v2_int8.onnx"
        command = [sys.executable, "-m", "ptqlite.cli", "convert", "--fmk=TFLITE", f"--modelFile={tflite}",
                   f"--outputFile={out}", f"--configFile={config}", "--quiet"]
        start = time.perf_counter()
        subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        ptq_s = time.perf_counter() - start

        lite = tflite_run(tflite, batch)
        onnx_float = ort_run(float_onnx, batch)
        onnx_int8 = ort_run(out, batch)
        print(f"MobileNet V2 (weights: {weights}), {len(batch)} images, calibration {imagenet.CALIBRATION} images "
              "(MAX_MIN, per-channel)")
        print(f"build (Keras -> SavedModel -> .tflite) {build_s:.1f} s; tf2onnx {convert_s:.1f} s "
              f"(TensorFlow already imported); ptqlite convert --fmk=TFLITE FULL_QUANT {ptq_s:.1f} s "
              "(a new process: TensorFlow import included)")
        print(f"sizes: .tflite {tflite.stat().st_size / 1e6:.2f} MB, ONNX float {float_onnx.ByteSize() / 1e6:.2f} "
              f"MB, ptqlite int8 {out.stat().st_size / 1e6:.2f} MB")
        c = cosines(onnx_float, lite)
        print(f"tf2onnx float ONNX vs TFLite interpreter: cosine mean {c.mean():.6f} min {c.min():.6f}, "
              f"max abs diff {np.abs(onnx_float - lite).max():.2e}, top-1 agreement "
              f"{np.mean(onnx_float.argmax(1) == lite.argmax(1)) * 100:.1f}%")
        if reference is not None:
            shared = ort_run(reference, batch.transpose(0, 3, 1, 2).copy())
            c = cosines(onnx_float, shared)
            print(f"tf2onnx float ONNX vs ../shared ONNX (same weights): cosine mean {c.mean():.6f} min {c.min():.6f}")
        c = cosines(onnx_int8, onnx_float)
        print(f"ptqlite FULL_QUANT vs float: cosine mean {c.mean():.4f} min {c.min():.4f}, top-1 agreement "
              f"{np.mean(onnx_int8.argmax(1) == onnx_float.argmax(1)) * 100:.1f}%")
        if weights == "shared":
            print(f"top-1: TFLite float {top1(lite, labels):.1f}, ONNX float {top1(onnx_float, labels):.1f}, "
                  f"ptqlite int8 {top1(onnx_int8, labels):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
