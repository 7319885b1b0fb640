"""Quality metrics for attribution maps: deletion and insertion, the pointing games, and the
cascading model-randomisation sanity check. All are batched and run in torch on the inputs'
device.

Attributions are taken as (B, 1, h, w) or (B, C, h, w): channels are summed (the map of a
Captum attribution over the input's colour channels is their sum), and a map smaller than the
image (or mask) is brought to its size with ``LayerAttribution.interpolate(..., "bilinear")``.

Which metric comes from where (checked against quantus 0.6.0, grad-cam 1.5.7, captum 0.9.0):

- **Deletion / insertion** (Petsiuk et al. 2018): here. ``captum.metrics`` has only
  infidelity and sensitivity; pytorch-grad-cam's ROAD and confidence-change metrics perturb at
  one threshold, not along a curve; quantus has deletion only: ``PixelFlipping`` flips each
  element (a colour channel of a pixel) as a feature, sorts unstably, leaves out the
  unperturbed point and integrates over the step index with ``np.trapz``, which numpy 2.4 no
  longer has (AttributeError); ``RegionPerturbation`` removes 8 x 8 patches ranked by their
  summed attribution and records the drop of the score, not a curve of probabilities.
- **Pointing game** (Zhang et al. 2018): here. quantus' ``PointingGame`` has no tolerance,
  counts an image with an empty mask as a hit (it stores NaN into a bool array) and a constant
  map as a hit (every pixel is a maximum).
- **Energy-based pointing game** (Wang et al. 2020): here. quantus' ``RelevanceMassAccuracy``
  divides the signed attribution (no ReLU: values outside [0, 1]) and gives NaN for a zero map.
- **Model randomisation** (Adebayo et al. 2018): here. quantus' ``MPRT`` re-initialises every
  module that has ``reset_parameters`` one after another (each Linear and LayerNorm is a
  "layer"; a ViT's class token and position embedding never change), reseeds the global RNG
  and needs scipy.

quantus would also bring pandas, opencv-python, scikit-image, scikit-learn and scipy (about
0.5 GB) and works on numpy arrays on the CPU; so no metric here depends on it.
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
    "pointing_game",
    "energy_pointing_game",
    "cascading_randomisation",
    "spearman_correlation",
]

BASELINES = ("blur", "zeros", "mean")


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


# ---- pure tensor helpers ----------------------------------------------------------------------


def _average_ranks(values: Tensor) -> Tensor:
    """(B, N) 1-based ranks along dim 1, ties sharing their average rank, as float64."""
    ordered = values.sort(dim=1).values
    below = torch.searchsorted(ordered, values.contiguous(), right=False)
    up_to = torch.searchsorted(ordered, values.contiguous(), right=True)
    # a tie group occupies positions below + 1 .. up_to; its average is their midpoint
    return (below + up_to + 1).to(torch.float64) / 2


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


# ---- deletion and insertion -------------------------------------------------------------------


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
    if not isinstance(inputs, Tensor) or inputs.dim() != 4:
        raise ValueError(f"Expected inputs of shape (B, C, H, W), got {_shape_of(inputs)}.")
    batch, _, height, width = inputs.shape
    num_pixels = height * width
    _check_attributions(attributions, batch, (height, width))
    targets = format_target(target, batch, torch.device("cpu"))
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Expected steps to be a positive int, got {steps!r}.")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"Expected batch_size to be a positive int or None, got {batch_size!r}.")

    device = inputs.device
    with torch.no_grad():
        substrate = _baseline(inputs, baseline, blur_kernel_size, blur_sigma)
        saliency = _spatial_map(attributions.to(device), (height, width)).flatten(1)
        order = saliency.argsort(dim=1, descending=True, stable=True)
        positions = torch.arange(num_pixels, device=device).expand(batch, -1)
        rank = torch.empty_like(order).scatter_(1, order, positions)
        counts = torch.arange(steps + 1, device=device) * num_pixels // steps

        chunk = batch_size or batch
        if targets is None:
            predicted = [
                _class_scores(forward_func(part), len(part)) for part in inputs.split(chunk)
            ]
            targets = torch.cat(predicted).argmax(dim=1)
        targets, highest_target = targets.to(device), int(targets.max())

        # start and finish of every pixel: deletion goes image -> baseline, insertion back
        start, finish = (substrate, inputs) if insert else (inputs, substrate)
        total = (steps + 1) * batch
        probabilities = []
        for first in range(0, total, chunk):
            pairs = torch.arange(first, min(first + chunk, total), device=device)
            step, example = pairs // batch, pairs % batch
            changed = (rank[example] < counts[step].unsqueeze(1)).view(-1, 1, height, width)
            perturbed = torch.where(changed, finish[example], start[example])
            scores = _class_scores(forward_func(perturbed), len(pairs))
            if highest_target >= scores.shape[1]:
                raise ValueError(
                    f"Expected target classes below the model's {scores.shape[1]} outputs, "
                    f"got {highest_target}."
                )
            probabilities.append(_softmax(scores).gather(1, targets[example].unsqueeze(1)))
        probabilities = torch.cat(probabilities).view(steps + 1, batch).T
        fractions = counts.to(probabilities.dtype) / num_pixels
    return PerturbationCurve(fractions, probabilities, torch.trapezoid(probabilities, fractions))


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


def _class_scores(output: object, rows: int) -> Tensor:
    if not isinstance(output, Tensor) or output.dim() != 2 or output.shape[0] != rows:
        raise ValueError(
            f"Expected forward_func to return ({rows}, classes) scores, got {_shape_of(output)}."
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
