"""captum_daam.metrics against quantus 0.6.0 where quantus computes the same quantity, and
the differences the metrics module's docstring claims where it does not.

Same quantity, on a domain (maps at the mask's or image's size, so no upsampling differs):
- ``pointing_game`` = ``quantus.PointingGame`` on maps with one maximum and non-empty masks;
- ``energy_pointing_game`` = ``quantus.RelevanceMassAccuracy`` on non-negative maps with a
  positive value and non-empty masks, and = ``quantus.AttributionLocalisation(abs=False,
  positive_attributions=True)`` on any map with non-empty masks;
- ``deletion`` (zeros) = ``quantus.PixelFlipping(perturb_baseline=0.0)``'s curve, less our
  unperturbed point, for one map per pixel without ties and features_in_step = C x the pixels
  per step;
- ``perturbation``'s probabilities = the same curve at Chefer et al.'s fractions (quantus has no
  accuracy curve, so ``correct`` and ``auc`` are not cross-checked);
- ``cascading_randomisation`` = ``quantus.MPRT(abs=False, normalise=False)`` for the first
  re-initialised layer with our seed set to quantus' seed + 1.

``insertion``, ``segmentation`` and ``confidence_change`` have no quantus counterpart.
"""

import warnings

import numpy as np
import pytest
import quantus
import torch
from torch import nn

from captum_daam.metrics import (
    CHEFER_FRACTIONS,
    cascading_randomisation,
    deletion,
    energy_pointing_game,
    pointing_game,
    perturbation,
)
from helpers import make_model


def random_maps_and_masks(batch, height, width, seed):
    """float64 (B, 1, H, W) normal maps and (B, 1, H, W) bool masks of varied density, each
    with at least one True pixel."""
    generator = torch.Generator().manual_seed(seed)
    maps = torch.randn(batch, 1, height, width, generator=generator, dtype=torch.float64)
    density = torch.rand(batch, 1, 1, 1, generator=generator, dtype=torch.float64) * 0.6 + 0.05
    masks = torch.rand(batch, 1, height, width, generator=generator, dtype=torch.float64) < density
    masks.flatten(1)[:, 0] |= ~masks.flatten(1).any(dim=1)
    return maps, masks


def quantus_localisation(metric, maps, masks):
    """Per-example scores of a quantus localisation metric on torch maps and masks, as a
    float64 tensor; x_batch and y_batch are placeholders (these metrics never run a model)."""
    batch, _, height, width = maps.shape
    images = np.zeros((batch, 3, height, width), dtype=np.float32)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")  # quantus warns of empty masks whatever it is told
        scores = metric(
            model=None,
            x_batch=images,
            y_batch=np.zeros(batch, dtype=np.int64),
            a_batch=maps.numpy(),
            s_batch=masks.numpy(),
            device="cpu",
        )
    return torch.tensor(np.asarray(scores, dtype=np.float64))


def assert_equal_scores(ours, theirs, atol):
    torch.testing.assert_close(ours.to(torch.float64), theirs, rtol=0, atol=atol)


# ---- pointing game ---------------------------------------------------------------------------


def test_pointing_game_equals_quantus_on_maps_with_one_maximum_and_non_empty_masks():
    maps, masks = random_maps_and_masks(64, 16, 12, seed=0)
    flat = maps.flatten(1)
    assert bool(((flat == flat.amax(dim=1, keepdim=True)).sum(dim=1) == 1).all())

    ours = pointing_game(maps, masks)
    theirs = quantus_localisation(quantus.PointingGame(disable_warnings=True), maps, masks)

    assert 0 < int(ours.sum()) < len(ours)  # both hits and misses are compared
    assert_equal_scores(ours, theirs, atol=0)


def test_pointing_game_differs_from_quantus_on_constant_maps_empty_masks_and_tied_maxima():
    height, width = 4, 4
    masks = torch.zeros(4, 1, height, width, dtype=torch.bool)
    masks[:, :, :2, :2] = True  # the first pixel in row-major order is on the object
    maps = torch.rand(4, 1, height, width, generator=torch.Generator().manual_seed(1))
    maps[0] = 0.0  # constant map, all zero: every pixel is a maximum
    maps[1] = 0.5  # constant map
    masks[2] = False  # empty mask, the map's maximum anywhere
    maps[3, 0, 0, 3] = maps[3, 0, 1, 1] = 2.0  # two equal maxima, the first off the object

    ours = pointing_game(maps, masks)
    theirs = quantus_localisation(quantus.PointingGame(disable_warnings=True), maps, masks)

    # quantus: any maximum on the object is a hit (a constant map always), and its NaN for an
    # empty mask, stored into a bool array, reads True; ours: argmax (the first maximum),
    # a constant map and an empty mask are misses
    assert ours.tolist() == [False, False, False, False]
    assert theirs.tolist() == [1.0, 1.0, 1.0, 1.0]


# ---- energy-based pointing game --------------------------------------------------------------


def test_energy_pointing_game_equals_relevance_mass_accuracy_on_non_negative_maps():
    maps, masks = random_maps_and_masks(64, 16, 12, seed=2)
    maps = maps.relu()  # about half the pixels exactly zero
    assert bool((maps.flatten(1).amax(dim=1) > 0).all())

    ours = energy_pointing_game(maps, masks)
    theirs = quantus_localisation(quantus.RelevanceMassAccuracy(disable_warnings=True), maps, masks)

    assert_equal_scores(ours, theirs, atol=1e-9)


def test_energy_pointing_game_differs_from_relevance_mass_accuracy_on_signed_and_zero_maps():
    height, width = 4, 4
    masks = torch.zeros(4, 1, height, width, dtype=torch.bool)
    masks[:, :, :2, :2] = True  # 4 of 16 pixels
    maps = torch.zeros(4, 1, height, width, dtype=torch.float64)
    maps[0] = torch.where(masks[0], 1.0, -0.1)  # inside 4, total 4 - 1.2
    maps[1] = torch.where(masks[1], -1.0, 0.5)  # inside -4, total -4 + 6
    # maps[2] stays zero
    maps[3] = 1.0
    masks[3] = False  # empty mask

    ours = energy_pointing_game(maps, masks)
    theirs = quantus_localisation(quantus.RelevanceMassAccuracy(disable_warnings=True), maps, masks)

    # ours: the ReLU first, in [0, 1], 0 for a zero map and for an empty mask
    assert_equal_scores(ours, torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64), 1e-12)
    # quantus: the signed ratio, outside [0, 1], NaN for a zero map and for an empty mask
    torch.testing.assert_close(theirs[:2], torch.tensor([4 / 2.8, -4 / 2], dtype=torch.float64))
    assert bool(theirs[2:].isnan().all())


def test_energy_pointing_game_equals_attribution_localisation_on_positive_part():
    maps, masks = random_maps_and_masks(64, 16, 12, seed=3)
    maps[0] = 0.0  # no positive value: 0 in both
    maps[1] = -maps[1].abs()
    metric = quantus.AttributionLocalisation(
        abs=False, positive_attributions=True, disable_warnings=True
    )

    ours = energy_pointing_game(maps, masks)
    theirs = quantus_localisation(metric, maps, masks)

    assert ours[0] == 0 and ours[1] == 0
    # quantus divides by the total + 1e-9
    assert_equal_scores(ours, theirs, atol=1e-9)


def test_energy_pointing_game_differs_from_attribution_localisation_on_empty_masks():
    maps, masks = random_maps_and_masks(4, 8, 8, seed=4)
    masks[1:3] = False
    metric = quantus.AttributionLocalisation(
        abs=False, positive_attributions=True, disable_warnings=True
    )

    ours = energy_pointing_game(maps, masks)
    theirs = quantus_localisation(metric, maps, masks)

    assert ours[1:3].tolist() == [0.0, 0.0]
    assert bool(theirs[1:3].isnan().all())
    assert_equal_scores(ours[[0, 3]], theirs[[0, 3]], atol=1e-9)


# ---- deletion and Chefer's perturbation test against PixelFlipping --------------------------


def small_classifier(channels, height, width, seed=0):
    """A convolution and a linear layer to 5 classes, in eval mode (quantus requires it)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * height * width, 5),
    ).eval()


def pixel_flipping_curves(model, images, maps, targets, features_in_step, **kwargs):
    """(B, steps) softmax probabilities of the targets from quantus.PixelFlipping, each image's
    features set to 0 in order of the map, ``features_in_step`` elements per step."""
    metric = quantus.PixelFlipping(
        features_in_step=features_in_step,
        perturb_baseline=0.0,
        disable_warnings=True,
        **kwargs,
    )
    curves = metric(
        model=model,
        x_batch=images.numpy(),
        y_batch=targets.numpy(),
        a_batch=maps.numpy(),
        device="cpu",
    )
    return torch.tensor(np.asarray(curves), dtype=torch.float32)


def test_deletion_with_zeros_equals_pixel_flipping_curve_without_the_unperturbed_point():
    batch, channels, height, width, pixels_per_step = 4, 3, 12, 12, 12
    generator = torch.Generator().manual_seed(5)
    model = small_classifier(channels, height, width)
    images = torch.rand(batch, channels, height, width, generator=generator)
    maps = torch.randn(batch, 1, height, width, generator=generator)
    targets = torch.tensor([0, 1, 2, 4])
    steps = height * width // pixels_per_step

    ours = deletion(model, images, maps, target=targets, steps=steps, baseline="zeros")
    # quantus ranks the C elements of a pixel, tied in a (B, 1, H, W) map, one after another
    theirs = pixel_flipping_curves(model, images, maps, targets, channels * pixels_per_step)

    assert theirs.shape == (batch, steps)
    torch.testing.assert_close(ours.probabilities[:, 1:], theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("positive", [True, False])
def test_perturbation_probabilities_equal_pixel_flipping_at_chefer_fractions(positive):
    batch, height, width, pixels_per_step = 4, 10, 10, 10
    generator = torch.Generator().manual_seed(6)
    model = small_classifier(1, height, width)
    images = torch.rand(batch, 1, height, width, generator=generator)
    maps = torch.randn(batch, 1, height, width, generator=generator)
    targets = torch.tensor([3, 0, 1, 2])
    counts = [int(fraction * height * width) for fraction in CHEFER_FRACTIONS]
    assert counts == [pixels_per_step * step for step in range(len(counts))]

    ours = perturbation(model, images, maps, target=targets, positive=positive)
    # PixelFlipping removes the highest first: negative perturbation is its curve of -map
    theirs = pixel_flipping_curves(
        model, images, maps if positive else -maps, targets, pixels_per_step
    )

    torch.testing.assert_close(
        ours.probabilities[:, 1:], theirs[:, : len(counts) - 1], rtol=0, atol=1e-6
    )


def test_pixel_flipping_flips_colour_channels_apart_and_its_auc_needs_np_trapz():
    batch, channels, height, width = 2, 3, 12, 12
    generator = torch.Generator().manual_seed(7)
    model = small_classifier(channels, height, width)
    images = torch.rand(batch, channels, height, width, generator=generator) + 0.1
    maps = torch.randn(batch, channels, height, width, generator=generator)  # one per channel
    targets = torch.tensor([0, 1])
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        pixel_flipping_curves(model, images, maps, targets, channels * 12)
        theirs_first_step = seen[0]
        seen.clear()
        deletion(model, images, maps, target=targets, steps=12, baseline="zeros")
        ours_steps = torch.cat(seen)
    finally:
        hook.remove()

    def partly_zeroed_pixels(perturbed):
        zeroed = (perturbed == 0).sum(dim=1)
        return int(((zeroed > 0) & (zeroed < channels)).sum())

    # quantus' features are the colour values of a pixel; ours are pixels (channels summed)
    assert partly_zeroed_pixels(theirs_first_step) > 0
    assert partly_zeroed_pixels(ours_steps) == 0

    # its per-sample AUC integrates with np.trapz, which numpy 2.4 no longer has
    assert not hasattr(np, "trapz")
    with pytest.raises(AttributeError, match="trapz"):
        pixel_flipping_curves(
            model, images, maps, targets, channels * 12, return_auc_per_sample=True
        )


# ---- model randomisation ---------------------------------------------------------------------


def gradient_times_input(network, inputs, target):
    """(B, 1, H, W): the target logit's gradient times the input, summed over channels."""
    inputs = inputs.detach().clone().requires_grad_(True)
    scores = network(inputs).gather(1, torch.as_tensor(target).view(-1, 1))
    (gradient,) = torch.autograd.grad(scores.sum(), inputs)
    return (gradient * inputs).sum(dim=1, keepdim=True).detach()


def run_quantus_mprt(model, images, targets, seed, explain=gradient_times_input):
    """quantus.MPRT's scores per layer (top down, cascading), on the raw maps (no absolute
    value, no normalisation), its global reseeding kept inside a forked RNG."""

    def explain_func(model, inputs, targets, **kwargs):
        return explain(model, torch.as_tensor(inputs), torch.as_tensor(targets)).numpy()

    metric = quantus.MPRT(seed=seed, abs=False, normalise=False, disable_warnings=True)
    with torch.random.fork_rng(devices=[]):
        scores = metric(
            model=model,
            x_batch=images.numpy(),
            y_batch=targets.numpy(),
            a_batch=None,
            explain_func=explain_func,
            device="cpu",
        )
        global_seed = torch.initial_seed()
    return scores, global_seed


def tiny_vit_problem():
    model = make_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=5)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    return model, images, torch.tensor([1, 3])


def test_cascading_randomisation_of_the_head_equals_quantus_mprt_first_layer():
    model, images, targets = tiny_vit_problem()
    quantus_seed = 42

    theirs, _ = run_quantus_mprt(model, images, targets, quantus_seed)
    # quantus re-initialises the last module with reset_parameters first, the head, after
    # torch.manual_seed(seed + 1); ours draws the k-th module from seed + k
    assert list(theirs)[:2] == ["original", "head"]
    ours = cascading_randomisation(
        gradient_times_input, model, images, targets, [model.head], seed=quantus_seed + 1
    )

    expected = torch.tensor(np.stack([theirs["original"], theirs["head"]], axis=1))
    assert bool((expected[:, 1] < 0.99).all())  # the head's re-initialisation changed the maps
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_quantus_mprt_randomises_layer_by_layer_and_reseeds_the_global_rng():
    model, images, targets = tiny_vit_problem()
    networks = []

    def recording_explain(network, inputs, target):
        networks.append(network)
        return gradient_times_input(network, inputs, target)

    theirs, global_seed = run_quantus_mprt(model, images, targets, 42, recording_explain)
    fully_randomised = networks[-1]

    # every Linear, LayerNorm and the patch convolution is a "layer", from the top down
    assert list(theirs)[1:] == [
        "head",
        "norm",
        *[
            f"blocks.{block}.{layer}"
            for block in (1, 0)
            for layer in ("mlp.fc2", "mlp.fc1", "norm2", "attn.proj", "attn.qkv", "norm1")
        ],
        "patch_embed.proj",
    ]
    # each reseeds the global RNG with seed + 1
    assert global_seed == 43
    # the class token and the position embedding, owned by no module with reset_parameters,
    # never change
    assert torch.equal(fully_randomised.cls_token, model.cls_token)
    assert torch.equal(fully_randomised.pos_embed, model.pos_embed)
    qkv = model.blocks[0].attn.qkv.weight
    assert not torch.equal(fully_randomised.blocks[0].attn.qkv.weight, qkv)

    # ours, given the whole model as one module, re-initialises those too and leaves the
    # global RNG as it was
    networks.clear()
    state = torch.get_rng_state()
    cascading_randomisation(recording_explain, model, images, targets, [model], seed=43)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(networks[-1].cls_token, model.cls_token)
    assert not torch.equal(networks[-1].pos_embed, model.pos_embed)
