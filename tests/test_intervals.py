"""Paired bootstrap intervals of perplexity ratios: known inputs give known intervals."""
import math

import pytest

from se_compress.eval.intervals import format_ratio, paired_bootstrap_ratio, ratio_between

T = 511  # predicted tokens per window


def test_a_constant_per_token_shift_is_a_point_interval_however_hard_the_windows_are():
    base = [2000.0, 3500.0, 2600.0, 4100.0, 1900.0]           # windows of very different difficulty
    c = 0.01                                                  # model B: +0.01 nats on every token of every window
    iv = paired_bootstrap_ratio(base, [n + c * T for n in base], T)
    assert iv["ratio"] == pytest.approx(math.exp(c), rel=1e-12)
    assert iv["low"] == pytest.approx(math.exp(c), rel=1e-12) and iv["high"] == pytest.approx(math.exp(c), rel=1e-12)
    assert iv["excludes_one"]                                 # pairing removes the windows' spread entirely


def test_the_same_model_is_one_and_not_a_difference():
    base = [2000.0, 3500.0, 2600.0]
    iv = paired_bootstrap_ratio(base, base, T)
    assert (iv["ratio"], iv["low"], iv["high"], iv["excludes_one"]) == (1.0, 1.0, 1.0, False)
    assert format_ratio(iv) == "x1.000 [1.000, 1.000]"


def test_two_windows_give_the_two_per_window_ratios_as_the_interval():
    # per-token differences d1 < d2: a resample is {w1,w1}, {w1,w2} or {w2,w2} with probability 1/4, 1/2, 1/4, so
    # the 2.5% and 97.5% percentiles are exp(d1) and exp(d2); the point estimate is exp((d1 + d2) / 2)
    d1, d2 = -0.02, 0.03
    iv = paired_bootstrap_ratio([1000.0, 1500.0], [1000.0 + d1 * T, 1500.0 + d2 * T], T, draws=4000)
    assert iv["low"] == pytest.approx(math.exp(d1), rel=1e-12) and iv["high"] == pytest.approx(math.exp(d2), rel=1e-12)
    assert iv["ratio"] == pytest.approx(math.exp((d1 + d2) / 2), rel=1e-12)
    assert not iv["excludes_one"] and format_ratio(iv) == "x1.005 [0.980, 1.030]"


def test_seeded_and_marked_when_the_interval_excludes_one():
    base = [2000.0 + 37 * i for i in range(40)]
    other = [n + (0.004 + 0.003 * math.sin(1.7 * i)) * T for i, n in enumerate(base)]  # +0.4% per token, noisy
    a, b = paired_bootstrap_ratio(base, other, T, seed=3), paired_bootstrap_ratio(base, other, T, seed=3)
    assert a == b and a["low"] > 1 and format_ratio(a).endswith(" *")
    assert paired_bootstrap_ratio(base, other, T, seed=4)["low"] != a["low"]


def test_results_on_different_windows_are_not_paired():
    a = {"perplexity": {"books": {"window_nll": [1.0, 2.0], "tokens": 2 * T, "seqlen": 512, "window_ids_sha1": "x"}}}
    b = {"perplexity": {"books": {"window_nll": [1.5, 2.5], "tokens": 2 * T, "seqlen": 512, "window_ids_sha1": "y"}}}
    assert ratio_between(a, b, "books") is None
    b["perplexity"]["books"]["window_ids_sha1"] = "x"
    assert ratio_between(a, b, "books")["ratio"] == pytest.approx(math.exp(0.5 / T))
    assert format_ratio(None, 1.2345) == "x1.234" and format_ratio(None) == "-"
