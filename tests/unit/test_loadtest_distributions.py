"""Length distributions and arrival processes of the benchmark (loadtest/lengths.py, loadtest/arrival.py):
seeded and reproducible, statistics within loose bounds of what was asked, bad specs named."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loadtest.arrival import Arrival
from loadtest.lengths import LengthDist

N = 20_000


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_fixed_and_uniform_lengths():
    assert LengthDist.parse("256").sample(rng(), 5) == [256] * 5
    assert LengthDist.parse("fixed:7").sample(rng(), 3) == [7] * 3
    values = np.array(LengthDist.parse("uniform:100:200").sample(rng(), N))
    assert values.min() >= 100 and values.max() <= 200
    assert values.min() == 100 and values.max() == 200  # both ends reachable
    assert abs(values.mean() - 150) < 2


def test_normal_and_lognormal_have_the_asked_mean_and_spread():
    normal = np.array(LengthDist.parse("normal:500:50").sample(rng(), N))
    assert abs(normal.mean() - 500) < 5 and abs(normal.std() - 50) < 5
    lognormal = np.array(LengthDist.parse("lognormal:300:0.6").sample(rng(), N))
    assert abs(lognormal.mean() - 300) < 300 * 0.05  # the mean, not the median, is what is asked
    assert np.median(lognormal) < lognormal.mean()  # a right tail
    assert np.std(np.log(lognormal)) == pytest.approx(0.6, rel=0.1)


def test_samples_are_clipped_to_at_least_one_and_the_cap():
    values = LengthDist.parse("normal:5:50", maximum=20).sample(rng(), N)
    assert min(values) == 1 and max(values) == 20


def test_same_seed_same_lengths_other_seed_other_lengths():
    dist = LengthDist.parse("lognormal:100:1")
    assert dist.sample(rng(3), 100) == dist.sample(rng(3), 100)
    assert dist.sample(rng(3), 100) != dist.sample(rng(4), 100)


@pytest.mark.parametrize("spec", ["0", "abc", "uniform:10", "uniform:20:10", "normal:-1:3", "gauss:1:2", "3.5"])
def test_bad_length_specs_name_the_flag(spec):
    with pytest.raises(ValueError, match="input_len"):
        LengthDist.parse(spec, "input_len")


def gaps(arrival: Arrival, seed: int = 0) -> np.ndarray:
    times = arrival.times(rng(seed), N)
    assert times[0] == 0.0 and all(b >= a for a, b in zip(times, times[1:], strict=False))
    return np.diff(times)


def test_poisson_gaps_have_mean_one_over_rate_and_cv_one():
    g = gaps(Arrival("poisson", rate=10.0))
    assert g.mean() == pytest.approx(0.1)  # rescaled to the asked rate exactly, as vLLM does
    assert abs(g.std() / g.mean() - 1.0) < 0.05
    few = Arrival("poisson", rate=2.0).times(rng(7), 11)
    assert few[-1] == pytest.approx(5.0)  # ten gaps at 2/s, whatever the seed


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_sets_the_spread_but_not_the_rate(burstiness):
    g = gaps(Arrival("gamma", rate=10.0, burstiness=burstiness))
    assert g.mean() == pytest.approx(0.1)
    assert g.std() / g.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.1)


def test_constant_and_infinite_rates():
    assert Arrival("constant", rate=4.0).times(rng(), 5) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert Arrival("poisson").times(rng(), 3) == [0.0, 0.0, 0.0]  # rate inf: all at once


def test_arrivals_are_reproducible_by_seed():
    arrival = Arrival("gamma", rate=5.0, burstiness=0.5)
    assert arrival.times(rng(1), 50) == arrival.times(rng(1), 50)
    assert arrival.times(rng(1), 50) != arrival.times(rng(2), 50)


def test_closed_loop_has_users_and_no_send_times():
    closed = Arrival("closed", concurrency=8)
    assert closed.is_closed
    with pytest.raises(ValueError, match="closed loop"):
        closed.times(rng(), 3)


@pytest.mark.parametrize("kwargs, field", [
    ({"kind": "uniform"}, "arrival"),
    ({"rate": 0.0}, "rate"),
    ({"kind": "gamma", "rate": 1.0, "burstiness": 0.0}, "burstiness"),
    ({"kind": "closed"}, "concurrency"),
    ({"concurrency": 4}, "concurrency"),
    ({"max_concurrency": -1}, "max_concurrency"),
])
def test_bad_arrivals_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Arrival(**kwargs)
