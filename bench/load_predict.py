"""loadmem.predict_load against ONNX Runtime's measured load peak, model by model.

    PYTHONPATH=src .venv/bin/python bench/load_predict.py MODEL.onnx [MODEL.onnx ...] [--rounds 2]

Each model is loaded in a fresh child process with the gate's session for an output (runtime.cpu_session: the
defaults, graph optimisation on, prepacking on) and run once; the child reports its VmRSS after importing numpy
and onnxruntime, and VmHWM after the load and after the run: the load's peak is VmHWM minus that baseline, what
the session needed above the process it was made in (as the gate asks available_memory() for). Rounds alternate
the models, so the machine's load weighs on each alike. Prints a markdown table: initializers, folded, predicted
total, measured peak (min over the rounds), and the error (predicted / measured load peak - 1). The run's peak is shown beside it: activations, not predicted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """import json, sys
import numpy as np, onnxruntime
from ptqlite.runtime import cpu_session, model_input_specs, synthetic_inputs, REFERENCE_VALUES, session_feeds
import onnx

def status():
    with open("/proc/self/status") as f:
        return {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f if l.split(":")[0] in ("VmRSS", "VmHWM")}

base = status()["VmRSS"]
session = cpu_session(sys.argv[1], "for the bench", spinning=False)
loaded = status()
graph = onnx.load(sys.argv[1], load_external_data=False)
feeds = synthetic_inputs(model_input_specs(graph), REFERENCE_VALUES, 1)[0]
del graph
session.run(None, session_feeds(session, feeds))
ran = status()
print(json.dumps({"load": loaded["VmHWM"] - base, "run": ran["VmHWM"] - base, "after": ran["VmRSS"] - base}))
"""


def measure(path: str) -> dict:
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise SystemExit(f"{path}: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from ptqlite.loadmem import predict_load
    from ptqlite.model import stored_bytes

    runs: dict[str, list[dict]] = {m: [] for m in args.models}
    for _ in range(args.rounds):
        for model in args.models:
            runs[model].append(measure(model))
    print("| model | file MB | initializers MB | folded MB | unsized | predicted MB | measured load peak MB "
          "(after one run) | error |")
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models:
        estimate = predict_load(model)
        load = min(r["load"] for r in runs[model])
        ran = min(r["run"] for r in runs[model])
        print(f"| {Path(model).name} | {stored_bytes(model) / 1e6:.1f} | {estimate.initializers / 1e6:.1f} | "
              f"{estimate.folded / 1e6:.1f} | {estimate.unsized} | {estimate.total / 1e6:.1f} | "
              f"{load / 1e6:.1f} ({ran / 1e6:.1f}) | {estimate.total / load - 1:+.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
