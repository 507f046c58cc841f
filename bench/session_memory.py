"""Where an ONNX Runtime session's memory goes: anonymous and file-backed resident memory (RssAnon, RssFile of
/proc/self/status) of this process above what it held before the session, after loading a model and after one
run at seq 1 (1 thread), for the decoders of bench/llm_int4.py.

    PYTHONPATH=src .venv/bin/python bench/session_memory.py MODEL.onnx [KEY=VALUE ...]

KEY=VALUE: a session config entry (session.qdq_matmulnbits_accuracy_level=0, session.disable_prepacking=1, ...),
or level=0/1/2/99 (graph optimization level). Anonymous memory is what the session allocated (weights it made,
packed weights, arena); file-backed is the pages of mapped files it touched (libraries, external data read in
place). Run it under MALLOC_MMAP_THRESHOLD_=65536 to see what glibc keeps of freed temporaries.
"""

from __future__ import annotations

import sys

import numpy as np
import onnxruntime as ort

LEVELS = {"0": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "1": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "2": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "99": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def status() -> dict[str, int]:
    """Resident memory in MB by kind."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                values[key] = int(line.split()[1]) // 1024
    return values


def main() -> None:
    path = sys.argv[1]
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    for pair in sys.argv[2:]:
        key, value = pair.split("=", 1)
        if key == "level":
            options.graph_optimization_level = LEVELS[value]
        else:
            options.add_session_config_entry(key, value)
    before = status()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    loaded = status()
    session.run(None, {"input_ids": np.zeros((1, 1), np.int64)})
    ran = status()
    print(f"{path} {' '.join(sys.argv[2:])}: anonymous +{loaded['RssAnon'] - before['RssAnon']} MB at load, "
          f"+{ran['RssAnon'] - before['RssAnon']} MB after a run; file-backed +{ran['RssFile'] - before['RssFile']} "
          f"MB; VmRSS {ran['VmRSS']} MB, peak {ran['VmHWM']} MB")


if __name__ == "__main__":
    main()
