"""Progress bars on stderr (tqdm: k/n, rate, ETA) for every step of a conversion that can take more than about a
second: calibration passes, the mixed-bit search, auto_tune, the debug reports, analyze. Shown only when stderr
is a terminal unless the caller says otherwise (the Python API's `progress=`), so logs and pipes stay clean."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int | None = None, desc: str = "calibration",
             enabled: bool | None = None, unit: str = "sample") -> Iterator[T]:
    """Wrap an iterable in a bar; enabled=None shows it only on a terminal."""
    with progress_bar(total, desc, enabled, unit) as bar:
        for item in items:
            yield item
            bar.update(1)


def known_total(items: Any) -> int | None:
    """How many items `items` will give, for a bar's total and ETA: len() or __length_hint__, None if unknown."""
    total = operator.length_hint(items, -1)
    return None if total < 0 else total


def progress_bar(total: int | None, desc: str, enabled: bool | None = None, unit: str = "step"):
    """A bar to update by hand (a context manager); enabled=None: only when stderr is a terminal."""
    from tqdm import tqdm

    disable = None if enabled is None else not enabled
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=False)
