"""Peak memory of LoRA training with the adapter-disabled reference against a frozen deepcopy reference.

    python benchmarks/align_memory.py --json benchmarks/results/align_memory.json
    python benchmarks/align_memory.py --models sd15-sized --mixed-precision no,bf16 \
        --json benchmarks/results/align_memory_sd15_h200.json    # on a GPU

Each configuration runs in its own process: the memory the policy adds when it is built (LoRA + its reference),
then a few D3PO steps and their peak. On the CPU that is the resident set size (``VmRSS``, ``ru_maxrss``); where
training runs on a GPU (accelerate's choice), ``torch.cuda.memory_allocated`` and ``max_memory_allocated``.
Models: ``builtin:*``, ``tiny-sd`` (the tiny random Stable Diffusion pipeline) and ``sd15-sized`` (Stable
Diffusion 1.5's UNet and VAE with random weights, 512 x 512 images).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys, torch
import diffalign
from diffalign.align import LoraSettings, Policy, config_for, train
model, reference, precision, out = sys.argv[1:5]
steps, pairs, ddim_steps, per_backward = map(int, sys.argv[5:9])
cuda = torch.cuda.is_available()

def used_mb():
    if cuda:
        return torch.cuda.memory_allocated() / 2**20
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024

pipe = diffalign.load_pipeline(model, device="cuda" if cuda else "cpu")
before = used_mb()
policy = Policy(pipe, LoraSettings(), reference=reference)
setup_mb = used_mb() - before
nets = [policy.unet] + ([policy._reference_unet] if policy._reference_unet is not None else [])
weights_mb = sum(t.numel() * t.element_size() for net in nets for t in net.state_dict().values()) / 2**20
del policy, pipe, nets
if cuda:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
prompts = ["a photo of a cat", "a red dog"] if not model.startswith("builtin:") else None
cfg = config_for("d3po", overrides={"model": model, "reward": "brightness", "reference": reference, "max_steps": steps,
                                    "pairs_per_step": pairs, "num_steps": ddim_steps, "guidance": 1.0,
                                    "steps_per_backward": per_backward,
                                    "prompts": prompts, "checkpoint_every": 0, "mixed_precision": precision})
result = train("d3po", cfg, out, progress=False)
unet = result.policy.unet
last = result.metrics[-1]
print(json.dumps({"device": "cuda" if cuda else "cpu", "policy_setup_mb": setup_mb, "policy_weights_mb": weights_mb,
                  "unet_mb": sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**20,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                  "train_wall_s": last["wall_s"], "last_loss": last.get("loss")}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--models", default="builtin:fashion,tiny-sd",
                   help="comma-separated: builtin:*, tiny-sd, sd15-sized")
    p.add_argument("--mixed-precision", default="no", help="comma-separated accelerate settings: no, bf16, fp16")
    p.add_argument("--max-steps", type=int, default=3, help="D3PO optimizer steps per configuration")
    p.add_argument("--pairs-per-step", type=int, default=4)
    p.add_argument("--num-steps", type=int, default=20, help="DDIM steps per trajectory")
    p.add_argument("--steps-per-backward", type=int, default=0, help="trajectory steps per backward (0: all)")
    args = p.parse_args()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        from diffalign.models.tiny_sd import RANDOM_PIPELINES

        for label in args.models.split(","):
            model = label
            if label in RANDOM_PIPELINES:
                model = str(Path(tmp) / label)
                RANDOM_PIPELINES[label](seed=0).save_pretrained(model)
            for precision in args.mixed_precision.split(","):
                for reference in ("adapter", "copy"):
                    out = Path(tmp) / f"run-{len(records)}"
                    proc = subprocess.run([sys.executable, "-c", CHILD, model, reference, precision, str(out),
                                           str(args.max_steps), str(args.pairs_per_step), str(args.num_steps),
                                           str(args.steps_per_backward)],
                                          capture_output=True, text=True)
                    if proc.returncode:
                        sys.exit(f"{label} reference={reference} mixed_precision={precision} failed:\n{proc.stderr}")
                    rec = {"model": label, "reference": reference, "mixed_precision": precision,
                           **json.loads(proc.stdout.strip().splitlines()[-1])}
                    records.append(rec)
                    gpu = rec["device"] == "cuda"
                    unit, peak = ("GPU", rec["cuda_peak_mb"]) if gpu else ("RSS", rec["peak_rss_mb"])
                    print(f"{label:<16} {precision:<4} reference={reference:<8} UNet(s) + LoRA "
                          f"{rec['policy_weights_mb']:7.1f} MB, policy set-up +{rec['policy_setup_mb']:7.1f} MB "
                          f"{unit}, training peak {unit} {peak:8.1f} MB (UNet weights {rec['unet_mb']:.1f} MB), "
                          f"{rec['train_wall_s']:.1f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
