"""Sample images from a named model with any registered sampler, and save them as a labelled grid."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageOps

from .samplers import make_scheduler, trajectory


def sample_images(named_model, sampler: str, steps: int, num_images: int, label: int | None = None,
                  guidance: float = 1.0, seed: int = 0, device: str = "cpu", progress: bool = True) -> torch.Tensor:
    """Images in [0, 1], shape [N, C, H, W]; class-conditional (and guided) when ``label`` is given."""
    from tqdm.auto import tqdm

    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}.")
    from .eval.sampler_bench import sampler_overrides

    overrides = sampler_overrides(named_model, sampler, guidance)
    sched = make_scheduler(sampler, {**named_model.scheduler_config, **overrides})
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((num_images, *named_model.sample_shape), generator=gen, dtype=named_model.dtype).to(device)
    labels = None if label is None else torch.full((num_images,), label, dtype=torch.long, device=device)
    def model(x_t, t):
        return named_model.predict(x_t, t, labels, guidance)

    for x_next in tqdm(trajectory(sched, model, x, steps, generator=gen), desc=sampler, total=steps, unit="step",
                       disable=not progress):
        x = x_next
    return ((x.float().clamp(-1, 1) + 1) / 2).cpu()


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
                    seed: int = 0, progress: bool = True) -> torch.Tensor:
    """Images in [0, 1] from any diffusers pipeline with the sampler swapped in (only the arguments its
    ``__call__`` accepts are passed: prompt, guidance_scale, batch size)."""
    import inspect

    pipe.scheduler = make_scheduler(sampler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=not progress)
    accepted = inspect.signature(pipe.__call__).parameters
    kwargs = {"num_inference_steps": steps, "generator": torch.Generator().manual_seed(seed), "output_type": "pt"}
    if "prompt" in accepted and prompt is not None:
        kwargs["prompt"] = [prompt] * num_images
    elif "batch_size" in accepted:
        kwargs["batch_size"] = num_images
    elif "num_images_per_prompt" in accepted:
        kwargs["num_images_per_prompt"] = num_images
    if "guidance_scale" in accepted:
        kwargs["guidance_scale"] = guidance
    images = pipe(**kwargs).images
    images = torch.as_tensor(images)
    if images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.permute(0, 3, 1, 2)
    return images.float().clamp(0, 1).cpu()
