"""The ViT-explanation evaluation protocols of captum_daam.metrics (Chefer et al.'s perturbation
and segmentation tests, average drop and increase in confidence, bootstrap intervals) against
hand computations, transcriptions of the papers' scripts, sklearn and torchcam."""

import math
import re
from contextlib import nullcontext
from fractions import Fraction
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score
from torch import nn
from torchcam.methods.core import _CAM
from torchcam.metrics import ClassificationMetric

from captum_daam.metrics import (
    SegmentationScores,
    bootstrap_interval,
    bootstrap_intervals,
    confidence_change,
    paired_difference,
    perturbation,
    segmentation,
)


class ThresholdedSum(nn.Module):
    """Two classes: logit 0 is sum(weights * x), logit 1 the constant ``threshold``, so class
    0 wins while the weighted sum is above it and p(class 0) = sigmoid(sum - threshold)."""

    def __init__(self, weights: torch.Tensor, threshold: float = 0.0) -> None:
        super().__init__()
        self.weights, self.threshold = weights, threshold
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        score = (images * self.weights).flatten(1).sum(dim=1)
        return torch.stack([score, torch.full_like(score, self.threshold)], dim=1)


class LinearClassifier(nn.Module):
    """A random linear classifier over the flattened image; counts its calls."""

    def __init__(self, shape, classes=5, seed=0, scale=1.0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        features = math.prod(shape)
        self.weight = nn.Parameter(scale * torch.randn(classes, features, generator=generator))
        self.bias = nn.Parameter(torch.randn(classes, generator=generator))
        self.calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return images.flatten(1) @ self.weight.T + self.bias


def trapezoid_by_hand(values, fractions):
    return sum(
        (values[i] + values[i + 1]) / 2 * (fractions[i + 1] - fractions[i])
        for i in range(len(fractions) - 1)
    )


# ---- perturbation test ------------------------------------------------------------------------


def test_perturbation_of_a_perfect_map_matches_the_hand_counted_accuracy():
    # ten pixels weighted 1..10 on an image of ones; class 0 wins while the sum is above 20
    weights = torch.arange(1.0, 11.0).view(1, 2, 5)
    model, image = ThresholdedSum(weights, threshold=20.0), torch.ones(1, 1, 2, 5)
    fractions = [k / 10 for k in range(10)]  # k pixels removed at fraction k / 10

    positive = perturbation(model, image, weights[None], target=0)
    # most relevant first: after k removals the sum is 1 + ... + (10 - k)
    sums = [55, 45, 36, 28, 21, 15, 10, 6, 3, 1]
    assert positive.correct[0].tolist() == [1.0] * 5 + [0.0] * 5
    torch.testing.assert_close(positive.probabilities[0], torch.sigmoid(torch.tensor(sums) - 20.0))
    torch.testing.assert_close(positive.fractions, torch.tensor(fractions))
    torch.testing.assert_close(positive.auc, torch.tensor([0.4 + 0.05]))

    negative = perturbation(model, image, weights[None], target=0, positive=False)
    # least relevant first: after k removals the sum is 55 - (1 + ... + k)
    sums = [55, 54, 52, 49, 45, 40, 34, 27, 19, 10]
    assert negative.correct[0].tolist() == [1.0] * 8 + [0.0] * 2
    torch.testing.assert_close(negative.probabilities[0], torch.sigmoid(torch.tensor(sums) - 20.0))
    torch.testing.assert_close(negative.auc, torch.tensor([0.7 + 0.05]))
    assert negative.correct.dtype == torch.float32 and negative.auc.shape == (1,)


def reference_perturbation(model, image, attribution, substrate, fractions, target, positive):
    """One image, in Python: pixels ordered by attribution (descending for positive,
    ascending for negative, ties by row-major index), the first int(f * N) of them set to the
    baseline in every channel; the target's hit and softmax probability per fraction."""
    height, width = image.shape[-2:]
    values = attribution.sum(dim=0).flatten().tolist()
    sign = -1 if positive else 1
    order = sorted(range(height * width), key=lambda pixel: (sign * values[pixel], pixel))
    hits, probabilities = [], []
    for fraction in fractions:
        removed = torch.zeros(height * width, dtype=torch.bool)
        removed[order[: int(fraction * (height * width))]] = True
        perturbed = torch.where(removed.view(1, height, width), substrate, image)
        scores = model(perturbed[None])[0]
        hits.append(float(scores.argmax() == target))
        probabilities.append(torch.softmax(scores, dim=0)[target])
    return torch.tensor(hits), torch.stack(probabilities)


@pytest.mark.parametrize("positive", [True, False])
@pytest.mark.parametrize("batch_size", [None, 4])
def test_perturbation_matches_a_pixel_by_pixel_reference_with_ties(positive, batch_size):
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(3, 2, 6, 5, generator=generator)
    attributions = torch.randint(0, 4, (3, 2, 6, 5), generator=generator).float()  # many ties
    substrate = torch.rand(2, 6, 5, generator=generator)
    model = LinearClassifier((2, 6, 5), classes=3, seed=1, scale=2.0)
    targets, fractions = [0, 1, 2], [0.0, 0.15, 0.3, 0.5, 0.7, 0.95]
    with torch.no_grad():
        result = perturbation(
            model,
            images,
            attributions,
            targets,
            positive,
            fractions,
            substrate,
            batch_size=batch_size,
        )
        for index in range(3):
            hits, probabilities = reference_perturbation(
                model,
                images[index],
                attributions[index],
                substrate,
                fractions,
                targets[index],
                positive,
            )
            torch.testing.assert_close(result.correct[index], hits)
            torch.testing.assert_close(result.probabilities[index], probabilities)
            torch.testing.assert_close(
                result.auc[index], torch.tensor(trapezoid_by_hand(hits.tolist(), fractions))
            )
    assert 0 < result.correct.mean() < 1  # the curves do change


def chefer_normalize(tensor):
    """Their ``normalize``: mean 0.5 and std 0.5 per channel."""
    return (tensor - 0.5) / 0.5


@pytest.mark.parametrize("negative", [False, True])
def test_perturbation_with_the_normalised_black_follows_chefers_script(negative):
    # pertubation_eval_from_hdf5.py: topk of the (negated) map, zeros scattered into the
    # unnormalised image, then normalised and classified; no ties here, so topk's order is ours
    generator = torch.Generator().manual_seed(2)
    data = torch.rand(4, 3, 8, 8, generator=generator)
    vis = torch.randn(4, 1, 8, 8, generator=generator)
    target = torch.tensor([0, 1, 2, 3])
    model = LinearClassifier((3, 8, 8), classes=4, seed=3, scale=0.5)
    steps = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    base_size = 8 * 8
    ranked = (-vis if negative else vis).reshape(4, -1)
    hits, probabilities = [], []
    with torch.no_grad():
        for step in steps:
            _, idx = torch.topk(ranked, int(base_size * step), dim=-1)
            idx = idx.unsqueeze(1).repeat(1, 3, 1)
            perturbed = data.clone().reshape(4, 3, -1).scatter_(-1, idx, 0).reshape(4, 3, 8, 8)
            out = model(chefer_normalize(perturbed))
            hits.append((target == out.argmax(dim=1)).float())
            probabilities.append(torch.softmax(out, dim=1).gather(1, target[:, None])[:, 0])
    black = chefer_normalize(torch.zeros(3, 1, 1))
    result = perturbation(
        model, chefer_normalize(data), vis, target, positive=not negative, baseline=black
    )
    torch.testing.assert_close(result.correct, torch.stack(hits, dim=1))
    torch.testing.assert_close(result.probabilities, torch.stack(probabilities, dim=1))
    assert 0 < result.correct.mean() < 1


def test_perturbation_removes_int_of_the_float_product_of_pixels():
    # int(0.29 * 100) is 28 and int(0.57 * 100) is 56 (float products just below), as in
    # Chefer et al.'s script; an image of ones whose logit counts the pixels left, over 100
    model = ThresholdedSum(torch.full((1, 10, 10), 0.01), threshold=0.0)
    result = perturbation(
        model,
        torch.ones(1, 1, 10, 10),
        torch.rand(1, 1, 10, 10),
        0,
        fractions=(0.0, 0.29, 0.5, 0.57),
    )
    left = torch.tensor([100, 72, 50, 44]) / 100
    torch.testing.assert_close(result.probabilities[0], torch.sigmoid(left))


def test_perturbation_of_a_coarse_map_is_that_of_its_bilinear_upsampling():
    generator = torch.Generator().manual_seed(4)
    images = torch.rand(2, 3, 8, 8, generator=generator)
    coarse = torch.randn(2, 2, 2, 2, generator=generator)
    upsampled = F.interpolate(coarse.sum(dim=1, keepdim=True), (8, 8), mode="bilinear")
    model = LinearClassifier((3, 8, 8), seed=6)
    for positive in (True, False):
        result = perturbation(model, images, coarse, [1, 2], positive)
        reference = perturbation(model, images, upsampled, [1, 2], positive)
        torch.testing.assert_close(result.probabilities, reference.probabilities)


def test_perturbation_without_target_scores_the_prediction_with_one_more_pass():
    model = LinearClassifier((3, 4, 4), seed=8)
    images = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    maps = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    predicted = model(images).argmax(dim=1)
    model.calls = 0
    result = perturbation(model, images, maps, batch_size=2)
    reference = perturbation(model, images, maps, target=predicted, batch_size=2)
    torch.testing.assert_close(result, reference)
    assert result.correct[:, 0].tolist() == [1.0, 1.0, 1.0]
    assert model.calls == 2 + 15 + 15  # predictions (3 images by 2), then 30 images by 2 twice
    model.train()
    perturbation(model, images, maps)
    assert model.training and all(parameter.grad is None for parameter in model.parameters())


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(inputs=torch.rand(3, 4, 4)), "inputs of shape"),
        (dict(attributions=torch.rand(3, 1, 4, 4)), "attributions for 2"),
        (dict(attributions=torch.rand(2, 4, 4)), "(B, C, h, w)"),
        (dict(attributions=torch.rand(2, 1, 8, 8)), "no larger than"),
        (dict(fractions=(0.0, 0.3, 0.2)), "strictly increasing"),
        (dict(fractions=(0.0, 0.2, 0.2)), "strictly increasing"),
        (dict(fractions=(0.0, 1.0)), "within [0, 1)"),
        (dict(fractions=(-0.1, 0.5)), "within [0, 1)"),
        (dict(fractions=(0.5,)), "at least two"),
        (dict(fractions="0.1"), "at least two"),
        (dict(fractions=torch.zeros(2, 2)), "at least two"),
        (dict(positive="yes"), "positive to be True or False"),
        (dict(baseline="noise"), "one of"),
        (dict(batch_size=0), "batch_size"),
        (dict(target=[0, 1, 0]), "one target per example"),
        (dict(target=-1), "non-negative"),
        (dict(target=torch.tensor([0.0, 1.0])), "integer"),
    ],
)
def test_perturbation_refuses_bad_arguments_before_any_model_call(change, message):
    model = ThresholdedSum(torch.ones(3, 4, 4))
    arguments = dict(inputs=torch.rand(2, 3, 4, 4), attributions=torch.rand(2, 1, 4, 4), target=0)
    arguments.update(change)
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        perturbation(model, **arguments)
    assert model.calls == 0


def test_targets_beyond_the_outputs_are_refused_at_the_first_call():
    # the number of classes is known only from the model's first output
    model = ThresholdedSum(torch.ones(3, 4, 4))
    images, maps = torch.rand(2, 3, 4, 4), torch.rand(2, 1, 4, 4)
    for metric in (perturbation, confidence_change):
        model.calls = 0
        with pytest.raises(ValueError, match="below the model's 2 outputs, got 2"):
            metric(model, images, maps, target=[0, 2])
        assert model.calls == 1


# ---- segmentation -----------------------------------------------------------------------------


def test_segmentation_scores_on_a_3x3_example_computed_by_hand():
    attributions = torch.arange(9.0).view(1, 1, 3, 3)  # min-max normalised: k / 8, mean 1 / 2
    masks = torch.zeros(1, 3, 3, dtype=torch.bool)
    masks.view(-1)[[4, 5, 7, 8]] = True
    scores = segmentation(attributions, masks)
    # foreground: 5 / 8 and above, pixels 5, 6, 7, 8; mask 4, 5, 7, 8
    # agree on pixels 0, 1, 2, 3 (background) and 5, 7, 8 (foreground): 7 of 9
    torch.testing.assert_close(scores.pixel_accuracy, torch.tensor([7 / 9], dtype=torch.float64))
    # background: predicted 0-4, true 0-3 and 6 -> 4 / 6; foreground 3 / 5
    assert scores.intersection.tolist() == [[4, 3]] and scores.union.tolist() == [[6, 5]]
    torch.testing.assert_close(scores.iou, torch.tensor([(4 / 6 + 3 / 5) / 2], dtype=torch.float64))
    # AP: pixel k scores 1 - k / 8 (background) and k / 8 (foreground), so every score is
    # held by two of the 18 entries, one per channel. Groups from the highest score, with the
    # positives they hold and the precision once the group is in (9 positives in all):
    #   1: bg 0 (+), fg 8 (+): 2 of 2      7/8: bg 1 (+), fg 7 (+): 4 of 4
    #   3/4: bg 2 (+), fg 6 (-): 5 of 6    5/8: bg 3 (+), fg 5 (+): 7 of 8
    #   1/2: bg 4 (-), fg 4 (+): 8 of 10   3/8: bg 5 (-), fg 3 (-): no recall gained
    #   1/4: bg 6 (+), fg 2 (-): 9 of 14   the rest: no recall gained
    gains = [
        (2, Fraction(2, 2)),
        (2, Fraction(4, 4)),
        (1, Fraction(5, 6)),
        (2, Fraction(7, 8)),
        (1, Fraction(8, 10)),
        (1, Fraction(9, 14)),
    ]
    expected = sum(Fraction(positives, 9) * precision for positives, precision in gains)
    torch.testing.assert_close(
        scores.average_precision, torch.tensor([float(expected)], dtype=torch.float64)
    )


def normalised_at_mask_size(attributions, size):
    upsampled = F.interpolate(attributions.sum(dim=1, keepdim=True), size, mode="bilinear")
    flat = upsampled.flatten(1)
    low, high = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    return (flat - low) / (high - low)


@pytest.mark.parametrize("levels", [None, 5, 2])
def test_average_precision_matches_sklearn(levels):
    generator = torch.Generator().manual_seed(11 if levels is None else levels)
    if levels is None:  # distinct values, a coarse map upsampled
        attributions = torch.randn(6, 1, 4, 4, generator=generator)
    else:  # few distinct values: ties within and across the two channels
        attributions = torch.randint(0, levels, (6, 1, 12, 12), generator=generator).float()
    masks = torch.rand(6, 12, 12, generator=generator) < torch.linspace(0.05, 0.9, 6).view(6, 1, 1)
    scores = segmentation(attributions, masks)
    maps = normalised_at_mask_size(attributions, (12, 12))
    for index in range(6):
        labels = torch.cat([~masks[index].flatten(), masks[index].flatten()]).numpy()
        predicted = torch.cat([1 - maps[index], maps[index]]).numpy()
        expected = average_precision_score(labels, predicted)
        assert scores.average_precision[index].item() == pytest.approx(expected, abs=1e-12)


def chefer_eval_batch(attributions, labels):
    """imagenet_seg_eval.py for one image (their batch size), from the upsampled map on:
    Res normalised, binarised by gt / le its mean, NaNs to 0, then utils/metrices.py's
    batch_pix_accuracy, batch_intersection_union and get_ap_scores."""
    Res = F.interpolate(attributions, scale_factor=4, mode="bilinear")
    Res = (Res - Res.min()) / (Res.max() - Res.min())
    ret = Res.mean()
    Res_1 = Res.gt(ret).type(Res.type())
    Res_0 = Res.le(ret).type(Res.type())
    Res_1_AP = Res
    Res_0_AP = 1 - Res
    Res_1[Res_1 != Res_1] = 0
    Res_0[Res_0 != Res_0] = 0
    Res_1_AP[Res_1_AP != Res_1_AP] = 0
    Res_0_AP[Res_0_AP != Res_0_AP] = 0
    output = torch.cat((Res_0, Res_1), 1)[0]
    output_AP = torch.cat((Res_0_AP, Res_1_AP), 1)[0]

    _, predict = torch.max(output, 0)
    predict, target = predict.numpy() + 1, labels.numpy() + 1
    correct, labeled = np.sum((predict == target) * (target > 0)), np.sum(target > 0)
    predict = predict * (target > 0).astype(predict.dtype)
    intersection = predict * (predict == target)
    area_inter, _ = np.histogram(intersection, bins=2, range=(1, 2))
    area_pred, _ = np.histogram(predict, bins=2, range=(1, 2))
    area_lab, _ = np.histogram(target, bins=2, range=(1, 2))
    union = area_pred + area_lab - area_inter

    one_hot = torch.zeros_like(output_AP).scatter_(0, labels.unsqueeze(0).long(), 1)
    ap = np.nan_to_num(
        average_precision_score(one_hot.numpy().reshape(-1), output_AP.numpy().reshape(-1))
    )
    return correct, labeled, area_inter, union, ap


def test_segmentation_matches_chefers_script_per_image_and_pooled():
    generator = torch.Generator().manual_seed(7)
    attributions = torch.randn(5, 1, 4, 4, generator=generator)
    attributions[3] = 0.25  # a constant map: NaNs in their script
    masks = torch.rand(5, 16, 16, generator=generator) < 0.4
    scores = segmentation(attributions, masks)
    total_inter, total_union = np.zeros(2, np.int64), np.zeros(2, np.int64)
    for index in range(5):
        correct, labeled, inter, union, ap = chefer_eval_batch(
            attributions[index : index + 1].clone(), masks[index].long()
        )
        assert scores.pixel_accuracy[index].item() == pytest.approx(correct / labeled, abs=1e-12)
        assert scores.intersection[index].tolist() == inter.tolist()
        assert scores.union[index].tolist() == union.tolist()
        assert scores.average_precision[index].item() == pytest.approx(ap, abs=1e-12)
        total_inter, total_union = total_inter + inter, total_union + union
    their_iou = (1.0 * total_inter / (np.spacing(1, dtype=np.float64) + total_union)).mean()
    assert scores.pooled_iou().item() == pytest.approx(their_iou, abs=1e-12)
    assert scores.average_precision[3].item() == 0.5


def test_a_constant_map_is_all_background():
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :2] = True  # half the image; the second mask is empty
    scores = segmentation(torch.full((2, 1, 2, 2), 3.0), masks)
    torch.testing.assert_close(scores.pixel_accuracy, torch.tensor([0.5, 1.0], dtype=torch.float64))
    assert scores.intersection.tolist() == [[8, 0], [16, 0]]
    assert scores.union.tolist() == [[16, 8], [16, 0]]
    # the empty foreground union of the second image counts IoU 1
    torch.testing.assert_close(scores.iou, torch.tensor([0.25, 1.0], dtype=torch.float64))
    torch.testing.assert_close(scores.average_precision, torch.full((2,), 0.5, dtype=torch.float64))


def test_pooled_iou_divides_the_summed_counts():
    scores = SegmentationScores(
        torch.zeros(2),
        torch.zeros(2),
        torch.zeros(2),
        torch.tensor([[1, 0], [5, 3]]),
        torch.tensor([[2, 4], [6, 4]]),
    )
    expected = ((1 + 5) / (2 + 6) + (0 + 3) / (4 + 4)) / 2
    assert scores.pooled_iou().item() == pytest.approx(expected)
    empty = SegmentationScores(*scores[:3], torch.tensor([[2, 0]]), torch.tensor([[2, 0]]))
    assert empty.pooled_iou().item() == 1.0


def test_segmentation_refuses_bad_masks():
    maps = torch.rand(2, 1, 4, 4)
    with pytest.raises(TypeError, match="bool masks"):
        segmentation(maps, torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match="masks of shape"):
        segmentation(maps, torch.ones(2, 2, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attributions for 3"):
        segmentation(maps, torch.ones(3, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="no larger than"):
        segmentation(maps, torch.ones(2, 3, 3, dtype=torch.bool))


# ---- average drop and increase in confidence --------------------------------------------------


def test_confidence_change_on_a_2x2_example_computed_by_hand():
    # the map 0 1 / 2 4 is normalised to E = 0 1/4 / 1/2 1
    maps = torch.tensor([[0.0, 1.0], [2.0, 4.0]]).expand(2, 1, 2, 2)
    weights = torch.tensor([[[1.0, 2.0], [-1.0, 1.0]]])
    images = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [4.0, 0.0]]]).unsqueeze(1)
    model = ThresholdedSum(weights, threshold=1.0)
    change = confidence_change(model, images, maps, target=0)
    # weighted sums: 1 + 2 - 1 + 1 = 3 and -4 on the images;
    # 0 + 2/4 - 1/2 + 1 = 1 and -4/2 = -2 on the explained images
    original = torch.sigmoid(torch.tensor([3.0, -4.0]) - 1)
    explained = torch.sigmoid(torch.tensor([1.0, -2.0]) - 1)
    torch.testing.assert_close(change.probabilities, original)
    torch.testing.assert_close(change.explained_probabilities, explained)
    first_drop = (original[0] - explained[0]) / original[0]
    torch.testing.assert_close(change.drop, torch.stack([first_drop, torch.tensor(0.0)]))
    assert change.increase.tolist() == [False, True]
    # class 1's probability is 1 - p(class 0): the other way round
    other = confidence_change(model, images, maps, target=1)
    torch.testing.assert_close(
        other.drop,
        torch.stack([torch.tensor(0.0), (explained[1] - original[1]) / (1 - original[1])]),
    )
    assert other.increase.tolist() == [True, False]


class FixedCamExtractor:
    """A duck-typed torchcam CAM extractor whose CAMs are given maps, channels summed and
    normalised by torchcam's own ``_CAM._normalize`` (what an extractor returns by default)."""

    def __init__(self, model, maps):
        self.model, self.maps = model, maps

    def __call__(self, class_idx, scores):
        return [_CAM._normalize(self.maps.sum(dim=1).clone(), spatial_dims=2)]

    def fuse_cams(self, cams):
        return cams[0]

    def _hooks_off(self):
        return nullcontext()


@pytest.mark.parametrize("target", [None, "labels"])
def test_confidence_change_means_match_torchcam(target):
    generator = torch.Generator().manual_seed(9)
    images = torch.rand(12, 3, 16, 16, generator=generator)
    maps = torch.randn(12, 2, 4, 4, generator=generator)
    maps[5] = -1.0  # constant: E = 0 here and in torchcam
    model = LinearClassifier((3, 16, 16), classes=5, seed=10, scale=0.2)
    labels = torch.randint(0, 5, (12,), generator=generator).tolist()
    class_idx = None if target is None else labels
    metric = ClassificationMetric(FixedCamExtractor(model, maps), partial(torch.softmax, dim=-1))
    metric.update(images, class_idx=class_idx)
    summary = metric.summary()
    change = confidence_change(model, images, maps, target=class_idx, batch_size=5)
    assert change.drop.mean().item() == pytest.approx(summary["avg_drop"], abs=1e-5)
    assert change.increase.float().mean().item() == pytest.approx(summary["conf_increase"])
    assert 0 < summary["conf_increase"] < 1 and summary["avg_drop"] > 0.01


def test_confidence_change_batches_model_calls_not_results():
    model = LinearClassifier((3, 8, 8), seed=2)
    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    maps = torch.rand(5, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    reference = confidence_change(model, images, maps)
    model.calls = 0
    change = confidence_change(model, images, maps, batch_size=2)
    torch.testing.assert_close(change, reference)
    assert model.calls == 6 and change.increase.dtype == torch.bool


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(inputs=torch.rand(2, 3, 4)), "inputs of shape"),
        (dict(attributions=torch.rand(3, 1, 2, 2)), "attributions for 2"),
        (dict(attributions=torch.rand(2, 1, 5, 5)), "no larger than"),
        (dict(attributions=torch.full((2, 1, 2, 2), float("inf"))), "finite"),
        (dict(target=[1]), "one target per example"),
        (dict(target=-2), "non-negative"),
        (dict(batch_size=1.5), "batch_size"),
    ],
)
def test_confidence_change_refuses_bad_arguments_before_any_model_call(change, message):
    model = ThresholdedSum(torch.ones(3, 4, 4))
    arguments = dict(inputs=torch.rand(2, 3, 4, 4), attributions=torch.rand(2, 1, 2, 2))
    arguments.update(change)
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        confidence_change(model, **arguments)
    assert model.calls == 0


# ---- bootstrap intervals ----------------------------------------------------------------------


def quantile_by_hand(values, level):
    """Linear interpolation between the order statistics at position level * (n - 1)."""
    ordered = sorted(values)
    position = level * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (position - below) * (ordered[above] - ordered[below])


def test_bootstrap_interval_matches_resamples_drawn_by_hand():
    values = torch.tensor([0.3, float("nan"), 1.2, -0.4, 2.0, 0.9, 0.1])
    kept = [value for value in values.double().tolist() if not math.isnan(value)]
    rows = torch.randint(6, (400, 6), generator=torch.Generator().manual_seed(3)).tolist()
    means = [sum(kept[index] for index in row) / 6 for row in rows]
    interval = bootstrap_interval(values, confidence=0.9, resamples=400, seed=3)
    assert interval.mean == pytest.approx(sum(kept) / 6, abs=1e-15)
    assert interval.low == pytest.approx(quantile_by_hand(means, 0.05), abs=1e-12)
    assert interval.high == pytest.approx(quantile_by_hand(means, 0.95), abs=1e-12)
    assert isinstance(interval.low, float)


def test_bootstrap_draws_in_blocks_as_one_draw():
    # 5000 values: the indices come in three blocks of at most 838 resamples
    values = torch.randn(5000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    indices = torch.randint(5000, (2000, 5000), generator=torch.Generator().manual_seed(1))
    means = values[indices].mean(dim=1).tolist()
    interval = bootstrap_interval(values, resamples=2000, seed=1)
    assert interval.low == pytest.approx(quantile_by_hand(means, 0.025), abs=1e-12)
    assert interval.high == pytest.approx(quantile_by_hand(means, 0.975), abs=1e-12)


def test_bootstrap_of_constant_values_is_exact():
    assert bootstrap_interval(torch.full((9,), 0.75), resamples=50) == (0.75, 0.75, 0.75)
    assert bootstrap_interval(torch.tensor([2.0, float("nan")])) == (2.0, 2.0, 2.0)
    assert paired_difference(torch.arange(5.0) + 1, torch.arange(5.0)) == (1.0, 1.0, 1.0)


def test_paired_difference_resamples_the_same_examples_of_both():
    a = torch.tensor([0.5, 0.7, float("nan"), 0.2, 0.9, 0.4, 0.6])
    b = torch.tensor([0.4, 0.1, 0.3, float("nan"), 0.8, 0.5, 0.2])
    both = [0, 1, 4, 5, 6]  # scored by both
    rows = torch.randint(5, (300, 5), generator=torch.Generator().manual_seed(4)).tolist()
    a_kept, b_kept = [a[i].item() for i in both], [b[i].item() for i in both]
    means = [sum(a_kept[i] for i in row) / 5 - sum(b_kept[i] for i in row) / 5 for row in rows]
    interval = paired_difference(a, b, confidence=0.8, resamples=300, seed=4)
    assert interval.mean == pytest.approx((sum(a_kept) - sum(b_kept)) / 5, abs=1e-7)
    assert interval.low == pytest.approx(quantile_by_hand(means, 0.1), abs=1e-7)
    assert interval.high == pytest.approx(quantile_by_hand(means, 0.9), abs=1e-7)


def test_bootstrap_intervals_cover_the_true_mean_of_normal_samples():
    generator = torch.Generator().manual_seed(12)
    trials, covered, covered_paired = 300, 0, 0
    for trial in range(trials):
        sample = torch.randn(40, generator=generator, dtype=torch.float64) + 3.0
        low, high = bootstrap_interval(sample, resamples=1000, seed=trial)[1:]
        covered += low <= 3.0 <= high
        shared = torch.randn(40, generator=generator, dtype=torch.float64)
        first = shared + 0.5 + 0.3 * torch.randn(40, generator=generator, dtype=torch.float64)
        second = shared + 0.3 * torch.randn(40, generator=generator, dtype=torch.float64)
        low, high = paired_difference(first, second, resamples=1000, seed=trial)[1:]
        covered_paired += low <= 0.5 <= high
    # nominal 0.95; the percentile bootstrap undercovers slightly at n = 40
    assert 0.89 <= covered / trials <= 0.99
    assert 0.89 <= covered_paired / trials <= 0.99


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: bootstrap_interval(torch.rand(2, 3)), ValueError, "1-D tensor"),
        (lambda: bootstrap_interval([0.1, 0.2]), ValueError, "1-D tensor"),
        (lambda: bootstrap_interval(torch.ones(3, dtype=torch.bool)), TypeError, "real"),
        (lambda: bootstrap_interval(torch.tensor([1.0, math.inf])), ValueError, "finite"),
        (lambda: bootstrap_interval(torch.full((3,), math.nan)), ValueError, "3 NaNs"),
        (lambda: bootstrap_interval(torch.rand(3), confidence=1.0), ValueError, "(0, 1)"),
        (lambda: bootstrap_interval(torch.rand(3), confidence=95), ValueError, "(0, 1)"),
        (lambda: bootstrap_interval(torch.rand(3), resamples=0), ValueError, "resamples"),
        (lambda: bootstrap_interval(torch.rand(3), seed=1.0), TypeError, "seed"),
        (lambda: paired_difference(torch.rand(3), torch.rand(4)), ValueError, "3 and 4"),
        (lambda: paired_difference(torch.rand(3), torch.rand(3, 1)), ValueError, "second"),
    ],
)
def test_bootstrap_refuses_bad_arguments(call, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call()


def test_bootstrap_intervals_of_columns_equal_each_columns_bootstrap_interval():
    generator = torch.Generator().manual_seed(5)
    columns = torch.rand(300, 4, generator=generator, dtype=torch.float64)
    columns[7, 2] = float("nan")  # this column is resampled on its own
    together = bootstrap_intervals(columns, confidence=0.9, resamples=700, seed=4)
    for k in range(4):
        alone = bootstrap_interval(columns[:, k], confidence=0.9, resamples=700, seed=4)
        assert tuple(together[k]) == pytest.approx(tuple(alone), rel=1e-9, abs=1e-12)
    with pytest.raises(ValueError, match="2-D"):
        bootstrap_intervals(columns[:, 0])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_intervals(columns, confidence=1.5)
