"""FID (1,000 samples, the shipped classifier's features) of UniPC at NFE 5 on builtin:fashion, on the default grid,
on Align Your Steps' timesteps and on a searched grid (``--searched``: a file of ``diffalign calibrate timesteps``,
by default the 32-noise search at guidance 1 of ``benchmarks/search_timesteps.sh``).

    python benchmarks/timesteps_fid.py
    python benchmarks/timesteps_fid.py --guidance 7.5 \
        --searched diffalign/models/schedules/builtin_fashion/unipc_g7.5.json
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
    p.add_argument("--guidance", type=float, default=1.0, help="the searched file's guidance")
    p.add_argument("--searched", type=Path, default=SEARCHED, help="schedule file with an NFE-5 grid")
    args = p.parse_args()
    named = load_model("builtin:fashion")
    features, stats = get_features("classifier:builtin:fashion"), weights_dir("fashion") / "fid_stats.safetensors"
    sched = make_scheduler("unipc", named.scheduler_config)
    sched.set_timesteps(timesteps=ays_timesteps(5))
    ays = Path(tempfile.mkdtemp()) / "unipc_ays.json"
    write_entry(ays, named.name, "unipc", args.guidance, schedule_fingerprint(sched.config),
                {"steps": 5, "nfe": 5, "sigmas": sched.sigmas.double().tolist()[:-1], "method": "ays"})
    for label, overrides in [("default grid", {}), ("AYS timesteps", {"timesteps_path": str(ays)}),
                             ("searched grid", {"timesteps_path": str(args.searched)})]:
        named.sampler_overrides = {"unipc": overrides}
        result = fid_of_model(named, "unipc", 5, args.num_images, features, stats, args.guidance, 0,
                              progress=False, searched=False)  # only the grid of its row
        print(f"unipc NFE 5, guidance {args.guidance:g}, {label}: FID {result['fid']:.4f}")


if __name__ == "__main__":
    main()
