"""Quality metrics for attribution maps: deletion and insertion, Chefer et al.'s perturbation
test and ImageNet-segmentation scores, the pointing games, average drop and increase in
confidence, and the cascading model-randomisation sanity check; and percentile-bootstrap
intervals for their means. All are batched and run in torch on the inputs' device.

Attributions are taken as (B, 1, h, w) or (B, C, h, w): channels are summed (the map of a
Captum attribution over the input's colour channels is their sum), and a map smaller than the
image (or mask) is brought to its size with ``LayerAttribution.interpolate(..., "bilinear")``.

Which metric comes from where (checked against quantus 0.6.0, grad-cam 1.5.7, captum 0.9.0,
torchcam 0.5.0 and Chefer et al.'s scripts in hila-chefer/Transformer-Explainability):

- **Deletion / insertion** (Petsiuk et al. 2018): here. ``captum.metrics`` has only
  infidelity and sensitivity; pytorch-grad-cam's ROAD and confidence-change metrics perturb at
  one threshold, not along a curve; quantus has deletion only: ``PixelFlipping`` flips each
  element (a colour channel of a pixel) as a feature, leaves out the unperturbed point, needs
  its step to divide the pixel count, and its per-example AUC integrates over the step index
  with ``np.trapz``, which numpy 2.4 no longer has (AttributeError); its curve equals
  :func:`deletion`'s probabilities after step 0 for a one-channel map with zeros as baseline
  (tests/test_metrics_quantus.py). ``RegionPerturbation`` removes 8 x 8 patches ranked by
  their summed attribution and records the drop of the score, not a curve of probabilities.
- **Positive / negative perturbation** (Chefer, Gur & Wolf, CVPR 2021): here. Their
  ``pertubation_eval_from_hdf5.py`` ranks pixels with ``torch.topk`` (ties in no set order),
  sets them to 0 before the normalisation and saves the hits per step; no library above has
  this accuracy curve (quantus' PixelFlipping gives its probabilities, tested).
- **ImageNet-segmentation scores** (Chefer et al. 2021, ``imagenet_seg_eval.py``): here,
  without sklearn (their average precision is ``sklearn.metrics.average_precision_score``).
  quantus' localisation ``AUC`` is the ROC AUC of the raw map, and it has no IoU.
- **Average drop / increase in confidence** (Chattopadhyay et al., Grad-CAM++, WACV 2018):
  here, as torchcam's ``ClassificationMetric`` computes them (without its 1e-7 and 1e-8
  guards, and leaving the model's mode alone); pytorch-grad-cam's ``DropInConfidence`` is the
  plain difference max(0, Y - O), not divided by Y, of the logit by default.
- **Pointing game** (Zhang et al. 2018): here; equal to quantus' ``PointingGame`` on maps
  with one maximum and non-empty masks (tested). quantus has no tolerance, counts an image
  with an empty mask as a hit (it stores NaN into a bool array), a constant map as a hit
  (every pixel is a maximum), and any tied maximum on the object as a hit.
- **Energy-based pointing game** (Wang et al. 2020): here; equal to quantus'
  ``AttributionLocalisation(abs=False, positive_attributions=True)`` but for an empty mask
  (NaN there), and to ``RelevanceMassAccuracy`` on non-negative maps (tested); the latter
  divides the signed attribution (no ReLU: values outside [0, 1]) and gives NaN for a zero map.
- **Model randomisation** (Adebayo et al. 2018): here; the first step equals quantus'
  ``MPRT`` (tested). ``MPRT`` re-initialises every module that has ``reset_parameters`` one
  after another (each Linear and LayerNorm is a "layer"; a ViT's class token and position
  embedding never change), reseeding the global RNG with the same seed for each.
- **Bootstrap intervals** of a mean and of a paired difference of means (Efron's percentile
  bootstrap): here, in torch; ``scipy.stats.bootstrap`` would bring scipy.

quantus would also bring pandas, opencv-python, scikit-image, scikit-learn and scipy (about
0.5 GB) and works on numpy arrays on the CPU; so no metric here depends on it (the tests do).
"""

import copy
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from captum._utils.typing import TargetType
from captum.attr import LayerAttribution
from torch import Tensor, nn
from torchvision.transforms.functional import gaussian_blur

from ._targets import format_target

__all__ = [
    "PerturbationCurve",
    "deletion",
    "insertion",
    "PerturbationTest",
    "perturbation",
    "pointing_game",
    "energy_pointing_game",
    "SegmentationScores",
    "segmentation",
    "ConfidenceChange",
    "confidence_change",
    "cascading_randomisation",
    "spearman_correlation",
    "Interval",
    "bootstrap_interval",
    "bootstrap_intervals",
    "paired_difference",
]

BASELINES = ("blur", "zeros", "mean")

#: The fractions of Chefer et al.'s perturbation test: 0 % to 90 % of the pixels in 10 % steps.
CHEFER_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

#: At most this many resampled indices are held at once by the bootstrap.
_BOOTSTRAP_BLOCK = 2**22


class PerturbationCurve(NamedTuple):
    """A deletion or insertion curve per example.

    Attributes:
        fractions: (steps + 1,) the fraction of pixels removed (deletion) or inserted
            (insertion) after each step, from 0 to 1.
        probabilities: (B, steps + 1) the model's softmax probability of the target class
            after each step.
        auc: (B,) the area under each curve, ``torch.trapezoid(probabilities, fractions)``.
    """

    fractions: Tensor
    probabilities: Tensor
    auc: Tensor


def deletion(
    forward_func: Callable[[Tensor], Tensor],
    inputs: Tensor,
    attributions: Tensor,
    target: TargetType = None,
    steps: int = 32,
    baseline: Union[str, Tensor] = "zeros",
    blur_kernel_size: int = 11,
    blur_sigma: float = 5.0,
    batch_size: Optional[int] = None,
) -> PerturbationCurve:
    r"""The deletion curve (Petsiuk, Das & Saenko, RISE, BMVC 2018): the most attributed pixels
    are replaced by the baseline first; a faithful map makes the probability fall fast
    (lower AUC is better).

    Pixels are ordered by attribution, highest first; ties keep row-major order (a stable
    sort). After step i of ``steps`` the first floor(i N / steps) of the N pixels are replaced,
    in every channel; ``fractions`` holds these counts over N, exactly i / steps when ``steps``
    divides N. The model sees the whole batch (or ``batch_size`` images) per call, under
    ``torch.no_grad``; its train/eval mode is left as it is (put it in eval mode first: dropout
    makes the curves noisy).

    Args:
        forward_func (Callable): the model or any function from (n, C, H, W) images to
            (n, classes) scores (logits; the softmax is taken here).
        inputs (Tensor): (B, C, H, W) images, as ``forward_func`` takes them.
        attributions (Tensor): (B, 1, h, w) or (B, C', h, w) maps with h <= H, w <= W;
            channels are summed and smaller maps upsampled bilinearly.
        target (int, list[int] or Tensor, optional): the class per example, Captum style;
            None takes each example's predicted class on the unmodified image (one more
            pass of the model over the images).
            Default: None
        steps (int, optional): number of steps from no pixel to all pixels; the model is run
            on steps + 1 versions of every image. RISE moves 224 pixels per step on 224 x 224
            images (224 steps); 32 costs 7 times less and, for DAAM on the bundled model,
            moves the mean AUC by 0.003 (deletion) and 0.001 (insertion) from 256 steps.
            Default: 32
        baseline (str or Tensor, optional): what a deleted pixel becomes: ``"zeros"``
            (zero in the model's input space, as RISE deletes), ``"blur"`` (a Gaussian-blurred
            copy of the image), ``"mean"`` (each image's per-channel mean), or a tensor
            broadcastable to ``inputs``.
            Default: ``"zeros"``
        blur_kernel_size (int, optional): odd kernel size of the ``"blur"`` baseline
            (``torchvision.transforms.functional.gaussian_blur``, reflect padding); RISE uses
            11 (with zero padding).
            Default: 11
        blur_sigma (float, optional): standard deviation in pixels of the ``"blur"``
            baseline; RISE uses 5.
            Default: 5.0
        batch_size (int, optional): images per model call; None: B.
            Default: None

    Returns:
        :class:`PerturbationCurve`: ``fractions`` (steps + 1,), ``probabilities``
        (B, steps + 1) and ``auc`` (B,), on the inputs' device.

    Example::

        >>> from captum_daam import DAAM
        >>> from captum_daam.data import make_shapes
        >>> from captum_daam.zoo import tiny_vit
        >>> model = tiny_vit()
        >>> images, labels, masks = make_shapes(4, seed=3)
        >>> maps = DAAM(model).attribute(images, target=labels[:, 0])
        >>> curve = deletion(model, images, maps, target=labels[:, 0])
        >>> curve.probabilities.shape, curve.auc.shape
        (torch.Size([4, 33]), torch.Size([4]))
    """
    return _perturbation_curve(
        forward_func,
        inputs,
        attributions,
        target,
        steps,
        baseline,
        blur_kernel_size,
        blur_sigma,
        batch_size,
        insert=False,
    )


def insertion(
    forward_func: Callable[[Tensor], Tensor],
    inputs: Tensor,
    attributions: Tensor,
    target: TargetType = None,
    steps: int = 32,
    baseline: Union[str, Tensor] = "blur",
    blur_kernel_size: int = 11,
    blur_sigma: float = 5.0,
    batch_size: Optional[int] = None,
) -> PerturbationCurve:
    r"""The insertion curve (Petsiuk, Das & Saenko, RISE, BMVC 2018): starting from the
    baseline, the image's most attributed pixels are put back first; a faithful map makes the
    probability rise fast (higher AUC is better).

    Ordering, steps, batching and the model's mode are as in :func:`deletion`; step 0 is the
    baseline and the last step the unmodified image.

    Args:
        forward_func (Callable): the model or any function from (n, C, H, W) images to
            (n, classes) scores (logits; the softmax is taken here).
        inputs (Tensor): (B, C, H, W) images, as ``forward_func`` takes them.
        attributions (Tensor): (B, 1, h, w) or (B, C', h, w) maps with h <= H, w <= W;
            channels are summed and smaller maps upsampled bilinearly.
        target (int, list[int] or Tensor, optional): the class per example, Captum style;
            None takes each example's predicted class on the unmodified image.
            Default: None
        steps (int, optional): number of steps from no pixel to all pixels.
            Default: 32
        baseline (str or Tensor, optional): the image before insertion: ``"blur"`` (a
            Gaussian-blurred copy, as RISE inserts), ``"zeros"``, ``"mean"`` (each image's
            per-channel mean), or a tensor broadcastable to ``inputs``.
            Default: ``"blur"``
        blur_kernel_size (int, optional): odd kernel size of the ``"blur"`` baseline.
            Default: 11
        blur_sigma (float, optional): standard deviation in pixels of the ``"blur"`` baseline.
            Default: 5.0
        batch_size (int, optional): images per model call; None: B.
            Default: None

    Returns:
        :class:`PerturbationCurve`: ``fractions`` (steps + 1,), ``probabilities``
        (B, steps + 1) and ``auc`` (B,), on the inputs' device.

    Example::

        >>> curve = insertion(model, images, maps, target=labels[:, 0], steps=16)
        >>> curve.fractions.shape
        torch.Size([17])
    """
    return _perturbation_curve(
        forward_func,
        inputs,
        attributions,
        target,
        steps,
        baseline,
        blur_kernel_size,
        blur_sigma,
        batch_size,
        insert=True,
    )


class PerturbationTest(NamedTuple):
    """Chefer et al.'s positive or negative perturbation test per example.

    Attributes:
        fractions: (F,) the fractions of pixels perturbed, as given.
        correct: (B, F) 1.0 where the model's top class on the perturbed image is the target,
            else 0.0; its mean over examples is Chefer et al.'s accuracy curve.
        probabilities: (B, F) the model's softmax probability of the target class.
        auc: (B,) the area under each ``correct`` curve, ``torch.trapezoid(correct,
            fractions)``; the mean over examples is the AUC of the accuracy curve.
    """

    fractions: Tensor
    correct: Tensor
    probabilities: Tensor
    auc: Tensor


def perturbation(
    forward_func: Callable[[Tensor], Tensor],
    inputs: Tensor,
    attributions: Tensor,
    target: TargetType = None,
    positive: bool = True,
    fractions: Sequence[float] = CHEFER_FRACTIONS,
    baseline: Union[str, Tensor] = "zeros",
    blur_kernel_size: int = 11,
    blur_sigma: float = 5.0,
    batch_size: Optional[int] = None,
) -> PerturbationTest:
    r"""The perturbation test of Chefer, Gur & Wolf (Transformer Interpretability Beyond
    Attention Visualization, CVPR 2021): pixels are removed in the order of the map and the
    model classifies what is left. Positive perturbation removes the most relevant pixels
    first: a faithful map makes the accuracy fall fast (lower AUC is better). Negative
    perturbation removes the least relevant first: the accuracy should hold (higher AUC is
    better). One function does both, chosen by ``positive``.

    The map is brought to the image size as in :func:`deletion` and the pixels are ranked by
    it, highest first for positive perturbation and lowest first for negative (Chefer et al.
    rank the negated map); ties keep row-major order in both (a stable sort; Chefer et al.'s
    ``torch.topk`` breaks them in no set order). At each fraction f the first
    ``int(f * (H * W))`` ranked pixels (a float product, as in their script: 28 pixels for
    f = 0.29 of 100) are set to the baseline in every channel. Chefer et al. set them to 0
    before normalising the image; here the baseline is in the model's input space, as in
    :func:`deletion`: pass the normalised black, e.g. ``((0 - mean) / std).view(3, 1, 1)``,
    to follow them exactly. The model sees the whole batch (or ``batch_size`` images) per
    call, under ``torch.no_grad``; its train/eval mode is left as it is.

    Args:
        forward_func (Callable): the model or any function from (n, C, H, W) images to
            (n, classes) scores (logits; the softmax is taken here).
        inputs (Tensor): (B, C, H, W) images, as ``forward_func`` takes them.
        attributions (Tensor): (B, 1, h, w) or (B, C', h, w) maps with h <= H, w <= W;
            channels are summed and smaller maps upsampled bilinearly.
        target (int, list[int] or Tensor, optional): the class per example, Captum style;
            Chefer et al. score against the ground-truth label. None takes each example's
            predicted class on the unmodified image (one more pass of the model).
            Default: None
        positive (bool, optional): True removes the most relevant pixels first (positive
            perturbation), False the least relevant first (negative perturbation).
            Default: True
        fractions (sequence of float, optional): strictly increasing fractions in [0, 1) of
            the pixels to remove, at least two; the model runs once per fraction and image.
            Default: ``(0.0, 0.1, ..., 0.9)``, the unperturbed image and Chefer et al.'s
            nine steps
        baseline (str or Tensor, optional): what a removed pixel becomes: ``"zeros"``,
            ``"blur"``, ``"mean"`` or a tensor broadcastable to ``inputs``, as in
            :func:`deletion`.
            Default: ``"zeros"``
        blur_kernel_size (int, optional): odd kernel size of the ``"blur"`` baseline.
            Default: 11
        blur_sigma (float, optional): standard deviation in pixels of the ``"blur"`` baseline.
            Default: 5.0
        batch_size (int, optional): images per model call; None: B.
            Default: None

    Returns:
        :class:`PerturbationTest`: ``fractions`` (F,), ``correct`` and ``probabilities``
        (B, F) and ``auc`` (B,), on the inputs' device.

    Example::

        >>> positive = perturbation(model, images, maps, target=labels[:, 0])
        >>> negative = perturbation(model, images, maps, target=labels[:, 0], positive=False)
        >>> positive.correct.mean(dim=0), positive.auc.mean(), negative.auc.mean()
    """
    targets = _check_model_inputs(inputs, attributions, target)
    if not isinstance(positive, bool):
        raise TypeError(f"Expected positive to be True or False, got {positive!r}.")
    fractions = _check_fractions(fractions)
    _check_batch_size(batch_size)

    batch, _, height, width = inputs.shape
    num_pixels, device = height * width, inputs.device
    with torch.no_grad():
        substrate = _baseline(inputs, baseline, blur_kernel_size, blur_sigma)
        ranks = _pixel_ranks(attributions.to(device), (height, width), positive)
        counts = torch.tensor([int(f * num_pixels) for f in fractions], device=device)
        chunk = batch_size or batch
        if targets is None:
            targets = _target_probabilities(forward_func, inputs, None, chunk)[1]
        probabilities, hits = _perturbed_predictions(
            forward_func, inputs, substrate, ranks, counts, targets.to(device), chunk
        )
        points = torch.tensor(fractions, dtype=probabilities.dtype, device=device)
        correct = hits.to(probabilities.dtype)
    return PerturbationTest(points, correct, probabilities, torch.trapezoid(correct, points))


def pointing_game(attributions: Tensor, masks: Tensor, tolerance: float = 0) -> Tensor:
    r"""The pointing game (Zhang et al., Top-down neural attention by excitation backprop,
    ECCV 2016 / IJCV 2018): a hit when the map's maximum lies on the object.

    The map is brought to the mask's size first. Of several equal maxima the first in
    row-major order counts (``torch.argmax``); a constant map (all zero, say) has no maximum
    and is a miss, and so is every map against an empty mask (leave such images out when
    averaging).

    Args:
        attributions (Tensor): (B, 1, h, w) or (B, C, h, w) maps with h <= H, w <= W;
            channels are summed and smaller maps upsampled bilinearly.
        masks (Tensor): (B, H, W) or (B, 1, H, W) bool, True on the object.
        tolerance (float, optional): a hit also when the maximum is within this Euclidean
            distance, in mask pixels, of the object. Zhang et al. use 15 pixels on their
            datasets' images; 0 asks for the maximum on the object itself.
            Default: 0

    Returns:
        Tensor: (B,) bool, True for a hit.

    Example::

        >>> pointing_game(maps, masks).float().mean()  # the pointing-game accuracy
    """
    masks = _check_masks(masks, attributions)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0:
        raise ValueError(f"Expected tolerance to be a non-negative number, got {tolerance!r}.")
    height, width = masks.shape[-2:]
    saliency = _spatial_map(attributions, (height, width)).flatten(1)
    peak = saliency.argmax(dim=1)
    rows = torch.arange(height, device=masks.device).view(1, -1, 1)
    cols = torch.arange(width, device=masks.device).view(1, 1, -1)
    peak_row, peak_col = (peak // width).view(-1, 1, 1), (peak % width).view(-1, 1, 1)
    near_peak = (rows - peak_row) ** 2 + (cols - peak_col) ** 2 <= tolerance**2
    hit = (near_peak & masks).flatten(1).any(dim=1)
    return hit & (saliency.amax(dim=1) > saliency.amin(dim=1))


def energy_pointing_game(attributions: Tensor, masks: Tensor) -> Tensor:
    r"""The energy-based pointing game (Wang et al., Score-CAM, CVPR Workshops 2020): the share
    of the map's positive part that lies on the object, sum(relu(a) * mask) / sum(relu(a)).

    The map is brought to the mask's size first (channels summed, then upsampled, then the
    ReLU). A map with no positive value gives 0.

    Args:
        attributions (Tensor): (B, 1, h, w) or (B, C, h, w) maps with h <= H, w <= W.
        masks (Tensor): (B, H, W) or (B, 1, H, W) bool, True on the object.

    Returns:
        Tensor: (B,) floats in [0, 1].

    Example::

        >>> energy_pointing_game(maps, masks).mean()
    """
    masks = _check_masks(masks, attributions)
    positive = _spatial_map(attributions, tuple(masks.shape[-2:])).relu().flatten(1)
    inside = (positive * masks.flatten(1)).sum(dim=1)
    total = positive.sum(dim=1)
    return inside / torch.where(total > 0, total, torch.ones_like(total))


class SegmentationScores(NamedTuple):
    """Chefer et al.'s ImageNet-segmentation scores per example.

    Attributes:
        pixel_accuracy: (B,) float64, the share of pixels where the binarised map equals the
            mask.
        iou: (B,) float64, the mean of the background and the foreground IoU (the image's
            mIoU).
        average_precision: (B,) float64, the AP of the scores [1 - map, map] against the
            labels [not mask, mask].
        intersection: (B, 2) int64 pixel counts, background then foreground.
        union: (B, 2) int64 pixel counts, background then foreground.
    """

    pixel_accuracy: Tensor
    iou: Tensor
    average_precision: Tensor
    intersection: Tensor
    union: Tensor

    def pooled_iou(self) -> Tensor:
        r"""The mIoU as Chefer et al. report it: per class the intersections summed over the
        examples over the unions summed, then the mean of the two classes (a class whose
        summed union is empty counts 1). It differs from ``iou.mean()``, which weighs every
        image equally. For several batches, concatenate their scores first:
        ``SegmentationScores(*map(torch.cat, zip(*batches))).pooled_iou()``.

        Returns:
            Tensor: a float64 scalar.
        """
        return _iou(self.intersection.sum(dim=0), self.union.sum(dim=0)).mean()


def segmentation(attributions: Tensor, masks: Tensor) -> SegmentationScores:
    r"""The ImageNet-segmentation test of Chefer, Gur & Wolf (CVPR 2021, their
    ``imagenet_seg_eval.py``): the map as a foreground segmentation of the object.

    The map is brought to the mask's size (channels summed, upsampled bilinearly) and min-max
    normalised per image to m in [0, 1]; the foreground is where m is above its mean over the
    image. Pixel accuracy is the share of pixels where this foreground equals the mask; the IoU
    of a class (background, foreground) is its intersection over its union, 1 where the union
    is empty (the map and the mask agree the class is absent), and ``iou`` is the mean of the
    two. Chefer et al. sum intersections and unions over the data set before dividing: use
    :meth:`SegmentationScores.pooled_iou` for that figure; their pixel accuracy and mAP are the
    means of ``pixel_accuracy`` and ``average_precision`` over the images.

    Average precision is theirs: ``sklearn.metrics.average_precision_score`` of the 2 H W
    scores [1 - m, m] (background channel, then foreground) against the labels
    [not mask, mask], i.e. AP = sum_n (R_n - R_{n-1}) P_n over the distinct scores n from the
    highest down, equal scores forming one threshold; computed here in torch.

    A constant map (min-max normalisation undefined) is scored as their script scores its NaNs:
    every pixel background and every AP score 0, which makes the AP 0.5.

    Args:
        attributions (Tensor): (B, 1, h, w) or (B, C, h, w) maps with h <= H, w <= W.
        masks (Tensor): (B, H, W) or (B, 1, H, W) bool, True on the object.

    Returns:
        :class:`SegmentationScores`: ``pixel_accuracy``, ``iou`` and ``average_precision``
        (B,) float64, ``intersection`` and ``union`` (B, 2) int64.

    Example::

        >>> scores = segmentation(maps, masks)
        >>> scores.pixel_accuracy.mean(), scores.pooled_iou(), scores.average_precision.mean()
    """
    masks = _check_masks(masks, attributions)
    saliency, constant = _min_max(_spatial_map(attributions, tuple(masks.shape[-2:])).flatten(1))
    labels = masks.flatten(1)
    foreground = saliency > saliency.mean(dim=1, keepdim=True)
    foreground[constant] = False
    pixel_accuracy = (foreground == labels).double().mean(dim=1)
    predicted = torch.stack([~foreground, foreground], dim=1)  # (B, 2, N): background first
    true = torch.stack([~labels, labels], dim=1)
    intersection, union = (predicted & true).sum(dim=2), (predicted | true).sum(dim=2)
    scores = torch.cat([1 - saliency, saliency], dim=1)
    scores[constant] = 0
    average_precision = _average_precision(scores, torch.cat([~labels, labels], dim=1))
    iou = _iou(intersection, union).mean(dim=1)
    return SegmentationScores(pixel_accuracy, iou, average_precision, intersection, union)


class ConfidenceChange(NamedTuple):
    """Average drop and increase in confidence per example.

    Attributes:
        drop: (B,) max(0, Y - O) / Y; its mean (x 100) is the average drop.
        increase: (B,) bool, O > Y; its mean (x 100) is the increase in confidence.
        probabilities: (B,) Y, the softmax probability of the target on the image.
        explained_probabilities: (B,) O, the same on the image times the explanation map.
    """

    drop: Tensor
    increase: Tensor
    probabilities: Tensor
    explained_probabilities: Tensor


def confidence_change(
    forward_func: Callable[[Tensor], Tensor],
    inputs: Tensor,
    attributions: Tensor,
    target: TargetType = None,
    batch_size: Optional[int] = None,
) -> ConfidenceChange:
    r"""Average drop and increase in confidence (Chattopadhyay et al., Grad-CAM++, WACV 2018):
    how the target's probability changes when the model sees only what the map shows, the
    image multiplied by the map. A faithful map drops little (lower is better) and increases
    often (higher is better).

    Y is the softmax probability of the target on the image and O on the image times the
    explanation map E: the map (channels summed) min-max normalised per image on its own grid,
    then resized bilinearly (``align_corners=False``) to the image size, as torchcam does; a
    constant map gives E = 0 (torchcam's result). drop = max(0, Y - O) / Y (0 where Y is 0)
    and increase = O > Y. The model runs twice over the images (``batch_size`` per call),
    under ``torch.no_grad``; its train/eval mode is left as it is.

    Args:
        forward_func (Callable): the model or any function from (n, C, H, W) images to
            (n, classes) scores (logits; the softmax is taken here).
        inputs (Tensor): (B, C, H, W) images, as ``forward_func`` takes them.
        attributions (Tensor): (B, 1, h, w) or (B, C', h, w) maps with h <= H, w <= W.
        target (int, list[int] or Tensor, optional): the class per example, Captum style;
            None takes each example's predicted class on the image (torchcam's default).
            Default: None
        batch_size (int, optional): images per model call; None: B.
            Default: None

    Returns:
        :class:`ConfidenceChange`: ``drop``, ``increase`` (bool), ``probabilities`` and
        ``explained_probabilities``, each (B,), on the inputs' device.

    Example::

        >>> change = confidence_change(model, images, maps)
        >>> 100 * change.drop.mean(), 100 * change.increase.float().mean()
    """
    targets = _check_model_inputs(inputs, attributions, target)
    _check_batch_size(batch_size)

    batch, _, height, width = inputs.shape
    with torch.no_grad():
        summed = attributions.detach().to(inputs.device).sum(dim=1, keepdim=True)
        normalised = _min_max(summed.flatten(1))[0].view_as(summed)
        explanation = _spatial_map(normalised, (height, width)).to(inputs.dtype)
        chunk = batch_size or batch
        original, targets = _target_probabilities(forward_func, inputs, targets, chunk)
        explained, _ = _target_probabilities(forward_func, inputs * explanation, targets, chunk)
        positive = original > 0
        drop = (original - explained).clamp(min=0) / torch.where(positive, original, 1)
    return ConfidenceChange(drop * positive, explained > original, original, explained)


def cascading_randomisation(
    explain: Callable[[nn.Module, Tensor, TargetType], Tensor],
    model: nn.Module,
    inputs: Tensor,
    target: TargetType,
    modules: Sequence[nn.Module],
    seed: int = 0,
    absolute: bool = False,
) -> Tensor:
    r"""The cascading model-parameter randomisation test (Adebayo et al., Sanity checks for
    saliency maps, NeurIPS 2018): how similar the map of the trained model stays as its
    modules are re-initialised one after another from the top down. A map that explains the
    model should become dissimilar (correlations towards 0).

    The modules are re-initialised, cumulatively and in the given order, in one deep copy of
    the model; ``model`` itself is never changed (``explain`` runs on it once, for the trained
    map). A module is re-initialised like a fresh one: every submodule with a
    ``reset_parameters`` method calls it; any parameter not owned by such a submodule is set
    to zeros if its name starts with ``bias``, to ones if it is 1-D (scales such as norm
    weights), and otherwise from ``torch.nn.init.trunc_normal_(std=0.02)`` (timm's ViT
    initialisation). The values are drawn on the CPU from ``seed + k`` for the k-th module, so
    they are the same on any device, and the global random state is left unchanged.

    Args:
        explain (Callable): ``explain(model, inputs, target)`` returns (B, 1, h, w) or
            (B, C, h, w) attributions; channels are summed.
        model (nn.Module): the trained model, returning (B, classes) scores.
        inputs (Tensor): the inputs ``explain`` and ``model`` take, batch first.
        target (int, list[int], Tensor or None): passed to ``explain``; None is replaced by
            the trained model's predicted classes, so that every map explains the same class.
        modules (sequence of nn.Module): submodules of ``model`` to re-initialise, in order,
            e.g. ``[model.head, *reversed(model.blocks)]``.
        seed (int, optional): seed of the re-initialisation.
            Default: 0
        absolute (bool, optional): correlate the absolute values of the maps (Adebayo et al.
            report both).
            Default: False

    Returns:
        Tensor: (B, L + 1) float64 Spearman rank correlations between the trained map and the
        map after re-initialising the first k modules, k = 0 .. L (column 0 is 1). NaN where
        either map is constant (no ranking), e.g. all zero.

    Example::

        >>> explain = lambda model, images, target: DAAM(model).attribute(images, target=target)
        >>> cascading_randomisation(explain, model, images, labels[:, 0],
        ...                         [model.head, *reversed(model.blocks)]).shape
        torch.Size([4, 8])
    """
    names = _submodule_names(model, modules)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"Expected seed to be an int, got {seed!r}.")
    if not isinstance(inputs, Tensor) or inputs.dim() == 0:
        raise ValueError(
            f"Expected inputs to be a tensor with a batch dimension, got {_shape_of(inputs)}."
        )
    if target is None:
        with torch.no_grad():
            target = model(inputs).argmax(dim=1)

    def flat_map(network: nn.Module) -> Tensor:
        attributions = explain(network, inputs, target)
        if not isinstance(attributions, Tensor) or attributions.dim() != 4:
            raise ValueError(
                f"Expected explain to return (B, C, h, w) attributions, got "
                f"{_shape_of(attributions)}."
            )
        flat = attributions.detach().sum(dim=1).flatten(1)
        return flat.abs() if absolute else flat

    trained = flat_map(model)
    correlations = [spearman_correlation(trained, trained)]
    randomised = copy.deepcopy(model)
    for index, name in enumerate(names):
        _reinitialise(randomised.get_submodule(name), seed + index)
        correlations.append(spearman_correlation(trained, flat_map(randomised)))
    return torch.stack(correlations, dim=1)


def spearman_correlation(first: Tensor, second: Tensor) -> Tensor:
    r"""Spearman's rank correlation per example: the Pearson correlation of the ranks, with
    tied values given their average rank (as ``scipy.stats.spearmanr``).

    Args:
        first (Tensor): (B, ...) values; each example is flattened.
        second (Tensor): values of the same shape.

    Returns:
        Tensor: (B,) float64 in [-1, 1]; NaN where either example is constant.

    Example::

        >>> spearman_correlation(torch.tensor([[1.0, 2, 2, 5]]), torch.tensor([[0.0, 1, 3, 2]]))
        tensor([0.6325], dtype=torch.float64)
    """
    if first.shape != second.shape or first.dim() < 2:
        raise ValueError(
            f"Expected two tensors of the same (B, ...) shape, got {tuple(first.shape)} and "
            f"{tuple(second.shape)}."
        )
    ranks_first = _average_ranks(first.flatten(1))
    ranks_second = _average_ranks(second.flatten(1))
    centred_first = ranks_first - ranks_first.mean(dim=1, keepdim=True)
    centred_second = ranks_second - ranks_second.mean(dim=1, keepdim=True)
    covariance = (centred_first * centred_second).sum(dim=1)
    return covariance / (centred_first.norm(dim=1) * centred_second.norm(dim=1))


class Interval(NamedTuple):
    """A mean and its bootstrap confidence interval.

    Attributes:
        mean: the mean of the values (NaNs left out).
        low: the lower end of the interval.
        high: the upper end of the interval.
    """

    mean: float
    low: float
    high: float


def bootstrap_interval(
    values: Tensor, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> Interval:
    r"""The percentile-bootstrap confidence interval of a mean (Efron & Tibshirani, An
    Introduction to the Bootstrap, 1993, ch. 13), e.g. of per-example AUCs over a data set.

    NaNs (examples without a score, say) are left out first. ``resamples`` samples of the n
    remaining values are drawn with replacement, their indices from
    ``torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed))`` on the
    CPU (drawn in blocks of rows, which on the CPU gives the same numbers), and the interval
    runs between the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of their means,
    ``torch.quantile``'s linear interpolation (numpy's default). The computation is float64 on
    the CPU; the same seed gives the same interval on any machine.

    Args:
        values (Tensor): (n,) real values; NaN marks a missing one.
        confidence (float, optional): the interval's nominal coverage, in (0, 1).
            Default: 0.95
        resamples (int, optional): number of bootstrap samples.
            Default: 10000
        seed (int, optional): seed of the resampling.
            Default: 0

    Returns:
        :class:`Interval`: ``(mean, low, high)`` as Python floats.

    Example::

        >>> curve = deletion(model, images, maps, target=labels[:, 0])
        >>> bootstrap_interval(curve.auc)
        Interval(mean=..., low=..., high=...)
    """
    return _bootstrap(_check_values(values, "values"), confidence, resamples, seed)


def bootstrap_intervals(
    columns: Tensor, confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> List[Interval]:
    r""":func:`bootstrap_interval` of every column of ``columns`` at once: the intervals a
    comparison table needs (each method's metrics, and their paired differences as columns
    ``first - second``), in one pass over the resampled examples.

    Each column's interval is the one :func:`bootstrap_interval` gives it with the same
    arguments: columns without NaN share the resampled examples (the same draws, the same
    seed), and their bootstrap means are formed as the counts of each example in each
    resample times the values (a matrix product), so the cost is one draw of the indices for
    all columns, not one per column; a column with NaNs is resampled on its own, over its
    values that are not NaN, as :func:`bootstrap_interval` does (which forms its means the
    same way).

    Args:
        columns (Tensor): (n, K) real values, one column per quantity.
        confidence (float, optional): Default: 0.95
        resamples (int, optional): Default: 10000
        seed (int, optional): Default: 0

    Returns:
        list of :class:`Interval`: one per column.
    """
    if not isinstance(columns, Tensor) or columns.dim() != 2:
        raise ValueError(f"Expected columns to be a 2-D tensor (n, K), got "
                         f"{_shape_of(columns)}.")
    columns = torch.stack([_check_values(column, "columns") for column in columns.T], dim=1) \
        if columns.shape[1] else columns.to(torch.float64)
    _check_bootstrap(confidence, resamples, seed)
    intervals: List[Optional[Interval]] = [None] * columns.shape[1]
    whole = [k for k in range(columns.shape[1]) if not bool(columns[:, k].isnan().any())]
    for k in range(columns.shape[1]):
        if k not in whole:
            intervals[k] = _bootstrap(columns[:, k], confidence, resamples, seed)
    if whole:
        for k, interval in zip(whole, _bootstrap_columns(columns[:, whole], confidence,
                                                         resamples, seed)):
            intervals[k] = interval
    return intervals  # type: ignore[return-value]


def paired_difference(
    first: Tensor,
    second: Tensor,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> Interval:
    r"""The percentile-bootstrap confidence interval of mean(first - second) over the
    examples scored by both, e.g. two explanation methods' AUCs on the same images: the
    resampled examples are the same for both (a paired bootstrap), so the spread the images
    share cancels out.

    Examples where either value is NaN are left out; the differences of the others are
    bootstrapped as in :func:`bootstrap_interval`, with its resampling, quantiles and seed.
    An interval that excludes 0 says the methods differ on such data at this confidence.

    Args:
        first (Tensor): (n,) real values per example; NaN marks a missing one.
        second (Tensor): (n,) real values for the same examples, in the same order.
        confidence (float, optional): the interval's nominal coverage, in (0, 1).
            Default: 0.95
        resamples (int, optional): number of bootstrap samples.
            Default: 10000
        seed (int, optional): seed of the resampling.
            Default: 0

    Returns:
        :class:`Interval`: ``(mean, low, high)`` of the differences, as Python floats.

    Example::

        >>> daam = deletion(model, images, maps, target=labels[:, 0]).auc
        >>> other = deletion(model, images, other_maps, target=labels[:, 0]).auc
        >>> paired_difference(daam, other)  # below 0: DAAM deletes faster
    """
    first, second = _check_values(first, "first"), _check_values(second, "second")
    if first.shape != second.shape:
        raise ValueError(
            f"Expected first and second to score the same examples, got {len(first)} and "
            f"{len(second)} values."
        )
    return _bootstrap(first - second, confidence, resamples, seed)


# ---- pure tensor helpers ----------------------------------------------------------------------


def _average_ranks(values: Tensor) -> Tensor:
    """(B, N) 1-based ranks along dim 1, ties sharing their average rank, as float64."""
    ordered = values.sort(dim=1).values
    below = torch.searchsorted(ordered, values.contiguous(), right=False)
    up_to = torch.searchsorted(ordered, values.contiguous(), right=True)
    # a tie group occupies positions below + 1 .. up_to; its average is their midpoint
    return (below + up_to + 1).to(torch.float64) / 2


def _min_max(maps: Tensor) -> Tuple[Tensor, Tensor]:
    """(B, N) maps scaled to [0, 1] per row, and (B,) bool, which rows are constant (their
    scaled values are 0)."""
    low = maps.amin(dim=1, keepdim=True)
    spread = maps.amax(dim=1, keepdim=True) - low
    constant = spread[:, 0] == 0
    return (maps - low) / torch.where(spread > 0, spread, torch.ones_like(spread)), constant


def _iou(intersection: Tensor, union: Tensor) -> Tensor:
    """Float64 intersection over union, 1 where the union is empty."""
    ratio = intersection.double() / union.clamp(min=1).double()
    return torch.where(union > 0, ratio, torch.ones_like(ratio))


def _average_precision(scores: Tensor, labels: Tensor) -> Tensor:
    """(B,) float64 average precision per row of (B, N) scores against (B, N) bool labels, as
    sklearn's ``average_precision_score``: sum_n (R_n - R_{n-1}) P_n over the distinct scores
    from the highest down. Each positive adds 1 / positives to the recall at its score, where
    the precision is that of every example scoring at least as high; 0 without positives."""
    negated, order = (-scores).sort(dim=1)
    true_positives = labels.gather(1, order).double().cumsum(dim=1)
    # how many examples score at least as high as each one: the end of its group of ties
    at_least = torch.searchsorted(negated, (-scores).contiguous(), right=True)
    precision = true_positives.gather(1, at_least - 1) / at_least
    positives = labels.sum(dim=1).clamp(min=1)
    return (precision * labels).sum(dim=1) / positives


def _check_fractions(fractions: Sequence[float]) -> List[float]:
    """The fractions as floats, checked to be at least two, strictly increasing, in [0, 1)."""
    if isinstance(fractions, Tensor):
        fractions = fractions.tolist() if fractions.dim() == 1 else fractions
    valid = (
        isinstance(fractions, (list, tuple))
        and len(fractions) >= 2
        and all(
            isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
            for fraction in fractions
        )
    )
    if not valid:
        raise ValueError(
            f"Expected fractions to be a sequence of at least two numbers, got {fractions!r}."
        )
    fractions = [float(fraction) for fraction in fractions]
    if not all(0 <= fraction < 1 for fraction in fractions) or any(
        later <= earlier for earlier, later in zip(fractions, fractions[1:])
    ):
        raise ValueError(f"Expected fractions strictly increasing within [0, 1), got {fractions}.")
    return fractions


def _check_values(values: Tensor, name: str) -> Tensor:
    """(n,) float64 CPU values, checked to be 1-D, real and finite or NaN."""
    if not isinstance(values, Tensor) or values.dim() != 1:
        raise ValueError(f"Expected {name} to be a 1-D tensor, got {_shape_of(values)}.")
    if values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"Expected real {name}, got a tensor of dtype {values.dtype}.")
    values = values.detach().to(device="cpu", dtype=torch.float64)
    if bool(values.isinf().any()):
        raise ValueError(f"Expected finite {name} (NaN for a missing one), got an infinity.")
    return values


def _bootstrap(values: Tensor, confidence: float, resamples: int, seed: int) -> Interval:
    """The percentile-bootstrap interval of the mean of the values that are not NaN."""
    _check_bootstrap(confidence, resamples, seed)
    kept = values[~values.isnan()]
    if len(kept) == 0:
        raise ValueError(f"Expected at least one value that is not NaN, got {len(values)} NaNs.")
    return _bootstrap_columns(kept.unsqueeze(1), confidence, resamples, seed)[0]


def _bootstrap_columns(values: Tensor, confidence: float, resamples: int, seed: int
                       ) -> List[Interval]:
    """The percentile-bootstrap interval of the mean of each column of (n, K) values without
    NaN, every column over the same resampled examples: the resamples' indices drawn from
    ``seed`` in blocks of rows (bounding their memory), each resample's means formed as the
    examples' counts in it times the values."""
    count = values.shape[0]
    generator = torch.Generator().manual_seed(seed)
    rows = max(1, _BOOTSTRAP_BLOCK // count)
    means = []
    for first in range(0, resamples, rows):
        indices = torch.randint(count, (min(rows, resamples - first), count), generator=generator)
        counts = torch.zeros(indices.shape, dtype=torch.float64).scatter_add_(
            1, indices, torch.ones(indices.shape, dtype=torch.float64))
        means.append(counts @ values / count)
    tail = (1 - confidence) / 2
    levels = torch.tensor([tail, 1 - tail], dtype=torch.float64)
    bounds = torch.quantile(torch.cat(means), levels, dim=0)
    return [Interval(float(values[:, k].mean()), float(bounds[0, k]), float(bounds[1, k]))
            for k in range(values.shape[1])]


def _check_bootstrap(confidence: float, resamples: int, seed: int) -> None:
    if (
        isinstance(confidence, bool)
        or not isinstance(confidence, (int, float))
        or not 0 < confidence < 1
    ):
        raise ValueError(f"Expected confidence to be a number in (0, 1), got {confidence!r}.")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"Expected resamples to be a positive int, got {resamples!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"Expected seed to be an int, got {seed!r}.")


def _shape_of(value: object) -> str:
    """A value's shape for an error message, or its type when it is not a tensor."""
    return str(tuple(value.shape)) if isinstance(value, Tensor) else type(value).__name__


def _spatial_map(attributions: Tensor, size: Tuple[int, int]) -> Tensor:
    """(B, 1, H, W): the channels summed, upsampled bilinearly when smaller than ``size``."""
    summed = attributions.detach().sum(dim=1, keepdim=True)
    if tuple(summed.shape[-2:]) != tuple(size):
        summed = LayerAttribution.interpolate(summed, tuple(size), "bilinear")
    return summed


def _check_attributions(attributions: Tensor, batch: int, size: Tuple[int, int]) -> None:
    if not isinstance(attributions, Tensor) or attributions.dim() != 4:
        raise ValueError(
            f"Expected attributions of shape (B, C, h, w), got {_shape_of(attributions)}."
        )
    if attributions.shape[0] != batch:
        raise ValueError(
            f"Expected attributions for {batch} examples, got {attributions.shape[0]}."
        )
    height, width = attributions.shape[-2:]
    if height > size[0] or width > size[1] or height == 0 or width == 0:
        raise ValueError(
            f"Expected attribution maps no larger than {tuple(size)} (they are upsampled, "
            f"never downsampled), got {(height, width)}."
        )
    if not attributions.is_floating_point() or not bool(torch.isfinite(attributions).all()):
        raise ValueError("Expected finite floating-point attributions.")


def _check_masks(masks: Tensor, attributions: Tensor) -> Tensor:
    """(B, H, W) bool masks from (B, H, W) or (B, 1, H, W); the attributions checked too."""
    if not isinstance(masks, Tensor) or masks.dtype != torch.bool:
        given = masks.dtype if isinstance(masks, Tensor) else type(masks).__name__
        raise TypeError(f"Expected bool masks (use masks > 0.5 for 0/1 masks), got {given}.")
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.dim() != 3:
        raise ValueError(
            f"Expected masks of shape (B, H, W) or (B, 1, H, W), got {tuple(masks.shape)}."
        )
    _check_attributions(attributions, masks.shape[0], tuple(masks.shape[-2:]))
    return masks.to(attributions.device)


# ---- perturbation curves ----------------------------------------------------------------------


def _perturbation_curve(
    forward_func: Callable[[Tensor], Tensor],
    inputs: Tensor,
    attributions: Tensor,
    target: TargetType,
    steps: int,
    baseline: Union[str, Tensor],
    blur_kernel_size: int,
    blur_sigma: float,
    batch_size: Optional[int],
    insert: bool,
) -> PerturbationCurve:
    targets = _check_model_inputs(inputs, attributions, target)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Expected steps to be a positive int, got {steps!r}.")
    _check_batch_size(batch_size)

    batch, _, height, width = inputs.shape
    num_pixels, device = height * width, inputs.device
    with torch.no_grad():
        substrate = _baseline(inputs, baseline, blur_kernel_size, blur_sigma)
        ranks = _pixel_ranks(attributions.to(device), (height, width), most_relevant_first=True)
        counts = torch.arange(steps + 1, device=device) * num_pixels // steps
        chunk = batch_size or batch
        if targets is None:
            targets = _target_probabilities(forward_func, inputs, None, chunk)[1]
        # start and finish of every pixel: deletion goes image -> baseline, insertion back
        start, finish = (substrate, inputs) if insert else (inputs, substrate)
        probabilities, _ = _perturbed_predictions(
            forward_func, start, finish, ranks, counts, targets.to(device), chunk
        )
        fractions = counts.to(probabilities.dtype) / num_pixels
    return PerturbationCurve(fractions, probabilities, torch.trapezoid(probabilities, fractions))


def _check_model_inputs(
    inputs: Tensor, attributions: Tensor, target: TargetType
) -> Optional[Tensor]:
    """The checks of every metric that runs the model; the targets as a (B,) CPU tensor."""
    if not isinstance(inputs, Tensor) or inputs.dim() != 4:
        raise ValueError(f"Expected inputs of shape (B, C, H, W), got {_shape_of(inputs)}.")
    _check_attributions(attributions, inputs.shape[0], tuple(inputs.shape[-2:]))
    return format_target(target, inputs.shape[0], torch.device("cpu"))


def _check_batch_size(batch_size: Optional[int]) -> None:
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"Expected batch_size to be a positive int or None, got {batch_size!r}.")


def _pixel_ranks(attributions: Tensor, size: Tuple[int, int], most_relevant_first: bool) -> Tensor:
    """(B, H * W): each pixel's place in the order of perturbation, by attribution, highest
    first (lowest first when not ``most_relevant_first``), ties in row-major order."""
    saliency = _spatial_map(attributions, size).flatten(1)
    order = saliency.argsort(dim=1, descending=most_relevant_first, stable=True)
    positions = torch.arange(saliency.shape[1], device=saliency.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def _perturbed_predictions(
    forward_func: Callable[[Tensor], Tensor],
    start: Tensor,
    finish: Tensor,
    ranks: Tensor,
    counts: Tensor,
    targets: Tensor,
    chunk: int,
) -> Tuple[Tensor, Tensor]:
    """The model on every image with its first ``counts[s]`` ranked pixels taken from
    ``finish`` and the others from ``start``, for every s, ``chunk`` images per call: (B, S)
    softmax probabilities of the targets and (B, S) bool, whether the target is the top class
    (the first of tied maxima, ``torch.argmax``)."""
    batch, _, height, width = start.shape
    highest_target = int(targets.max())
    total = len(counts) * batch
    probabilities, hits = [], []
    for first in range(0, total, chunk):
        pairs = torch.arange(first, min(first + chunk, total), device=start.device)
        step, example = pairs // batch, pairs % batch
        changed = (ranks[example] < counts[step].unsqueeze(1)).view(-1, 1, height, width)
        perturbed = torch.where(changed, finish[example], start[example])
        scores = _class_scores(forward_func(perturbed), len(pairs), highest_target)
        chosen = targets[example].unsqueeze(1)
        probabilities.append(_softmax(scores).gather(1, chosen))
        hits.append(scores.argmax(dim=1, keepdim=True) == chosen)
    shape = (len(counts), batch)
    return torch.cat(probabilities).view(shape).T, torch.cat(hits).view(shape).T


def _target_probabilities(
    forward_func: Callable[[Tensor], Tensor],
    images: Tensor,
    targets: Optional[Tensor],
    chunk: int,
) -> Tuple[Tensor, Tensor]:
    """(B,) softmax probabilities of the targets on ``images`` and the (B,) targets; None
    takes each image's top class."""
    highest_target = None if targets is None else int(targets.max())
    scores = torch.cat(
        [
            _class_scores(forward_func(part), len(part), highest_target)
            for part in images.split(chunk)
        ]
    )
    targets = scores.argmax(dim=1) if targets is None else targets.to(scores.device)
    return _softmax(scores).gather(1, targets.unsqueeze(1))[:, 0], targets


def _baseline(
    inputs: Tensor, baseline: Union[str, Tensor], kernel_size: int, sigma: float
) -> Tensor:
    """The (B, C, H, W) image every pixel is deleted to or inserted from."""
    if isinstance(baseline, Tensor):
        try:
            shape = torch.broadcast_shapes(baseline.shape, inputs.shape)
        except RuntimeError:
            shape = None
        if shape != inputs.shape:
            raise ValueError(
                f"Expected a baseline tensor broadcastable to the inputs' shape "
                f"{tuple(inputs.shape)}, got {tuple(baseline.shape)}."
            )
        return baseline.to(inputs).expand_as(inputs)
    if baseline == "zeros":
        return torch.zeros_like(inputs)
    if baseline == "mean":
        return inputs.mean(dim=(2, 3), keepdim=True).expand_as(inputs)
    if baseline == "blur":
        if (
            isinstance(kernel_size, bool)
            or not isinstance(kernel_size, int)
            or kernel_size < 1
            or kernel_size % 2 == 0
            or kernel_size // 2 >= min(inputs.shape[-2:])
        ):
            raise ValueError(
                f"Expected blur_kernel_size to be an odd int whose half is below the image "
                f"size {tuple(inputs.shape[-2:])}, got {kernel_size!r}."
            )
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or sigma <= 0:
            raise ValueError(f"Expected blur_sigma to be a positive number, got {sigma!r}.")
        return gaussian_blur(inputs, [kernel_size, kernel_size], [float(sigma), float(sigma)])
    raise ValueError(f"Expected baseline to be one of {BASELINES} or a tensor, got {baseline!r}.")


def _class_scores(output: object, rows: int, highest_target: Optional[int] = None) -> Tensor:
    """The model's output, checked to be (rows, classes) scores with a class highest_target."""
    if not isinstance(output, Tensor) or output.dim() != 2 or output.shape[0] != rows:
        raise ValueError(
            f"Expected forward_func to return ({rows}, classes) scores, got {_shape_of(output)}."
        )
    if highest_target is not None and highest_target >= output.shape[1]:
        raise ValueError(
            f"Expected target classes below the model's {output.shape[1]} outputs, "
            f"got {highest_target}."
        )
    return output


def _softmax(scores: Tensor) -> Tensor:
    # at least float32: half-precision softmax loses the small probabilities the curves track
    return scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(dim=1)


# ---- model randomisation ----------------------------------------------------------------------


def _submodule_names(model: nn.Module, modules: Sequence[nn.Module]) -> List[str]:
    """The names of ``modules`` in ``model``, to find them again in a copy."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected model to be an nn.Module, got {type(model).__name__}.")
    if isinstance(modules, nn.Module) or not isinstance(modules, Sequence) or not modules:
        raise TypeError(
            "Expected modules to be a non-empty list of the model's submodules, e.g. "
            "[model.head, *reversed(model.blocks)]."
        )
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    found = []
    for index, module in enumerate(modules):
        if not isinstance(module, nn.Module) or id(module) not in names:
            raise ValueError(
                f"Expected modules[{index}] to be a submodule of model, got {module!r}."
            )
        if names[id(module)] in found:
            raise ValueError(f"Expected each module once, got {names[id(module)]!r} twice.")
        found.append(names[id(module)])
    return found


def _reinitialise(module: nn.Module, seed: int) -> None:
    """Fresh parameters for ``module`` in place, drawn on the CPU from ``seed``."""
    fresh = copy.deepcopy(module).cpu()
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only: torch.manual_seed would reseed the GPUs' as well
        torch.default_generator.manual_seed(seed)
        reset = set()
        for submodule in fresh.modules():
            if callable(getattr(submodule, "reset_parameters", None)):
                submodule.reset_parameters()
                reset.update(id(parameter) for parameter in submodule.parameters(recurse=False))
        with torch.no_grad():
            for name, parameter in fresh.named_parameters():
                if id(parameter) in reset:
                    continue
                if name.rsplit(".", 1)[-1].startswith("bias"):
                    parameter.zero_()
                elif parameter.dim() == 1:
                    parameter.fill_(1.0)
                else:
                    nn.init.trunc_normal_(parameter, std=0.02)
    module.load_state_dict(fresh.state_dict())
