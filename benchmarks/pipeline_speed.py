"""Sampling speed of each sampler in a real-size Stable Diffusion pipeline, and its agreement with diffusers' own
scheduler for the same method, in each precision.

    python benchmarks/pipeline_speed.py --model sd15-sized --device cuda --dtypes fp32,bf16 \\
        --json benchmarks/results/pipeline_speed_h200.json

``sd15-sized`` is :func:`diffalign.models.tiny_sd.sd15_sized_pipeline`: Stable Diffusion 1.5's UNet and VAE with
random weights, so no download is needed; ``tiny-sd`` is the tiny pipeline (for a CPU run of the script), and any
other value is loaded with ``diffalign.load_pipeline``. Each call samples ``--batch`` 512 x 512 latents with
classifier-free guidance and stops before the VAE (``output_type="latent"``), so the time is the UNet's plus the
scheduler's. "agrees" is the largest difference of the final latents from the twin's (same prompts, noise, steps,
precision), in units of the twin's standard deviation; "vs fp32" is the same measure against the sampler's own
float32 latents, the scale of the lower precision's rounding.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from diffalign.samplers import make_scheduler

# ours=twin: the same method in diffusers, or ours alone
DEFAULT = ("ddim=diffusers:DDIMScheduler,dpm-solver++=diffusers:DPMSolverMultistepScheduler,"
           "unipc=diffusers:UniPCMultistepScheduler,pndm,dpm-solver,dc-solver,"
           "dualfast:ddim")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROMPTS = ["a photo of a cat", "a red dress", "a blue sneaker", "a painting of a dog"]


def build(model: str):
    from diffalign.models.tiny_sd import RANDOM_PIPELINES

    if model in RANDOM_PIPELINES:
        return RANDOM_PIPELINES[model](seed=0)
    import diffalign

    return diffalign.load_pipeline(model)


def run(pipe, name: str, config, steps: int, batch: int, guidance: float, device: str) -> torch.Tensor:
    pipe.scheduler = make_scheduler(name, config)
    prompts = (PROMPTS * batch)[:batch]
    with torch.inference_mode():
        return pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                    generator=torch.Generator(device).manual_seed(0)).images.float()


def gap(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference, in units of ``ref``'s standard deviation."""
    return float((x - ref).abs().max() / ref.std())


def fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.2e}"


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd15-sized")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, of {', '.join(DTYPES)}")
    p.add_argument("--samplers", default=DEFAULT, help="comma-separated `ours` or `ours=diffusers twin`")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    pipe = build(args.model)
    pipe.set_progress_bar_config(disable=True)
    config = dict(pipe.scheduler.config)
    twin_of = dict(tuple(s.split("=", 1)) if "=" in s else (s, None) for s in args.samplers.split(","))
    names = list(dict.fromkeys(n for pair in twin_of.items() for n in pair if n))
    records, fp32 = [], {}
    for dname in args.dtypes.split(","):
        pipe.to(args.device, DTYPES[dname])
        print(f"\n{args.model}, {dname}, batch {args.batch}, {args.steps} steps, guidance {args.guidance}, "
              f"{args.device}")
        print(f"{'sampler':<40}{'s/call':>9}{'ms/step':>9}{'agrees':>12}{'vs fp32':>12}  finite")
        latents, seconds = {}, {}
        for name in names:
            def call(n=name, out=latents):
                out[n] = run(pipe, n, config, args.steps, args.batch, args.guidance, args.device)
            seconds[name] = timed(call, args.device, args.repeats)
        for name in names:
            x, other = latents[name], twin_of.get(name)
            agree = None if other is None else gap(x, latents[other])
            rounding = gap(x, fp32[name]) if name in fp32 and dname != "fp32" else None
            rec = {"dtype": dname, "sampler": name, "twin": other, "s_per_call": seconds[name],
                   "ms_per_step": 1e3 * seconds[name] / args.steps, "agreement": agree,
                   "vs_fp32": rounding, "finite": bool(torch.isfinite(x).all())}
            records.append(rec)
            print(f"{name:<40}{rec['s_per_call']:>9.3f}{rec['ms_per_step']:>9.1f}"
                  f"{fmt(agree):>12}{fmt(rounding):>12}  {rec['finite']}")
        if dname == "fp32":
            fp32 = latents
    if args.json:
        meta = {k: getattr(args, k) for k in ("model", "device", "steps", "batch", "guidance", "repeats")}
        if args.device.startswith("cuda"):
            meta["gpu"] = torch.cuda.get_device_name()
        meta["torch"] = torch.__version__
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**meta, "records": records}, indent=1))


if __name__ == "__main__":
    main()
