"""Train the network behind the `realism` reward of a built-in model and fit its class Gaussians.

A pixel MLP (not the shipped CNN whose features FID and ``prompt_following`` use) is trained as a classifier on the
model's training images; the class means and the pooled within-class precision of its last hidden layer, on the
same training images, complete the reward. Writes ``diffalign/models/weights/<model>/realism.safetensors``
(float16 weights, float32 statistics, the config and training record in its metadata)::

    python scripts/train_realism.py --model fashion --epochs 10 --lr 2e-3
    python scripts/train_realism.py --model digits --epochs 100 --lr 3e-3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffalign.models.builtin import (  # noqa: E402
    BUILTIN_MODELS,
    builtin_spec,
    load_builtin_data,
    translate,
    weights_dir,
)
from diffalign.rewards.realism import WEIGHTS_FILE, PixelMLP, class_gaussians, realism_score  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(BUILTIN_MODELS), required=True)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory (default: the package's weights/<model>/)")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    spec = builtin_spec(args.model)
    x, y = load_builtin_data(spec.name, "train")
    xt, yt = load_builtin_data(spec.name, "test")
    net = PixelMLP(image_size=spec.image_size, num_classes=len(spec.class_names))
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * -(-len(x) // args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    gen, t0 = torch.Generator().manual_seed(args.seed), time.time()
    shift = 1 if spec.image_size <= 8 else 2
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), args.batch_size):
            idx = perm[i:i + args.batch_size]
            dy, dx = torch.randint(0, 2 * shift + 1, (2, len(idx)), generator=gen)  # a random translation
            loss = F.cross_entropy(net(translate(x[idx], dy, dx, shift)), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f}")
    net.eval()
    with torch.no_grad():
        accuracy = float((net(xt).argmax(-1) == yt).float().mean())
        means, precision = class_gaussians(net.features(x), y, len(spec.class_names))
        held_out = realism_score(net.features(xt), means, precision, yt)
    record = {"train_images": len(x), "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
              "seed": args.seed, "augmentation": f"random translation up to {shift} px",
              "test_accuracy": round(accuracy, 4), "test_realism_mean": round(float(held_out.mean()), 4),
              "test_realism_sd": round(float(held_out.std()), 4), "seconds": round(time.time() - t0, 1),
              "command": "python scripts/train_realism.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    tensors = {f"net.{k}": v.half() for k, v in net.state_dict().items()}
    tensors.update(means=means, precision=precision)
    out = Path(args.out or weights_dir(spec.name))
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"config": json.dumps(net.config), "training": json.dumps(record)})
    tmp.chmod(0o644)
    tmp.replace(out / WEIGHTS_FILE)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
