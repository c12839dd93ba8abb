"""What metrics cost: one recorded event, and one scrape as process files pile up.

```
python -m bench.metrics [--calls 200000] [--jobs 2000] [--workers 4]
```

1. ``metrics.webhook_delivery("accepted")`` in multiprocess mode (a write into a
   memory-mapped file) against the same counter kept in memory (the baseline), per call.
2. A ``/metrics`` aggregation over the files a machine accumulates after ``--jobs`` jobs:
   one file per worker for its work-horses (what the platform does) against one file
   per work-horse (prometheus-client's default process identity, the baseline).
Runs in a temporary directory and removes it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

_DIR = Path(tempfile.mkdtemp(prefix="bench-metrics-"))
os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_DIR / "live")
(_DIR / "live").mkdir()

from prometheus_client import CollectorRegistry, Counter, generate_latest, values  # noqa: E402
from prometheus_client.mmap_dict import MmapedDict, mmap_key  # noqa: E402
from prometheus_client.multiprocess import MultiProcessCollector  # noqa: E402

from partner_app import metrics  # noqa: E402

# One file's worth of what a work-horse records: a job outcome, API calls, a refresh.
_HORSE_SAMPLES = [
    ("partner_jobs_total", ["queue", "outcome"], [q, o])
    for q in ("default", "sync", "webhooks") for o in ("finished", "retried")
] + [("partner_stora_api_calls_total", ["status"], [s]) for s in ("200", "401", "429")] + [
    ("partner_token_refreshes_total", ["outcome"], ["refreshed"])]


def per_call(calls: int) -> tuple[float, float]:
    start = time.perf_counter()
    for _ in range(calls):
        metrics.webhook_delivery("accepted")
    mmap_ns = (time.perf_counter() - start) / calls * 1e9
    saved = values.ValueClass
    values.ValueClass = values.MutexValue
    try:
        baseline = Counter("bench_in_memory_total", "baseline", ["outcome"],
                           registry=CollectorRegistry())
        child = baseline.labels("accepted")
        start = time.perf_counter()
        for _ in range(calls):
            baseline.labels("accepted").inc()
        memory_ns = (time.perf_counter() - start) / calls * 1e9
        assert child._value.get() == calls
    finally:
        values.ValueClass = saved
    return mmap_ns, memory_ns


def _write_files(folder: Path, identities: list[str]) -> None:
    folder.mkdir()
    for identity in identities:
        mmap = MmapedDict(str(folder / f"counter_{identity}.db"))
        for name, labelnames, labelvalues in _HORSE_SAMPLES:
            mmap.write_value(mmap_key(name, name, labelnames, labelvalues, "h"), 1.0, 0.0)
        mmap.close()


def scrape_seconds(folder: Path, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(folder))
        start = time.perf_counter()
        generate_latest(registry)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--jobs", type=int, default=2_000)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    try:
        mmap_ns, memory_ns = per_call(args.calls)
        web = ["101", "102"]  # two gunicorn workers
        ours = web + [str(200 + w) for w in range(args.workers)] + \
            [f"{200 + w}-horse" for w in range(args.workers)]
        default = web + [str(200 + w) for w in range(args.workers)] + \
            [str(10_000 + j) for j in range(args.jobs)]
        _write_files(_DIR / "ours", ours)
        _write_files(_DIR / "per_horse", default)
        ours_s, default_s = scrape_seconds(_DIR / "ours"), scrape_seconds(_DIR / "per_horse")
        print(f"{'measure':<52}{'value':>14}{'baseline':>14}{'ratio':>9}")
        print(f"{'record one event (ns), mmap vs in-memory':<52}{mmap_ns:>14.0f}"
              f"{memory_ns:>14.0f}{mmap_ns / memory_ns:>9.2f}")
        print(f"{f'scrape after {args.jobs} jobs (ms), files: {len(ours)} vs {len(default)}':<52}"
              f"{ours_s * 1e3:>14.2f}{default_s * 1e3:>14.2f}{ours_s / default_s:>9.3f}")
    finally:
        shutil.rmtree(_DIR, ignore_errors=True)


if __name__ == "__main__":
    main()
