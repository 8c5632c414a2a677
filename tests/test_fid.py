"""FID on a pluggable feature network: against scipy, self-distance, perturbations, stats files, KID."""

import pytest
import torch

from diffalign.eval.fid import FID, Features, feature_stats, frechet_distance_scipy, kid, load_stats, save_stats
from diffalign.models import load_digits_tensor


@pytest.fixture(scope="module")
def digits():
    images, _ = load_digits_tensor()
    return (images + 1) / 2  # [0, 1]


@pytest.fixture(scope="module")
def features():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten())
    return Features(net, 64)


def fid_of(features, real, fake):
    fid = FID(features)
    fid.add_reference(real)
    fid.add(fake)
    return fid.compute()


def test_fid_of_a_set_against_itself_is_zero(digits, features):
    assert abs(fid_of(features, digits, digits)) < 1e-8


def test_fid_grows_with_perturbation(digits):
    features = Features(torch.nn.Flatten(), 64)  # raw pixels: a transparent feature space
    half = digits[:900]
    gen = torch.Generator().manual_seed(0)
    noisy = [(half + s * torch.randn(half.shape, generator=gen)).clamp(0, 1) for s in (0.1, 0.3)]
    fids = [fid_of(features, half, x) for x in noisy]
    assert 0.05 < fids[0] < fids[1] < fid_of(features, half, 1 - half)


def test_fid_equals_an_independent_scipy_sqrtm_computation(digits, features):
    real, fake = digits[:900], digits[900:] ** 1.5
    a, b = feature_stats(features, [real]), feature_stats(features, [fake])
    expected = frechet_distance_scipy(a["mean"].numpy(), a["cov"].numpy(), b["mean"].numpy(), b["cov"].numpy())
    assert fid_of(features, real, fake) == pytest.approx(expected, rel=1e-6)


def test_precomputed_reference_statistics_round_trip(digits, features, tmp_path):
    stats = feature_stats(features, [digits[:600], digits[600:900]])  # batched accumulation
    save_stats(stats, tmp_path / "ref.safetensors")
    fid = FID(features)
    fid.load_reference(tmp_path / "ref.safetensors")
    fid.add(digits[900:])
    assert fid.compute() == pytest.approx(fid_of(features, digits[:900], digits[900:]), rel=1e-9)
    with pytest.raises(FileNotFoundError, match="fid-stats"):
        load_stats(tmp_path / "missing.safetensors")


def test_uint8_and_float_inputs_agree_and_wrong_ranges_are_rejected(digits, features):
    as_uint8 = (digits * 255).round().to(torch.uint8)
    assert fid_of(features, digits[:900], as_uint8[900:]) == pytest.approx(
        fid_of(features, digits[:900], as_uint8[900:].float() / 255), rel=1e-9)
    fid = FID(features)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fid.add(digits * 255)


def test_kid_small_sample(digits, features):
    same, _ = kid(features, digits[:300], digits[300:600], subsets=20)
    diff, _ = kid(features, digits[:300], 1 - digits[300:600], subsets=20)
    assert abs(same) < diff
    # reproducible (its subsets are drawn with `seed`), subsets of half the smaller set by default, which vary
    assert kid(features, digits[:40], digits[40:80], subsets=20) == kid(features, digits[:40], digits[40:80],
                                                                        subsets=20)
    assert kid(features, digits[:40], digits[40:80], subsets=20)[1] > 0
    with pytest.raises(ValueError, match="at least 4"):
        kid(features, digits[:3], digits[3:6])


def test_inception_network_moves_with_the_metric(monkeypatch):
    import torchmetrics.image.fid as tm_fid

    from diffalign.eval.fid import inception_features

    class StandIn(torch.nn.Module):  # the real network needs torch-fidelity and downloaded weights
        def __init__(self, name, features_list):
            super().__init__()
            self.proj = torch.nn.Linear(3, 2048)

        def forward(self, x):
            return self.proj(x.float().mean(dim=(2, 3)))

    monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", StandIn)
    feats = inception_features()
    assert sum(p.numel() for p in feats.parameters()) == 3 * 2048 + 2048  # registered: .to(device) reaches it
    assert FID(feats, device="meta").features.fn.net.proj.weight.device.type == "meta"


def test_fid_of_model_gives_every_image_its_own_noise_past_1000_per_class(monkeypatch, tmp_path):
    import diffalign.sampling
    from diffalign.eval.fid import fid_of_model
    from diffalign.models.registry import load_model

    seeds = []

    def fake_sample_images(model, sampler, steps, n, label, guidance, seed, **kwargs):
        seeds.extend(range(seed, seed + n))
        return torch.rand(n, 1, 8, 8)

    monkeypatch.setattr(diffalign.sampling, "sample_images", fake_sample_images)
    named = load_model("builtin:digits")
    feats = Features(torch.nn.Flatten(), 64)
    stats = tmp_path / "stats.safetensors"
    save_stats(feature_stats(feats, [torch.rand(100, 1, 8, 8)]), stats)
    fid_of_model(named, "ddim", 2, 10 * 1001, feats, stats, batch_size=4096, progress=False)
    assert len(seeds) == 10 * 1001 and len(set(seeds)) == len(seeds)
    seeds.clear()  # up to 1,000 per class the seeds are what they always were (recorded FIDs stay reproducible)
    fid_of_model(named, "ddim", 2, 20, feats, stats, progress=False)
    assert seeds == [s for k in range(10) for s in (1000 * k, 1000 * k + 1)]


def _distributed_worker(rank, world, init_file, real, fake, stats, result_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten())
    fid = FID(Features(net, 64))
    fid.set_reference_stats(stats["mean"], stats["cov"], int(stats["num_samples"]))
    fid.add(fake[rank::world])  # each process adds its share
    value = fid.compute()
    if rank == 0:
        torch.save(torch.tensor(value), result_file)
    dist.destroy_process_group()


def test_fid_is_the_same_when_images_are_split_across_processes(digits, features, tmp_path):
    """torch.distributed (what `accelerate launch` sets up): 2 CPU processes, gloo backend."""
    import torch.multiprocessing as mp

    real, fake = digits[:900], digits[900:]
    stats = feature_stats(features, [real])
    single = FID(features)
    single.set_reference_stats(stats["mean"], stats["cov"], int(stats["num_samples"]))
    single.add(fake)
    result = tmp_path / "fid.pt"
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), real, fake, stats, str(result)), nprocs=2)
    assert float(torch.load(result)) == pytest.approx(single.compute(), rel=1e-6)  # float32 features, other batches
