"""Cost and weight error of the block search (ptqlite.blockwise.quantize_blocks), 4 bit block 32, against its own
round to nearest (search=False), on synthetic decoder weights and on all-MiniLM-L6-v2's MatMul weights.

    PYTHONPATH=src .venv/bin/python bench/block_search.py [--minilm .cache/minilm/all-MiniLM-L6-v2.onnx]

CPU time (time.process_time, summed over the search's threads) per weight, so a loaded machine inflates it less than wall time;
"relative error" is sum((dequantized - w)^2) / sum(w^2) over the weights. Each row takes the best of --repeat runs.
Run it on two checkouts to compare two versions of the search.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ptqlite import blockwise

# scales on the float16 grid, as ON_THE_FLY stores them (older versions of the search have no such option)
GRID = {"scale_grid": blockwise.float16_grid} if hasattr(blockwise, "float16_grid") else {}


def synthetic(seed: int = 0) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    gauss = rng.standard_normal((2048, 5632), dtype=np.float32) * np.float32(1 / np.sqrt(2048))
    gauss[rng.random(gauss.shape) < 0.001] *= 8  # as bench/llm_int4.py's decoder weights
    heavy = (rng.standard_t(4, (1024, 4096)) * 0.02).astype(np.float32)
    return {"decoder-like 2048x5632 (Gaussian, 0.1% outliers x8)": [gauss], "Student t(4) 1024x4096": [heavy]}


def minilm(path: Path) -> list[np.ndarray]:
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    return [numpy_helper.to_array(inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits]


def measure(weights: list[np.ndarray], search: bool, repeat: int) -> tuple[float, float]:
    best = float("inf")
    for _ in range(repeat):
        start, error, norm = time.process_time(), 0.0, 0.0
        for w in weights:
            q = blockwise.quantize_blocks(w, 4, 0, 32, search=search, **GRID)
            error, norm = error + q.squared_error, norm + q.squared_norm
        best = min(best, time.process_time() - start)
    return best / sum(w.size for w in weights) * 1e9, error / norm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minilm", default="", help="all-MiniLM-L6-v2 float ONNX (its MatMul weights)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sets = synthetic()
    if args.minilm:
        sets["all-MiniLM-L6-v2 MatMul weights (36)"] = minilm(Path(args.minilm))
    print("| weights | round to nearest: CPU ns/weight, relative error | search: CPU ns/weight, relative error |")
    print("|---|---|---|")
    for name, weights in sets.items():
        rtn, searched = (measure(weights, s, args.repeat) for s in (False, True))
        print(f"| {name} | {rtn[0]:.1f}, {rtn[1]:.6f} | {searched[0]:.1f}, {searched[1]:.6f} |", flush=True)


if __name__ == "__main__":
    main()
