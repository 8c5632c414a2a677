"""The Gaussian teleport: the first, high-noise stretch of the sampling ODE solved in closed form, so that a sampler's
first model evaluation is free.

At high noise the data distribution blurred by noise of VE scale sigma is close to the Gaussian with the data's mean
mu and covariance C (Wang & Vastola 2023, "The hidden linear structure in score-based models", Sec. 4, "analytical
teleportation"). For a Gaussian the posterior mean is linear in z = x / alpha (VE coordinates),

    D(z, sigma) = mu + C (C + sigma^2 I)^-1 (z - mu),

and the probability-flow ODE dz / d sigma = (z - D(z, sigma)) / sigma has the exact solution from sigma_a to sigma_b

    z(sigma_b) = mu + (C + sigma_b^2 I)^(1/2) (C + sigma_a^2 I)^(-1/2) (z(sigma_a) - mu).

C is stored in low rank, C = U diag(lambda) U^T + rho (I - U U^T): the top ``rank`` eigenpairs and the mean of the
other eigenvalues (rho, the best isotropic fit of the rest), so the statistics of a 32x32 model are ~100 kB a class.

Class-conditional models get one Gaussian per class. With classifier-free guidance g the guided denoiser
D_u + g (D_c - D_u) mixes the unconditional and the class Gaussian, whose eigenvectors differ: that path is integrated
by RK4 in log sigma instead, at the cost of a few hundred products with the low-rank bases.

    teleport = GaussianTeleport.fit(images, labels, rank=64)   # or GaussianTeleport.load("teleport.safetensors")
    x, sigmas = teleport.start(scheduler, noise, steps, labels, guidance)   # no model evaluation
    x = sample(scheduler, model, x, sigmas=sigmas)                       # `steps` model evaluations
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch


def spectral_apply(v: torch.Tensor, U: torch.Tensor, top: torch.Tensor, rest: float | torch.Tensor) -> torch.Tensor:
    """f(C) v for a covariance C with top eigenvectors ``U`` [D, r] and one eigenvalue for the rest of the space, and
    the function f whose values on the top eigenvalues are ``top`` [r] and on the rest ``rest``; v is [N, D]."""
    return rest * v + ((v @ U) * (top - rest)) @ U.T


@dataclass
class LowRankGaussian:
    """N(mu, U diag(lam) U^T + rho (I - U U^T)) on flattened samples: ``mu`` [D], ``U`` [D, r] orthonormal,
    ``lam`` [r], ``rho`` a scalar tensor."""

    mu: torch.Tensor
    U: torch.Tensor
    lam: torch.Tensor
    rho: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor, rank: int | None = None) -> LowRankGaussian:
        """Maximum-likelihood fit to the rows of ``x`` [N, D], restricted to rank ``rank`` plus an isotropic rest
        (``None``: full rank)."""
        x = x.double().flatten(1)
        lam, U = torch.linalg.eigh(torch.cov(x.T).reshape(x.shape[1], x.shape[1]))
        lam, U = lam.flip(0).clamp(min=0.0), U.flip(1)
        r = x.shape[1] if rank is None else min(rank, x.shape[1])
        rho = lam[r:].mean() if r < len(lam) else lam.new_zeros(())
        return cls(x.mean(0), U[:, :r].contiguous(), lam[:r].contiguous(), rho)

    def _apply(self, v: torch.Tensor, top: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
        """f(C) v for the function whose values on the top eigenvalues are ``top`` and on the rest ``rest``."""
        return spectral_apply(v, self.U, top, rest)

    def denoise(self, z: torch.Tensor, sigma: float) -> torch.Tensor:
        """The posterior mean E[x0 | z] at VE noise level ``sigma`` (z flattened, [N, D])."""
        s2 = sigma**2
        return self.mu + self._apply(z - self.mu, self.lam / (self.lam + s2), self.rho / (self.rho + s2))

    def flow(self, z: torch.Tensor, sigma_a: float, sigma_b: float) -> torch.Tensor:
        """The probability-flow ODE's exact solution from ``sigma_a`` to ``sigma_b`` (z flattened, [N, D])."""
        a2, b2 = sigma_a**2, sigma_b**2
        return self.mu + self._apply(z - self.mu, torch.sqrt((self.lam + b2) / (self.lam + a2)),
                                     torch.sqrt((self.rho + b2) / (self.rho + a2)))


class GaussianTeleport:
    """Gaussian statistics of a model's data (one unconditional Gaussian, optionally one per class) and the exact
    (guidance 1) or RK4 (guided) solution of their probability-flow ODE.

    Call it with VP samples at VE noise level ``sigma_from`` (``x = alpha (x0 + sigma eps)``, the convention of
    diffalign's and diffusers' multistep schedulers, whose ``sigmas`` are VE sigmas); it returns the VP samples at
    ``sigma_to``.
    """

    def __init__(self, uncond: LowRankGaussian, classes: list[LowRankGaussian] | None, shape: tuple[int, ...]):
        self.uncond, self.classes, self.shape = uncond, classes or [], tuple(shape)

    @property
    def rank(self) -> int:
        return self.uncond.U.shape[1]

    @classmethod
    def fit(cls, data: torch.Tensor, labels: torch.Tensor | None = None, rank: int | None = 64,
            num_classes: int | None = None) -> GaussianTeleport:
        """Fit to ``data`` [N, *shape] (and per class, given integer ``labels`` [N]); ``rank=None`` keeps full rank."""
        if data.ndim < 2 or len(data) < 2:
            raise ValueError(f"data must be [N, *shape] with N >= 2 samples, got shape {tuple(data.shape)}.")
        classes = None
        if labels is not None:
            num_classes = num_classes or int(labels.max()) + 1
            counts = torch.bincount(labels.long().cpu(), minlength=num_classes)
            if (counts < 2).any():
                raise ValueError(f"every class needs at least 2 samples; counts per class: {counts.tolist()}.")
            classes = [LowRankGaussian.fit(data[labels == k], rank) for k in range(num_classes)]
        return cls(LowRankGaussian.fit(data, rank), classes, tuple(data.shape[1:]))

    def __call__(self, x: torch.Tensor, sigma_from: float, sigma_to: float, labels: torch.Tensor | None = None,
                 guidance: float = 1.0, steps: int = 200) -> torch.Tensor:
        """VP samples ``x`` at VE noise level ``sigma_from`` carried to ``sigma_to`` along the Gaussian ODE.

        ``labels=None``: the unconditional Gaussian (closed form). With labels and ``guidance == 1`` each sample
        follows its class Gaussian (closed form); otherwise the guided denoiser D_u + g (D_c - D_u), by ``steps``
        RK4 steps uniform in log sigma.
        """
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"the teleport's statistics are for samples of shape {self.shape}, got "
                             f"{tuple(x.shape[1:])}; fit them to this model's data (GaussianTeleport.fit).")
        if not sigma_from >= sigma_to > 0:
            raise ValueError(f"the teleport runs from high to low noise: sigma_from {sigma_from:g} >= sigma_to "
                             f"{sigma_to:g} > 0 required.")
        if labels is not None and not self.classes:
            raise ValueError("these teleport statistics have no class Gaussians; fit them with labels to teleport "
                             "class-conditional samples.")
        if labels is not None and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise ValueError(f"labels must lie in [0, {len(self.classes)}), got {labels.min()}..{labels.max()}.")
        z = x.detach().flatten(1).to(self.uncond.mu.device).double() * math.sqrt(1.0 + sigma_from**2)
        if labels is None:
            z = self.uncond.flow(z, sigma_from, sigma_to)
        else:
            labels = labels.to(z.device)
            for k in labels.unique().tolist():
                rows = labels == k
                z[rows] = (self.classes[k].flow(z[rows], sigma_from, sigma_to) if guidance == 1.0 else
                           self._guided(z[rows], self.classes[k], sigma_from, sigma_to, guidance, steps))
        return (z / math.sqrt(1.0 + sigma_to**2)).reshape(x.shape).to(x.dtype).to(x.device)

    def start(self, scheduler, x: torch.Tensor, steps: int, labels: torch.Tensor | None = None,
              guidance: float = 1.0) -> tuple[torch.Tensor, list[float]]:
        """The teleport's share of a sampling run of ``steps`` model evaluations: ``(x, sigmas)``, the noise ``x``
        carried to the second point of ``scheduler``'s default ``steps + 1``-point grid (:func:`teleport_grid`), and
        the ``steps`` sigmas the scheduler then runs on (``set_timesteps(sigmas=sigmas)``)."""
        grid = teleport_grid(scheduler, steps)
        return self(x, grid[0], grid[1], labels, guidance), grid[1:]

    def _guided(self, z: torch.Tensor, cls: LowRankGaussian, sigma_a: float, sigma_b: float, guidance: float,
                steps: int) -> torch.Tensor:
        def velocity(v: torch.Tensor, log_sigma: float) -> torch.Tensor:  # dz / d log sigma = z - D(z, sigma)
            s = math.exp(log_sigma)
            d_u = self.uncond.denoise(v, s)
            return v - (d_u + guidance * (cls.denoise(v, s) - d_u))

        ts = torch.linspace(math.log(sigma_a), math.log(sigma_b), steps + 1, dtype=torch.float64).tolist()
        for a, b in zip(ts[:-1], ts[1:], strict=True):
            h = b - a
            k1 = velocity(z, a)
            k2 = velocity(z + h / 2 * k1, a + h / 2)
            k3 = velocity(z + h / 2 * k2, a + h / 2)
            k4 = velocity(z + h * k3, b)
            z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return z

    def save(self, path: str | Path, **metadata) -> Path:
        """Write the statistics (float32 safetensors; ``metadata`` such as the model name goes in the header)."""
        from safetensors.torch import save_file

        gaussians = [self.uncond, *self.classes]
        tensors = {f"{name}": torch.stack([getattr(g, name) for g in gaussians]).float().contiguous()
                   for name in ("mu", "U", "lam", "rho")}
        header = {"shape": json.dumps(list(self.shape)), "num_classes": str(len(self.classes)),
                  **{k: str(v) for k, v in metadata.items()}}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=header)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> GaussianTeleport:
        """Read statistics written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no teleport statistics at {path}; make them with `diffalign calibrate teleport "
                                    "--model M --out FILE`.")
        with safe_open(str(path), "pt", device=str(device)) as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k).double() for k in f.keys()}
        if not {"mu", "U", "lam", "rho"} <= set(t) or "shape" not in meta:
            raise ValueError(f"{path} holds no teleport statistics (tensors mu, U, lam, rho and a shape header).")
        gaussians = [LowRankGaussian(t["mu"][i], t["U"][i], t["lam"][i], t["rho"][i]) for i in range(len(t["mu"]))]
        return cls(gaussians[0], gaussians[1:], tuple(json.loads(meta["shape"])))


@functools.lru_cache(maxsize=8)
def _load_version(path: str, mtime_ns: int) -> GaussianTeleport:
    return GaussianTeleport.load(path)


def load_cached(path: str | Path) -> GaussianTeleport:
    """:meth:`GaussianTeleport.load`, read once per file version (path and modification time): a pipeline or a
    scheduler built in a loop does not re-read the file. The result is shared; do not modify it."""
    path = Path(path)
    if not path.is_file():
        return GaussianTeleport.load(path)  # its error names the fix
    path = path.resolve()
    return _load_version(str(path), path.stat().st_mtime_ns)


def teleport_grid(scheduler, steps: int) -> list[float]:
    """The ``steps + 1`` VE sigmas of ``scheduler``'s default grid (its final sigma left out): the teleport runs from
    the first to the second and the sampler takes ``steps`` model evaluations on the rest (``sigmas=grid[1:]``).

    Needs a multistep scheduler that starts from unit-variance noise (one model evaluation per grid point,
    ``init_noise_sigma == 1``)."""
    if steps < 1:
        raise ValueError(f"the teleport needs at least 1 sampler step after it, got steps={steps}.")
    if float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
        raise ValueError(f"{type(scheduler).__name__} starts from noise of scale {scheduler.init_noise_sigma}; the "
                         "teleport needs a scheduler on VP samples (init_noise_sigma 1), e.g. a diffalign sampler.")
    scheduler.set_timesteps(steps + 1)
    sigmas = [float(s) for s in scheduler.sigmas[:-1]]
    if len(scheduler.timesteps) != steps + 1 or len(sigmas) != steps + 1:
        raise ValueError(f"{type(scheduler).__name__} makes {len(scheduler.timesteps)} model evaluations on "
                         f"{len(sigmas)} grid points; the teleport needs a multistep sampler, one evaluation a point.")
    try:
        scheduler.set_timesteps(sigmas=sigmas[1:])  # the grid the sampler will run after the teleport
    except (ValueError, TypeError) as err:
        raise ValueError(f"{type(scheduler).__name__} cannot run the grid after the teleport ({err}); the teleport "
                         "needs a multistep sampler that takes explicit sigmas.") from err
    return sigmas


def fit_model_teleport(named_model, num_datapoints: int = 60000, kind: str = "data", rank: int | None = 64,
                       seed: int = 0, device: str | torch.device = "cpu", progress: bool = True) -> GaussianTeleport:
    """Teleport statistics of a named model: Gaussians fitted to ``num_datapoints`` of its data set (``kind="data"``,
    all of it when there are fewer) or of its own samples (``"samples"``: 50-step DPM-Solver++, class-conditional
    without guidance), one per class for class-conditional models (see
    :func:`~diffalign.samplers.ems.model_datapoints`)."""
    from .ems import model_datapoints

    x0, labels = model_datapoints(named_model, num_datapoints, kind, 1.0, seed, device, progress, labelled=True)
    return GaussianTeleport.fit(x0.cpu(), None if labels is None else labels.cpu(), rank,
                                len(named_model.class_names) if labels is not None else None)
