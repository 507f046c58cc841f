"""What the debug reports cost: the same conversion without and with debug_info_save_path, in one process, taking
turns, best of --repeat (wall time and this process's CPU time, which a busy shared machine disturbs less).
The ratio it prints first is the report part alone over the conversion, (with - without) / without; the
with / without ratio follows in brackets.

    PYTHONPATH=src .venv/bin/python bench/report_cost.py --model resnet20 [--rounds 100] [--repeat 2]
    PYTHONPATH=src .venv/bin/python bench/report_cost.py --model mobilenet_v2 --rounds 50

resnet20: examples/configs/full_quant.cfg (FULL_QUANT MAX_MIN per-channel, bias correction, the bundled calibration
images). mobilenet_v2: bench/configs/full_max_min_per_channel.cfg with the ImageNet [data_preprocess_param] of
bench/full_quant.py. --rounds sets calibrate_size, which is also the number of report rounds. Run it with another
checkout's src on PYTHONPATH to compare versions side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import full_quant  # the bench models and their configs

from ptqlite.config import load_config
from ptqlite.convert import convert

ROOT = Path(__file__).resolve().parents[1]


def config_text(model: str, rounds: int) -> tuple[Path, str]:
    if model == "resnet20":
        text = (ROOT / "examples" / "configs" / "full_quant.cfg").read_text()
        text = text.replace("calibrate_size=100", f"calibrate_size={rounds}")
        text = text.replace("calibrate_path=input:examples/", f"calibrate_path=input:{ROOT}/examples/")
        return ROOT / "examples" / "models" / "resnet20_cifar10.onnx", text
    bench = full_quant.BENCHES[model]
    path = bench.model_path()
    row = next(r for r in full_quant.rows() if r.key == "maxmin_pc")
    with tempfile.TemporaryDirectory() as work:
        text = full_quant.write_config(bench, row, Path(work), path, rounds).read_text()
    return path, text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet20", choices=["resnet20", *full_quant.BENCHES])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    model_path, text = config_text(args.model, args.rounds)
    model = onnx.load(model_path)
    with tempfile.TemporaryDirectory() as work:
        cfg = Path(work) / "c.cfg"
        cfg.write_text(text)
        plain = load_config(cfg)
        debug = dataclasses.replace(plain, common=dataclasses.replace(
            plain.common, debug_info_save_path=str(Path(work) / "debug")))
        times: dict[str, list[tuple[float, float]]] = {"plain": [], "debug": []}
        for _ in range(args.repeat):
            for name, config in (("plain", plain), ("debug", debug)):
                wall, cpu = time.perf_counter(), time.process_time()
                convert(model, config, progress=False)
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    (pw, pc), (dw, dc) = (min(times[k]) for k in ("plain", "debug"))
    # The target (issue 13, docs/results.md): the report part alone, (with - without) / without, at most 1.5.
    print(f"{args.model}, {args.rounds} rounds: convert {pw:.2f} s wall / {pc:.2f} s CPU; with reports "
          f"{dw:.2f} s / {dc:.2f} s; reports alone {dw - pw:.2f} s / {dc - pc:.2f} s = "
          f"{(dw - pw) / pw:.2f}x / {(dc - pc) / pc:.2f}x the conversion "
          f"(with / without {dw / pw:.2f}x / {dc / pc:.2f}x)")


if __name__ == "__main__":
    main()
