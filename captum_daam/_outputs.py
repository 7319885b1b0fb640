"""The (B, K) tensor DAAM explains, in what a model's forward pass returned.

Models of the Hugging Face ecosystem return an output object (transformers' ``ModelOutput``,
a dict subclass) rather than a tensor. One rule, the same for every family, picks the tensor:

1. ``logits``: a classifier's class scores (an image-text model's ``logits_per_image``);
2. ``image_embeds``: an embedding model's projected image features, where it has a
   projection (``CLIPVisionModelWithProjection``);
3. ``pooler_output``: where pooling is part of the model's design (SigLIP's and AIMv2's
   attention pool, BEiT's mean pooling, the normalised [class] token of CLIP, DINOv2 and
   DINOv3, timm's pooled features through ``TimmWrapperModel``); adapters of models whose
   pooler is an extra dense + tanh layer that self-supervised checkpoints lack (transformers'
   ``ViTModel``, ``DeiTModel``) skip it;
4. the [class] token of ``last_hidden_state``, ``last_hidden_state[:, 0]``; in a model
   without a [class] token (I-JEPA, SigLIP without its head), the mean of its tokens.
"""

from typing import Any, Mapping, Optional

from torch import Tensor

__all__ = ["scores_in_output", "describe_output"]

_SCORE_FIELDS = ("logits", "logits_per_image", "image_embeds")


def scores_in_output(
    output: Any, pooler: bool = True, class_token: bool = True
) -> Optional[Tensor]:
    """The tensor to explain in ``output`` by the rule above, or None when there is none.

    ``pooler``: whether ``pooler_output`` is part of the model's design (step 3);
    ``class_token``: whether the first token is a [class] token (step 4).
    """
    if isinstance(output, Tensor):
        return output
    if not isinstance(output, Mapping):
        return None
    for field in _SCORE_FIELDS:
        value = output.get(field)
        if isinstance(value, Tensor):
            return value
    pooled = output.get("pooler_output")
    if pooler and isinstance(pooled, Tensor):
        return pooled
    last_hidden_state = output.get("last_hidden_state")
    if isinstance(last_hidden_state, Tensor) and last_hidden_state.dim() == 3:
        return last_hidden_state[:, 0] if class_token else last_hidden_state.mean(dim=1)
    return None


def describe_output(output: Any) -> str:
    """How ``output`` reads in a message: its shape, or its type and tensor fields."""
    if isinstance(output, Tensor):
        return f"a tensor shaped {tuple(output.shape)}"
    if isinstance(output, Mapping):
        fields = ", ".join(
            f"{name} {tuple(value.shape)}" for name, value in output.items()
            if isinstance(value, Tensor)
        )
        return f"a {type(output).__name__} with {fields or 'no tensor fields'}"
    if isinstance(output, tuple):
        return (
            f"a tuple of {len(output)} items (a transformers model called with "
            f"return_dict=False?)"
        )
    return f"a {type(output).__name__}"
