"""FID (1,000 samples, the shipped classifier's features) of UniPC at NFE 5 on builtin:fashion, guidance 1, on the
default grid, on Align Your Steps' timesteps and on the grid searched by ``benchmarks/search_timesteps.sh``.

    python benchmarks/timesteps_fid.py
"""

import argparse
import tempfile
from pathlib import Path

from diffalign.eval.fid import fid_of_model, get_features
from diffalign.models.builtin import weights_dir
from diffalign.models.registry import load_model
from diffalign.samplers import make_scheduler
from diffalign.samplers.timesteps import ays_timesteps, schedule_fingerprint, write_entry

SEARCHED = Path(__file__).parent / "results" / "timesteps_builtin_fashion" / "unipc_g1.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=1000)
    args = p.parse_args()
    named = load_model("builtin:fashion")
    features, stats = get_features("classifier:builtin:fashion"), weights_dir("fashion") / "fid_stats.safetensors"
    sched = make_scheduler("unipc", named.scheduler_config)
    sched.set_timesteps(timesteps=ays_timesteps(5))
    ays = Path(tempfile.mkdtemp()) / "unipc_ays.json"
    write_entry(ays, named.name, "unipc", 1.0, schedule_fingerprint(sched.config),
                {"steps": 5, "nfe": 5, "sigmas": sched.sigmas.double().tolist()[:-1], "method": "ays"})
    for label, overrides in [("default grid", {}), ("AYS timesteps", {"timesteps_path": str(ays)}),
                             ("searched grid", {"timesteps_path": str(SEARCHED)})]:
        named.sampler_overrides = {"unipc": overrides}
        result = fid_of_model(named, "unipc", 5, args.num_images, features, stats, 1.0, 0, progress=False)
        print(f"unipc NFE 5, {label}: FID {result['fid']:.4f}")


if __name__ == "__main__":
    main()
