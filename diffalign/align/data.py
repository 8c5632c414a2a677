"""Preference datasets for the DPO family (Diffusion-DPO, RankDPO, SmPO).

On disk, a dataset is a directory with ``pairs.jsonl`` (two images per line) or ``rankings.jsonl`` (k >= 2 images
per line) and the PNG images, paths relative to the directory::

    {"prompt": "sneaker", "images": ["0_0.png", "0_1.png"], "preferred": 0, "scores": {"brightness": [0.4, 0.2]}}
    {"prompt": "sneaker", "images": ["a.png", "b.png", "c.png"], "phi": [1.0, 0.0, 0.5], "scores": {...}}

``preferred`` (pairs: 0, 1, or null for a tie) or ``phi`` (the soft label of each image: the fraction of pairwise
wins, higher is better) give the label; without either, the label comes from the ``scores`` (per-reward lists, one
score per image), as ``diffalign data synth`` computes it. Every dataset is held as k images per prompt with
labels phi [N, k] (a pair preferring image 0 has phi = [1, 0], a tie [1/2, 1/2]) and each reward's scores [N, k].

A Hugging Face ``datasets`` dataset with Pick-a-Pic columns (``caption``, ``jpg_0``, ``jpg_1``, ``label_0``) loads
too (:func:`from_pickapic`), and so does one saved with ``save_to_disk``.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

PAIRS_FILE = "pairs.jsonl"
RANKINGS_FILE = "rankings.jsonl"
SYNTH_FILE = "synth.json"
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")


def phi_from_scores(scores: dict[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
    """Soft labels phi [N, k]: for each image, its strict pairwise wins against the other k - 1 images of its
    prompt, summed over the n rewards and divided by n (k - 1) (RankDPO's Algorithm 1; ties win nothing)."""
    stack = torch.stack(list(scores.values()) if isinstance(scores, dict) else list(scores)).double()
    n, _, k = stack.shape
    if k < 2:
        raise ValueError(f"a ranking needs k >= 2 images per prompt, got {k}.")
    wins = (stack[:, :, :, None] > stack[:, :, None, :]).sum((0, 3))
    return (wins / (n * (k - 1))).float()


def ranking_line(prompt: str, files: Sequence[str], phi: torch.Tensor, scores: dict[str, torch.Tensor],
                 sources: list[dict]) -> str:
    """One ``rankings.jsonl`` line (no newline): a row's prompt, image files, soft labels, per-reward scores and
    where each image came from."""
    return json.dumps({"prompt": prompt, "images": list(files), "phi": [round(float(v), 6) for v in phi],
                       "scores": {n: [float(v) for v in s] for n, s in scores.items()}, "sources": sources})


@dataclass
class PreferenceData:
    """k images per prompt with soft labels phi [N, k] and per-reward scores [N, k]; images load on access."""

    prompts: list[str]
    phi: torch.Tensor
    scores: dict[str, torch.Tensor]
    source: str
    """Where the data came from (named in errors)."""
    loader: Callable[[int], list] = field(repr=False)
    """Row index -> the row's k PIL images."""
    where: Callable[[int], str] = field(repr=False)
    """Row index -> "file:line" (or "dataset row i") for error messages."""
    sizes: list[tuple[int, int]] | None = field(default=None, repr=False)
    """(width, height) of every row's images where known without decoding them (files on disk)."""

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def k(self) -> int:
        return self.phi.shape[1]

    def ranked_by(self, reward: str | None) -> PreferenceData:
        """The data labelled by stored scores alone: one reward's, or several joined by "," (phi averaged over
        them, as ``diffalign data synth`` labels); ``None``: the stored labels."""
        if reward is None:
            return self
        names = [n.strip() for n in reward.split(",")]
        missing = [n for n in names if n not in self.scores]
        if missing:
            have = ", ".join(self.scores) or "none"
            raise ValueError(f"{self.source} has no scores for reward {missing[0]!r} (it has: {have}); score it "
                             f"with `diffalign data synth --rewards {missing[0]}` or leave `reward` unset to use its "
                             "labels.")
        return PreferenceData(self.prompts, phi_from_scores([self.scores[n] for n in names]), self.scores,
                              self.source, self.loader, self.where, self.sizes)

    def decided(self) -> list[int]:
        """Rows whose images are not all tied (the rows a preference loss learns from)."""
        return [i for i in range(len(self)) if bool((self.phi[i] != self.phi[i, 0]).any())]

    def check_decided(self) -> list[int]:
        rows = self.decided()
        if not rows:
            raise ValueError(f"every row of {self.source} is a tie (all its images have the same label); preference "
                             "methods learn nothing from ties. Label the data, or rank it by a reward that separates "
                             "the images.")
        return rows

    def check_images(self, size: tuple[int, int], resize: bool = False) -> None:
        """Refuse images whose size is not the model's ``(height, width)`` (unless ``resize``), naming the row."""
        if resize:
            return
        rows = range(len(self)) if self.sizes is not None else range(min(1, len(self)))
        for i in rows:
            found = [self.sizes[i]] if self.sizes is not None else [im.size for im in self.loader(i)]
            for w, h in found:
                if (h, w) != tuple(size):
                    raise ValueError(f"{self.where(i)}: the images are {w}x{h} but the model makes "
                                     f"{size[1]}x{size[0]} images; resize the dataset, or set resize=true to resize "
                                     "and centre-crop on loading.")

    def images(self, rows: Sequence[int], size: tuple[int, int], channels: int, resize: bool = False
               ) -> torch.Tensor:
        """Images [len(rows), k, C, H, W] in [0, 1]."""
        out = []
        for i in rows:
            pics = self.loader(i)
            if len(pics) != self.k:
                raise ValueError(f"{self.where(i)}: {len(pics)} images, expected {self.k}.")
            out.append(torch.stack([_to_tensor(im, size, channels, resize, self.where(i)) for im in pics]))
        return torch.stack(out)


def _to_tensor(image, size: tuple[int, int], channels: int, resize: bool, where: str) -> torch.Tensor:
    from PIL import Image, ImageOps

    if image.mode.startswith("I;16"):  # 16-bit PNG: Pillow's convert would clip it, not scale it, to 8 bits
        image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257).round().astype(np.uint8))
    elif image.mode in ("I", "F"):
        raise ValueError(f"{where}: an image is {image.mode!r} (32-bit) data, whose range is unknown; save it as an "
                         "8- or 16-bit PNG.")
    image = image.convert("L" if channels == 1 else "RGB")
    h, w = size
    if image.size != (w, h):
        if not resize:
            raise ValueError(f"{where}: an image is {image.size[0]}x{image.size[1]} but the model makes {w}x{h} "
                             "images; resize the dataset, or set resize=true to resize and centre-crop on loading.")
        image = ImageOps.fit(image, (w, h), Image.Resampling.BICUBIC)
    arr = np.asarray(image, dtype=np.float32) / 255.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


# ---------------------------------------------------------------------- on disk
def _parse_line(line: str, where: str, root: Path, expect_k: int | None) -> dict:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg}).") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
        raise ValueError(f"{where}: each line must be a JSON object with a \"prompt\" string and \"images\".")
    images = entry.get("images")
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise ValueError(f"{where}: \"images\" must be a list of image paths.")
    if len(images) < 2:
        raise ValueError(f"{where}: {len(images)} image(s); a preference needs k >= 2 images of the prompt.")
    if expect_k is not None and len(images) != expect_k:
        raise ValueError(f"{where}: {len(images)} images, but this file's rows have {expect_k}; every row needs "
                         "the same number.")
    k = len(images)
    scores = entry.get("scores") or {}
    if not isinstance(scores, dict):
        raise ValueError(f"{where}: \"scores\" must map reward names to lists of {k} numbers.")
    for name, values in scores.items():
        if (not isinstance(values, list) or len(values) != k
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
            raise ValueError(f"{where}: scores[{name!r}] must be a list of {k} finite numbers, got {values!r}.")
    if "preferred" in entry:
        pref = entry["preferred"]
        if k != 2 or pref not in (0, 1, None):
            raise ValueError(f"{where}: \"preferred\" is for pairs and must be 0, 1 or null (a tie), got {pref!r}.")
        phi = [0.5, 0.5] if pref is None else [1.0 - pref, float(pref)]
    elif "phi" in entry:
        phi = entry["phi"]
        if (not isinstance(phi, list) or len(phi) != k
                or not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in phi)):
            raise ValueError(f"{where}: \"phi\" must be a list of {k} numbers in [0, 1] (one soft label per image), "
                             f"got {phi!r}.")
    elif scores:
        phi = phi_from_scores({n: torch.tensor([v], dtype=torch.float64) for n, v in scores.items()})[0].tolist()
    else:
        raise ValueError(f"{where}: no label: give \"preferred\" (pairs), \"phi\" or per-reward \"scores\".")
    files = [root / p for p in images]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{where}: image {f} not found.")
    return {"prompt": entry["prompt"], "files": files, "phi": [float(v) for v in phi],
            "scores": {n: [float(v) for v in s] for n, s in scores.items()}}


def load_directory(path: str | Path, columns: dict[str, str] | None = None, drop_ties: bool = False
                   ) -> PreferenceData:
    """A dataset directory (``pairs.jsonl`` or ``rankings.jsonl`` + images), validated line by line, or a dataset
    saved with ``datasets``' ``save_to_disk`` (``columns`` and ``drop_ties`` as in :func:`from_pickapic`)."""
    from PIL import Image

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"preference dataset {root} not found.")
    if (root / "dataset_info.json").is_file() or (root / "state.json").is_file():
        try:
            import datasets
        except ImportError:
            raise ImportError(f"{root} is a saved Hugging Face dataset; reading it needs the `datasets` package "
                              "(pip install 'diffalign[datasets]').") from None
        return from_pickapic(datasets.load_from_disk(str(root)), columns, drop_ties, source=str(root))
    if (root / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk: one saved dataset per split
        splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
        raise ValueError(f"{root} is a saved Hugging Face DatasetDict (splits: {', '.join(splits) or 'none'}); give "
                         f"the directory of one split, e.g. {root / (splits[0] if splits else 'train')}.")
    files = [root / name for name in (PAIRS_FILE, RANKINGS_FILE) if (root / name).is_file()]
    if len(files) != 1:
        raise FileNotFoundError(f"{root} needs exactly one of {PAIRS_FILE} / {RANKINGS_FILE} (found "
                                f"{len(files)}), or to be a dataset saved with datasets' save_to_disk.")
    file = files[0]
    rows, wheres, sizes = [], [], []
    expect_k = 2 if file.name == PAIRS_FILE else None
    for lineno, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{file}:{lineno}"
        row = _parse_line(line, where, root, expect_k)
        expect_k = len(row["files"])
        dims = set()
        for f in row["files"]:
            try:
                with Image.open(f) as im:
                    dims.add(im.size)
            except OSError as err:
                raise ValueError(f"{where}: {f} is not a readable image ({err}).") from None
        if len(dims) > 1:
            raise ValueError(f"{where}: the row's images differ in size ({sorted(dims)}).")
        rows.append(row)
        wheres.append(where)
        sizes.append(dims.pop())
    if not rows:
        raise ValueError(f"{file} holds no rows.")
    names = set(rows[0]["scores"])
    for row, where in zip(rows, wheres, strict=True):
        if set(row["scores"]) != names:
            raise ValueError(f"{where}: scores for {sorted(row['scores'])}, but the first row has {sorted(names)}; "
                             "every row needs the same rewards.")

    def loader(i: int) -> list:
        return [Image.open(f) for f in rows[i]["files"]]

    return PreferenceData(
        prompts=[r["prompt"] for r in rows], phi=torch.tensor([r["phi"] for r in rows]),
        # float64, as the stored labels were computed: scores closer than float32 resolves stay apart
        scores={n: torch.tensor([r["scores"][n] for r in rows], dtype=torch.float64) for n in sorted(names)},
        source=str(file), loader=loader, where=lambda i: wheres[i], sizes=sizes)


# ---------------------------------------------------------------------- Hugging Face datasets
def from_pickapic(dataset, columns: dict[str, str] | None = None, drop_ties: bool = False,
                  source: str | None = None) -> PreferenceData:
    """A Hugging Face ``datasets`` dataset with Pick-a-Pic (v2) columns: ``caption``, ``jpg_0`` / ``jpg_1``
    (JPEG bytes or PIL images) and ``label_0`` (1: image 0 preferred, 0: image 1, 0.5: a tie).

    ``columns`` maps these names to the dataset's own (``{"caption": "prompt"}``); other columns are ignored. Ties
    stay (they carry no gradient) unless ``drop_ties``. Images decode on access.
    """
    names = {c: (columns or {}).get(c, c) for c in PICKAPIC_COLUMNS}
    have = list(getattr(dataset, "column_names", None) or [])
    missing = [f"{c}" + (f" (as {n!r})" if n != c else "") for c, n in names.items() if n not in have]
    if missing:
        raise ValueError(f"the dataset lacks the Pick-a-Pic columns {', '.join(missing)}; it has {have}. Map its "
                         "columns with columns={'caption': ..., 'jpg_0': ..., 'jpg_1': ..., 'label_0': ...}.")
    labels = [float(v) for v in dataset[names["label_0"]]]
    bad = [i for i, v in enumerate(labels) if v not in (0.0, 0.5, 1.0)]
    if bad:
        raise ValueError(f"dataset row {bad[0]}: label_0 must be 1, 0 or 0.5, got {labels[bad[0]]}.")
    rows = [i for i, v in enumerate(labels) if not (drop_ties and v == 0.5)]
    prompts = [str(p) for p in dataset[names["caption"]]]

    def loader(i: int) -> list:
        from PIL import Image

        record = dataset[rows[i]]
        out = []
        for col in ("jpg_0", "jpg_1"):
            value = record[names[col]]
            out.append(Image.open(io.BytesIO(value)) if isinstance(value, (bytes, bytearray)) else value)
        return out

    return PreferenceData(
        prompts=[prompts[i] for i in rows], phi=torch.tensor([[labels[i], 1.0 - labels[i]] for i in rows]),
        scores={}, source=source or f"dataset ({len(labels)} rows)", loader=loader,
        where=lambda i: f"{source or 'dataset'} row {rows[i]}")


def load_preferences(data, columns: dict[str, str] | None = None, drop_ties: bool = False) -> PreferenceData:
    """A :class:`PreferenceData` from a dataset directory, a saved ``datasets`` dataset, or a ``datasets`` dataset
    (Pick-a-Pic columns; ``columns`` renames them, ``drop_ties`` leaves out the tied rows, which training skips
    anyway)."""
    if isinstance(data, PreferenceData):
        return data
    if isinstance(data, (str, Path)):
        return load_directory(data, columns, drop_ties)
    if hasattr(data, "column_names"):
        return from_pickapic(data, columns, drop_ties)
    raise TypeError(f"cannot read preferences from {type(data).__name__}; pass a dataset directory or a "
                    "datasets.Dataset with Pick-a-Pic columns.")
