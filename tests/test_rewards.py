"""Reward protocol, registry (entry points included), built-in rewards on real images, and input errors."""

import sys
import textwrap

import pytest
import torch
from sklearn.datasets import load_sample_images

from diffalign.rewards import as_reward, available_rewards, combine, get_reward, pareto_compare


@pytest.fixture(scope="module")
def photos():
    """Two real photographs (scikit-learn's china.jpg and flower.jpg), 3 x 128 x 128 crops in [0, 1]."""
    arr = torch.from_numpy(load_sample_images().images[0][100:228, 200:328]).permute(2, 0, 1).float() / 255
    arr2 = torch.from_numpy(load_sample_images().images[1][100:228, 200:328]).permute(2, 0, 1).float() / 255
    return torch.stack([arr, arr2])


def test_flat_image_is_more_compressible_than_a_photo_and_noise(photos):
    flat = torch.full((1, 3, 128, 128), 0.5)
    noise = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, photos[:1], noise])
    scores, _ = get_reward("jpeg_compressibility")(images, ["", "", ""])
    assert scores[0] > scores[1] > scores[2]
    inc, _ = get_reward("jpeg_incompressibility")(images, ["", "", ""])
    torch.testing.assert_close(inc, -scores)


def test_pixel_statistics_rank_known_images(photos):
    dark, bright = photos * 0.3, photos * 0.3 + 0.7
    b, _ = get_reward("brightness")(torch.cat([dark, bright]), [""] * 4)
    assert (b[2:] > b[:2]).all()
    grey = photos.mean(1, keepdim=True).repeat(1, 3, 1, 1)
    s, _ = get_reward("saturation")(torch.cat([grey, photos]), [""] * 4)
    assert s[:2].abs().max() < 1e-6 and (s[2:] > 0.1).all()
    c, _ = get_reward("contrast")(torch.cat([torch.full((1, 3, 128, 128), 0.4), photos[:1]]), ["", ""])
    assert c[0] < 1e-6 < c[1]


def test_uint8_images_are_accepted_and_equal_float_input(photos):
    as_uint8 = (photos * 255).round().to(torch.uint8)
    a, _ = get_reward("brightness")(as_uint8, ["", ""])
    b, _ = get_reward("brightness")(as_uint8.float() / 255, ["", ""])
    torch.testing.assert_close(a, b)


def test_differentiable_reward_gives_gradients():
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    r, _ = get_reward("brightness", differentiable=True)(x, ["", ""])
    r.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="not differentiable"):
        get_reward("jpeg_compressibility", differentiable=True)


def test_plain_ddpo_style_function_is_accepted():
    import numpy as np

    def my_reward(images, prompts, metadata):
        return np.array([len(p) for p in prompts], dtype=np.float32), {"kind": "length"}

    scores, info = as_reward(my_reward)(torch.rand(2, 3, 4, 4), ["ab", "abcd"])
    assert scores.tolist() == [2.0, 4.0] and info == {"kind": "length"}


def test_combination_weighted_sum_and_pareto_vector(photos):
    images = torch.cat([photos, photos * 0.2])
    vec, _ = combine(["brightness", "contrast"], mode="vector")(images, [""] * 4)
    assert vec.shape == (4, 2)
    total, _ = combine({"brightness": 2.0, "contrast": -1.0})(images, [""] * 4)
    torch.testing.assert_close(total, 2 * vec[:, 0] - vec[:, 1])
    assert pareto_compare(vec[:2], vec[2:]).tolist() == [1, 1]  # brighter and more contrasted dominates
    assert pareto_compare(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])).tolist() == [0]


def test_reward_registered_through_an_entry_point_is_found_by_name(tmp_path, monkeypatch):
    pkg = tmp_path / "thirdparty_reward"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        import torch
        def make(offset=0.0):
            return lambda images, prompts, metadata: (images.mean(dim=(1, 2, 3)) + offset, {})
        make.differentiable = True
        def dark():
            return lambda images, prompts, metadata: (-images.mean(dim=(1, 2, 3)), {})
    """))
    dist = tmp_path / "thirdparty_reward-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-reward\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[diffalign.rewards]\nmean_plus = thirdparty_reward:make\n"
                                           "brightness = thirdparty_reward:dark\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(UserWarning, match="'thirdparty_reward:dark'.*'brightness', which is a built-in; it is ignored"):
        assert "mean_plus" in available_rewards()
    images = torch.full((2, 1, 4, 4), 0.25, requires_grad=True)
    with pytest.warns(UserWarning, match="ignored"):
        scores, _ = get_reward("mean_plus", differentiable=True, offset=1.0)(images, ["", ""])
        assert get_reward("brightness")(images, ["", ""])[0].mean() > 0  # the built-in, not the entry point
    torch.testing.assert_close(scores.detach(), torch.tensor([1.25, 1.25]))
    scores.sum().backward()  # the factory's `differentiable` attribute is honoured
    assert images.grad is not None
    sys.modules.pop("thirdparty_reward", None)


@pytest.mark.parametrize(
    "images, prompts, match",
    [
        (torch.rand(2, 3, 8, 8) * 2 - 1, ["", ""], r"\[0, 1\].*\(x \+ 1\) / 2"),
        (torch.rand(2, 3, 8, 8) * 255, ["", ""], r"divide by 255"),
        (torch.rand(2, 4, 8, 8), ["", ""], "1 or 3 channels"),
        (torch.rand(2, 8, 8, 3), ["", ""], "1 or 3 channels"),
        (torch.rand(0, 3, 8, 8), [], "empty batch"),
        (torch.rand(2, 3, 8, 8), ["only one"], "1 prompts for 2 images"),
        (torch.rand(3, 8, 8), [""], r"\[N, C, H, W\]"),
    ],
)
def test_bad_input_gets_a_clear_error(images, prompts, match):
    with pytest.raises(ValueError, match=match):
        get_reward("brightness")(images, prompts)


def test_unknown_reward_lists_the_available_ones():
    with pytest.raises(ValueError, match="jpeg_compressibility"):
        get_reward("aesthetics-v9")


def test_prompt_following_reward_is_high_for_the_true_class_and_low_otherwise():
    from diffalign.models.builtin import load_builtin_data

    images, labels = load_builtin_data("digits", split="test")
    images, labels = (images[:40] + 1) / 2, labels[:40]
    reward = get_reward("prompt_following", model="builtin:digits")
    right, info = reward(images, [str(int(k)) for k in labels])
    wrong, _ = reward(images, [str((int(k) + 3) % 10) for k in labels])
    assert right.mean() > 0.8 and wrong.mean() < 0.1
    assert (info["predicted"] == labels).float().mean() > 0.9
    log_prob, _ = get_reward("prompt_log_prob", model="builtin:digits")(images, [str(int(k)) for k in labels])
    assert torch.allclose(log_prob.exp(), right, atol=1e-6) and (log_prob <= 0).all()
    confidence, _ = get_reward("classifier_confidence", model="builtin:digits")(images, [""] * 40)
    assert (confidence >= right - 1e-6).all()
    with pytest.raises(ValueError, match="names no class"):
        reward(images[:1], ["giraffe"])


@pytest.mark.parametrize("model", ["digits", "fashion"])
def test_realism_reward_prefers_real_images_of_the_prompted_class(model):
    from diffalign.models.builtin import load_builtin_data
    from diffalign.rewards.realism import load_realism

    images, labels = load_builtin_data(model, split="test")
    images, labels = (images[:200] + 1) / 2, labels[:200]
    reward = get_reward("realism", model=f"builtin:{model}")
    right, _ = reward(images, [str(int(k)) for k in labels])
    wrong, _ = reward(images, [str((int(k) + 3) % 10) for k in labels])
    noise, _ = reward(torch.rand_like(images), [str(int(k)) for k in labels])
    assert (right <= 0).all() and -1.0 < right.mean() < -0.1  # about -1/2 for a real image, 0 only at a class mean
    assert (right > wrong).float().mean() > 0.8
    assert right.mean() > noise.mean() + 1.0
    # a network FID does not use: not the shipped classifier, and its features are not the FID features
    net, means, precision = load_realism(f"builtin:{model}")
    assert net.features(images[:1] * 2 - 1).shape[1] != 128
    assert means.shape == (10, net.config["feature_dim"]) and torch.allclose(precision, precision.T, atol=1e-4)
    with pytest.raises(ValueError, match="names no class"):
        reward(images[:1], ["giraffe"])


def test_realism_reward_without_its_weights_names_the_script(tmp_path):
    from diffalign.rewards.realism import load_realism

    with pytest.raises(FileNotFoundError, match="scripts/train_realism.py --model digits"):
        load_realism("builtin:digits", directory=tmp_path)
