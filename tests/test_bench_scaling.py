"""The arithmetic of benchmarks/bench_scaling.py, which a device session will rely on: Amdahl's
serial fraction recovered from speed-ups, and the thread count it predicts for a target."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_scaling  # noqa: E402


@pytest.mark.parametrize("f", [0.0, 0.05, 0.2, 0.7, 1.0])
def test_the_fit_recovers_the_serial_fraction_of_exact_speedups(f):
    pts = [(n, 1 / (f + (1 - f) / n)) for n in (1, 2, 4, 8, 16)]
    assert bench_scaling.amdahl_fit(pts) == pytest.approx(f, abs=1e-9)
    assert bench_scaling.amdahl_fit([(1, 1.0)]) != bench_scaling.amdahl_fit([(1, 1.0)])     # nan: nothing to fit


def test_threads_for_a_target():
    gib = 1 << 30
    assert bench_scaling.threads_for(2.5 * gib, 3 * gib, 0.5) == "1"                 # already there
    assert float(bench_scaling.threads_for(2 * gib, 1 * gib, 0.0)) == pytest.approx(2.0)
    # f = 0.2, 1 GiB/s on one thread: B(n) = 1 / (0.2 + 0.8 / n) reaches 2.5 at n = 0.8 / 0.2 = 4
    assert float(bench_scaling.threads_for(2.5 * gib, 1 * gib, 0.2)) == pytest.approx(4.0)
    assert bench_scaling.threads_for(2.5 * gib, 1 * gib, 0.5).startswith("never (ceiling 2.00")
