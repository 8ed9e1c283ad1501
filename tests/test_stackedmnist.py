"""StackedMNIST modes and reverse KL (ddaebm/metrics/stackedmnist.py): the formulas, and the protocol on real
StackedMNIST digits from the MNIST shards, which should cover about as many modes as n uniform draws can."""

import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ddaebm.metrics.stackedmnist import (NUM_MODES, classifier_for, expected_modes, label_counts, label_distribution,
                                         kl_by_channel, mode_stats, modes_row, reverse_kl, stacked_labels)
from tests.conftest import ROOT

MNIST = ROOT.parent / "shared" / "data" / "mnist-10k"
needs_mnist = pytest.mark.skipif(not MNIST.is_dir(), reason="../shared/data/mnist-10k not present")


def test_reverse_kl_and_modes_formulas():
    p = np.full(NUM_MODES, 1 / NUM_MODES)
    counts = label_counts(np.arange(NUM_MODES))
    assert mode_stats(counts, p) == {"modes": 1000, "kl": pytest.approx(0.0, abs=1e-12)}
    # Half the modes, evenly: q = 2/1000 on 500 labels → KL = log 2; empty labels (0·log 0) are dropped.
    counts = label_counts(np.repeat(np.arange(0, NUM_MODES, 2), 3))
    assert mode_stats(counts, p) == {"modes": 500, "kl": pytest.approx(np.log(2))}
    # A label the data lacks makes the KL infinite.
    p_hole = p.copy()
    p_hole[0], p_hole[1] = 0, 2 / NUM_MODES
    assert reverse_kl(label_counts([0, 5]), p_hole) == float("inf")
    with pytest.raises(ValueError, match="0..999"):
        label_counts([1000])


def test_expected_modes_matches_simulation():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(NUM_MODES, 20.0))
    n = 2000
    sim = np.mean([(np.bincount(rng.choice(NUM_MODES, n, p=p), minlength=NUM_MODES) > 0).sum() for _ in range(200)])
    assert expected_modes(p, n) == pytest.approx(sim, abs=2.0)
    assert expected_modes(np.full(NUM_MODES, 1e-3), 2000) == pytest.approx(1000 * (1 - 0.999 ** 2000))  # 864.9


def _shards(out, source, split, *extra):
    subprocess.run([sys.executable, "-m", "data_shards", source, "--input", str(MNIST), "--out", str(out), "--name",
                    source, "--split", split, *extra], cwd=ROOT, check=True, capture_output=True, timeout=300)


def test_reverse_kl_splits_into_channel_marginals_and_dependence():
    p = np.full(NUM_MODES, 1 / NUM_MODES)
    # R only ever 0 or 1, G and B uniform and independent: KL log 5, all of it R's marginal.
    labels = np.array([100 * r + 10 * g + b for r in (0, 1) for g in range(10) for b in range(10)])
    split = kl_by_channel(label_counts(labels), p)
    assert split["kl_channels"] == [pytest.approx(np.log(5)), pytest.approx(0, abs=1e-12),
                                    pytest.approx(0, abs=1e-12)]
    assert split["kl_dependence"] == pytest.approx(0, abs=1e-12)
    # Three equal digits (000, 111, …, 999): every marginal uniform, KL log 100, all of it dependence.
    split = kl_by_channel(label_counts(111 * np.arange(10)), p)
    assert split["kl_channels"] == [pytest.approx(0, abs=1e-12)] * 3
    assert split["kl_dependence"] == pytest.approx(np.log(100))
    # Any histogram against a product p: the parts add up to the joint KL.
    rng = np.random.default_rng(0)
    p_c = [rng.dirichlet(np.ones(10)) for _ in range(3)]
    p_prod = np.einsum("a,b,c->abc", *p_c).ravel()
    counts = rng.integers(0, 50, NUM_MODES).astype(float)
    split = kl_by_channel(counts, p_prod)
    assert sum(split["kl_channels"]) + split["kl_dependence"] == pytest.approx(reverse_kl(counts, p_prod), rel=1e-10)
    # As a row: the infinite KL of samples on a label the data lacks is None, the rest stay numbers.
    p_hole = p.copy()
    p_hole[0], p_hole[1] = 0, 2 / NUM_MODES
    row = modes_row(label_counts([0, 5]), p_hole)
    assert row["modes"] == 2 and row["kl"] is None and row["kl_dependence"] >= 0
    assert all(np.isfinite(v) for v in row["kl_channels"])


@needs_mnist
def test_real_stackedmnist_covers_the_expected_modes(tmp_path, capsys):
    """The classifier is trained on the 8k MNIST training digits; 2000 StackedMNIST samples drawn from the 2000 test
    digits are classified channel by channel. Their label distribution is the product p(a)p(b)p(c) of the test
    digit frequencies, so the expected coverage is Σ 1 − (1 − p_c)^n (≈ 864 for n = 2000) and the KL of a perfect
    classifier is the sampling noise of the histogram, estimated here by simulating multinomial draws of p."""
    from ddaebm.data.images import load_labels
    from ddaebm.metrics.fid import split_images

    torch.set_num_threads(1)
    _shards(tmp_path / "mnist", "mnist", "train")
    _shards(tmp_path / "mnist", "mnist", "test")
    _shards(tmp_path / "sm", "stackedmnist", "test", "--num-samples", "2000", "--seed", "1")
    t0 = time.perf_counter()
    clf, info = classifier_for(tmp_path / "mnist", "mnist", epochs=2, cache_dir=tmp_path / "clf", log=lambda _: None)
    train_s = time.perf_counter() - t0
    assert info["num_train"] == 8000 and info["num_test"] == 2000
    assert info["test_accuracy"] > 0.96
    clf2, info2 = classifier_for(tmp_path / "mnist", "mnist", epochs=2, cache_dir=tmp_path / "clf")  # cached
    assert info2 == info and all(torch.equal(a, b) for a, b in zip(clf.parameters(), clf2.parameters()))

    images = np.concatenate(list(split_images(tmp_path / "sm", "stackedmnist", "test", 32, 3, 500)))
    truth = load_labels(tmp_path / "sm", "stackedmnist", "test")
    pred = stacked_labels(clf, images)
    digits = load_labels(tmp_path / "mnist", "mnist", "test")
    f = np.bincount(digits, minlength=10) / len(digits)
    p = (f[:, None, None] * f[None, :, None] * f[None, None, :]).ravel()  # label 100a + 10b + c
    n = len(pred)
    stats = mode_stats(label_counts(pred), p)
    true_stats = mode_stats(label_counts(truth), p)
    rng = np.random.default_rng(0)
    sim_kl = [reverse_kl(np.bincount(rng.choice(NUM_MODES, n, p=p), minlength=NUM_MODES).astype(float), p)
              for _ in range(200)]
    exp_modes = expected_modes(p, n)
    with capsys.disabled():
        print(f"\nMNIST classifier: test accuracy {info['test_accuracy']:.4f} ({train_s:.0f} s for 2 epochs); "
              f"StackedMNIST labels right {np.mean(pred == truth):.3f}; n={n}: modes {stats['modes']} "
              f"(true labels {true_stats['modes']}, expected {exp_modes:.1f}), KL {stats['kl']:.3f} "
              f"(true labels {true_stats['kl']:.3f}, multinomial {np.mean(sim_kl):.3f} ± {np.std(sim_kl):.3f}); "
              f"uniform p: KL {reverse_kl(label_counts(pred), np.full(NUM_MODES, 1e-3)):.3f}")
    assert np.mean(pred == truth) > 0.88  # three digits right
    assert abs(stats["modes"] - exp_modes) < 40  # ~4 standard deviations of the coverage count
    assert stats["kl"] < np.mean(sim_kl) + 5 * np.std(sim_kl) + 0.02  # classifier errors add a little
    assert label_distribution(truth).sum() == pytest.approx(1.0)
