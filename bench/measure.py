"""Measurement helpers shared by the benchmark scripts: file size, child-process time and peak memory, latency.

Latency is only reported as a ratio to a baseline measured in the same process, interleaved run by run, so that
the load other programs put on the machine hits every model alike.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort


def file_mb(path: str | Path) -> float:
    """Size of a file in MB (10^6 bytes)."""
    return Path(path).stat().st_size / 1e6


@dataclass(frozen=True)
class ChildRun:
    """What a child process did: exit status, wall time, peak resident memory, its output, and its CPU time
    (user + system, its own threads and children included)."""

    returncode: int
    seconds: float
    peak_mb: float
    stdout: str
    stderr: str
    cpu_seconds: float = 0.0


# Linux carries a process's peak RSS across fork+exec, so a child started straight from this (large) process would
# report at least this process's peak. A small launcher process forks the real command and reports its rusage.
_LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write("\\n__cpu_s__=%.3f\\n__peak_kib__=%d\\n" % (usage.ru_utime + usage.ru_stime, usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_child(command: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None) -> ChildRun:
    """Run `command` to completion; its peak RSS is the kernel's rusage of that command alone (via a launcher)."""
    start = time.perf_counter()
    command = [sys.executable, "-c", _LAUNCHER, *command]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    # communicate() reaps the child itself, which would lose its rusage: read the pipes in threads and wait4.
    chunks: dict[str, str] = {}

    def drain(name: str, stream) -> None:
        chunks[name] = stream.read()

    readers = [threading.Thread(target=drain, args=(n, s)) for n, s in (("out", process.stdout),
                                                                           ("err", process.stderr))]
    for reader in readers:
        reader.start()
    _, status, _usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    for reader in readers:
        reader.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr, _, peak = chunks["err"].rpartition("\n__peak_kib__=")
    stderr, _, cpu = stderr.rpartition("\n__cpu_s__=")
    # Linux reports ru_maxrss in KiB.
    return ChildRun(process.returncode, seconds, int(peak) * 1024 / 1e6, chunks["out"], stderr.rstrip("\n"),
                    float(cpu))


def session(path: str | Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latency_ratios(models: dict[str, str | Path], baseline: str, feed: np.ndarray | dict[str, np.ndarray],
                   threads: int, rounds: int = 30, runs: int = 5, warmup: int = 5) -> dict[str, float]:
    """Median latency of each model divided by the baseline's, measured interleaved in this process.

    Each round times `runs` back-to-back runs of every model in turn (batch = `feed`, an array for the first
    input or a dict of every input); the median over rounds of the per-round time is compared. Returns
    {name: ratio}, the baseline being 1.0.
    """
    sessions = {name: session(path, threads) for name, path in models.items()}
    feeds = {name: feed if isinstance(feed, dict) else {s.get_inputs()[0].name: feed}
             for name, s in sessions.items()}
    for name, s in sessions.items():
        for _ in range(warmup):
            s.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            start = time.perf_counter()
            for _ in range(runs):
                s.run(None, feeds[name])
            times[name].append(time.perf_counter() - start)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    return {name: medians[name] / medians[baseline] for name in medians}
