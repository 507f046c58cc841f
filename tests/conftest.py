"""Fixtures every test gets (shared helpers are in helpers.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _fixed_int8_timing(monkeypatch):
    """Conversions in tests must not depend on how busy this machine is: the latency-aware planning of FULL_QUANT
    and DYNAMIC_QUANT sees the int8 graph at half of float's time (tests of that planning patch `measure`
    themselves)."""
    from ptqlite import latency

    monkeypatch.setattr(latency, "measure", lambda *args, **kwargs: latency.Timing(1.0, 0.5))
