"""Latency-aware planning's timing stops early only where the decision is already sure: the ratio of the medians
of all the runs would fall on the same side of the caller's bounds whatever the remaining runs measure (fake
sessions and a fake clock here; the decision is checked against the one every run gives)."""

from __future__ import annotations

import itertools
import time

import numpy as np
import onnx
import pytest
from test_latency_aware import CONFIG, _samples, conv_chain

from ptqlite import latency
from ptqlite.config import parse_config
from ptqlite.convert import convert

REAL_MEASURE = latency.measure  # taken at import, before conftest's fixed timing replaces it for each test


def test_median_bounds_hold_for_every_completion():
    r = np.random.default_rng(0)
    for runs in (5, 6, 15, 16):
        for known in range(1, runs + 1):
            values = list(r.uniform(1, 2, known))
            bounds = latency.median_bounds(values, runs)
            if bounds is None:
                assert known <= runs // 2
                continue
            lows, highs = [0.0] * (runs - known), [10.0] * (runs - known)
            # the extremes are reached: every remaining run fastest, or every one slowest
            assert np.median(values + lows) == pytest.approx(bounds[0])
            assert np.median(values + highs) == pytest.approx(bounds[1])
            for _ in range(20):
                rest = list(r.uniform(0, 3, runs - known))
                assert bounds[0] <= np.median(values + rest) <= bounds[1]
            assert bounds[0] <= np.median(values) <= bounds[1]  # the ratio quoted after a stop lies inside too


def test_an_early_stop_never_changes_the_side():
    """Random timings, some with a slow tail: wherever `decided` stops, all runs give the same side."""
    r = np.random.default_rng(1)
    runs, stops = 15, 0
    for trial in range(400):
        ratio = r.choice([0.6, 0.95, 1.0, 1.03, 1.05, 1.08, 1.4])
        floats = r.lognormal(np.log(10), 0.15, runs)
        quantized = r.lognormal(np.log(10 * ratio), 0.15, runs)
        if trial % 3 == 0:
            quantized[runs // 2:] *= 3  # int8 turns slow after the first half (a load spike)
        full = np.median(quantized) / np.median(floats)
        for low, high in ((1.0, latency.SLOWER), (1 / latency.SLOWER, latency.SLOWER), (1.0, 1.2)):
            for k in range(2, runs + 1):
                seen = [list(floats[:k]), list(quantized[:k])]
                if latency.decided(seen, runs, low, high):
                    stops += 1
                    early = np.median(seen[1]) / np.median(seen[0])
                    assert (full <= low) == (early <= low) and (full > high) == (early > high)
                    assert full <= low or full > high  # never stopped inside the band
                    break
    assert stops > 200  # and it does stop, most often where the ratio is far from the bounds


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class FakeSession:
    """A session whose runs take the next of `times` (ms) on the fake clock."""

    def __init__(self, clock: FakeClock, times):
        self.clock, self.times, self.runs = clock, iter(times), 0

    def get_inputs(self):
        return [onnx.ValueInfoProto(name="x")]

    def run(self, _names, _feeds):
        self.clock.now += next(self.times) / 1000
        self.runs += 1
        return [np.zeros(1, np.float32)]


def _fake_timing(monkeypatch, float_ms, int8_ms):
    clock = FakeClock()
    monkeypatch.setattr(time, "perf_counter", clock)
    sessions = [FakeSession(clock, float_ms), FakeSession(clock, int8_ms)]
    made = iter(sessions)
    monkeypatch.setattr(latency, "cpu_session", lambda *a, **k: next(made))
    return sessions


def test_a_clear_ratio_stops_after_half_the_runs(monkeypatch):
    # 100 ms a pair: BUDGET_S buys fewer than MIN_RUNS, so 15 runs are due; 8 known values bound both medians
    sessions = _fake_timing(monkeypatch, itertools.repeat(60.0), itertools.repeat(40.0))
    timing = REAL_MEASURE(onnx.ModelProto(), onnx.ModelProto(), {"x": 0}, clear_of=(1.0, latency.SLOWER))
    assert timing.ratio == pytest.approx(40 / 60)
    assert [s.runs for s in sessions] == [2 + 8, 2 + 8]  # warm-up and output run, then 8 of the 15 timed runs


def test_without_bounds_or_within_the_band_every_run_counts(monkeypatch):
    for clear_of, ms in ((None, 40.0), ((1.0, latency.SLOWER), 61.5)):  # 61.5 / 60: inside (1.0, 1.05]
        sessions = _fake_timing(monkeypatch, itertools.repeat(60.0), itertools.repeat(ms))
        timing = REAL_MEASURE(onnx.ModelProto(), onnx.ModelProto(), {"x": 0}, clear_of=clear_of)
        assert timing.ratio == pytest.approx(ms / 60)
        assert [s.runs for s in sessions] == [2 + latency.MIN_RUNS] * 2


def test_a_slow_tail_is_waited_for(monkeypatch):
    """int8 fast for 3 timed runs, then slow: the median of the first 5 says faster, that of all 15 slower."""
    float_ms = itertools.repeat(60.0)
    int8_ms = itertools.chain([40.0] * 5, itertools.repeat(90.0))  # warm-up, output run, 3 fast timed runs
    sessions = _fake_timing(monkeypatch, float_ms, int8_ms)
    timing = REAL_MEASURE(onnx.ModelProto(), onnx.ModelProto(), {"x": 0}, clear_of=(1.0, latency.SLOWER))
    assert timing.ratio == pytest.approx(90 / 60)  # what all 15 runs say: slower, so layers go back to float
    assert sessions[1].runs == 2 + 11  # ... and it stopped once that was sure: 8 slow of 11 hold the median


def test_full_quant_passes_its_decision_bounds(monkeypatch):
    """Every layer int8 is decided against 1.0 and the margin; each demotion against 1.0 and the fastest so far."""
    seen = []
    ratios = iter([1.3, 1.2, 0.9])

    def measure(float_model, quantized, feeds, own_shapes=None, clear_of=None):
        seen.append(clear_of)
        return latency.Timing(1.0, next(ratios))

    monkeypatch.setattr(latency, "measure", measure)
    convert(conv_chain(), parse_config(CONFIG), samples=_samples(), progress=False)
    assert seen == [(1.0, latency.SLOWER), (1.0, 1.3), (1.0, 1.2)]
