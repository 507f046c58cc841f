"""sha256 of every bundled config's output on ResNet20 and of every bench config's output on MobileNet V2.

    .venv/bin/python bench/output_shas.py [--calibrate 16] [--out shas.txt]

A refactoring that promises "no output byte changes" runs this before and after and compares the two listings
(`diff before.txt after.txt`). Each conversion runs through the CLI, as users run it; FULL_QUANT bench configs get
the [data_preprocess_param] of bench/full_quant.py with `--calibrate` images (the figure only needs determinism,
not accuracy, so the default is small).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import full_quant

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def convert(model: Path, config: Path, out: Path) -> str:
    command = [sys.executable, "-m", "ptqlite.cli", "convert", "--fmk=ONNX", f"--modelFile={model}",
               f"--outputFile={out}", f"--configFile={config}", "--quiet"]
    done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        return f"failed (exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]})"
    return hashlib.sha256(Path(f"{out}.onnx").read_bytes()).hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibrate", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        resnet20 = EXAMPLES / "models" / "resnet20_cifar10.onnx"
        for config in sorted((EXAMPLES / "configs").glob("*.cfg")):
            lines.append(f"resnet20 {config.name} {convert(resnet20, config, work / config.stem)}")
            print(lines[-1], flush=True)
        if full_quant.MODELS.exists():
            bench = full_quant.BENCHES["mobilenet_v2"]
            model = bench.model_path()
            for config in sorted(full_quant.CONFIGS.glob("*.cfg")):
                row = full_quant.Row(config.stem, config.stem, "ptqlite", config.name)
                written = full_quant.write_config(bench, row, work, model, args.calibrate)
                lines.append(f"mobilenet_v2 {config.name} {convert(model, written, work / ('mv2_' + config.stem))}")
                print(lines[-1], flush=True)
        else:
            print(f"{full_quant.MODELS} not found: MobileNet V2 rows skipped", file=sys.stderr)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
