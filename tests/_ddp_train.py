"""Run under `accelerate launch --num_processes 2`: a short run (D3PO, or the method named by argv[2]); each
process saves the weights it holds (for D3PO the weight average, which every process keeps for itself)."""

import os
import sys
from pathlib import Path

from peft import get_peft_model_state_dict
from safetensors.torch import save_file

from diffalign.align import config_for, train

out = Path(sys.argv[1])
method = sys.argv[2] if len(sys.argv) > 2 else "d3po"
settings = {
    "d3po": {"guidance": 1.0, "pairs_per_step": 2, "num_steps": 4, "ema_decay": 0.9},  # each process averages
    "distill-dpo": {"pairs_per_step": 2, "student_steps": 2, "regression_pairs": 4, "regression_batch": 2,
                    "regression_steps": 4, "fake_lr": 1e-3},
}[method]
cfg = config_for(method, overrides={"model": "builtin:digits", "reward": "brightness", "max_steps": 3, "lr": 1e-3,
                                    "checkpoint_every": 2, **settings})
result = train(method, cfg, out, progress=False)
rank = int(os.environ.get("RANK", "0"))  # set by accelerate launch
weights = result.policy.trainable_state_dict()
if method == "distill-dpo":  # the fake-score adapters too
    for name in ("fake_w", "fake_l"):
        weights.update({f"{name}.{k}": v.contiguous() for k, v in
                        get_peft_model_state_dict(result.policy.unet, adapter_name=name).items()})
save_file(weights, str(out / f"rank{rank}.safetensors"))
