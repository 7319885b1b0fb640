"""captum_daam.metrics against hand-computed values and slow, explicit re-computations."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captum_daam.metrics import (
    _reinitialise,
    cascading_randomisation,
    deletion,
    energy_pointing_game,
    insertion,
    pointing_game,
    spearman_correlation,
)
from helpers import make_model


class WeightedPixelSum(nn.Module):
    """Two classes: logit 0 is sum(weights * x) over channels and pixels, logit 1 is 0, so
    p(class 0) = sigmoid(sum(weights * x)). Counts its calls."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.weights = weights
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        score = (images * self.weights).flatten(1).sum(dim=1)
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def reference_curve(model, image, attribution, substrate, steps, insert):
    """One image, pixel by pixel in Python: the order by descending attribution (ties by
    row-major index), floor(i N / steps) pixels changed after step i, softmax of class 0."""
    height, width = image.shape[-2:]
    values = attribution.sum(dim=0).flatten().tolist()
    order = sorted(range(height * width), key=lambda pixel: (-values[pixel], pixel))
    probabilities = []
    for step in range(steps + 1):
        changed = torch.zeros(height * width, dtype=torch.bool)
        changed[order[: step * height * width // steps]] = True
        changed = changed.view(1, height, width)
        start, finish = (substrate, image) if insert else (image, substrate)
        perturbed = torch.where(changed, finish, start)
        probabilities.append(torch.softmax(model(perturbed[None]), dim=1)[0, 0])
    return torch.stack(probabilities)


def gaussian_blur_reference(images, kernel_size, sigma):
    """Separable Gaussian of the given size and sigma, normalised, with reflect padding."""
    offsets = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(images.dtype)
    channels = images.shape[1]
    padded = F.pad(images, [kernel_size // 2] * 4, mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)


def toy_problem(batch=2, channels=3, size=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, channels, size, size, generator=generator)
    weights = torch.randn(channels, size, size, generator=generator)
    attributions = torch.randn(batch, 1, size, size, generator=generator)
    return WeightedPixelSum(weights), images, attributions


# ---- deletion and insertion -------------------------------------------------------------------


def test_deletion_of_a_perfect_map_matches_hand_computed_probabilities():
    weights = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    model, image = WeightedPixelSum(weights), torch.ones(1, 1, 2, 2)
    curve = deletion(model, image, weights[None], target=0, steps=4)
    # pixels go 4, 3, 2, 1: the score falls 10, 6, 3, 1, 0
    expected = torch.sigmoid(torch.tensor([10.0, 6.0, 3.0, 1.0, 0.0]))
    torch.testing.assert_close(curve.fractions, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    torch.testing.assert_close(curve.probabilities[0], expected)
    trapezoid = sum((expected[i] + expected[i + 1]) / 2 * 0.25 for i in range(4))
    torch.testing.assert_close(curve.auc[0], trapezoid)


def test_insertion_with_one_step_is_the_mean_of_the_end_probabilities():
    model, images, attributions = toy_problem()
    baseline = torch.full_like(images, 0.3)
    curve = insertion(model, images, attributions, target=0, steps=1, baseline=baseline)
    start = torch.sigmoid((baseline * model.weights).flatten(1).sum(1))
    end = torch.sigmoid((images * model.weights).flatten(1).sum(1))
    torch.testing.assert_close(curve.probabilities, torch.stack([start, end], dim=1))
    torch.testing.assert_close(curve.auc, (start + end) / 2)


@pytest.mark.parametrize("insert", [False, True])
@pytest.mark.parametrize("steps", [1, 3, 5, 16, 40])
def test_curves_match_a_pixel_by_pixel_reference(insert, steps):
    model, images, attributions = toy_problem(batch=3)
    attributions = attributions.round(decimals=0)  # many ties
    baseline = torch.rand(images.shape[1:], generator=torch.Generator().manual_seed(1))
    metric = insertion if insert else deletion
    curve = metric(model, images, attributions, target=0, steps=steps, baseline=baseline)
    for index in range(3):
        expected = reference_curve(
            model, images[index], attributions[index], baseline, steps, insert
        )
        torch.testing.assert_close(curve.probabilities[index], expected)
    fractions = torch.tensor([step * 16 // steps / 16 for step in range(steps + 1)])
    torch.testing.assert_close(curve.fractions, fractions)
    torch.testing.assert_close(curve.auc, torch.trapezoid(curve.probabilities, fractions))


def test_deletion_falls_faster_and_insertion_rises_faster_with_the_true_importance():
    model, images, _ = toy_problem()
    images = images + 0.5  # positive pixels: a weight's sign is its pixel's evidence for class 0
    importance = model.weights.sum(dim=0).expand(2, 1, 4, 4)
    good = deletion(model, images, importance, target=0).auc
    bad = deletion(model, images, -importance, target=0).auc
    assert bool((good < bad).all())
    good = insertion(model, images, importance, target=0, baseline="zeros").auc
    bad = insertion(model, images, -importance, target=0, baseline="zeros").auc
    assert bool((good > bad).all())


def test_ties_are_removed_in_row_major_order():
    weights = torch.arange(1.0, 5.0).view(1, 2, 2)  # 1 2 / 3 4
    model, image = WeightedPixelSum(weights), torch.ones(1, 1, 2, 2)
    curve = deletion(model, image, torch.zeros(1, 1, 2, 2), target=0, steps=4)
    expected = torch.sigmoid(torch.tensor([10.0, 9.0, 7.0, 4.0, 0.0]))
    torch.testing.assert_close(curve.probabilities[0], expected)


def test_baselines_are_what_every_pixel_becomes():
    model, images, attributions = toy_problem(size=8)
    expected = {
        "zeros": torch.zeros_like(images),
        "mean": images.mean(dim=(2, 3), keepdim=True).expand_as(images),
        "blur": gaussian_blur_reference(images, 5, 1.5),
        "tensor": torch.tensor([0.1, 0.5, 0.9]).view(3, 1, 1).expand_as(images),
    }
    for name, substrate in expected.items():
        baseline = torch.tensor([0.1, 0.5, 0.9]).view(3, 1, 1) if name == "tensor" else name
        kwargs = dict(target=0, steps=2, baseline=baseline, blur_kernel_size=5, blur_sigma=1.5)
        deleted = deletion(model, images, attributions, **kwargs).probabilities[:, -1]
        before_insertion = insertion(model, images, attributions, **kwargs).probabilities[:, 0]
        probability = torch.sigmoid((substrate * model.weights).flatten(1).sum(1))
        torch.testing.assert_close(deleted, probability, msg=name)
        torch.testing.assert_close(before_insertion, probability, msg=name)


def test_the_defaults_follow_rise_zeros_for_deletion_and_blur_for_insertion():
    model, images, attributions = toy_problem(size=16)
    deleted = deletion(model, images, attributions, target=0, steps=1).probabilities[:, -1]
    inserted = insertion(model, images, attributions, target=0, steps=1).probabilities[:, 0]
    blurred = gaussian_blur_reference(images, 11, 5.0)
    torch.testing.assert_close(deleted, torch.full((2,), 0.5))
    torch.testing.assert_close(inserted, torch.sigmoid((blurred * model.weights).flatten(1).sum(1)))


def test_a_coarse_map_is_upsampled_bilinearly_and_channels_are_summed():
    model, images, _ = toy_problem(size=8)
    coarse = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(2))
    explicit = F.interpolate(coarse.sum(1, keepdim=True), (8, 8), mode="bilinear")
    for metric in (deletion, insertion):
        curve = metric(model, images, coarse, target=0, steps=8)
        reference = metric(model, images, explicit, target=0, steps=8)
        torch.testing.assert_close(curve.probabilities, reference.probabilities)


def test_targets_in_captum_forms_and_none_as_the_predicted_class():
    model, images, attributions = toy_problem()
    predicted = model(images).argmax(dim=1)
    reference = deletion(model, images, attributions, target=predicted.tolist(), steps=4)
    for target in (None, predicted, predicted.tolist()):
        curve = deletion(model, images, attributions, target=target, steps=4)
        torch.testing.assert_close(curve.probabilities, reference.probabilities)
    ones = deletion(model, images, attributions, target=1, steps=4).probabilities
    zeros = deletion(model, images, attributions, target=torch.tensor(0), steps=4).probabilities
    torch.testing.assert_close(ones, 1 - zeros)


def test_batch_size_sets_the_model_calls_not_the_result():
    model, images, attributions = toy_problem(batch=3)
    reference = deletion(model, images, attributions, target=0, steps=4)
    for batch_size, calls, predicting in ((None, 5, 1), (1, 15, 3), (4, 4, 1), (100, 1, 1)):
        model.calls = 0
        curve = deletion(model, images, attributions, target=0, steps=4, batch_size=batch_size)
        torch.testing.assert_close(curve.probabilities, reference.probabilities)
        assert model.calls == calls
        model.calls = 0
        deletion(model, images, attributions, target=None, steps=4, batch_size=batch_size)
        assert model.calls == calls + predicting  # the predicted classes: one more pass


def test_the_model_mode_and_gradients_are_left_alone():
    model = make_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=5)
    model.train()
    images = torch.rand(2, 3, 32, 32)
    maps = torch.rand(2, 1, 4, 4)
    curve = insertion(model, images, maps, steps=2, baseline="mean")
    assert model.training and not curve.probabilities.requires_grad
    assert all(parameter.grad is None for parameter in model.parameters())


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(inputs=torch.rand(3, 4, 4)), "inputs of shape"),
        (dict(attributions=torch.rand(3, 1, 4, 4)), "attributions for 2"),
        (dict(attributions=torch.rand(2, 4, 4)), "(B, C, h, w)"),
        (dict(attributions=torch.rand(2, 1, 8, 8)), "no larger than"),
        (dict(attributions=torch.full((2, 1, 4, 4), float("nan"))), "finite"),
        (dict(steps=0), "positive int"),
        (dict(steps=True), "steps"),
        (dict(baseline="noise"), "one of"),
        (dict(baseline=torch.rand(2, 3, 5, 5)), "broadcastable"),
        (dict(baseline="blur", blur_kernel_size=4), "odd"),
        (dict(baseline="blur", blur_kernel_size=9), "odd"),
        (dict(baseline="blur", blur_kernel_size=3, blur_sigma=0), "blur_sigma"),
        (dict(batch_size=0), "batch_size"),
        (dict(target=[0, 1, 0]), "one target per example"),
        (dict(target=-1), "non-negative"),
        (dict(target=torch.tensor([0.0, 1.0])), "integer"),
        (dict(target=torch.zeros(2, 1, dtype=torch.long)), "1-D"),
    ],
)
def test_bad_arguments_fail_before_any_model_call(change, message):
    model, images, attributions = toy_problem()
    arguments = dict(inputs=images, attributions=attributions, target=0)
    arguments.update(change)
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        deletion(model, **arguments)
    assert model.calls == 0


def test_a_target_beyond_the_outputs_fails_after_one_call():
    model, images, attributions = toy_problem()
    with pytest.raises(ValueError, match="below the model's 2 outputs, got 2"):
        deletion(model, images, attributions, target=2)
    assert model.calls == 1
    with pytest.raises(ValueError, match=r"return \(2, classes\) scores"):
        deletion(lambda images: images.sum(), images, attributions)


# ---- pointing games ---------------------------------------------------------------------------


def single_pixel_mask(row, col, size=5):
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[0, row, col] = True
    return mask


def test_pointing_game_hits_when_the_maximum_is_on_the_object():
    attributions = torch.zeros(1, 1, 5, 5)
    attributions[0, 0, 1, 2] = 3.0
    assert pointing_game(attributions, single_pixel_mask(1, 2)).tolist() == [True]
    assert pointing_game(attributions, single_pixel_mask(1, 3)).tolist() == [False]
    assert pointing_game(attributions, single_pixel_mask(1, 2)[:, None]).dtype == torch.bool


def test_pointing_game_tolerance_is_a_euclidean_distance_in_pixels():
    attributions = torch.zeros(1, 1, 5, 5)
    attributions[0, 0, 0, 0] = 1.0
    two_right, diagonal = single_pixel_mask(0, 2), single_pixel_mask(1, 1)
    assert pointing_game(attributions, two_right, tolerance=1).tolist() == [False]
    assert pointing_game(attributions, two_right, tolerance=2).tolist() == [True]
    assert pointing_game(attributions, diagonal, tolerance=1).tolist() == [False]
    assert pointing_game(attributions, diagonal, tolerance=1.5).tolist() == [True]


def test_pointing_game_takes_the_first_maximum_in_row_major_order():
    attributions = torch.zeros(1, 1, 5, 5)
    attributions[0, 0, 1, 3] = attributions[0, 0, 3, 0] = 2.0
    assert pointing_game(attributions, single_pixel_mask(1, 3)).tolist() == [True]
    assert pointing_game(attributions, single_pixel_mask(3, 0)).tolist() == [False]


def test_pointing_game_misses_with_a_constant_map_or_an_empty_mask():
    everywhere = torch.ones(2, 5, 5, dtype=torch.bool)
    assert pointing_game(torch.zeros(2, 1, 5, 5), everywhere).tolist() == [False, False]
    peaked = torch.zeros(1, 1, 5, 5)
    peaked[0, 0, 2, 2] = 1.0
    empty = torch.zeros(1, 5, 5, dtype=torch.bool)
    assert pointing_game(peaked, empty, tolerance=10).tolist() == [False]


def test_pointing_game_upsamples_a_coarse_map_and_sums_channels():
    coarse = torch.randn(6, 2, 2, 3, generator=torch.Generator().manual_seed(0))
    masks = torch.rand(6, 8, 12, generator=torch.Generator().manual_seed(1)) > 0.7
    upsampled = F.interpolate(coarse.sum(1, keepdim=True), (8, 12), mode="bilinear")
    peaks = upsampled.flatten(1).argmax(dim=1)
    expected = masks.flatten(1)[torch.arange(6), peaks]
    assert pointing_game(coarse, masks).tolist() == expected.tolist()


def test_energy_pointing_game_is_the_positive_mass_on_the_object():
    attributions = torch.tensor([[[[2.0, -1.0], [1.0, 1.0]]]])
    masks = torch.tensor([[[True, True], [False, False]]])
    torch.testing.assert_close(energy_pointing_game(attributions, masks), torch.tensor([0.5]))
    split = torch.cat([attributions, -attributions.clamp(max=0)], dim=1)  # sums to relu
    torch.testing.assert_close(energy_pointing_game(split, masks), torch.tensor([2 / 4]))


def test_energy_pointing_game_is_zero_without_positive_attribution():
    masks = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    maps = torch.stack([torch.zeros(1, 3, 3), -torch.ones(1, 3, 3)])
    torch.testing.assert_close(energy_pointing_game(maps, masks), torch.zeros(2))


def test_energy_pointing_game_upsamples_before_the_relu():
    coarse = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(3))
    masks = torch.rand(4, 9, 9, generator=torch.Generator().manual_seed(4)) > 0.5
    positive = F.interpolate(coarse, (9, 9), mode="bilinear").relu()[:, 0]
    expected = (positive * masks).sum((1, 2)) / positive.sum((1, 2))
    torch.testing.assert_close(energy_pointing_game(coarse, masks), expected)


@pytest.mark.parametrize("metric", [pointing_game, energy_pointing_game])
def test_pointing_games_reject_bad_masks(metric):
    maps = torch.rand(2, 1, 4, 4)
    with pytest.raises(TypeError, match="bool masks"):
        metric(maps, torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match="masks of shape"):
        metric(maps, torch.ones(2, 2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attributions for 3"):
        metric(maps, torch.ones(3, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="no larger than"):
        metric(maps, torch.ones(2, 3, 3, dtype=torch.bool))


def test_pointing_game_rejects_a_negative_tolerance():
    with pytest.raises(ValueError, match="tolerance"):
        pointing_game(torch.rand(1, 1, 4, 4), torch.ones(1, 4, 4, dtype=torch.bool), -1)


# ---- Spearman and model randomisation ---------------------------------------------------------


def explicit_spearman(first, second):
    """Average ranks by counting (ranks start at 1), then Pearson's formula, in Python."""

    def ranks(values):
        return [
            sum(other < value for other in values)
            + (sum(other == value for other in values) + 1) / 2
            for value in values
        ]

    first, second = ranks(first), ranks(second)
    mean_first, mean_second = sum(first) / len(first), sum(second) / len(second)
    covariance = sum((a - mean_first) * (b - mean_second) for a, b in zip(first, second))
    spread_first = math.sqrt(sum((a - mean_first) ** 2 for a in first))
    spread_second = math.sqrt(sum((b - mean_second) ** 2 for b in second))
    return covariance / (spread_first * spread_second)


def test_spearman_with_ties_matches_a_hand_computed_value():
    # ranks 1, 2.5, 2.5, 4 and 1, 2, 4, 3: covariance 3, spreads sqrt(4.5) and sqrt(5)
    correlation = spearman_correlation(
        torch.tensor([[1.0, 2, 2, 5]]), torch.tensor([[0.0, 1, 3, 2]])
    )
    torch.testing.assert_close(
        correlation, torch.tensor([3 / math.sqrt(22.5)], dtype=torch.float64)
    )


def test_spearman_matches_an_explicit_rank_computation():
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(0, 5, (4, 2, 3, 3), generator=generator).float()  # many ties
    second = torch.randn(4, 2, 3, 3, generator=generator)
    expected = [
        explicit_spearman(a.flatten().tolist(), b.flatten().tolist()) for a, b in zip(first, second)
    ]
    torch.testing.assert_close(
        spearman_correlation(first, second), torch.tensor(expected, dtype=torch.float64)
    )


def test_spearman_is_one_for_monotone_maps_and_nan_for_constant_ones():
    values = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(spearman_correlation(values, values.exp()), torch.ones(2).double())
    torch.testing.assert_close(spearman_correlation(values, -values), -torch.ones(2).double())
    assert spearman_correlation(values, torch.zeros(2, 10)).isnan().all()
    with pytest.raises(ValueError, match="same"):
        spearman_correlation(values, values[:, :5])


class SignedScale(nn.Module):
    """Logits are the first two pixels times one 1-D weight, which re-initialises to ones."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([-1.0]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)[:, :2] * self.weight


def test_randomisation_of_a_map_that_ignores_the_model_keeps_correlation_one():
    model = make_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=5)
    images = torch.rand(3, 3, 32, 32)

    def ignore_model(model, images, target):
        return images

    modules = [model.head, *reversed(model.blocks)]
    correlations = cascading_randomisation(ignore_model, model, images, [0, 1, 2], modules)
    torch.testing.assert_close(correlations, torch.ones(3, 4, dtype=torch.float64))


def test_randomisation_with_and_without_absolute_values():
    model, images = SignedScale(), torch.rand(2, 1, 3, 3) + 0.1

    def explain(model, images, target):
        return images * model.weight

    signed = cascading_randomisation(explain, model, images, 0, [model])
    absolute = cascading_randomisation(explain, model, images, 0, [model], absolute=True)
    torch.testing.assert_close(signed, torch.tensor([[1.0, -1.0]] * 2, dtype=torch.float64))
    torch.testing.assert_close(absolute, torch.ones(2, 2, dtype=torch.float64))
    assert model.weight.item() == -1.0


def test_randomisation_of_a_vit_with_daam_leaves_the_model_and_random_state_alone():
    from captum_daam import DAAM

    model = make_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=5)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    modules = [model.head, *reversed(model.blocks)]
    before = {name: value.clone() for name, value in model.state_dict().items()}
    random_state = torch.random.get_rng_state()

    def explain(model, images, target):
        return DAAM(model).attribute(images, target=target)

    first = cascading_randomisation(explain, model, images, None, modules, seed=3)
    again = cascading_randomisation(explain, model, images, None, modules, seed=3)
    other = cascading_randomisation(explain, model, images, None, modules, seed=4)
    assert first.shape == (2, 5) and first.dtype == torch.float64
    torch.testing.assert_close(first[:, 0], torch.ones(2, dtype=torch.float64))
    assert bool(((first >= -1) & (first <= 1)).all())
    torch.testing.assert_close(first, again)
    assert not torch.equal(first[:, 1:], other[:, 1:])
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert torch.equal(torch.random.get_rng_state(), random_state)
    assert not model.training


def test_reinitialise_resets_like_a_fresh_module_and_falls_back_for_bare_parameters():
    module = nn.Module()
    module.linear = nn.Linear(6, 4)
    module.table = nn.Parameter(torch.full((200, 50), 7.0))
    module.scale = nn.Parameter(torch.full((5,), 7.0))
    module.bias_extra = nn.Parameter(torch.full((5,), 7.0))
    _reinitialise(module, seed=11)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        fresh = nn.Linear(6, 4)  # the linear is the first to draw
    torch.testing.assert_close(module.linear.weight, fresh.weight)
    torch.testing.assert_close(module.linear.bias, fresh.bias)
    assert torch.equal(module.scale, torch.ones(5)) and torch.equal(
        module.bias_extra, torch.zeros(5)
    )
    assert abs(module.table.std().item() - 0.02) < 0.002 and module.table.abs().max() < 0.2


def test_randomisation_rejects_bad_modules_and_maps_before_explaining():
    model = SignedScale()
    calls = []

    def explain(model, images, target):
        calls.append(1)
        return images * model.weight

    images = torch.rand(2, 1, 3, 3)
    with pytest.raises(ValueError, match="submodule of model"):
        cascading_randomisation(explain, model, images, 0, [nn.Linear(1, 1)])
    with pytest.raises(TypeError, match="non-empty list"):
        cascading_randomisation(explain, model, images, 0, [])
    with pytest.raises(ValueError, match="once"):
        cascading_randomisation(explain, model, images, 0, [model, model])
    assert not calls
    with pytest.raises(ValueError, match=r"\(B, C, h, w\) attributions"):
        cascading_randomisation(lambda *args: images[:, 0], model, images, 0, [model])
