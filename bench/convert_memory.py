"""Peak RSS and CPU time of one CLI conversion in every mode, for several source trees taking turns, with the
sha256 of each output (so a change is checked to write the same bytes). --gate off converts with --verify=off
(the pass's own peak, without the gate's sessions).

    .venv/bin/python bench/convert_memory.py --src /path/to/before/src src [--model minilm mobilenet_v2]
                                             [--mode weight8 mixed on_the_fly dynamic full] [--repeat 2]
                                             [--gate off]

Each conversion is the ptqlite CLI in its own child process (bench/measure.py's launcher: the peak RSS is the
kernel's rusage of that process alone, CPU is user + system), with PYTHONPATH set to one --src folder, the gate on
(unless --gate off). The trees take turns conversion by conversion (A B A B ...). DYNAMIC_QUANT and FULL_QUANT run with
latency-aware planning off, whose timing on a loaded machine would decide the output bytes by noise. MiniLM's
FULL_QUANT is bench/full_quant_minilm.py's CLI conversion (20 sentences, --inputShape); MobileNet V2's reads 100
calibration images as bench/full_quant.py does. Prints one markdown row per model, mode and tree: median peak and
CPU, the ratio of the peak to the model's bytes, and the output's sha256 (all rounds' if they differ).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import full_quant
import full_quant_minilm
import measure

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bench" / "configs"
EXAMPLES = ROOT / "examples" / "configs"
MODES = {  # name -> (config file, text appended to it)
    "weight8": (CONFIGS / "weight_8bit.cfg", ""),
    "mixed": (CONFIGS / "weight_mixed_0.02.cfg", ""),
    "on_the_fly": (EXAMPLES / "on_the_fly_weight_quant.cfg", ""),
    "dynamic": (EXAMPLES / "dynamic_quant.cfg", "latency_aware=false\n"),
    "full": (None, "latency_aware=false\n"),
}


def _model(name: str, cache: Path) -> Path:
    if name == "minilm":
        return cache / "all-MiniLM-L6-v2.onnx"
    return full_quant.BENCHES[name].model_path()


def _config(name: str, mode: str, model: Path, work: Path, cache: Path) -> tuple[Path, list[str]]:
    """The config file for `mode` on `name`, and the extra CLI flags."""
    source, extra = MODES[mode]
    if mode == "full" and name == "minilm":
        text = full_quant_minilm.write_calibration(cache, work, 20).read_text()
        flags = [f"--inputShape={full_quant_minilm.SHAPES}"]
    elif mode == "full":
        bench = full_quant.BENCHES[name]
        row = full_quant.Row("cost", "cost", "ptqlite", "full_max_min_per_channel.cfg")
        text, flags = full_quant.write_config(bench, row, work, model, 100).read_text(), []
    else:
        text, flags = source.read_text(), []
    if extra:
        section = "[full_quant_param]" if mode == "full" else "[dynamic_quant_param]"
        text = text.replace(section, f"{section}\n{extra.rstrip()}") if section in text else (
            f"{text}\n{section}\n{extra}")
    path = work / f"{name}-{mode}.cfg"
    path.write_text(text)
    return path, flags


def _sha(path: Path) -> str:
    digest = hashlib.sha256()
    for part in sorted(path.parent.glob(path.name + "*")):  # the model and any data file
        digest.update(part.read_bytes())
    return digest.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", nargs="+", type=Path, required=True, help="ptqlite source folders")
    parser.add_argument("--model", nargs="+", default=["minilm", "mobilenet_v2"],
                        choices=["minilm", *sorted(full_quant.BENCHES)])
    parser.add_argument("--mode", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--gate", choices=["on", "off"], default="on", help="off: --verify=off")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "minilm", help="bench/minilm.py's cache")
    args = parser.parse_args(argv)
    work = ROOT / ".cache" / "bench" / "convert_memory"
    work.mkdir(parents=True, exist_ok=True)
    print(f"`python bench/convert_memory.py {' '.join(argv if argv is not None else sys.argv[1:])}`; load average "
          + " ".join(f"{v:.1f}" for v in os.getloadavg()) + "\n")
    print("| model | mode | source | peak MB | peak / model | CPU s | output sha256 |")
    print("|---|---|---|---:|---:|---:|---|")
    for name in args.model:
        model = _model(name, args.cache)
        size = model.stat().st_size / 1e6
        for mode in args.mode:
            config, flags = _config(name, mode, model, work, args.cache)
            runs: dict[Path, list[tuple[measure.ChildRun, str]]] = {src: [] for src in args.src}
            for _ in range(args.repeat):
                for number, src in enumerate(args.src):
                    out = work / f"out{number}.onnx"
                    for old in out.parent.glob(out.name + "*"):
                        old.unlink()
                    command = [sys.executable, "-m", "ptqlite.cli", "convert", "--fmk=ONNX", f"--modelFile={model}",
                               f"--outputFile={out}", f"--configFile={config}", "--quiet", *flags,
                               *(["--verify=off"] if args.gate == "off" else [])]
                    done = measure.run_child(command, env=dict(os.environ, PYTHONPATH=str(src.resolve())), cwd=ROOT)
                    if done.returncode != 0:
                        print(f"| {name} | {mode} | {src} | failed: {done.stderr.strip().splitlines()[-1:]} |")
                        return 1
                    runs[src].append((done, _sha(out)))
            for src, done in runs.items():
                peak = statistics.median(d.peak_mb for d, _ in done)
                cpu = statistics.median(d.cpu_seconds for d, _ in done)
                shas = " / ".join(dict.fromkeys(s for _, s in done))
                print(f"| {name} | {mode} | {src} | {peak:.0f} | {peak / size:.2f}x | {cpu:.1f} | {shas} |",
                      flush=True)
    print("\nload average at the end " + " ".join(f"{v:.1f}" for v in os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
