"""FID and IS (ddaebm/metrics/fid.py, inception.py) against independent computations, the reference cache, and the
real TF-Inception features on MNIST halves vs MNIST-vs-Fashion-MNIST."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from ddaebm.metrics.fid import FIDStats, Moments, fid_from_stats, frechet_distance, reference_stats
from ddaebm.metrics.inception import ISAccumulator, LogitsModel, inception_input
from tests.conftest import ROOT

MNIST = ROOT.parent / "shared" / "data" / "mnist-10k"
FASHION = Path("/usr/share/datasets/fashion-mnist")


def _fd_by_eigenvalues(mu1, s1, mu2, s2) -> float:
    """tr((Σ1Σ2)^½) = Σ √λ of the symmetric Σ1^½ Σ2 Σ1^½ (eigh, no sqrtm): an independent route to the FD."""
    w, v = scipy.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = scipy.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(lam, 0, None)).sum())


def _features(rng, n, d, shift=0.0):
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ a + shift


def test_moments_match_numpy_and_add_over_batches_and_ranks():
    rng = np.random.default_rng(0)
    x = _features(rng, 500, 12, 3.0)
    whole = Moments()
    whole.add(x)
    a, b = Moments(), Moments()  # two "ranks", each fed in uneven batches
    for lo, hi in ((0, 7), (7, 200)):
        a.add(x[lo:hi])
    b.add(x[200:])
    a.n, a.s, a.ss = a.n + b.n, a.s + b.s, a.ss + b.ss  # what the all-reduce does
    for m in (whole, a):
        st = m.stats()
        np.testing.assert_allclose(st.mu, x.mean(0), rtol=1e-12)
        np.testing.assert_allclose(st.sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
        assert st.num == 500


def test_frechet_distance_against_eigenvalue_computation_and_analytic_cases():
    rng = np.random.default_rng(1)
    x, y = _features(rng, 400, 16), _features(rng, 300, 16, 0.5)
    sx = FIDStats(x.mean(0), np.cov(x, rowvar=False), len(x))
    sy = FIDStats(y.mean(0), np.cov(y, rowvar=False), len(y))
    fd = fid_from_stats(sx, sy)
    ref = _fd_by_eigenvalues(sx.mu, sx.sigma, sy.mu, sy.sigma)
    assert fd == pytest.approx(ref, rel=1e-9, abs=1e-9)
    assert fd > 1.0
    assert abs(fid_from_stats(sx, sx)) < 1e-8  # FD(x, x) = 0
    # Same covariance, shifted means: FD = ‖Δμ‖² exactly.
    delta = rng.normal(size=16)
    assert frechet_distance(sx.mu, sx.sigma, sx.mu + delta, sx.sigma) == pytest.approx(delta @ delta, rel=1e-8)
    # Gaussians with commuting covariances: FD = ‖Δμ‖² + Σ(√a − √b)².
    a, b = rng.uniform(0.5, 2, 16), rng.uniform(0.5, 2, 16)
    assert frechet_distance(np.zeros(16), np.diag(a), np.ones(16), np.diag(b)) == pytest.approx(
        16 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum(), rel=1e-10)


def test_frechet_distance_with_singular_covariances_stays_finite():
    """Fewer samples than dimensions (as in small-sample FID): rank-deficient covariances."""
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(10, 40)), rng.normal(size=(10, 40)) + 1
    fd = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    ref = _fd_by_eigenvalues(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert np.isfinite(fd) and fd == pytest.approx(ref, rel=1e-3)
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_input_range_resize_and_gray():
    img = np.zeros((2, 28, 28, 1), np.uint8)
    img[0], img[1] = 0, 255
    x = inception_input(img)
    assert x.shape == (2, 3, 299, 299)
    assert x[0].min() == x[0].max() == -1.0  # TF's input map (x − 128)/128: 0 → −1, 255 → 127/128
    assert x[1].min().item() == pytest.approx(127 / 128, abs=1e-6) == x[1].max().item()
    with pytest.raises(ValueError, match="uint8"):
        inception_input(img.astype(np.float32))


class _ChannelStats:
    """A cheap stand-in feature extractor: per-channel mean, std and mean square of the pixels."""

    id = "channel-stats-test"

    def __init__(self):
        self.calls = 0

    def __call__(self, images):
        self.calls += len(images)
        x = images.astype(np.float64) / 255
        return np.concatenate([x.mean((1, 2)), x.std((1, 2)), (x ** 2).mean((1, 2))], axis=1)


@pytest.fixture(scope="module")
def mnist_shards(tmp_path_factory):
    if not MNIST.is_dir():
        pytest.skip("../shared/data/mnist-10k not present")
    out = tmp_path_factory.mktemp("fid") / "mnist"
    for split in ("train", "test"):
        subprocess.run([sys.executable, "-m", "data_shards", "mnist", "--input", str(MNIST), "--out", str(out),
                        "--name", "mnist", "--split", split, "--limit", "64"], cwd=ROOT, check=True,
                       capture_output=True)
    return out


def test_reference_statistics_are_cached_by_key(mnist_shards, tmp_path):
    ext = _ChannelStats()
    cache = tmp_path / "cache"
    st, path, cached = reference_stats(mnist_shards, "mnist", "test", 28, 1, ext, num=40, cache_dir=cache, batch=16)
    assert not cached and path.is_file() and ext.calls == 40 and st.num == 40
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary file left behind
    st2, path2, cached2 = reference_stats(mnist_shards, "mnist", "test", 28, 1, ext, num=40, cache_dir=cache)
    assert cached2 and path2 == path and ext.calls == 40
    np.testing.assert_array_equal(st.sigma, st2.sigma)
    # Another sample count, resolution or extractor is another entry.
    _, p3, c3 = reference_stats(mnist_shards, "mnist", "test", 32, 1, ext, num=40, cache_dir=cache)
    _, p4, c4 = reference_stats(mnist_shards, "mnist", "test", 28, 1, ext, cache_dir=cache)
    assert not c3 and not c4 and len({path, p3, p4}) == 3 and "n64" in p4.name
    with pytest.raises(ValueError, match="ref-num"):
        reference_stats(mnist_shards, "mnist", "test", 28, 1, ext, num=65, cache_dir=cache)
    with pytest.raises(FileNotFoundError):
        reference_stats(mnist_shards, "mnist", "valid", 28, 1, ext, cache_dir=cache)


def _standard_is(probs: np.ndarray, splits: int) -> tuple[float, float]:
    """The Salimans et al. loop, with scipy's entropy: exp(mean KL(p(y|x) ‖ p(y))) per split."""
    from scipy.stats import entropy

    scores, n = [], len(probs)
    for i in range(splits):
        part = probs[i * n // splits:(i + 1) * n // splits]
        py = part.mean(0)
        scores.append(np.exp(np.mean([entropy(p, py) for p in part])))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_accumulator_against_standard_loop():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(103, 1008)) * 3
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    acc = ISAccumulator(103, 10, 1008)
    order = rng.permutation(103)  # any order, in pieces (as ranks and batches feed it)
    for chunk in np.array_split(order, 7):
        acc.add(probs[chunk], chunk)
    mean, std = acc.score()
    ref_mean, ref_std = _standard_is(probs, 10)
    assert mean == pytest.approx(ref_mean, rel=1e-10) and std == pytest.approx(ref_std, rel=1e-8, abs=1e-12)
    # One-hot predictions spread evenly over K classes give IS = K; identical predictions give 1.
    onehot = np.eye(1000)[np.arange(200) % 20]
    acc = ISAccumulator(200, 10, 1000)
    acc.add(onehot, np.arange(200))
    assert acc.score()[0] == pytest.approx(20.0)
    acc = ISAccumulator(50, 5, 1000)
    acc.add(np.full((50, 1000), 1e-3), np.arange(50))
    assert acc.score() == pytest.approx((1.0, 0.0))


def test_inception_score_needs_logit_weights():
    with pytest.raises(ValueError, match="--inception-logits"):
        LogitsModel(None)


@pytest.mark.skipif(not (FASHION / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST absent: apt-get install -y dataset-fashion-mnist")
def test_tf_inception_fid_mnist_halves_vs_fashion(mnist_shards, tmp_path, capsys):
    """32 vs 32 images through the real TF-Inception weights: two disjoint MNIST sets are far closer than MNIST and
    Fashion-MNIST (small-sample FIDs are biased upwards, so only the ordering and a wide gap are asserted)."""
    from ddaebm.metrics.inception import FeatureExtractor

    torch.set_num_threads(1)
    subprocess.run([sys.executable, "-m", "data_shards", "mnist", "--input", str(FASHION), "--out",
                    str(tmp_path / "fashion"), "--name", "fashion", "--split", "test", "--limit", "32"], cwd=ROOT,
                   check=True, capture_output=True)
    ext = FeatureExtractor(batch=32)
    cache = tmp_path / "cache"
    a, _, _ = reference_stats(mnist_shards, "mnist", "test", 28, 1, ext, num=32, cache_dir=cache)
    b, _, _ = reference_stats(mnist_shards, "mnist", "train", 28, 1, ext, num=32, cache_dir=cache)
    c, _, _ = reference_stats(tmp_path / "fashion", "fashion", "test", 28, 1, ext, num=32, cache_dir=cache)
    assert a.mu.shape == (2048,)
    same, other = fid_from_stats(a, b), fid_from_stats(a, c)
    with capsys.disabled():
        print(f"\nTF-Inception FID, 32 vs 32: MNIST test vs MNIST train {same:.1f}, MNIST vs Fashion-MNIST {other:.1f}")
    assert 0 < same < 0.6 * other
