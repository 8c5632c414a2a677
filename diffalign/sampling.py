"""Sample images from a named model with any registered sampler, and save them as a labelled grid."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageOps

from .samplers import make_scheduler, trajectory


def sample_images(named_model, sampler: str, steps: int, num_images: int, label: int | None = None,
                  guidance: float = 1.0, seed: int = 0, device: str = "cpu", progress: bool = True,
                  batch_size: int | None = None, searched: bool = True, teleport=None) -> torch.Tensor:
    """Images in [0, 1], shape [N, C, H, W]; class-conditional (and guided) when ``label`` is given.

    The model's shipped data for the sampler apply (:func:`~diffalign.models.sampler_data.sampler_overrides`),
    searched time steps included unless ``searched=False``.

    ``teleport`` (``True``: the model's shipped statistics; or a file, or a
    :class:`~diffalign.samplers.teleport.GaussianTeleport`) replaces the first model evaluation by the Gaussian
    teleport: the sampler runs ``steps`` evaluations on the last ``steps`` points of its default ``steps + 1``-point
    grid (:func:`~diffalign.samplers.teleport.teleport_grid`), or on the time steps searched with the teleport where
    they are shipped (``searched``).

    Image i starts from the noise of seed ``seed + i`` (see :func:`image_seeds`), so with a deterministic sampler
    it does not depend on ``batch_size`` (default: all images in one batch) or on the other images.
    """
    from tqdm.auto import tqdm

    from .models.sampler_data import load_teleport, sampler_overrides

    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}.")
    batch_size = batch_size or num_images
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    teleport = load_teleport(named_model.name, teleport)
    overrides = sampler_overrides(named_model, sampler, guidance, searched, teleport is not None)
    noise = initial_noise(named_model.sample_shape, image_seeds(seed, num_images), named_model.dtype)
    batches = range(0, num_images, batch_size)
    bar = tqdm(desc=sampler, total=steps * len(batches), unit="step", disable=not progress)
    out = []
    for start in batches:
        sched = make_scheduler(sampler, {**named_model.scheduler_config, **overrides})
        x = noise[start:start + batch_size].to(device)
        n = len(x)
        labels = None if label is None else torch.full((n,), label, dtype=torch.long, device=device)
        gen = torch.Generator().manual_seed(seed + start)  # the step noise of stochastic samplers

        def model(x_t, t, labels=labels):
            return named_model.predict(x_t, t, labels, guidance)

        grid = {}
        if teleport is not None:
            x, sigmas = teleport.start(sched, x, steps, labels, guidance)
            grid = {"sigmas": sigmas}
        for x_next in trajectory(sched, model, x, None if grid else steps, generator=gen, **grid):
            x = x_next
            bar.update()
        out.append(((x.float().clamp(-1, 1) + 1) / 2).cpu())
    bar.close()
    return torch.cat(out)


def image_seeds(seed: int, num_images: int) -> list[int]:
    """The seed of each image of a run with ``seed``: ``seed + i`` (``--seed`` of a one-image run reproduces it)."""
    return [seed + i for i in range(num_images)]


def initial_noise(shape: tuple[int, ...], seeds: list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise [len(seeds), *shape], one generator per image."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(s), dtype=dtype)
                      for s in seeds])


def save_grid(images: torch.Tensor, path: str, title: str = "", scale: int | None = None) -> Image.Image:
    """Save [N, C, H, W] images in [0, 1] as a near-square PNG grid with a caption line."""
    from diffusers.utils import make_image_grid

    n, c, h, w = images.shape
    scale = scale or max(1, 64 // max(h, w))
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    pil = [ImageOps.expand(Image.fromarray(a[..., 0] if c == 1 else a).convert("RGB")
                           .resize((w * scale, h * scale), Image.NEAREST), border=2, fill="white") for a in arr]
    cols = int(n**0.5 + 0.999)
    rows = (n + cols - 1) // cols
    pil += [Image.new("RGB", pil[0].size)] * (rows * cols - n)
    grid = make_image_grid(pil, rows, cols)
    if title:
        canvas = Image.new("RGB", (grid.width, grid.height + 14), "white")
        canvas.paste(grid, (0, 14))
        ImageDraw.Draw(canvas).text((2, 1), title, fill="black")
        grid = canvas
    grid.save(path)
    return grid


def pipeline_images(pipe, sampler: str, steps: int, num_images: int, prompt: str | None = None, guidance: float = 1.0,
                    seed: int = 0, progress: bool = True, batch_size: int | None = None) -> torch.Tensor:
    """Images in [0, 1] from any diffusers pipeline with the sampler swapped in (only the arguments its
    ``__call__`` accepts are passed: prompt, guidance_scale, batch size); image i uses a generator of seed
    ``seed + i``, in batches of ``batch_size`` (default: all at once)."""
    import inspect

    pipe.scheduler = make_scheduler(sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=not progress)
    accepted = inspect.signature(pipe.__call__).parameters
    seeds = image_seeds(seed, num_images)
    batch_size = batch_size or num_images
    out = []
    for start in range(0, num_images, batch_size):
        n = len(seeds[start:start + batch_size])
        kwargs = {"num_inference_steps": steps, "output_type": "pt",
                  "generator": [torch.Generator().manual_seed(s) for s in seeds[start:start + n]]}
        if "prompt" in accepted and prompt is not None:
            kwargs["prompt"] = [prompt] * n
        elif "batch_size" in accepted:
            kwargs["batch_size"] = n
        elif "num_images_per_prompt" in accepted:
            kwargs["num_images_per_prompt"] = n
        if "guidance_scale" in accepted:
            kwargs["guidance_scale"] = guidance
        images = torch.as_tensor(pipe(**kwargs).images)
        if images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
            images = images.permute(0, 3, 1, 2)
        out.append(images.float().clamp(0, 1).cpu())
    return torch.cat(out)


def save_images(images: torch.Tensor, out_dir: str | Path, names: list[str]) -> list[Path]:
    """Save [N, C, H, W] images in [0, 1] as one PNG each, ``out_dir/<name>.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    paths = []
    for a, name in zip(arr, names, strict=True):
        path = out_dir / f"{name}.png"
        Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(path)
        paths.append(path)
    return paths
