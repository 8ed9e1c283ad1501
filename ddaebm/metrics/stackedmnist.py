"""StackedMNIST mode coverage (method.md §10): an MNIST classifier, per-channel labels 100a + 10b + c, modes and KL.

Protocol (PacGAN/DDGAN/VAEBM): classify each of the three channels of every sample with a pretrained MNIST
classifier; the label is 100·R + 10·G + B (1000 modes). Covered modes = labels with ≥ 1 sample. KL is the reverse
KL Σ_c q(c) log(q(c)/p(c)) of the sample histogram q against the data-label distribution p (empirical label
frequencies of the StackedMNIST shards, ≈ uniform), dropping 0·log 0 terms; where q(c) > 0 = p(c) it is infinite
(a data set too small to hold every label: use p = uniform).

For n samples from a distribution p over the labels the expected number of covered modes is Σ_c 1 − (1 − p_c)^n,
1000·(1 − (1 − 1/1000)^n) for the uniform p (865 at n = 2000, 1000.0 at n = 26,000); the KL of the sample
histogram of a perfect model is not 0 but ≈ (K − 1)/(2n) for n ≫ K (0.019 at n = 26,000).

Classifier: three 3×3 conv layers (32, 64, 64 channels, ReLU, 2×2 max-pool after each) and an MLP (576 → 128 →
10) on 28×28 digits in [−1, 1]; Adam with a one-cycle learning rate (peak 3e-3), batch 64, random shifts of up to
2 pixels. Trained once per (MNIST shard content, epochs, seed) and cached as `<cache>/mnist-<digest>-e<E>-s<S>.pt`
with its test accuracy in the `.json` beside it (both written atomically). 32×32 StackedMNIST channels (digits
zero-padded by 2) are centre-cropped to 28; other sizes are resized bilinearly.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddaebm.errors import BadValue

NUM_MODES = 1000


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddaebm" / "mnist-classifier"


class MNISTClassifier(nn.Module):
    def __init__(self):
        super().__init__()

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]

        self.net = nn.Sequential(*block(1, 32), *block(32, 64), *block(64, 64), nn.Flatten(),
                                 nn.Linear(64 * 3 * 3, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def to_classifier_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W] digits → float [N, 1, 28, 28] in [−1, 1] (centre crop of a symmetric pad, else resize)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1.0)[:, None]
    side = x.shape[-1]
    if side != 28:
        if side > 28 and (side - 28) % 2 == 0:
            m = (side - 28) // 2
            x = x[..., m:m + 28, m:m + 28]
        else:
            x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    return x


@torch.no_grad()
def predict_digits(classifier: nn.Module, images: np.ndarray, batch: int = 1024) -> np.ndarray:
    """Digit (0..9) of each uint8 [N, H, W] image."""
    classifier.eval()
    device = next(classifier.parameters()).device
    out = [classifier(to_classifier_input(images[i:i + batch]).to(device)).argmax(1).cpu().numpy()
           for i in range(0, len(images), batch)]
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def stacked_labels(classifier: nn.Module, images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] → labels 100·a + 10·b + c from the digits of channels R, G, B."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise BadValue(f"StackedMNIST images are [N, H, W, 3], got {images.shape}")
    a, b, c = (predict_digits(classifier, images[..., ch]) for ch in range(3))
    return 100 * a + 10 * b + c


def label_counts(labels: np.ndarray) -> np.ndarray:
    """float64 histogram [1000] of StackedMNIST labels."""
    labels = np.asarray(labels, np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_MODES):
        raise BadValue(f"StackedMNIST labels lie in 0..{NUM_MODES - 1}, got {labels.min()}..{labels.max()} "
                         "(unlabelled shards, or not StackedMNIST?)")
    return np.bincount(labels, minlength=NUM_MODES).astype(np.float64)


def mode_stats(counts: np.ndarray, p_data: np.ndarray) -> dict:
    """{"modes", "kl"} of a sample label histogram against the data-label distribution p_data [1000] (method.md §10)."""
    return {"modes": int((counts > 0).sum()), "kl": reverse_kl(counts, p_data)}


def reverse_kl(counts: np.ndarray, p_data: np.ndarray) -> float:
    """Σ_c q log(q/p) with q = counts/Σcounts; terms with q = 0 are dropped; inf where q > 0 = p."""
    q = counts / counts.sum()
    p = np.asarray(p_data, np.float64)
    seen = q > 0
    if (p[seen] <= 0).any():
        return float("inf")
    return float((q[seen] * (np.log(q[seen]) - np.log(p[seen]))).sum())


def kl_by_channel(counts: np.ndarray, p_data: np.ndarray) -> dict:
    """Where a reverse KL comes from: {"kl_channels": [KL(q_c ‖ p_c) of each channel's digit marginal, R, G, B],
    "kl_dependence": KL(q ‖ q_R q_G q_B), how much the channels' digits depend on each other}. When p_data is a
    product of its marginals (StackedMNIST draws its three digits independently) the two add up to the joint
    reverse KL: too few or too many of some digit shows in kl_channels, merged or missing combinations in
    kl_dependence."""
    q = (counts / counts.sum()).reshape(10, 10, 10)
    p = np.asarray(p_data, np.float64).reshape(10, 10, 10)
    axes = ((1, 2), (0, 2), (0, 1))
    q_c, p_c = [q.sum(axis=a) for a in axes], [p.sum(axis=a) for a in axes]
    product = np.einsum("a,b,c->abc", *q_c)
    return {"kl_channels": [reverse_kl(qc, pc) for qc, pc in zip(q_c, p_c)],
            "kl_dependence": reverse_kl(q.ravel(), product.ravel())}


def modes_row(counts: np.ndarray, p_data: np.ndarray) -> dict:
    """mode_stats and kl_by_channel as a JSON row: an infinite KL (samples on labels the data lacks) is None."""
    def finite(v: float) -> float | None:
        return v if np.isfinite(v) else None

    stats, split = mode_stats(counts, p_data), kl_by_channel(counts, p_data)
    return {"modes": stats["modes"], "kl": finite(stats["kl"]),
            "kl_channels": [finite(v) for v in split["kl_channels"]], "kl_dependence": split["kl_dependence"]}


def expected_modes(p: np.ndarray, n: int) -> float:
    """E[#labels with ≥ 1 of n draws from p] = Σ_c 1 − (1 − p_c)^n."""
    return float((1.0 - (1.0 - np.asarray(p, np.float64)) ** n).sum())


def label_distribution(labels: np.ndarray) -> np.ndarray:
    """The empirical label distribution [1000] of a StackedMNIST set (p in the KL)."""
    counts = label_counts(labels)
    return counts / counts.sum()


# ---------------------------------------------------------------------------------------------- classifier


def load_digits(root, name: str, split: str, loader: str = "pil", workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, 28, 28], int64 labels) of an MNIST shard split."""
    from ddaebm.data.images import iterate_split
    from ddaebm.data.pixels import to_uint8

    images, labels = [], []
    for x, y in iterate_split(root, name, split, 1024, 28, 1, "minus_one_one", loader, workers):
        images.append(to_uint8(x, "minus_one_one")[..., 0])
        labels.append(y.numpy())
    y = np.concatenate(labels)
    if (y < 0).any() or (y > 9).any():
        raise BadValue(f"{root}:{name}:{split} has labels outside 0..9 (is it an MNIST shard set?)")
    return np.concatenate(images), y


def train_classifier(x: np.ndarray, y: np.ndarray, epochs: int, seed: int = 0, log=print) -> MNISTClassifier:
    """The classifier trained on uint8 digits x [N, 28, 28] with labels y (CPU, deterministic for a seed)."""
    torch.manual_seed(seed)
    net = MNISTClassifier()
    g = torch.Generator().manual_seed(seed)
    xs, ys = to_classifier_input(x), torch.from_numpy(np.asarray(y, np.int64))
    batch = 64
    steps_per_epoch = max(1, len(xs) // batch)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * steps_per_epoch)
    net.train()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(len(xs), generator=g)
        for i in range(steps_per_epoch):
            rows = perm[i * batch:(i + 1) * batch]
            shift = torch.randint(-2, 3, (2,), generator=g).tolist()  # MNIST borders are blank: roll = shift
            loss = F.cross_entropy(net(torch.roll(xs[rows], shift, dims=(2, 3))), ys[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log(f"mnist classifier: epoch {epoch + 1}/{epochs}, loss {loss.item():.3f}, "
            f"{time.perf_counter() - t0:.0f} s")
    return net.eval()


def accuracy(classifier: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict_digits(classifier, x) == y).mean())


def classifier_for(mnist_root, name: str, epochs: int = 8, seed: int = 0, cache_dir: Path | None = None,
                   loader: str = "pil", workers: int = 0, log=print) -> tuple[MNISTClassifier, dict]:
    """(classifier, info) for the MNIST shards ROOT:NAME (splits train and test): from the cache, or trained now.

    info: {"test_accuracy", "num_train", "num_test", "epochs", "seed", "shards", "path"}.
    """
    from ddaebm.data.shards import ShardSet
    from ddaebm.metrics.fid import shard_digest
    from ddaebm.fsio import write_atomic, write_atomic_bytes

    digests = []
    for split in ("train", "test"):
        shards = ShardSet(mnist_root, name, split)
        digests.append(shard_digest(shards))
        shards.close()
    path = Path(cache_dir or default_cache_dir()) / f"{name}-{'-'.join(digests)}-e{epochs}-s{seed}.pt"
    meta_path = path.with_suffix(".json")
    net = MNISTClassifier()
    if path.is_file() and meta_path.is_file():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net.eval(), json.loads(meta_path.read_text())
    x_train, y_train = load_digits(mnist_root, name, "train", loader, workers)
    x_test, y_test = load_digits(mnist_root, name, "test", loader, workers)
    net = train_classifier(x_train, y_train, epochs, seed, log)
    info = {"test_accuracy": accuracy(net, x_test, y_test), "num_train": len(x_train), "num_test": len(x_test),
            "epochs": epochs, "seed": seed, "shards": digests, "path": str(path)}
    path.parent.mkdir(parents=True, exist_ok=True)
    import io

    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    write_atomic_bytes(path, buf.getvalue())
    write_atomic(meta_path, json.dumps(info, indent=1) + "\n")
    return net, info
