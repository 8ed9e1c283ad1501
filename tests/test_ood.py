"""OOD AUROC (ddaebm/metrics/ood.py): the rank-based Mann-Whitney AUROC against scikit-learn, and energy scores read
from shards."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from ddaebm.metrics.ood import auroc, average_ranks, energy_scores, parse_set
from tests.conftest import ROOT

MNIST = ROOT.parent / "shared" / "data" / "mnist-10k"


def _sklearn_auroc(pos, neg) -> float:
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg])


def test_average_ranks_match_scipy():
    from scipy.stats import rankdata

    rng = np.random.default_rng(0)
    for x in (rng.normal(size=50), rng.integers(0, 5, 200).astype(float), np.ones(7), np.array([3.0])):
        np.testing.assert_allclose(average_ranks(x), rankdata(x))


@pytest.mark.parametrize("case", ["continuous", "ties", "unbalanced", "separated", "reversed", "all_equal"])
def test_auroc_matches_sklearn(case):
    rng = np.random.default_rng(1)
    pos, neg = {
        "continuous": (rng.normal(0.5, 1, 300), rng.normal(0, 1, 200)),
        "ties": (rng.integers(0, 4, 150).astype(float), rng.integers(0, 3, 170).astype(float)),
        "unbalanced": (rng.normal(1, 1, 5), rng.normal(0, 2, 1000)),
        "separated": (rng.uniform(2, 3, 40), rng.uniform(0, 1, 60)),
        "reversed": (rng.uniform(0, 1, 40), rng.uniform(2, 3, 60)),
        "all_equal": (np.zeros(10), np.zeros(20)),
    }[case]
    assert auroc(pos, neg) == pytest.approx(_sklearn_auroc(pos, neg), abs=1e-12)
    if case == "separated":
        assert auroc(pos, neg) == 1.0
    if case == "all_equal":
        assert auroc(pos, neg) == 0.5


def test_auroc_rejects_empty_or_nonfinite():
    with pytest.raises(ValueError, match="non-empty"):
        auroc([], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        auroc([np.nan], [1.0])


def test_parse_set_keeps_colons_in_root():
    assert parse_set("C:/data/x:svhn:test") == ("C:/data/x", "svhn", "test")
    with pytest.raises(ValueError, match="ROOT:NAME:SPLIT"):
        parse_set("svhn:test")


class _Brightness(torch.nn.Module):
    """f(x, k) = mean pixel: bright images count as in-distribution."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, k):
        assert (k == 0).all()
        return self.w * x.flatten(1).mean(1)


@pytest.mark.skipif(not MNIST.is_dir(), reason="../shared/data/mnist-10k not present")
def test_energy_scores_from_shards_in_order(tmp_path):
    from ddaebm.data.images import iterate_split

    subprocess.run([sys.executable, "-m", "data_shards", "mnist", "--input", str(MNIST), "--out", str(tmp_path),
                    "--name", "mnist", "--split", "test", "--limit", "50"], cwd=ROOT, check=True, capture_output=True)
    batches = iterate_split(tmp_path, "mnist", "test", 16, 32, 3, "minus_one_one", "pil", 0)
    s = energy_scores(_Brightness(), batches, "cpu", num=37)
    assert s.shape == (37,) and s.dtype == np.float64
    direct = torch.cat([x for x, _ in iterate_split(tmp_path, "mnist", "test", 50, 32, 3, "minus_one_one", "pil",
                                                    0)])[:37].flatten(1).mean(1)
    np.testing.assert_allclose(s, direct.double().numpy(), rtol=1e-6)
    # Inverted images are darker on average: the brightness "energy" separates them (AUROC = P(f_in > f_ood)).
    assert auroc(-s, s) == pytest.approx(_sklearn_auroc(-s, s)) and auroc(-s, s) > 0.99
