"""Embedding table width against logits cosine on a bench/llm_int4.py decoder: the table of a conversion that kept
it float is fake-quantized at each scheme (bits and block length along the rows, 0 = one scale per row; the block
search with float16 scales, as a conversion does), the rest of that conversion kept, and the logits compared with
float's over --samples seeded sequences of 32 tokens (the first 4 are bench/llm_int4.py's sequences), and with a
peer's (e.g. MatMulNBitsQuantizer's output) sequence by sequence.

    PYTHONPATH=src .venv/bin/python bench/embedding_width.py --work .cache/llm3 --vocab 32000 --base v1.onnx \\
        --peer v3.onnx --schemes 8:0,6:32,6:64,6:128,6:0 --samples 32

--base: a conversion with the table float (bench/llm_int4.py variant 1, "embedding float"); --peer: the model
the differences are taken to. Writes sweep_<bits>_<block>.onnx (+ data) into --work.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import session

from ptqlite.blockwise import float16_grid, quantize_blocks


def logits(path: Path, feeds: list[dict]) -> list[np.ndarray]:
    s = session(path, 2)
    return [s.run(None, f)[0].ravel().astype(np.float64) for f in feeds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--base", required=True, help="conversion with the table float, in --work")
    parser.add_argument("--peer", default="", help="model to compare with sequence by sequence, in --work")
    parser.add_argument("--table", default="embed", help="the Gather table's initializer name")
    parser.add_argument("--schemes", default="8:0,6:32,6:64,6:0", help="bits:block, comma-separated (0: per row)")
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args()
    work = Path(args.work)
    model = onnx.load(work / args.base)
    where = next(i for i, t in enumerate(model.graph.initializer) if t.name == args.table)
    table = numpy_helper.to_array(model.graph.initializer[where])
    paths = {"table float": work / args.base}
    errors = {}
    for scheme in args.schemes.split(","):
        bits, block = (int(v) for v in scheme.split(":"))
        q = quantize_blocks(table, bits, 1, block or table.shape[1], scale_grid=float16_grid)
        name = f"{bits} bit " + (f"block {block}" if block else "a scale per row")
        errors[name] = float(np.sqrt(q.squared_error / q.squared_norm))
        model.graph.initializer[where].CopyFrom(numpy_helper.from_array(q.dequantized(), args.table))
        del q
        out = work / f"sweep_{bits}_{block}.onnx"
        onnx.save_model(model, out, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=out.name + ".data", size_threshold=1024)
        paths[name] = out
    del model, table
    rng = np.random.default_rng(1)  # as bench/llm_int4.py's logits_cosine
    feeds = [{"input_ids": rng.integers(0, args.vocab, (1, 32)).astype(np.int64)} for _ in range(args.samples)]
    want = logits(work / "float.onnx", feeds)

    def cosines(path: Path) -> np.ndarray:
        return np.array([w @ g / (np.linalg.norm(w) * np.linalg.norm(g)) for w, g in zip(want, logits(path, feeds))])

    peer = cosines(work / args.peer) if args.peer else None
    n = args.samples
    print(f"| table | relative error | logits cosine, first 4 | logits cosine, {n} sequences | "
          f"minus the peer's ({n}), standard error | sequences ahead of the peer |")
    print("|---|---|---|---|---|---|")
    if peer is not None:
        print(f"| peer ({args.peer}) | | {peer[:4].mean():.4f} | {peer.mean():.4f} | | |")
    for name, path in paths.items():
        c = cosines(path)
        line = f"| {name} | {errors.get(name, 0.0):.4f} | {c[:4].mean():.4f} | {c.mean():.4f} |"
        if peer is not None:
            d = c - peer
            line += f" {d.mean():+.4f} ({d.std(ddof=1) / np.sqrt(n):.4f}) | {int((d > 0).sum())}/{n} |"
        print(line, flush=True)


if __name__ == "__main__":
    main()
