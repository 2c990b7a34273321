"""Timing: variants of one workload run interleaved in one process, with warm-up.

Each round runs every variant for ``batch`` operations, in an order that rotates from round to
round (A B C, B C A, C A B, ...), so drift on a shared machine (other processes, caches,
autovacuum) falls on all variants alike. Every operation is timed on its own; the summary is
the median and p95 per variant and the ratio of medians against the baseline.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Stats", "interleave", "summarize"]


@dataclass
class Stats:
    """Latency summary of one variant, in microseconds."""

    n: int
    median_us: float
    p95_us: float
    mean_us: float
    ratio: float | None = None  # median / baseline median
    ratio_p95: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def summarize(samples: dict[str, list[float]], baseline: str | None) -> dict[str, Stats]:
    out: dict[str, Stats] = {}
    for name, values in samples.items():
        s = sorted(values)
        out[name] = Stats(len(s), statistics.median(s) * 1e6, _percentile(s, 0.95) * 1e6, statistics.fmean(s) * 1e6)
    if baseline is not None and baseline in out:
        base = out[baseline]
        for stats in out.values():
            stats.ratio = stats.median_us / base.median_us
            stats.ratio_p95 = stats.p95_us / base.p95_us
    return out


def interleave(
    variants: dict[str, Callable[[int], Any]],
    *,
    rounds: int,
    batch: int,
    warmup: int,
    baseline: str | None,
) -> dict[str, Stats]:
    """Time ``variants`` (each called with the operation number) interleaved; see the module doc."""
    names = list(variants)
    for name in names:  # warm-up: connections, prepared statements, caches
        prepare = getattr(variants[name], "prepare", None)
        for i in range(warmup):
            if prepare is not None:
                prepare(i)
            variants[name](i)
    samples: dict[str, list[float]] = {name: [] for name in names}
    clock = time.perf_counter
    op = 0
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            fn = variants[name]
            prepare = getattr(fn, "prepare", None)  # untimed per-operation setup, if the variant has one
            out = samples[name]
            for i in range(batch):
                if prepare is not None:
                    prepare(op + i)
                start = clock()
                fn(op + i)
                out.append(clock() - start)
        op += batch
    return summarize(samples, baseline)


def interleave_rounds(fns: dict[str, Callable[[int], None]], *, rounds: int, batch: int, warmup: int) -> dict[str, list[list[float]]]:
    """As :func:`interleave`, keeping each round's samples apart (seconds): for per-round ratios."""
    names = list(fns)
    for name in names:
        for i in range(warmup):
            fns[name](i)
    samples: dict[str, list[list[float]]] = {name: [] for name in names}
    clock = time.perf_counter
    op = 0
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn, out = fns[name], []
            for i in range(batch):
                start = clock()
                fn(op + i)
                out.append(clock() - start)
            samples[name].append(out)
        op += batch
    return samples
