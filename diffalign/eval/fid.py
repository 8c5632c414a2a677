"""FID and KID with a pluggable feature network (torchmetrics), float64, with precomputed reference statistics.

Inputs are float images in [0, 1] (uint8 is converted; anything else out of range is an error -- torchmetrics
silently mis-scales [0, 1] floats passed where uint8 is expected). The feature network is any module mapping
[N, C, H, W] in [0, 1] to [N, D] features: the shipped classifiers of the built-in models, Inception (when
torch-fidelity weights are available), or your own.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from ..images import check_images


class Features(torch.nn.Module):
    """Adapts a feature function to torchmetrics: validated [0, 1] input, float64 [N, D] output."""

    def __init__(self, fn: torch.nn.Module, num_features: int):
        super().__init__()
        self.fn, self.num_features = fn, num_features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fn(images).double().flatten(1)


def inception_features() -> Features:
    """The standard 2048-d Inception-v3 pool features (torch-fidelity's port of the TF FID network)."""
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
    except Exception as err:  # missing torch-fidelity or weights (no network)
        raise RuntimeError(
            "Inception FID needs torch-fidelity and its weights (pt_inception-2015-12-05); install torch-fidelity and "
            "download the weights once with network access, or use the built-in classifier features "
            f"(features='classifier'). Cause: {err}"
        ) from err

    class _Inception(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net  # a submodule, so that FID(..., device=) moves it with the metric

        def forward(self, images):
            x = images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images
            return self.net((x * 255).round().to(torch.uint8))

    return Features(_Inception(), 2048)


class FID:
    """Frechet distance between generated images and a reference set, on a pluggable feature network.

    >>> fid = FID(features)                       # a Features module
    >>> fid.add_reference(real_images)            # or fid.load_reference("stats.safetensors")
    >>> fid.add(generated_images); fid.compute()
    """

    def __init__(self, features: Features, device: str | torch.device = "cpu"):
        self.features = features
        # the metric's states are float64; float64 features make its result float64 too (no set_dtype, which
        # would also cast the feature network)
        self.metric = FrechetInceptionDistance(feature=features, normalize=True, reset_real_features=False).to(device)
        self.device = device
        self._fake: list[torch.Tensor] = []

    def add_reference(self, images: torch.Tensor) -> None:
        self.metric.update(check_images(images).to(self.device), real=True)

    def add(self, images: torch.Tensor) -> None:
        images = check_images(images).to(self.device)
        self.metric.update(images, real=False)

    def set_reference_stats(self, mean: torch.Tensor, cov: torch.Tensor, num_samples: int) -> None:
        """Use precomputed reference statistics (mean [D], covariance [D, D] of N real images' features).

        Under torch.distributed (e.g. ``accelerate launch``) only rank 0 holds them: torchmetrics sums the
        states of all processes when computing.
        """
        m = self.metric
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return
        mean, cov = mean.double().to(m.real_features_sum.device), cov.double().to(m.real_features_sum.device)
        m.real_features_sum = mean * num_samples
        m.real_features_cov_sum = (num_samples - 1) * cov + num_samples * torch.outer(mean, mean)
        m.real_features_num_samples = torch.tensor(num_samples, device=mean.device)

    def load_reference(self, path: str | Path) -> None:
        stats = load_stats(path)
        self.set_reference_stats(stats["mean"], stats["cov"], int(stats["num_samples"]))

    def compute(self) -> float:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        local = (int(self.metric.fake_features_num_samples), int(self.metric.real_features_num_samples))
        if not distributed and min(local) < 2:  # (distributed: torchmetrics checks after summing the processes)
            raise ValueError("FID needs at least 2 generated and 2 reference images (use >= 1,000 for stable values).")
        return float(self.metric.compute())


def kid(features: Features, real: torch.Tensor, fake: torch.Tensor, subset_size: int | None = None,
        subsets: int = 100, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (unbiased, better than FID for small N): (mean, std) over ``subsets`` random
    subsets (drawn with ``seed``) of ``subset_size`` images of each set; default 1,000, or half the smaller set
    when that has fewer than 2,000 images (so that the subsets differ and the std means something)."""
    real, fake = check_images(real), check_images(fake)
    smaller = min(len(real), len(fake))
    if smaller < 4:
        raise ValueError(f"KID needs at least 4 real and 4 generated images, got {len(real)} and {len(fake)}.")
    size = subset_size or min(1000, smaller // 2)
    metric = KernelInceptionDistance(feature=features, normalize=True, subset_size=size, subsets=subsets)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws the subsets from the global RNG
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def feature_stats(features: Features, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean, covariance (float64) and count of the features of a set of images given in batches."""
    total, outer, n = None, None, 0
    for images in batches:
        f = features(check_images(images))
        total = f.sum(0) if total is None else total + f.sum(0)
        outer = f.T @ f if outer is None else outer + f.T @ f
        n += f.shape[0]
    if n < 2:
        raise ValueError("feature statistics need at least 2 images.")
    mean = total / n
    cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
    return {"mean": mean, "cov": cov, "num_samples": torch.tensor(n)}


def save_stats(stats: dict[str, torch.Tensor], path: str | Path) -> None:
    save_file({k: v.contiguous() for k, v in stats.items()}, str(path))


def load_stats(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"FID statistics file {path} not found; compute it with `diffalign eval fid-stats`.")
    stats = load_file(str(path))
    stats = {{"mu": "mean", "sigma": "cov"}.get(k, k): v for k, v in stats.items()}  # the model cards' key names
    missing = {"mean", "cov", "num_samples"} - set(stats)
    if missing:
        raise ValueError(f"{path} is not a FID statistics file (missing {sorted(missing)}).")
    return stats


def frechet_distance_scipy(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Reference implementation with scipy's ``sqrtm`` (as pytorch-fid / the original TF code)."""
    from scipy import linalg

    covmean, _ = linalg.sqrtm(sigma1 @ sigma2, disp=False)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def classifier_features(model: str, directory: str | Path | None = None) -> Features:
    """Penultimate features of a built-in model's shipped classifier (images resized and converted to grey;
    ``directory``: other weights than the package's)."""
    from ..models.builtin import ClassifierFeatures, builtin_spec, classifier_input, load_builtin_classifier

    size = builtin_spec(model).image_size
    inner = ClassifierFeatures(load_builtin_classifier(model, directory))

    class _Resized(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, images):
            return self.inner(classifier_input(images, size))

    return Features(_Resized(), inner.num_features)


def get_features(name: str) -> Features:
    """``"inception"`` or ``"classifier:<builtin model>"`` (e.g. ``classifier:builtin:fashion``)."""
    if name == "inception":
        return inception_features()
    if name.startswith("classifier:"):
        return classifier_features(name.split(":", 1)[1])
    raise ValueError(f"unknown features {name!r}; use 'inception' or 'classifier:builtin:<model>'.")


def load_image_folder(folder: str | Path, limit: int | None = None) -> torch.Tensor:
    """All PNG/JPEG images of a folder as one [N, C, H, W] float tensor in [0, 1] (same size required)."""
    from PIL import Image

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[:limit]
    if not files:
        raise FileNotFoundError(f"no .png/.jpg images in {folder}.")
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f"images in {folder} have different sizes; resize them to one size first.")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def fid_of_model(named_model, sampler: str, steps: int, num_images: int, features: Features, stats_path: str | Path,
                 guidance: float = 1.0, seed: int = 0, batch_size: int = 250, device: str = "cpu",
                 progress: bool = True, searched: bool = True, teleport=None) -> dict:
    """FID of ``num_images`` class-balanced samples of a model against stored reference statistics (``searched``
    and ``teleport`` as in :func:`~diffalign.sampling.sample_images`)."""
    import time

    from ..models.sampler_data import load_teleport
    from ..sampling import sample_images

    teleport = load_teleport(named_model.name, teleport)

    fid = FID(features, device=device)
    fid.load_reference(stats_path)
    classes = len(named_model.class_names)
    labels = torch.arange(num_images) % classes
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    bar = tqdm(total=num_images, desc="FID samples", unit="img", disable=not progress)  # on stderr
    stride = max(1000, int((labels == 0).sum()))  # class k's image j has seed + stride k + j: no seed twice
    for k in range(classes):
        n_k = int((labels == k).sum())
        for start in range(0, n_k, batch_size):
            n = min(batch_size, n_k - start)
            fid.add(sample_images(named_model, sampler, steps, n, k, guidance, seed + stride * k + start,
                                  device=device, progress=False, searched=searched, teleport=teleport))
            bar.update(n)
    bar.close()
    return {"fid": fid.compute(), "num_images": num_images, "sampler": sampler, "steps": steps,
            "guidance": guidance, "seed": seed, "seconds": time.perf_counter() - t0}
