"""Peak memory of the verification gate and of a conversion, split into anonymous and file-backed resident memory.

Each run is a child process under `/usr/bin/time -f "%M KB %e s"` (its VmHWM: anonymous and file-backed pages
together); its RssAnon, RssFile and VmRSS are sampled every 0.1 s from /proc. Runs of the variants alternate, round
after round, so the machine's load weighs on each alike.

    # the gate alone on a float model and an output of it: prepacked float session (before) against mapped (after)
    PYTHONPATH=src .venv/bin/python bench/gate_memory.py gate FLOAT.onnx OUTPUT.onnx --rounds 2
    # whole conversions with the gate, under two source trees (before: an export of the previous commit)
    PYTHONPATH=src .venv/bin/python bench/gate_memory.py convert FLOAT.onnx CONFIG.cfg --src before=OLD/src \\
        --src after=src --rounds 2 --out /tmp/out

The gate runs on 2 synthetic inputs (as the CLI's gate without calibration data) and prints the logits cosine.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

_GATE = """import sys, time
from ptqlite import verify
from ptqlite.model import load_model
float_path, output_path, variant = sys.argv[1:4]
if variant == "prepacked":  # the rule before: the float session prepacks (and allocates) every weight
    verify.float_plan = lambda model: verify.FloatPlan(1)
from ptqlite.runtime import REFERENCE_VALUES, model_input_specs, synthetic_inputs
specs = model_input_specs(load_model(float_path, lazy=True))
inputs = synthetic_inputs(specs, REFERENCE_VALUES, 2)
start = time.perf_counter()
checked = verify.verify(float_path, output_path, inputs, "2 synthetic inputs", 0.9)
took = time.perf_counter() - start
print("GATE", f"{took:.1f}", *(f"{o.name}={o.mean:.6f}" for o in checked.outputs), checked.skipped or "compared")
"""


def sample(pid: int) -> dict[str, int]:
    """Resident memory of a process in KB by kind ({} once it is gone)."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key = line.split(":")[0]
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    values[key] = int(line.split()[1])
    except OSError:
        return {}
    return values


def child_of(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def measure(command: list[str], env: dict[str, str], trace: str = "") -> dict:
    """Run `command` under /usr/bin/time; peaks of the sampled kinds (MB), VmHWM (MB), wall s, stdout. With
    `trace`, every sample is appended there (seconds, RssAnon, RssFile, VmRSS in MB)."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as timing:
        process = subprocess.Popen(["/usr/bin/time", "-f", "%M KB %e s", "-o", timing.name, *command], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        output: list[str] = []
        reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
        reader.start()
        start = time.perf_counter()
        with open(trace or os.devnull, "a") as log:
            while process.poll() is None:
                target = child_of(process.pid)
                if target is not None:
                    values = sample(target)
                    for key, value in values.items():
                        peaks[key] = max(peaks[key], value)
                    if values:
                        log.write(f"{time.perf_counter() - start:.1f} {values['RssAnon'] // 1024} "
                                  f"{values['RssFile'] // 1024} {values['VmRSS'] // 1024}\n")
                time.sleep(0.1)
        reader.join()
        hwm_kb, wall = re.match(r"(\d+) KB ([\d.]+) s", Path(timing.name).read_text().splitlines()[-1]).groups()
    return {"hwm": int(hwm_kb) // 1024, **{k: v // 1024 for k, v in peaks.items()}, "wall": float(wall),
            "rc": process.returncode, "out": "".join(output)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["gate", "convert"])
    parser.add_argument("model")
    parser.add_argument("other", help="gate: the output model; convert: the config file")
    parser.add_argument("--src", action="append", default=[], help="convert: LABEL=SRC_DIR (repeatable)")
    parser.add_argument("--out", default="", help="convert: output model path (removed after each run)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--trace", default="", help="append every sample to this file")
    args = parser.parse_args()
    load = os.getloadavg()
    with open("/proc/meminfo") as meminfo:
        available = next(line for line in meminfo if line.startswith("MemAvailable")).split()[1]
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; MemAvailable {available} kB")
    env = dict(os.environ)
    if args.what == "gate":
        variants = [("prepacked", env, [sys.executable, "-c", _GATE, args.model, args.other, "prepacked"]),
                    ("mapped", env, [sys.executable, "-c", _GATE, args.model, args.other, "mapped"])]
    else:
        variants = []
        for pair in args.src:
            label, src = pair.split("=", 1)
            variants.append((label, {**env, "PYTHONPATH": str(Path(src).resolve())},
                             [sys.executable, "-m", "ptqlite.cli", "convert", "--fmk=ONNX", f"--modelFile={args.model}",
                              f"--configFile={args.other}", f"--outputFile={args.out}"]))
    for round_number in range(args.rounds):
        for label, variant_env, command in variants:
            result = measure(command, variant_env, args.trace)
            digests = ""
            if args.what == "convert":  # the gate does not change the output: same bytes before and after
                for suffix in (".onnx", ".onnx.data"):
                    path = Path(args.out + suffix)
                    if path.is_file():
                        with open(path, "rb") as handle:
                            digests += f" {suffix} sha256 {hashlib.file_digest(handle, 'sha256').hexdigest()[:16]}"
                    path.unlink(missing_ok=True)
            lines = [line for line in result["out"].splitlines()
                     if line.startswith(("GATE", "ptqlite: error")) or line.strip().startswith("output '")
                     or "not compared" in line]
            print(f"round {round_number} {label}: VmHWM {result['hwm']} MB, peak RssAnon {result['RssAnon']} MB, "
                  f"peak RssFile {result['RssFile']} MB, peak VmRSS {result['VmRSS']} MB (sampled), wall "
                  f"{result['wall']:.1f} s, exit {result['rc']}{digests}; " + " | ".join(x.strip() for x in lines), flush=True)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
