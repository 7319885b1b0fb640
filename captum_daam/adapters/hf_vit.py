"""Hugging Face transformers ``ViTForImageClassification`` and ``ViTModel`` (transformers 5.x,
where ``ViTAttention`` holds ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj``), with any
attention implementation that computes softmax attention (eager, sdpa), with or without an
attention mask, at the configured image size or with ``interpolate_pos_encoding``.

transformers is never imported here: a model of this family can only exist once the user has
imported it, so :meth:`HFViTAdapter.supports` looks the classes up in ``sys.modules`` and the
package works, and stays fast to import, without transformers.
"""

import sys
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..decompose import SoftmaxAttention, class_attention_row
from .base import BlockRecord, Hook, ViTAdapter, register_adapter

_VIT_MODULE = "transformers.models.vit.modeling_vit"


def _vit_classes() -> Tuple[type, ...]:
    """(ViTModel, ViTForImageClassification) if transformers' ViT is loaded, else ()."""
    modeling_vit = sys.modules.get(_VIT_MODULE)
    if modeling_vit is None:
        return ()
    return tuple(
        getattr(modeling_vit, name)
        for name in ("ViTModel", "ViTForImageClassification")
        if hasattr(modeling_vit, name)
    )


def _additive_bias(attention_mask: Optional[Any]) -> Optional[Tensor]:
    """The mask the layer was given, as an additive logit bias.

    transformers prepares the mask per implementation: eager gets an additive float mask, sdpa a
    boolean one (True = may attend), both (B, 1, N, N); None when nothing is masked.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor):
        raise ValueError(
            f"Expected the attention mask of a ViT layer to be None or a tensor, got a "
            f"{type(attention_mask).__name__} (flex attention?). Load the model with "
            f"attn_implementation='eager' or 'sdpa' to explain it with DAAM."
        )
    mask = attention_mask.detach()
    if mask.dtype.is_floating_point:
        return mask
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return bias.masked_fill(~mask.bool(), float("-inf"))


def hf_vit_attention_hooks(attention: nn.Module, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of transformers' ``ViTAttention``.

    They read the mask from the call's arguments, the [class] query, the keys and the values
    from ``q_proj`` / ``k_proj`` / ``v_proj`` (split into heads as ``ViTAttention`` does), and
    watch the head-concatenated attention output where it enters ``o_proj``.
    """
    heads, width = attention.num_attention_heads, attention.head_dim
    call: dict = {}

    def split_heads(projected: Tensor) -> Tensor:
        # (B, N, H * d) -> (B, H, N, d), as ViTAttention's view(...).transpose(1, 2).
        return projected.detach().unflatten(-1, (heads, width)).transpose(1, 2)

    def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        attention_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        call["bias"] = _additive_bias(attention_mask)

    def on_query(module: nn.Module, args: tuple, query: Tensor) -> None:
        call["queries"] = split_heads(query)

    def on_keys(module: nn.Module, args: tuple, keys: Tensor) -> None:
        call["keys"] = split_heads(keys)

    def on_values(module: nn.Module, args: tuple, values: Tensor) -> None:
        call["values"] = split_heads(values)

    def on_pre_projection(module: nn.Module, args: tuple) -> Tuple[Tensor, ...]:
        queries, keys, bias = call.pop("queries"), call.pop("keys"), call.pop("bias")
        bias_row = None if bias is None else bias[..., 0, :]
        row = class_attention_row(queries[:, :, 0], keys, attention.scaling, bias_row)
        record.set_attention(
            row,
            call.pop("values"),
            SoftmaxAttention(queries, keys, attention.scaling, bias),
        )
        return (record.watch(args[0]),) + tuple(args[1:])

    return [
        Hook(attention, "pre_kwargs", on_call),
        Hook(attention.q_proj, "forward", on_query),
        Hook(attention.k_proj, "forward", on_keys),
        Hook(attention.v_proj, "forward", on_values),
        Hook(attention.o_proj, "pre", on_pre_projection),
    ]


@register_adapter
class HFViTAdapter(ViTAdapter):
    """transformers ``ViTForImageClassification`` and ``ViTModel``.

    Their forward returns an output object, not a tensor: :meth:`output_scores` gives the
    (B, K) tensor DAAM explains, ``logits`` for the classifier and, for the bare ``ViTModel``,
    the final [class] token ``last_hidden_state[:, 0]`` (the feature self-supervised ViTs such
    as DINO are used with; ``pooler_output`` comes from a head that such checkpoints lack).

    Args:
        model: a ``ViTForImageClassification`` or ``ViTModel``.
        interpolate_pos_encoding: set when the model is called with
            ``interpolate_pos_encoding=True``, so that images of any size divisible by the
            patch size are accepted; otherwise only the configured image size is.
    """

    family = "Hugging Face transformers ViT"
    examples = "ViTForImageClassification, ViTModel, e.g. google/vit-base-patch16-224"
    layer_example = "model.vit.layers[i].attention, or model.layers[i].attention for a ViTModel"

    def __init__(self, model: nn.Module, interpolate_pos_encoding: bool = False) -> None:
        super().__init__(model)
        self.interpolate_pos_encoding = interpolate_pos_encoding
        self.backbone = getattr(model, "vit", model)
        layers = getattr(self.backbone, "layers", None)
        if layers is None:
            raise TypeError(
                f"Expected a transformers ViT with its blocks in .layers (transformers 5), got "
                f"a {type(self.backbone).__name__} without them. Upgrade transformers "
                f"(pip install -U transformers) to explain it with DAAM."
            )
        for index, layer in enumerate(layers):
            attention = getattr(layer, "attention", None)
            missing = [
                name
                for name in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")
                if not hasattr(attention, name)
            ]
            if missing:
                raise TypeError(
                    f"Layer {index} of this ViT uses {type(attention).__name__} without "
                    f"{', '.join(missing)}; the transformers ViT adapter supports ViTAttention "
                    f"with q_proj, k_proj, v_proj and o_proj (transformers 5). Upgrade "
                    f"transformers or write an adapter for this attention."
                )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        classes = _vit_classes()
        return bool(classes) and isinstance(model, classes)

    def attention_modules(self) -> List[nn.Module]:
        return [layer.attention for layer in self.backbone.layers]

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return hf_vit_attention_hooks(attention, record)

    def output_scores(self, output: Any) -> Tensor:
        """The (B, K) tensor DAAM explains, from what the model's forward returned."""
        if isinstance(output, Tensor):
            return output
        logits = getattr(output, "logits", None)
        if isinstance(logits, Tensor):
            return logits
        last_hidden_state = getattr(output, "last_hidden_state", None)
        if isinstance(last_hidden_state, Tensor):
            return last_hidden_state[:, 0]
        raise ValueError(
            f"Expected the ViT to return logits or last_hidden_state, got a "
            f"{type(output).__name__} with neither. Call the model with return_dict left on."
        )

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    @property
    def in_channels(self) -> Optional[int]:
        return self.backbone.config.num_channels

    @property
    def num_outputs(self) -> Optional[int]:
        classifier = getattr(self.model, "classifier", None)
        if classifier is not None:
            return getattr(classifier, "out_features", self.backbone.config.hidden_size)
        return self.backbone.config.hidden_size

    @property
    def outputs_features(self) -> bool:
        classifier = getattr(self.model, "classifier", None)
        return classifier is None or isinstance(classifier, nn.Identity)

    @property
    def image_dtype(self) -> Optional[torch.dtype]:
        """None: the ViT converts ``pixel_values`` to its patch embedding's dtype itself."""
        return None

    def grid_size(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        patch_embeddings = self.backbone.embeddings.patch_embeddings
        expected_h, expected_w = patch_embeddings.image_size
        patch_h, patch_w = patch_embeddings.patch_size
        height, width = image_size
        if self.interpolate_pos_encoding:
            if height % patch_h or width % patch_w:
                raise ValueError(
                    f"Expected image height and width divisible by the patch size "
                    f"{patch_h}x{patch_w}, got {height}x{width}. Resize or pad the images."
                )
            return (height // patch_h, width // patch_w)
        if (height, width) != (expected_h, expected_w):
            raise ValueError(
                f"This ViT takes {expected_h}x{expected_w} images (a fixed "
                f"{expected_h // patch_h}x{expected_w // patch_w} patch grid), got "
                f"{height}x{width}. Resize the images, or call the model with "
                f"interpolate_pos_encoding=True and build the adapter with "
                f"HFViTAdapter(model, interpolate_pos_encoding=True)."
            )
        return (expected_h // patch_h, expected_w // patch_w)
