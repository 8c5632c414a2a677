"""Peak memory of LoRA training with the adapter-disabled reference against a frozen deepcopy reference.

    python benchmarks/align_memory.py --json benchmarks/results/align_memory.json

Each configuration runs in its own process: the resident memory the policy adds when it is built (LoRA + its
reference), then a few D3PO steps and their peak resident set size (``ru_maxrss``); on CUDA it also reports
``torch.cuda.max_memory_allocated``.
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
model, reference, out, steps, pairs, ddim_steps = sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7])

def rss_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024

pipe = diffalign.load_pipeline(model)
before = rss_mb()
policy = Policy(pipe, LoraSettings(), reference=reference)
setup_mb = rss_mb() - before
nets = [policy.unet] + ([policy._reference_unet] if policy._reference_unet is not None else [])
weights_mb = sum(t.numel() * t.element_size() for net in nets for t in net.state_dict().values()) / 2**20
del policy, pipe, nets
prompts = ["a photo of a cat", "a red dog"] if not model.startswith("builtin:") else None
cfg = config_for("d3po", overrides={"model": model, "reward": "brightness", "reference": reference, "max_steps": steps,
                                    "pairs_per_step": pairs, "num_steps": ddim_steps, "guidance": 1.0,
                                    "prompts": prompts, "checkpoint_every": 0})
result = train("d3po", cfg, out, progress=False)
unet = result.policy.unet
cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "policy_setup_mb": setup_mb,
                  "policy_weights_mb": weights_mb,
                  "unet_mb": sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**20,
                  "cuda_peak_mb": cuda and cuda / 2**20}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--max-steps", type=int, default=3, help="D3PO optimizer steps per configuration")
    p.add_argument("--pairs-per-step", type=int, default=4)
    p.add_argument("--num-steps", type=int, default=20, help="DDIM steps per trajectory")
    args = p.parse_args()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        from diffalign.models.tiny_sd import tiny_stable_diffusion_pipeline

        tiny = Path(tmp) / "tiny-sd"
        tiny_stable_diffusion_pipeline(seed=0).save_pretrained(tiny)
        for label, model in (("builtin:fashion", "builtin:fashion"), ("tiny Stable Diffusion", str(tiny))):
            for reference in ("adapter", "copy"):
                out = Path(tmp) / f"run-{len(records)}"
                proc = subprocess.run([sys.executable, "-c", CHILD, model, reference, str(out), str(args.max_steps),
                                       str(args.pairs_per_step), str(args.num_steps)], capture_output=True,
                                      text=True, check=True)
                rec = {"model": label, "reference": reference, **json.loads(proc.stdout.strip().splitlines()[-1])}
                records.append(rec)
                print(f"{label:<24} reference={reference:<8} UNet(s) + LoRA {rec['policy_weights_mb']:5.1f} MB, "
                      f"policy set-up +{rec['policy_setup_mb']:5.1f} MB RSS, "
                      f"training peak RSS {rec['peak_rss_mb']:8.1f} MB (UNet weights {rec['unet_mb']:.1f} MB)",
                      flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
