"""open_clip's own image tower, ``open_clip.transformer.VisionTransformer`` (the ``visual`` of
``open_clip.create_model('ViT-B-32')``, ViT-L-14, CoCa and the other non-timm ViT configs),
explained as an embedding model: its output is the image embedding (``output_dim`` features).

Its blocks run ``nn.MultiheadAttention`` (``ResidualAttentionBlock``) or, with qk_norm, head
scaling or the other NormFormer options, open_clip's ``Attention``
(``CustomResidualAttentionBlock``). A [class] token read by ``pool_type='tok'`` gives the
paper's [class] rows; ``'avg'`` pools the patch tokens, so every row is explained. The
attentional pooler (``attentional_pool=True``, CoCa) attends from its learned latent queries
over every token: the last block of the flow, explained from every latent row.

The adapter is found inside a whole CLIP model too: ``adapter_for(clip_model)`` is the adapter
of ``clip_model.visual``, for ``DAAM(clip_model.visual)`` or a forward function such as
``lambda images: clip_model.encode_image(images, normalize=True)`` given
``adapter=adapter_for(clip_model)``. Towers with a timm trunk (``TimmModel``) are explained by
the timm adapters, found for the trunk.

open_clip is never imported here: :meth:`OpenClipVisionTransformerAdapter.supports` looks its
classes up in ``sys.modules``, so the package works without open_clip.
"""

from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..decompose import SoftmaxAttention, class_attention_row
from .base import (
    BlockRecord,
    Hook,
    ViTAdapter,
    loaded_classes,
    register_adapter,
    watch_first_input,
)
from .multihead import multihead_attention_hooks, unsupported_multihead_options

__all__ = ["OpenClipVisionTransformerAdapter", "open_clip_attention_hooks"]

_TRANSFORMER_MODULE = "open_clip.transformer"


def _open_clip_class(name: str) -> Optional[type]:
    """The class ``name`` of ``open_clip.transformer`` if open_clip is loaded, else None."""
    found = loaded_classes(_TRANSFORMER_MODULE, (name,))
    return found[0] if found else None


def open_clip_attention_hooks(attention: nn.Module, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one unmasked call of open_clip's ``Attention``.

    The queries and keys are read after ``ln_q`` / ``ln_k`` (identities unless qk_norm), the
    values recomputed from the last third of ``in_proj_weight`` and scaled by ``head_scale``
    where the module has one (it scales each head's output, so it scales that head's values);
    the head-concatenated output is watched where it enters ``ln_inner`` (an identity unless
    scale_attn_inner), before the norm and ``out_proj``.
    """
    heads, width = attention.num_heads, attention.head_dim
    channels = heads * width
    call: dict = {}

    def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs.get("attn_mask", args[1] if len(args) > 1 else None) is not None:
            raise ValueError(
                "DAAM's open_clip adapter expects unmasked attention (as the image tower calls "
                "it), got a call with an attention mask. Call the tower without a mask."
            )
        tokens = args[0] if args else kwargs["x"]
        bias = module.in_proj_bias
        with torch.no_grad():
            values = F.linear(
                tokens,
                module.in_proj_weight.detach()[2 * channels:],
                None if bias is None else bias.detach()[2 * channels:],
            )
            values = values.unflatten(-1, (heads, width)).transpose(1, 2)  # (B, H, N, d)
            if module.head_scale is not None:
                values = values * module.head_scale.detach()
        call["values"] = values

    def on_query(module: nn.Module, args: tuple, queries: Tensor) -> None:
        call["queries"] = queries.detach()

    def on_keys(module: nn.Module, args: tuple, keys: Tensor) -> None:
        queries, keys = call.pop("queries"), keys.detach()
        row = class_attention_row(queries[:, :, 0], keys, attention.scale)
        record.set_attention(
            row, call.pop("values"), SoftmaxAttention(queries, keys, attention.scale)
        )

    return [
        Hook(attention, "pre_kwargs", on_call),
        Hook(attention.ln_q, "forward", on_query),
        Hook(attention.ln_k, "forward", on_keys),
        Hook(attention.ln_inner, "pre", watch_first_input(record)),
    ]


def _attention_pool(model: nn.Module) -> Optional[nn.Module]:
    """The tower's attentional pooler, or None (also for open_clip releases without one)."""
    return getattr(model, "attn_pool", None)


def _pool_type(model: nn.Module) -> str:
    """'tok', 'avg' or 'none'; from ``global_average_pool`` in releases before pool_type."""
    default = "avg" if getattr(model, "global_average_pool", False) else "tok"
    return getattr(model, "pool_type", default)


@register_adapter
class OpenClipVisionTransformerAdapter(ViTAdapter):
    """open_clip's ``VisionTransformer``: a [class] token, the blocks of
    ``model.transformer.resblocks`` and, where it has one, the attentional pooler
    ``model.attn_pool`` as the last block of the flow."""

    family = "open_clip VisionTransformer"
    examples = (
        "open_clip.create_model('ViT-B-32').visual, ViT-L-14, CoCa; found in a whole CLIP model"
    )
    layer_example = "model.transformer.resblocks[i].attn (clip_model.visual.transformer...)"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        standard = _open_clip_class("ResidualAttentionBlock")
        custom = _open_clip_class("CustomResidualAttentionBlock")
        custom_attention = _open_clip_class("Attention")
        for index, block in enumerate(model.transformer.resblocks):
            attention = getattr(block, "attn", None)
            if isinstance(block, standard) and isinstance(attention, nn.MultiheadAttention):
                unsupported = unsupported_multihead_options(attention)
            elif isinstance(block, custom) and isinstance(attention, custom_attention):
                scaled_cosine = attention.logit_scale is not None
                unsupported = ["scaled_cosine_attn=True"] if scaled_cosine else []
            else:
                raise TypeError(
                    f"Block {index} of this open_clip VisionTransformer is a "
                    f"{type(block).__name__} with attention {type(attention).__name__}; the "
                    f"open_clip adapter supports ResidualAttentionBlock (nn.MultiheadAttention) "
                    f"and CustomResidualAttentionBlock (open_clip's Attention). Write an "
                    f"adapter for this block type."
                )
            if unsupported:
                raise TypeError(
                    f"Block {index}'s attention was built with {', '.join(unsupported)}, which "
                    f"the open_clip adapter does not read. Build the tower without it."
                )
        if getattr(model, "attn_pool_type", ""):
            raise TypeError(
                f"This open_clip VisionTransformer pools with attentional_pool="
                f"{model.attn_pool_type!r} (two poolers, work in progress in open_clip); the "
                f"open_clip adapter explains attentional_pool=True (one pooler, as CoCa) or "
                f"False. Build the tower with one of those."
            )
        pool, pool_type = _attention_pool(model), _pool_type(model)
        if pool is None and pool_type == "none":
            raise TypeError(
                "This open_clip VisionTransformer has pool_type='none': it returns every "
                "token's features (B, N, D), not one embedding per image, which DAAM "
                "explains. Build the tower with pool_type 'tok' or 'avg'."
            )
        if pool is not None:
            if pool_type == "none":
                raise TypeError(
                    "This open_clip VisionTransformer's attentional pooler has pool_type="
                    "'none': it returns every latent query's features, not one embedding per "
                    "image, which DAAM explains. Build the tower with pool_type 'tok' or 'avg'."
                )
            unsupported = unsupported_multihead_options(pool.attn)
            if unsupported:
                raise TypeError(
                    f"The attentional pooler's attention was built with "
                    f"{', '.join(unsupported)}, which the open_clip adapter does not read."
                )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        vision_transformer = _open_clip_class("VisionTransformer")
        return vision_transformer is not None and isinstance(model, vision_transformer)

    def attention_modules(self) -> List[nn.Module]:
        blocks = [block.attn for block in self.model.transformer.resblocks]
        return blocks + self.latent_query_modules()

    def latent_query_modules(self) -> List[nn.Module]:
        pool = _attention_pool(self.model)
        return [] if pool is None else [pool.attn]

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        if isinstance(attention, nn.MultiheadAttention):
            return multihead_attention_hooks(attention, record)
        return open_clip_attention_hooks(attention, record)

    @property
    def has_class_token(self) -> bool:
        return getattr(self.model, "class_embedding", None) is not None

    @property
    def reads_class_token(self) -> bool:
        """Only ``pool_type='tok'`` without the attentional pooler reads the [class] token
        (``'avg'`` averages the patch tokens; the pooler attends over every token)."""
        pooled_by_token = _attention_pool(self.model) is None and _pool_type(self.model) == "tok"
        return self.has_class_token and pooled_by_token

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.has_class_token else 0

    @property
    def in_channels(self) -> Optional[int]:
        return self.model.conv1.in_channels

    @property
    def num_outputs(self) -> Optional[int]:
        if self.model.proj is not None:
            return self.model.proj.shape[1]
        # Pruned of its projection (prune_intermediate_layers): the pooled width.
        if _attention_pool(self.model) is not None:
            return self.model.output_dim
        return self.model.transformer.width

    @property
    def outputs_features(self) -> bool:
        return True

    def output_scores(self, output: Any) -> Tensor:
        """The image embedding: the tower's output, or the first item of the (pooled, tokens)
        it returns with ``output_tokens=True`` (CoCa)."""
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            return output[0]
        return super().output_scores(output)

    def grid_size(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        expected = tuple(self.model.image_size)
        grid = tuple(self.model.grid_size)
        if tuple(image_size) != expected:
            raise ValueError(
                f"This open_clip VisionTransformer takes {expected[0]}x{expected[1]} images (a "
                f"fixed {grid[0]}x{grid[1]} patch grid), got {image_size[0]}x{image_size[1]}. "
                f"Resize the images to {expected[0]}x{expected[1]}."
            )
        return grid
