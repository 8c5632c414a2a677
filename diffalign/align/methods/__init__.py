"""Alignment methods: each a small module saying how it collects data and which loss it applies.

A method is a class with

* ``__init__(cfg, policy)``: validates its inputs (rewards, labels, prompts) before anything is written;
* ``collect(generator) -> batch``: the data of one accumulation step (on-policy samples or stored pairs),
  every random draw from ``generator``;
* ``chunks(batch) -> list``: pieces of the batch whose losses are back-propagated one after another (memory);
* ``loss(batch, chunk) -> (loss, stats)``: the differentiable loss of a chunk (a mean) and float statistics;
* ``images_per_batch``: images a batch holds (the ``images_seen`` counter).
"""

from __future__ import annotations

from .d3po import D3PO
from .ddpo import DDPO
from .diffusion_dpo import DiffusionDPO
from .distill_dpo import DistillDPO
from .rankdpo import RankDPO
from .smpo import SmPO

METHODS = {"d3po": D3PO, "ddpo": DDPO, "diffusion-dpo": DiffusionDPO, "rankdpo": RankDPO, "smpo": SmPO,
           "distill-dpo": DistillDPO}


def get_method(name: str):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}.")
    return METHODS[name]
