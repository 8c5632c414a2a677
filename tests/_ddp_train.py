"""Run under `accelerate launch --num_processes 2`: a short D3PO run; each process saves the weights it holds."""

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from diffalign.align import config_for, train

out = Path(sys.argv[1])
cfg = config_for("d3po", overrides={"model": "builtin:digits", "reward": "brightness", "guidance": 1.0,
                                    "max_steps": 3, "lr": 1e-3, "pairs_per_step": 2, "num_steps": 4,
                                    "checkpoint_every": 2})
result = train("d3po", cfg, out, progress=False)
rank = int(os.environ.get("RANK", "0"))  # set by accelerate launch
save_file(result.policy.trainable_state_dict(), str(out / f"rank{rank}.safetensors"))
