"""Train the shipped models (``builtin:digits``, ``builtin:fashion``) reproducibly from a seed and a config.

    python scripts/train_builtin.py --model digits --what all
    python scripts/train_builtin.py --model fashion --what unet --resume   # continue after an interruption

Stages (``--what``): ``classifier`` (the small CNN used for FID features and as a reward), ``unet`` (the
class-conditional diffusion UNet: AdamW with linear warm-up and cosine decay, EMA, class dropout to the null
label), ``stats`` (FID reference statistics of the held-out set), ``card`` (measures FID and guided accuracy and
writes MODEL_CARD.md), or ``all`` (in that order). Checkpoints (safetensors) are written to ``--work-dir`` every
``--checkpoint-every`` steps; ``--resume`` continues from the latest one. Every random draw of step ``k`` comes from
a generator seeded with ``(seed, k)``, so an interrupted and resumed run gives the same weights as a straight one.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: no collapse on a shared CPU

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffalign.eval.fid import FID, Features  # noqa: E402
from diffalign.models.builtin import (  # noqa: E402
    BUILTIN_MODELS,
    ClassifierFeatures,
    GuidedUNet,
    SmallClassifier,
    builtin_spec,
    load_builtin_classifier,
    load_builtin_data,
    load_builtin_unet,
    load_fid_stats,
    translate,
    weights_dir,
)
from diffalign.samplers import make_scheduler  # noqa: E402
from diffalign.samplers import sample as run_sampler  # noqa: E402


def _gen(seed: int, *keys: int) -> torch.Generator:
    s = seed
    for k in keys:
        s = (s * 1_000_003 + k) % (2**63 - 1)
    return torch.Generator().manual_seed(s)


def _save_atomic(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    os.chmod(path, 0o644)


def _write_json(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _subset(x, y, n: int | None):
    return (x, y) if not n else (x[:n], y[:n])


def _augment(x: torch.Tensor, gen: torch.Generator, shift: int) -> torch.Tensor:
    """Random translation by up to ``shift`` pixels, filling with the background value (-1)."""
    if shift <= 0:
        return x
    dx = torch.randint(0, 2 * shift + 1, (len(x),), generator=gen)
    dy = torch.randint(0, 2 * shift + 1, (len(x),), generator=gen)
    return translate(x, dy, dx, shift)


def lr_at(step: int, total: int, warmup: int, base: float, final_frac: float = 0.05) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``final_frac * base`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def ema_decay_at(step: int, target: float) -> float:
    """Running mean until the EMA window ``1 / (1 - target)`` is reached, then ``target``.

    Choose ``target`` so that the window is a small fraction of the run (the early iterates must decay away).

    (Rules such as ``min(target, (1 + s) / (10 + s))`` never reach ``target`` on short runs, so every short run
    would average with the same, too-short window.)
    """
    return min(target, 1.0 - 1.0 / (step + 1))


# --------------------------------------------------------------------------------------------------------
# Classifier
# --------------------------------------------------------------------------------------------------------


def train_classifier(args, spec, out: Path) -> dict:
    torch.manual_seed(args.seed)
    x, y = _subset(*load_builtin_data(spec.name, "train"), args.subset)
    xt, yt = load_builtin_data(spec.name, "test")
    model = SmallClassifier(**spec.classifier_config).to(args.device)
    epochs = args.classifier_epochs or spec.train_defaults["classifier_epochs"]
    bs = 128
    steps_per_epoch = max(1, math.ceil(len(x) / bs))
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
    shift = 1 if spec.image_size <= 8 else 2
    t0 = time.time()
    bar = tqdm(total=total, desc=f"classifier[{spec.name}]", mininterval=5)
    step = 0
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=_gen(args.seed, 7, epoch))
        for i in range(steps_per_epoch):
            idx = perm[i * bs:(i + 1) * bs]
            xb = _augment(x[idx], _gen(args.seed, 8, step), shift).to(args.device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, min(100, total // 10), 2e-3)
            loss = F.cross_entropy(model(xb), y[idx].to(args.device), label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch)
    bar.close()
    model.eval()
    acc = classify_accuracy(model, xt, yt, args.device)
    out.mkdir(parents=True, exist_ok=True)
    _save_atomic(model.state_dict(), out / "classifier.safetensors")
    _write_json(spec.classifier_config, out / "classifier_config.json")
    info = {"epochs": epochs, "batch_size": bs, "lr": 2e-3, "test_accuracy": acc, "train_images": len(x),
            "params": sum(p.numel() for p in model.parameters()), "seconds": round(time.time() - t0, 1),
            "augmentation": f"random translation up to {shift} px"}
    _update_training_json(out, {"classifier": info})
    print(f"classifier: held-out accuracy {acc:.4f} ({info['seconds']} s)")
    return info


@torch.no_grad()
def classify_accuracy(model, x, y, device, bs: int = 500) -> float:
    correct = 0
    for i in range(0, len(x), bs):
        correct += (model(x[i:i + bs].to(device)).argmax(1).cpu() == y[i:i + bs]).sum().item()
    return correct / len(x)


# --------------------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------------------


def _opt_state_tensors(opt) -> dict[str, torch.Tensor]:
    out = {}
    for i, p in enumerate(opt.param_groups[0]["params"]):
        st = opt.state.get(p)
        if st:
            out[f"opt.{i}.exp_avg"] = st["exp_avg"]
            out[f"opt.{i}.exp_avg_sq"] = st["exp_avg_sq"]
            out[f"opt.{i}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    return out


def _load_opt_state(opt, tensors: dict[str, torch.Tensor]) -> None:
    for i, p in enumerate(opt.param_groups[0]["params"]):
        if f"opt.{i}.exp_avg" in tensors:
            opt.state[p] = {"exp_avg": tensors[f"opt.{i}.exp_avg"].to(p.device),
                            "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"].to(p.device),
                            "step": tensors[f"opt.{i}.step"].reshape(()).clone()}


def train_unet(args, spec, out: Path, work: Path) -> dict:
    from diffusers import DDPMScheduler, UNet2DModel

    d = spec.train_defaults
    steps = args.steps or d["steps"]
    bs = args.batch_size or d["batch_size"]
    base_lr = args.lr or d["lr"]
    warmup = min(d["warmup"], max(1, steps // 10))
    ema_target = args.ema_decay or d["ema_decay"]
    p_drop = d["class_dropout"]
    gamma = d["min_snr_gamma"]
    every = args.checkpoint_every or d["checkpoint_every"]
    stop = min(args.stop_at or steps, steps)

    x, y = _subset(*load_builtin_data(spec.name, "train"), args.subset)
    torch.manual_seed(args.seed)
    unet = UNet2DModel(**spec.unet_config).to(args.device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=base_lr, weight_decay=0.0, betas=(0.9, 0.99))
    noise = DDPMScheduler(**spec.noise_schedule)
    abar = noise.alphas_cumprod.to(args.device)
    nparams = sum(p.numel() for p in unet.parameters())

    work.mkdir(parents=True, exist_ok=True)
    ckpt, ckpt_json = work / "unet_checkpoint.safetensors", work / "unet_checkpoint.json"
    start, losses, elapsed = 0, [], 0.0
    schedule = [{"from_step": 0, "steps": steps}]  # cosine schedules used, in order (see --allow-schedule-change)
    config = {"batch_size": bs, "lr": base_lr, "seed": args.seed, "subset": args.subset, "unet": spec.unet_config}
    if args.resume and ckpt.is_file():
        meta = json.loads(ckpt_json.read_text())
        old = dict(meta["config"])
        old_steps = old.pop("steps")
        if old != config:
            raise SystemExit(f"checkpoint {ckpt} was made with another config: {meta['config']}")
        schedule = meta.get("schedule", [{"from_step": 0, "steps": old_steps}])
        if old_steps != steps:
            if not args.allow_schedule_change:
                raise SystemExit(f"checkpoint {ckpt} follows a {old_steps}-step schedule; pass --steps {old_steps} "
                                 "(or --allow-schedule-change to continue under a new cosine length)")
            schedule = [*schedule, {"from_step": meta["step"], "steps": steps}]
        tensors = load_file(str(ckpt))
        unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        _load_opt_state(opt, tensors)
        start, losses, elapsed = meta["step"], meta["losses"], meta["seconds"]
        print(f"resumed from {ckpt} at step {start}")
    elif args.resume:
        print(f"no checkpoint in {work}; starting from scratch")

    def checkpoint(step: int) -> None:
        tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
        tensors.update(_opt_state_tensors(opt))
        _save_atomic(tensors, ckpt)
        _write_json({"step": step, "losses": losses, "seconds": elapsed, "schedule": schedule,
                     "config": {"steps": steps, **config}}, ckpt_json)

    print(f"unet[{spec.name}]: {nparams / 1e6:.2f} M parameters, {len(x)} images, steps {steps}, batch {bs}, "
          f"lr {base_lr}, EMA {ema_target}, class dropout {p_drop}, seed {args.seed}", flush=True)
    unet.train()
    bar = tqdm(range(start, stop), initial=start, total=stop, desc=f"unet[{spec.name}]", mininterval=10)
    t_last = time.time()
    for step in bar:
        g = _gen(args.seed, 1, step)
        idx = torch.randint(0, len(x), (bs,), generator=g)
        x0 = x[idx].to(args.device)
        labels = y[idx].clone()
        labels[torch.rand(bs, generator=g) < p_drop] = spec.null_label
        t = torch.randint(0, noise.config.num_train_timesteps, (bs,), generator=g)
        eps = torch.randn(x0.shape, generator=g).to(args.device)
        a = abar[t.to(args.device)].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, warmup, base_lr)
        pred = unet(xt, t.to(args.device), class_labels=labels.to(args.device)).sample
        snr = a / (1 - a)  # Min-SNR-gamma weighting (Hang et al. 2023) for epsilon prediction
        w = snr.clamp(max=gamma) / snr
        loss = (w * (pred - eps).pow(2)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = ema_decay_at(step, ema_target)
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        losses.append(round(loss.item(), 5))
        now = time.time()
        elapsed += now - t_last
        t_last = now
        if step % 50 == 0 or step == stop - 1:
            avg = sum(losses[-200:]) / len(losses[-200:])
            bar.set_postfix(loss=f"{avg:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
            if step % 500 == 0:
                print(f"step {step} loss(avg200) {avg:.4f} {elapsed / (step + 1 - start or 1):.3f} s/step", flush=True)
        if (step + 1) % every == 0 or step == stop - 1:
            checkpoint(step + 1)
    bar.close()

    out.mkdir(parents=True, exist_ok=True)
    storage = torch.float16 if args.fp16 else torch.float32
    _save_atomic({k: v.to(storage) for k, v in ema.state_dict().items()}, out / "unet.safetensors",
                 metadata={"format": "pt", "storage_dtype": str(storage)})
    _write_json(dict(ema.config), out / "unet_config.json")
    _write_json(dict(spec.noise_schedule), out / "scheduler_config.json")
    tail = losses[-500:] or [float("nan")]
    done = max(start, stop)
    if done < steps:
        print(f"stopped at step {done} of the {steps}-step schedule (--stop-at)")
    info = {"steps": steps, "stopped_at": done, "schedule_history": schedule, "batch_size": bs, "lr": base_lr,
            "warmup": warmup, "schedule": "warm-up + cosine",
            "optimizer": "AdamW(betas=(0.9, 0.99), wd=0)", "ema_decay": ema_target, "class_dropout": p_drop,
            "loss": f"Min-SNR-{gamma} weighted epsilon MSE",
            "seed": args.seed, "params": nparams, "train_images": len(x), "final_loss": sum(tail) / len(tail),
            "seconds": round(elapsed, 1), "storage_dtype": str(storage).replace("torch.", ""),
            "grad_clip": 1.0, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine()}
    _update_training_json(out, {"unet": info})
    print(f"unet: done, final loss {info['final_loss']:.4f}, {info['seconds']} s")
    return info


# --------------------------------------------------------------------------------------------------------
# FID statistics and evaluation
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _features(classifier, x: torch.Tensor, device, bs: int = 500) -> torch.Tensor:
    feats = ClassifierFeatures(classifier).to(device)
    return torch.cat([feats(((x[i:i + bs] + 1) / 2).to(device)).cpu() for i in range(0, len(x), bs)])


def compute_stats(args, spec, out: Path) -> dict:
    classifier = load_builtin_classifier(spec.name, out)
    xt, _ = load_builtin_data(spec.name, "test")
    f = _features(classifier, xt, args.device)
    mu, sigma = f.mean(0), torch.cov(f.T)
    _save_atomic({"mu": mu, "sigma": sigma, "num_samples": torch.tensor([len(f)], dtype=torch.int64)},
                 out / "fid_stats.safetensors")
    _update_training_json(out, {"stats": {"num_samples": len(f), "features": f.shape[1]}})
    print(f"stats: {len(f)} held-out images, {f.shape[1]} features")
    return {"num_samples": len(f)}


def _fid(classifier, stats, images01: torch.Tensor, device) -> float:
    fid = FID(Features(ClassifierFeatures(classifier), classifier.num_features), device=device)
    fid.set_reference_stats(stats["mu"], stats["sigma"], int(stats["num_samples"].item()))
    for i in range(0, len(images01), 500):
        fid.add(images01[i:i + 500])
    return fid.compute()


@torch.no_grad()
def generate(model: GuidedUNet, spec, labels: torch.Tensor, guidance: float, steps: int, seed: int, device,
             bs: int = 250, desc: str = "sampling") -> torch.Tensor:
    """Images in [0, 1] from DPM-Solver++(2M) (diffalign) with classifier-free guidance ``guidance``."""
    sched = make_scheduler("dpm-solver++", spec.noise_schedule)
    out = []
    for i in tqdm(range(0, len(labels), bs), desc=desc, mininterval=5):
        lab = labels[i:i + bs].to(device)
        x_T = torch.randn((len(lab), *spec.sample_shape), generator=_gen(seed, 3, i)).to(device)
        if guidance == 1.0:
            fn = lambda x, t, lab=lab: model(x, t, lab)  # noqa: E731
        else:
            fn = lambda x, t, lab=lab: model.guided(x, t, lab, guidance)  # noqa: E731
        out.append(((run_sampler(sched, fn, x_T, steps).clamp(-1, 1) + 1) / 2).cpu())
    return torch.cat(out)


def evaluate(args, spec, out: Path) -> dict:
    """FID (classifier features) of ``--eval-samples`` samples vs the held-out set, the real-vs-real floor, and the
    classifier accuracy of guided samples."""
    classifier = load_builtin_classifier(spec.name, out).to(args.device)
    stats = load_fid_stats(spec.name, out)
    unet = load_builtin_unet(spec.name, out).to(args.device)
    model = GuidedUNet(unet, spec.null_label).eval()
    n = args.eval_samples
    k = spec.num_classes
    labels = torch.arange(n) % k
    t0 = time.time()
    samples = generate(model, spec, labels, 1.0, 20, args.seed, args.device, desc="FID samples (g=1)")
    fid = _fid(classifier, stats, samples, args.device)
    t_fid = time.time() - t0
    xr, _ = load_builtin_data(spec.name, "train")
    pick = torch.randperm(len(xr), generator=_gen(args.seed, 5))[:n]
    floor = _fid(classifier, stats, (xr[pick] + 1) / 2, args.device)
    acc1 = classify_accuracy(classifier, samples * 2 - 1, labels, args.device)
    n_guided = args.eval_guided or max(k, n // 2)
    g_labels = torch.arange(n_guided) % k
    guided = generate(model, spec, g_labels, 4.0, 20, args.seed + 1, args.device, desc="guided samples (g=4)")
    acc4 = classify_accuracy(classifier, guided * 2 - 1, g_labels, args.device)
    res = {"fid": fid, "fid_floor": floor, "fid_samples": n, "sampler": "dpm-solver++ (2M), 20 steps",
           "fid_guidance": 1.0, "accuracy_g1": acc1, "accuracy_g4": acc4, "guided_samples": n_guided,
           "eval_seconds": round(time.time() - t0, 1), "fid_sampling_seconds": round(t_fid, 1)}
    _update_training_json(out, {"eval": res})
    print(f"eval: FID {fid:.3f} (floor {floor:.3f}), accuracy g=1 {acc1:.3f}, g=4 {acc4:.3f}")
    return res


# --------------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------------


def _update_training_json(out: Path, update: dict) -> None:
    path = out / "training.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    if "eval" not in update:
        data.pop("eval", None)  # new weights or statistics: the stored evaluation is stale
    data.update(update)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(data, path)


DATA_TEXT = {
    "digits": "scikit-learn's bundled 8x8 digits (the UCI optdigits test set, 1,797 images, grey levels 0..16 mapped "
              "linearly to [-1, 1]); a fixed seeded permutation (seed 0) holds out 500 images, the other 1,297 train.",
    "fashion": "Fashion-MNIST (Zalando, MIT licence) from the Debian package `dataset-fashion-mnist`: the official "
               "60,000 training / 10,000 test images, 28x28 padded to 32x32 with the background value, scaled to "
               "[-1, 1]. The 10,000 test images are the held-out set.",
}


def write_card(args, spec, out: Path) -> str:
    info = json.loads((out / "training.json").read_text()) if (out / "training.json").is_file() else {}
    if "eval" not in info:  # (training or new stats drop a stored evaluation)
        info["eval"] = evaluate(args, spec, out)
    u, c, e = info.get("unet", {}), info.get("classifier", {}), info["eval"]
    sizes = {p.name: p.stat().st_size for p in sorted(out.glob("*.safetensors"))}
    uc = spec.unet_config
    ratio = e["fid"] / e["fid_floor"] if e["fid_floor"] > 0 else float("nan")
    attention = "mid-block attention" if uc["add_attention"] else "no attention"
    stopped = u.get("stopped_at", u.get("steps"))
    stop_flag = f" --stop-at {stopped}" if stopped != u.get("steps") else ""
    trained = (f"{u.get('steps')} steps" if not stop_flag else
               f"stopped at step {stopped} of a {u.get('steps')}-step schedule (CPU time budget)")
    history = u.get("schedule_history") or [{"from_step": 0, "steps": u.get("steps")}]
    reproduce = ""
    if len(history) > 1:  # the cosine length was changed on resume (CPU time budget): say so, and how to redo it
        segments = [f"steps {h['from_step']}-{nxt['from_step']} under a {h['steps']}-step cosine schedule"
                    for h, nxt in zip(history, history[1:], strict=False)]
        segments.append(f"steps {history[-1]['from_step']}-{stopped} under a {history[-1]['steps']}-step schedule")
        trained = f"{stopped} steps ({'; '.join(segments)}; the cosine length was changed on resume to fit CPU time)"
        cmds = [f"    python scripts/train_builtin.py --model {spec.name} --what unet --seed {u.get('seed')} "
                f"--steps {h['steps']} --stop-at {nxt['from_step']} --resume --allow-schedule-change"
                for h, nxt in zip(history, history[1:], strict=False)]
        cmds.append(f"    python scripts/train_builtin.py --model {spec.name} --what unet --seed {u.get('seed')} "
                    f"--steps {history[-1]['steps']}{stop_flag} --resume --allow-schedule-change")
        reproduce = ("\nThe UNet stage ran as these consecutive commands (the classifier, stats and card stages as "
                     "`--what classifier`, `--what stats`, `--what card`):\n\n" + "\n".join(cmds) + "\n")
    unet_mb = sizes.get("unet.safetensors", 0) / 1e6
    n, fid, ng = e["fid_samples"], e["fid"], e["guided_samples"]
    card = f"""# builtin:{spec.name}

{spec.description}.

Generated by `scripts/train_builtin.py`; reproduce with

    python scripts/train_builtin.py --model {spec.name} --what all --seed {u.get('seed', args.seed)} \\
        --steps {u.get('steps', '?')} --batch-size {u.get('batch_size', '?')} --lr {u.get('lr', '?')}{stop_flag}
{reproduce}
## Data
{DATA_TEXT[spec.name]}
Classes (label index = position; the null class for classifier-free guidance is index {spec.null_label}):
{', '.join(f'{i}: {n}' for i, n in enumerate(spec.class_names))}.

## Diffusion model
- diffusers `UNet2DModel`, {u.get('params', 0) / 1e6:.2f} M parameters: channels {tuple(uc['block_out_channels'])},
  {uc['layers_per_block']} ResNet layer(s) per block, {attention},
  GroupNorm({uc['norm_num_groups']}), class embedding of {uc['num_class_embeds']} entries ({spec.num_classes} classes
  + null).
- Epsilon prediction; noise schedule {json.dumps(spec.noise_schedule)}.
  Linear betas rather than cosine (`squaredcos_cap_v2`): with cosine betas `alphas_cumprod[999]` is ~2.4e-9, so the
  first data-prediction step of DPM-Solver(++) divides the model error by ~5e-5 and every image saturates unless x0
  is clipped. The linear schedule ends at `alphas_cumprod[999]` ~ 4.0e-5 (alpha_T ~ 6.4e-3), which keeps the first
  step bounded with no thresholding, is the schedule of the `reference:digits` closed-form model (so samplers are
  compared on the same ODE), and is DDPM's well-tested choice for 32x32 pixel models.
- Training: {trained}, batch {u.get('batch_size')}, {u.get('optimizer')}, peak lr {u.get('lr')},
  {u.get('warmup')} warm-up steps then cosine decay to 5 %, gradient clipping {u.get('grad_clip')},
  {u.get('loss')}, class dropout to the null label {u.get('class_dropout')}, EMA decay {u.get('ema_decay')}
  (running mean until the window is reached), seed {u.get('seed')}, fp32, {u.get('threads')} CPU threads,
  {u.get('seconds')} s wall time (torch {u.get('torch')}, on a shared CPU).
  Final training loss (mean of the last 500 steps): {u.get('final_loss', float('nan')):.4f}.
- Stored weights: the EMA weights, as {u.get('storage_dtype', '?')} (`unet.safetensors`, {unet_mb:.2f} MB);
  loaded into float32.

## Classifier (FID features and prompt-following reward)
- `SmallClassifier` (BatchNorm CNN), {c.get('params', 0) / 1e3:.0f} k parameters, features of dimension
  {spec.classifier_config['feature_dim']}; trained {c.get('epochs')} epochs (AdamW, lr {c.get('lr')}, label smoothing
  0.05, {c.get('augmentation')}) on the training split.
- Accuracy on the held-out set: **{c.get('test_accuracy', float('nan')):.4f}**.
- `fid_stats.safetensors`: float64 mean and covariance of its features over the held-out set.

## Measured quality (these weights, as stored)
| metric | value |
|---|---|
| FID (classifier features), {n} samples, {e['sampler']}, guidance 1, classes balanced, vs held-out | **{fid:.3f}** |
| FID floor: {e['fid_samples']} real training images vs held-out | {e['fid_floor']:.3f} |
| ratio FID / floor | {ratio:.2f} |
| classifier accuracy on guidance-1 samples (prompted class) | {e['accuracy_g1']:.3f} |
| classifier accuracy on guidance-4 samples (prompted class, {ng} images) | **{e['accuracy_g4']:.3f}** |

FID here uses the shipped classifier's features, not Inception: it is comparable only between models of this card's
data set, never with published FID numbers. The floor is itself a {n}-sample estimate, so values of the order of the
floor (or slightly below it) are within sampling noise. Chance accuracy is {1 / spec.num_classes:.2f}.

## Files
{chr(10).join(f'- `{k}` ({v / 1e3:.0f} kB)' for k, v in sizes.items())}
- `unet_config.json`, `scheduler_config.json`, `classifier_config.json`, `training.json` (all numbers above)
"""
    (out / "MODEL_CARD.md").write_text(card)
    print(f"wrote {out / 'MODEL_CARD.md'}")
    return card


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(BUILTIN_MODELS), required=True)
    p.add_argument("--what", choices=["classifier", "unet", "stats", "card", "all"], default="all")
    p.add_argument("--steps", type=int, default=None, help="UNet training steps (default: per model)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--ema-decay", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="weights directory (default: the package's weights/<model>/)")
    p.add_argument("--work-dir", default=None, help="checkpoints (default: out/train_builtin/<model>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --work-dir")
    p.add_argument("--allow-schedule-change", action="store_true",
                   help="with --resume: continue a checkpoint under a different --steps (cosine length); recorded")
    p.add_argument("--stop-at", type=int, default=None,
                   help="end UNet training at this step of the --steps schedule (export the EMA weights there)")
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--classifier-epochs", type=int, default=None)
    p.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True,
                   help="store the UNet weights as float16 (default) or float32")
    p.add_argument("--eval-samples", type=int, default=1000, help="samples for FID (and the real floor)")
    p.add_argument("--eval-guided", type=int, default=None, help="guided samples for accuracy (default: half)")
    p.add_argument("--subset", type=int, default=None, help="train on the first N training images only (tests)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = builtin_spec(args.model)
    out = Path(args.out) if args.out else weights_dir(spec.name)
    work = Path(args.work_dir) if args.work_dir else Path("out") / "train_builtin" / spec.name
    t0 = time.time()
    if args.what in ("classifier", "all"):
        train_classifier(args, spec, out)
    if args.what in ("unet", "all"):
        train_unet(args, spec, out, work)
    if args.what in ("stats", "all"):
        compute_stats(args, spec, out)
    if args.what in ("card", "all"):
        write_card(args, spec, out)
    print(f"total {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
