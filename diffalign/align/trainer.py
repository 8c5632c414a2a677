"""One accelerate training loop for every alignment method.

It owns what methods share: the policy and its optimizer, gradient accumulation (and several processes through
``accelerate launch``), seeding, the progress bar, ``metrics.jsonl``, optional tensorboard, checkpoints and resume,
and the output directory (final weights, resolved config, reward-curve PNG). Every process runs every collective
call (gather, barrier); only the writing of files is left to the main process.

A method that alternates updates of several parameter sets (Distillation-DPO: fake-score networks, then the
generator) declares ``phases`` (its last phase is the main one, logged as ``loss``), ``phase_parameters(phase)``
and ``phase_lr(phase)``; each phase gets its own optimizer and learning-rate schedule, and its loss is
``loss(batch, chunk, phase)``. Weights outside the policy's LoRA / UNet are saved through the method's
``state_dict`` / ``load_state_dict``.

With ``ema_decay > 0`` the main phase's weights are also averaged (diffusers' ``EMAModel``): each checkpoint keeps
the raw weights (``weights.safetensors``, what resume continues from) and the average (``ema.safetensors``, what
:func:`~diffalign.align.policy.load_aligned_pipeline` loads), and the output directory holds the average.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import warnings
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin
from safetensors.torch import load_file, save_file

from .config import TrainConfig, config_yaml, save_config
from .methods import get_method
from .policy import ALIGNMENT_FILE, EMA_FILE, LORA_WEIGHTS, Policy

RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", ALIGNMENT_FILE, LORA_WEIGHTS)
"""Files whose presence marks a directory as holding a run."""
WRITTEN_FILES = (*RUN_FILES, "reward_curve.png", "diffalign")
"""Everything a run writes (``diffalign``: its tensorboard logs; a full fine-tune's ``unet`` goes too when the
directory's ``alignment.json`` says it wrote one)."""
CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
SIGNATURE_DEFAULTS = {"ema_decay": 0.0}
"""What a checkpoint written before a signature key existed holds for it."""


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns: the output directory and the trained policy (this process's copy, holding the
    weights that were saved: the average when ``ema_decay > 0``)."""

    out_dir: Path
    policy: Policy

    @property
    def metrics(self) -> list[dict]:
        return read_metrics(self.out_dir / "metrics.jsonl")


def step_seed(seed: int, step: int, process: int) -> int:
    """The seed of every random draw of one optimizer step on one process (so a resumed run draws the same)."""
    return ((seed * 1_000_003 + step) * 8_191 + process) % (2**63)


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every checkpoint of the run in ``out``, in step order."""
    return sorted((int(p.name.split("-")[1]), p) for p in (Path(out) / CHECKPOINTS).glob("step-*"))


def find_checkpoint(out: Path, resume: str) -> Path:
    """``resume="latest"``: the newest complete checkpoint in ``out``; otherwise the checkpoint directory given."""
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint directory (no {STATE_FILE}).")
        return path
    found = [p for _, p in list_checkpoints(out) if (p / STATE_FILE).is_file()]
    if not found:
        raise FileNotFoundError(f"no checkpoint to resume in {out / CHECKPOINTS}; start without --resume.")
    return found[-1]


def run_signature(method: str, cfg: TrainConfig) -> dict:
    """What a checkpoint must share with the run that resumes it."""
    return {"method": method, "model": cfg.model, "full_finetune": cfg.full_finetune,
            "lora": None if cfg.full_finetune else dataclasses.asdict(cfg.lora), "ema_decay": cfg.ema_decay}


RESUME_FREE = frozenset({"max_steps", "max_minutes", "checkpoint_every", "checkpoint_minutes", "keep_checkpoints",
                         "log_every", "tensorboard", "device"})
"""Settings a resume may change without a warning: limits, checkpointing and logging."""


def changed_settings(path: Path, cfg: TrainConfig, method: str) -> list[str]:
    """One ``key was X, now Y`` line per setting of the run's saved ``config.yaml`` that ``cfg`` changes (beyond
    :data:`RESUME_FREE`; keys the file predates are skipped)."""
    import yaml

    then = yaml.safe_load(path.read_text()) or {}
    now = yaml.safe_load(config_yaml(cfg, method))  # the same round trip as the saved file
    return [f"{key} was {then.get(key)!r}, now {value!r}" for key, value in now.items()
            if key not in RESUME_FREE and key in then and then[key] != value]  # a key the file lacks is newer


def make_ema(cfg: TrainConfig, params: list[torch.nn.Parameter]):
    """diffusers' ``EMAModel`` over ``params`` with ``cfg``'s cap and warm-up, or None when averaging is off."""
    if not cfg.ema_decay:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True, power=cfg.ema_power)


def averaged_state_dict(policy: Policy, ema) -> dict[str, torch.Tensor]:
    """The policy's trainable state dict (same names) holding the averaged weights; the raw ones are put back."""
    params = policy.trainable_parameters()
    ema.store(params)
    ema.copy_to(params)
    try:
        return {k: v.clone() for k, v in policy.trainable_state_dict().items()}
    finally:
        ema.restore(params)


def load_average(policy: Policy, ema, state: dict[str, torch.Tensor], info: dict) -> None:
    """Set ``ema``'s average from a state dict written by :func:`averaged_state_dict` (and its scalars ``info``)."""
    params = policy.trainable_parameters()
    ema.store(params)
    try:
        policy.load_trainable_state_dict(state)
        ema.load_state_dict({**info, "shadow_params": [p.detach().clone() for p in params]})
    finally:
        ema.restore(params)


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer, tensors: dict[str, torch.Tensor], info: dict) -> None:
    state: dict[int, dict] = defaultdict(dict)
    for name, value in list(tensors.items()) + list(info["scalars"].items()):
        pid, key = name.split(".", 1)
        state[int(pid)][key] = value
    optimizer.load_state_dict({"state": dict(state), "param_groups": info["param_groups"]})


def apply_settings(optimizer, lr_scheduler, lr: float, cfg: TrainConfig) -> None:
    """Set the optimizer's hyperparameters and the schedule's base learning rate from ``cfg`` (after a resume,
    whose loaded state carries the checkpoint's), keeping the moments and the schedule's position."""
    for group in optimizer.param_groups:
        group.update(betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon,
                     initial_lr=lr)
    lr_scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, lr_scheduler.lr_lambdas, strict=True):
        group["lr"] = lr * factor(lr_scheduler.last_epoch)
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


MAIN = "main"


def _opt_name(phase: str) -> str:
    return "optimizer" if phase == MAIN else f"optimizer_{phase}"


def save_checkpoint(accelerator: Accelerator, out: Path, policy: Policy, optimizers: dict, lr_schedulers: dict,
                    state: dict, keep: int, algo=None, ema=None) -> Path:
    """Write checkpoint ``step-<step>`` atomically (a temporary directory renamed when complete)."""
    root = out / CHECKPOINTS
    final, tmp = root / f"step-{state['step']:06d}", root / f".tmp-step-{state['step']:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_file({"torch": torch.get_rng_state()}, str(tmp / f"rng_{accelerator.process_index}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file(policy.trainable_state_dict(), str(tmp / "weights.safetensors"))
        if hasattr(algo, "state_dict"):
            save_file(algo.state_dict(), str(tmp / "method.safetensors"))
        extra = {}
        if ema is not None:
            save_file(averaged_state_dict(policy, ema), str(tmp / EMA_FILE))
            extra["ema"] = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
        for phase, optimizer in optimizers.items():
            tensors, info = _optimizer_tensors(optimizer)
            save_file(tensors, str(tmp / f"{_opt_name(phase)}.safetensors"))
            extra[_opt_name(phase)] = info
            extra["lr_scheduler" if phase == MAIN else f"lr_scheduler_{phase}"] = lr_schedulers[phase].state_dict()
        if accelerator.scaler is not None:  # fp16: the loss scale and its growth count
            extra["scaler"] = accelerator.scaler.state_dict()
        (tmp / STATE_FILE).write_text(json.dumps({**state, **extra}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, signature: dict, accelerator: Accelerator, policy: Policy, optimizers: dict,
                    lr_schedulers: dict, algo=None, ema=None) -> dict:
    """Restore weights (and their average), optimizer, scheduler and RNG from ``path``; refuse a checkpoint of
    another run."""
    state = json.loads((path / STATE_FILE).read_text())
    theirs = {key: state.get(key, SIGNATURE_DEFAULTS.get(key)) for key in signature}
    if theirs != signature:
        diff = {k: (theirs[k], signature[k]) for k in signature if theirs[k] != signature[k]}
        raise ValueError(f"checkpoint {path} does not fit this run: " + "; ".join(
            f"{k} is {a!r} there but {b!r} here" for k, (a, b) in diff.items())
            + ". Resume with the run's own settings (its config.yaml), or train into a new output directory.")
    policy.load_trainable_state_dict(load_file(str(path / "weights.safetensors")))
    if ema is not None:
        load_average(policy, ema, load_file(str(path / EMA_FILE)), state["ema"])
    if hasattr(algo, "load_state_dict"):
        algo.load_state_dict(load_file(str(path / "method.safetensors")))
    for phase, optimizer in optimizers.items():
        _load_optimizer(optimizer, load_file(str(path / f"{_opt_name(phase)}.safetensors")), state[_opt_name(phase)])
        lr_schedulers[phase].load_state_dict(state["lr_scheduler" if phase == MAIN else f"lr_scheduler_{phase}"])
    if accelerator.scaler is not None and "scaler" in state:
        accelerator.scaler.load_state_dict(state["scaler"])
    rng = path / f"rng_{accelerator.process_index}.safetensors"
    if rng.is_file():
        torch.set_rng_state(load_file(str(rng))["torch"])
    return state


def _prepare_output(out: Path, resume: str | None, overwrite: bool) -> Path | None:
    """The checkpoint to resume (or None); refuses to train into a directory holding another run."""
    holds_run = out.is_dir() and any((out / name).exists() for name in RUN_FILES)
    if resume is not None and overwrite:
        raise ValueError("pass either --resume or --overwrite, not both.")
    if resume is not None:
        checkpoint = find_checkpoint(out, resume)
        if holds_run and checkpoint.resolve().parent.parent != out.resolve():
            raise FileExistsError(f"{out} holds another training run than the one {checkpoint} belongs to; resume "
                                  f"into that run's own directory ({checkpoint.parent.parent}), or into a new --out.")
        return checkpoint
    if holds_run and not overwrite:
        raise FileExistsError(f"{out} already holds a training run; pass --resume to continue it, --overwrite to "
                              "replace it, or choose another --out.")
    return None


def _clear_output(out: Path) -> None:
    """Remove what a run wrote in ``out`` (nothing else: ``out`` may hold other files)."""
    names = list(WRITTEN_FILES)
    info = out / ALIGNMENT_FILE
    if info.is_file() and json.loads(info.read_text()).get("full_finetune"):
        names.append("unet")
    for name in names:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _reduce(accelerator: Accelerator, values: dict[str, float]) -> dict[str, float]:
    """Mean of each statistic over processes (NaN entries ignored); a collective call."""
    keys = sorted(values)
    local = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    gathered = accelerator.gather(local[None]).reshape(-1, len(keys))
    return {k: float(v) for k, v in zip(keys, gathered.nanmean(0).tolist(), strict=True)}


def _accelerator(**kwargs) -> Accelerator:
    """An Accelerator; in a single process, one with other settings than an earlier run's replaces that run's
    state (accelerate keeps one state per process), so several runs can follow each other in one session."""
    from accelerate.state import AcceleratorState, PartialState

    try:
        return Accelerator(**kwargs)
    except ValueError as err:
        if "already been initialized" not in str(err) or PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(**kwargs)


def _backward(accelerator: Accelerator, unet, algo, batches: list[dict], phase: str = MAIN, main: bool = True,
              outside: list[torch.nn.Parameter] | None = None) -> dict[str, float]:
    """Back-propagate the losses of one optimizer step of one phase (every chunk of every accumulated batch,
    gradients synced across processes only on the last; ``outside``: trained parameters that are not in the
    prepared UNet, whose gradients are averaged here) and return the step's statistics, weighted as the loss is."""
    work = []
    for b in batches:
        chunks = algo.chunks(b)
        total = sum(len(c) for c in chunks)
        work += [(b, chunk, len(chunk) / total / len(batches)) for chunk in chunks]
    sums: dict[str, float] = defaultdict(float)
    weights: dict[str, float] = defaultdict(float)
    for j, (batch, chunk, weight) in enumerate(work):
        with accelerator.no_sync(unet) if j < len(work) - 1 else nullcontext():
            loss, chunk_stats = algo.loss(batch, chunk) if phase == MAIN else algo.loss(batch, chunk, phase)
            accelerator.backward(loss * weight)
        name = "loss" if main else f"{phase}_loss"
        for key, value in {name: float(loss.detach()), **chunk_stats}.items():
            valid = value == value  # a chunk without a value (NaN: e.g. accuracy over ties only) is left out
            sums[key] += value * weight if valid else 0.0
            weights[key] += weight if valid else 0.0
    stats = defaultdict(float, {k: sums[k] / w if w > 0 else float("nan") for k, w in weights.items()})
    if outside and accelerator.num_processes > 1:
        for prm in outside:
            if prm.grad is not None:
                prm.grad = accelerator.reduce(prm.grad, reduction="mean")
    if main:
        for batch in batches:
            for key, value in batch["stats"].items():
                stats[key] += value / len(batches)
    return dict(stats)


def train(method: str, cfg: TrainConfig, out_dir: str | Path, resume: str | None = None, overwrite: bool = False,
          progress: bool = True) -> TrainResult:
    """Train ``method`` with ``cfg`` into ``out_dir``.

    ``resume``: ``"latest"`` or a checkpoint directory; ``overwrite`` replaces a run already in ``out_dir``.
    Works the same under ``accelerate launch`` with several processes (each samples its own data; gradients are
    averaged; every process holds the same weights). A fresh run that fails before its first checkpoint (a reward
    returning NaN, say) removes what it wrote.
    """
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from ..pipelines.class_conditional import load_pipeline

    method_cls = get_method(method)
    if not isinstance(cfg, method_cls.config_class):
        raise TypeError(f"{method} needs a {method_cls.config_class.__name__}, got {type(cfg).__name__}.")
    cfg.check()  # before accelerate sees any setting
    out = Path(out_dir)
    # without an accelerator, processes started by `accelerate launch` / torchrun are CPU (gloo) processes
    has_accelerator = getattr(torch, "accelerator", None) is not None and torch.accelerator.is_available()
    cpu = cfg.device == "cpu" or (cfg.device is None and not has_accelerator)
    # null: what `accelerate launch` set (resolved here, so that an earlier run's setting in this process is not kept)
    precision = cfg.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    accelerator = _accelerator(mixed_precision=precision, cpu=cpu,
                               log_with="tensorboard" if cfg.tensorboard else None, project_dir=str(out),
                               # the trainer weights its accumulated losses itself: accelerate must not divide them
                               gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1))
    checkpoint = _prepare_output(out, resume, overwrite)
    created = not out.exists()

    torch.manual_seed(cfg.seed)  # the same LoRA initialisation on every process
    policy = Policy(load_pipeline(cfg.model, device=accelerator.device), cfg.lora, cfg.full_finetune, cfg.reference)
    algo = method_cls(cfg, policy)  # validates rewards, labels and prompts before anything is written
    phases = tuple(getattr(algo, "phases", (MAIN,)))
    params = {ph: policy.trainable_parameters() if ph == MAIN else list(algo.phase_parameters(ph)) for ph in phases}
    lrs = {ph: cfg.lr if ph == MAIN else algo.phase_lr(ph) for ph in phases}
    optimizers = {ph: torch.optim.AdamW(params[ph], lr=lrs[ph], betas=(cfg.adam_beta1, cfg.adam_beta2),
                                        weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon) for ph in phases}
    lr_schedulers = {ph: get_scheduler("constant_with_warmup", opt, num_warmup_steps=cfg.lr_warmup_steps)
                     for ph, opt in optimizers.items()}
    ema = make_ema(cfg, params[MAIN])
    signature = run_signature(method, cfg)
    state = {"step": 0, "images_seen": 0, "wall_s": 0.0}
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, signature, accelerator, policy, optimizers, lr_schedulers, algo, ema)
        for ph in phases:  # the resumed run's own learning rates, betas, weight decay and epsilon
            apply_settings(optimizers[ph], lr_schedulers[ph], lrs[ph], cfg)
    if len(phases) == 1:  # DDP on the UNet: gradients averaged during the backward pass
        unet, *prepared = accelerator.prepare(policy.unet, *optimizers.values())
        in_unet = {id(prm) for prm in policy.unet.parameters()}
        outside = {ph: [prm for prm in params[ph] if id(prm) not in in_unet] for ph in phases}
    else:  # alternating phases call the UNet several times per backward (adapters, unrolled sampling), which DDP
        # does not allow: every process computes its gradients alone and they are averaged after the backward
        unet, prepared = policy.unet, accelerator.prepare(*optimizers.values())
        prepared = prepared if isinstance(prepared, (list, tuple)) else [prepared]
        outside = params
    optimizers = dict(zip(optimizers, prepared, strict=True))
    policy.forward_unet = unet

    metrics_path = out / "metrics.jsonl"
    if accelerator.is_main_process:
        if overwrite:
            _clear_output(out)
        out.mkdir(parents=True, exist_ok=True)
        if checkpoint is not None and (out / "config.yaml").is_file():
            changed = changed_settings(out / "config.yaml", cfg, method)
            if changed:
                warnings.warn(f"resuming with settings other than the run's config.yaml: {'; '.join(changed)}. The "
                              "resumed run uses these (repeat the run's own with `--config "
                              f"{out / 'config.yaml'}`).", stacklevel=2)
        save_config(cfg, method, out / "config.yaml")
        kept = [line for line in metrics_path.read_text().splitlines()
                if json.loads(line)["step"] <= state["step"]] if checkpoint and metrics_path.exists() else []
        metrics_path.write_text("".join(line + "\n" for line in kept))
        if checkpoint is not None:  # checkpoints after the resumed one belong to the abandoned continuation
            for step, later in list_checkpoints(out):
                if step > state["step"]:
                    warnings.warn(f"resuming from step {state['step']}: removing the later checkpoint {later}, which "
                                  "the resumed run replaces", stacklevel=2)
                    shutil.rmtree(later)
    if cfg.tensorboard:
        flat = {k: v for k, v in dataclasses.asdict(cfg).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("diffalign", config=flat)
    accelerator.wait_for_everyone()

    start, images_seen = state["step"], state["images_seen"]
    t0 = time.perf_counter() - state["wall_s"]
    last_saved = state["wall_s"]
    bar = tqdm(total=cfg.max_steps, initial=start, desc=method, disable=not (progress and accelerator.is_main_process))
    try:
        for step in range(start + 1, cfg.max_steps + 1):
            gen = torch.Generator().manual_seed(step_seed(cfg.seed, step - 1, accelerator.process_index))
            stats = {}
            with accelerator.autocast():  # sampling, policy and reference in the same (mixed) precision
                batches = [algo.collect(gen) for _ in range(cfg.gradient_accumulation_steps)]
            for ph in phases:  # alternating updates, each with its own optimizer
                main = ph == phases[-1]
                with accelerator.autocast():
                    stats.update(_backward(accelerator, unet, algo, batches, ph, main, outside[ph]))
                norm = float(accelerator.clip_grad_norm_(params[ph], cfg.max_grad_norm))
                stats["grad_norm" if main else f"{ph}_grad_norm"] = norm
                optimizers[ph].step()
                if not getattr(optimizers[ph], "step_was_skipped", False):  # fp16: an overflow skips the update
                    lr_schedulers[ph].step()
                    if ema is not None and ph == MAIN:
                        ema.step(params[MAIN])
                optimizers[ph].zero_grad(set_to_none=True)
            lr_scheduler = lr_schedulers[phases[-1]]
            images_seen += algo.images_per_batch * len(batches) * accelerator.num_processes
            record = {"step": step, "wall_s": round(time.perf_counter() - t0, 3), "images_seen": images_seen,
                      **_reduce(accelerator, stats), "lr": lr_scheduler.get_last_lr()[0]}
            bar.update(1)
            bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "reward_mean", "implicit_acc") if k in record})
            out_of_time = cfg.max_minutes is not None and record["wall_s"] > 60 * cfg.max_minutes
            timed = cfg.checkpoint_minutes is not None and record["wall_s"] - last_saved >= 60 * cfg.checkpoint_minutes
            flags = accelerator.gather(torch.tensor([[float(out_of_time), float(timed)]], device=accelerator.device))
            stop, timed = (bool(v) for v in flags.amax(0))  # every process decides alike
            save = (stop or timed or step == cfg.max_steps
                    or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0))
            if save or step % cfg.log_every == 0:  # checkpoint steps always have their row
                if accelerator.is_main_process:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps({k: None if v != v else v for k, v in record.items()}) + "\n")
                if cfg.tensorboard:
                    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
            if save:
                last_saved = record["wall_s"]
                save_checkpoint(accelerator, out, policy, optimizers, lr_schedulers,
                                {"step": step, "images_seen": images_seen, "wall_s": record["wall_s"], **signature},
                                cfg.keep_checkpoints, algo, ema)
            if stop:
                break
    except BaseException:
        if checkpoint is None and accelerator.is_main_process and not (out / CHECKPOINTS).exists():
            _clear_output(out)
            if created and out.is_dir() and not any(out.iterdir()):
                out.rmdir()
        raise
    bar.close()
    accelerator.wait_for_everyone()
    # the returned policy calls its own UNet, without DDP or accelerate's mixed-precision forward; the DDP wrapper
    # and accelerate's references to it go now, while the process group they hold is alive (end_training ends it)
    policy.unet = accelerator.unwrap_model(unet, keep_fp32_wrapper=False)
    policy.forward_unet = policy.unet
    del unet
    accelerator.free_memory()
    if ema is not None:  # the run's result is the average (every process alike)
        ema.copy_to(params[MAIN])
    if accelerator.is_main_process:
        policy.save(out, cfg.model, method, getattr(algo, "export_info", None))
        plot_curves(metrics_path, out / "reward_curve.png")
    accelerator.end_training()
    return TrainResult(out, policy)


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: str | Path, png: str | Path) -> None:
    """Reward (or loss), loss and implicit accuracy against optimizer steps."""
    from matplotlib.figure import Figure  # no pyplot: the caller's matplotlib backend stays as it is

    rows = read_metrics(metrics_path)
    keys = [k for k in ("reward_mean", "loss", "implicit_acc") if any(r.get(k) is not None for r in rows)]
    if not rows or not keys:
        return
    fig = Figure(figsize=(4 * len(keys), 3))
    axes = fig.subplots(1, len(keys), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1)
        ax.set_xlabel("optimizer step")
        ax.set_title(key)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
