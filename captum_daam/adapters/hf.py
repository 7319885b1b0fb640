"""Hugging Face transformers vision encoders whose attention projects with ``q_proj`` /
``k_proj`` / ``v_proj`` and ``o_proj`` or ``out_proj`` (transformers 5): ViT, DeiT (and
``WithTeacher``), BEiT, DINOv2 (with and without registers), DINOv3, ViT-MSN, ViT-MAE,
I-JEPA, Data2Vec-Vision, the CLIP-style vision towers (CLIP, MetaCLIP 2, AltCLIP,
Chinese-CLIP, CLIPSeg, OWL-ViT, OWLv2, MLCD), SigLIP, SigLIP 2 and AIMv2 (their attention-pool
heads are the last block of the flow), as classifiers, bare models, embedding models and inside
image-text models; detectors and segmenters built on them are not taken.

One set of hooks serves every family: the attention mask a layer is given (BEiT's relative
position bias arrives there), the rotary embedding where the layer is given one (DINOv3,
through the family's own ``apply_rotary_pos_emb``), q / k / v from the projections, and the
head-concatenated output where it enters the output projection.

transformers is never imported here: a model of these families can only exist once the user
has imported it, so :meth:`HFVisionAdapter.supports` reads the model's class module and
config, and the package works, and stays fast to import, without transformers.
"""

import inspect
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from timm.layers import to_2tuple
from torch import Tensor, nn

from .._outputs import scores_in_output
from .._patches import images_as_patches
from ..decompose import SoftmaxAttention, class_attention_row
from .base import BlockRecord, Hook, TokenRows, ViTAdapter, register_adapter
from .multihead import multihead_attention_hooks

__all__ = ["HFVisionAdapter", "HFViTAdapter", "TransformersHead", "hf_attention_hooks"]

#: config.model_type of the vision encoders (and of the models that hold one) explained here.
_FAMILIES = {
    "vit": "ViT",
    "deit": "DeiT",
    "beit": "BEiT",
    "dinov2": "DINOv2",
    "dinov2_with_registers": "DINOv2 with registers",
    "dinov3_vit": "DINOv3",
    "vit_msn": "ViT-MSN",
    "vit_mae": "ViT-MAE",
    "ijepa": "I-JEPA",
    "clip": "CLIP",
    "clip_vision_model": "CLIP",
    "metaclip_2": "MetaCLIP 2",
    "metaclip_2_vision_model": "MetaCLIP 2",
    "siglip": "SigLIP",
    "siglip_vision_model": "SigLIP",
    "aimv2": "AIMv2",
    "aimv2_vision_model": "AIMv2",
    "data2vec-vision": "Data2Vec-Vision",
    "mlcd": "MLCD",
    "mlcd_vision_model": "MLCD",
    "siglip2": "SigLIP 2",
    "siglip2_vision_model": "SigLIP 2",
    "altclip": "AltCLIP",
    "altclip_vision_model": "AltCLIP",
    "chinese_clip": "Chinese-CLIP",
    "chinese_clip_vision_model": "Chinese-CLIP",
    "clipseg": "CLIPSeg",
    "clipseg_vision_model": "CLIPSeg",
    "owlvit": "OWL-ViT",
    "owlvit_vision_model": "OWL-ViT",
    "owlv2": "OWLv2",
    "owlv2_vision_model": "OWLv2",
    "idefics3_vision": "Idefics3 (SigLIP tower)",
    "smolvlm_vision": "SmolVLM (SigLIP tower)",
}
#: Classes of these families whose output is no score per image: their encoder is not
#: explained through them (object detection, segmentation, image-guided detection).
_DENSE_TASKS = ("ObjectDetection", "ImageGuidedDetection", "Segmentation", "Backbone")
#: Families whose embeddings take any image size (interpolated or relative positions, RoPE).
_ANY_SIZE = {
    "beit", "data2vec-vision", "dinov2", "dinov2_with_registers", "dinov3_vit",
    "mlcd_vision_model", "siglip2_vision_model", "idefics3_vision", "smolvlm_vision",
}
#: Families whose classifier reads the mean of the patch tokens (unless
#: use_mean_pooling=False).
_MEAN_POOLING = {"beit", "data2vec-vision"}
#: Image-text families whose ``...ForImageClassification`` reads the mean of the tower's tokens.
_TOKEN_MEAN_HEADS = {"clip", "metaclip_2", "siglip", "siglip2"}
#: Families whose attention layers project their output sequence first, (N, B, C).
_SEQUENCE_FIRST_OUTPUT = {"mlcd_vision_model"}
#: Poolers that are an extra dense + tanh layer, no part of a self-supervised checkpoint.
_DENSE_POOLERS = {"vit", "deit", "vit_msn"}


def _is_transformers_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.") and hasattr(model, "config")


def _model_type(module: nn.Module) -> str:
    return getattr(getattr(module, "config", None), "model_type", "")


def _additive_bias(attention_mask: Optional[Any]) -> Optional[Tensor]:
    """The mask a layer was given, as an additive logit bias.

    transformers prepares the mask per implementation: eager gets an additive float mask, sdpa
    a boolean one (True = may attend), both broadcastable to (B, H, N, N); BEiT passes its
    relative position bias (1, H, N, N) here. None when nothing is masked.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor):
        raise ValueError(
            f"Expected the attention mask of a transformers attention layer to be None or a "
            f"tensor, got a {type(attention_mask).__name__} (flex attention?). Load the model "
            f"with attn_implementation='eager' or 'sdpa' to explain it with DAAM."
        )
    mask = attention_mask.detach()
    if mask.dtype.is_floating_point:
        return mask
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return bias.masked_fill(~mask.bool(), float("-inf"))


def _rotate(
    attention: nn.Module, queries: Tensor, keys: Tensor, rotary: Tuple[Tensor, Tensor]
) -> Tuple[Tensor, Tensor]:
    """Queries and keys (B, H, N, d) rotated as the layer rotates them, with the family's own
    function from the layer's modeling module: DINOv3's ``apply_rotary_pos_emb`` (the patch
    tokens only), MLCD's ``apply_rotary_pos_emb_vision`` (tokens before heads, in float32)."""
    modeling = sys.modules.get(type(attention).__module__)
    vision = getattr(modeling, "apply_rotary_pos_emb_vision", None)
    if vision is not None:
        cos, sin = (part.unsqueeze(0).float() for part in rotary)
        queries, keys = vision(queries.transpose(1, 2), keys.transpose(1, 2), cos, sin)
        return queries.transpose(1, 2), keys.transpose(1, 2)
    return modeling.apply_rotary_pos_emb(queries, keys, *rotary)


def _output_projection(attention: nn.Module) -> Optional[nn.Linear]:
    projection = getattr(attention, "o_proj", None)
    return projection if projection is not None else getattr(attention, "out_proj", None)


def _attention_shape(attention: nn.Module) -> Tuple[int, int, float]:
    """(heads, head width, logit scale) of a transformers attention layer."""
    heads = getattr(attention, "num_attention_heads", None) or attention.num_heads
    scale = getattr(attention, "scaling", None)
    return heads, attention.head_dim, scale if scale is not None else attention.scale


def hf_attention_hooks(attention: nn.Module, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of a transformers attention layer with
    ``q_proj`` / ``k_proj`` / ``v_proj`` and ``o_proj`` or ``out_proj``.

    They read the mask and any rotary position embeddings from the call's arguments, the
    queries, keys and values from the projections (split into heads as the layer does; the
    rotary embedding applied to queries and keys with the family's own function), and watch the
    head-concatenated attention output where it enters the output projection.
    """
    heads, width, scale = _attention_shape(attention)
    sequence_first = _model_type(attention) in _SEQUENCE_FIRST_OUTPUT
    call: Dict[str, Any] = {}

    def split_heads(projected: Tensor) -> Tensor:
        # (B, N, H * d) -> (B, H, N, d), as the layers' view(...).transpose(1, 2).
        return projected.detach().unflatten(-1, (heads, width)).transpose(1, 2)

    parameters = inspect.signature(attention.forward)

    def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        # The layers pass the mask and rotary embedding by position or by name, in their order.
        given = parameters.bind_partial(*args, **kwargs).arguments
        call.clear()
        call["bias"] = _additive_bias(given.get("attention_mask"))
        call["rotary"] = given.get("position_embeddings")

    def keep(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            call[name] = split_heads(output)

        return hook

    def on_pre_projection(module: nn.Module, args: tuple) -> Tuple[Tensor, ...]:
        queries, keys, bias = call.pop("queries"), call.pop("keys"), call.pop("bias")
        rotary = call.pop("rotary")
        if rotary is not None:
            queries, keys = _rotate(attention, queries, keys, rotary)
        bias_row = None if bias is None else bias[..., 0, :]
        row = class_attention_row(queries[:, :, 0], keys, scale, bias_row)
        record.set_attention(
            row, call.pop("values"), SoftmaxAttention(queries, keys, scale, bias)
        )
        if not sequence_first:
            return (record.watch(args[0]),) + tuple(args[1:])
        # MLCD projects its output sequence first, (N, B, C): watched as a batch-first view.
        return (record.watch(args[0].transpose(0, 1)).transpose(0, 1),) + tuple(args[1:])

    return [
        Hook(attention, "pre_kwargs", on_call),
        Hook(attention.q_proj, "forward", keep("queries")),
        Hook(attention.k_proj, "forward", keep("keys")),
        Hook(attention.v_proj, "forward", keep("values")),
        Hook(_output_projection(attention), "pre", on_pre_projection),
    ]


def latent_pool_hooks(head: nn.Module, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from AIMv2's attention-pool head: its learned ``cls_token``
    is the one latent query, over keys and values from ``k_proj`` / ``v_proj`` (scaled
    dot-product attention's default scale), and its output enters ``output_proj``."""
    heads = head.num_heads
    width = head.hidden_size // heads
    call: Dict[str, Tensor] = {}

    def keep(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            call[name] = output.detach().unflatten(-1, (heads, width)).transpose(1, 2)

        return hook

    def on_pre_projection(module: nn.Module, args: tuple) -> Tuple[Tensor, ...]:
        keys, values = call.pop("keys"), call.pop("values")
        query = head.cls_token.detach().to(keys.dtype).reshape(1, heads, 1, width)
        queries = query.expand(keys.shape[0], -1, -1, -1)
        row = class_attention_row(queries[:, :, 0], keys, width**-0.5)
        record.set_attention(row, values, SoftmaxAttention(queries, keys, width**-0.5))
        # The pooled output is (B, C), the mean over the one latent query: watched as (B, 1, C).
        watched = record.watch(args[0].unsqueeze(1))
        return (watched.squeeze(1),) + tuple(args[1:])

    return [
        Hook(head.k_proj, "forward", keep("keys")),
        Hook(head.v_proj, "forward", keep("values")),
        Hook(head.output_proj, "pre", on_pre_projection),
    ]


def self_attention_output_hooks(attention: nn.Module, record: BlockRecord) -> List[Hook]:
    """Hooks that fill ``record`` from one call of a BERT-style attention layer (Data2Vec-Vision):
    ``attention.attention`` projects with ``query`` / ``key`` / ``value`` and adds its own
    relative position bias (a submodule, whose output is read) and the bias shared by all
    layers (an argument of the call); ``attention.output.dense`` is the output projection."""
    inner = attention.attention
    heads, width = inner.num_attention_heads, inner.attention_head_size
    parameters = inspect.signature(inner.forward)
    call: Dict[str, Any] = {}

    def split_heads(projected: Tensor) -> Tensor:
        return projected.detach().unflatten(-1, (heads, width)).transpose(1, 2)

    def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        given = parameters.bind_partial(*args, **kwargs).arguments
        call.clear()
        shared = given.get("relative_position_bias")
        call["bias"] = None if shared is None else shared.detach()

    def keep(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            call[name] = split_heads(output)

        return hook

    def on_own_bias(module: nn.Module, args: tuple, output: Tensor) -> None:
        shared = call.get("bias")
        call["bias"] = output.detach() if shared is None else output.detach() + shared

    def on_pre_projection(module: nn.Module, args: tuple) -> Tuple[Tensor, ...]:
        queries, keys, bias = call.pop("queries"), call.pop("keys"), call.pop("bias")
        bias_row = None if bias is None else bias[..., 0, :]
        row = class_attention_row(queries[:, :, 0], keys, width**-0.5, bias_row)
        record.set_attention(
            row, call.pop("values"), SoftmaxAttention(queries, keys, width**-0.5, bias)
        )
        return (record.watch(args[0]),) + tuple(args[1:])

    hooks = [
        Hook(inner, "pre_kwargs", on_call),
        Hook(inner.query, "forward", keep("queries")),
        Hook(inner.key, "forward", keep("keys")),
        Hook(inner.value, "forward", keep("values")),
        Hook(attention.output.dense, "pre", on_pre_projection),
    ]
    own_bias = getattr(inner, "relative_position_bias", None)
    if isinstance(own_bias, nn.Module):
        hooks.append(Hook(own_bias, "forward", on_own_bias))
    return hooks


def _is_self_attention_output(attention: nn.Module) -> bool:
    inner = getattr(attention, "attention", None)
    return hasattr(inner, "query") and hasattr(getattr(attention, "output", None), "dense")


def _patches_in_order(module: nn.Module, args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
    """A pre-hook on ViT-MAE's embeddings: with ``mask_ratio`` 0 they keep every patch but
    shuffle them by argsort of random ``noise``; increasing noise keeps the patches in grid
    order, as DAAM reads them."""
    pixel_values = kwargs.get("pixel_values", args[0] if args else None)
    noise = kwargs.get("noise", args[1] if len(args) > 1 else None)
    if noise is not None:
        if bool((noise.diff(dim=1) <= 0).any()):
            raise ValueError(
                "Expected no noise, or increasing noise, for ViT-MAE's patch order, got noise "
                "that shuffles the patches; DAAM reads the patches in grid order."
            )
        return args, kwargs
    patches = module.patch_embeddings.num_patches
    if kwargs.get("interpolate_pos_encoding", False):
        patch_h, patch_w = to_2tuple(module.patch_embeddings.patch_size)
        patches = (pixel_values.shape[-2] // patch_h) * (pixel_values.shape[-1] // patch_w)
    order = torch.arange(patches, device=pixel_values.device, dtype=torch.float32)
    kwargs = dict(kwargs, noise=order.expand(pixel_values.shape[0], -1))
    return args[:1], kwargs


def _vision_encoder(model: nn.Module) -> Optional[nn.Module]:
    """The module holding the patch embeddings and the blocks: ``model`` itself or the first
    module below it with ``embeddings`` (``model.vit``, ``model.vision_model``, ...)."""
    for module in model.modules():
        patch_size = getattr(getattr(module, "config", None), "patch_size", None)
        if hasattr(module, "embeddings") and patch_size and _blocks(module) is not None:
            return module  # the vision tower, not an image-text model's text tower
    return None


def _blocks(encoder: nn.Module) -> Optional[nn.ModuleList]:
    """The encoder's list of layers: ``layers``, ``encoder.layers``, ``encoder.layer`` or
    ``model.layer`` (DINOv3)."""
    for path in ("layers", "encoder.layers", "encoder.layer", "model.layer"):
        try:
            blocks = encoder.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return blocks
    return None


def _layer_attention(layer: nn.Module) -> Optional[nn.Module]:
    for name in ("attention", "self_attn"):
        attention = getattr(layer, name, None)
        if attention is not None:
            return attention
    return None


class TransformersHead:
    """What a transformers vision model's head tells before the forward pass, shared by the
    transformers adapters: the image channels of its config, the width of its classifier
    (``classifier`` or DeiT's ``cls_classifier``), else of its projection
    (``visual_projection``), else of the backbone's features (``_feature_width``; unknown
    before the forward pass for a classifier built with ``num_labels=0``, whose features
    DINOv2 concatenates), and whether it outputs features (no classifier). The adapter sets
    ``backbone`` to the module holding the config."""

    model: nn.Module
    backbone: nn.Module

    def _feature_width(self) -> int:
        """The width of the backbone's output features."""
        raise NotImplementedError

    @property
    def in_channels(self) -> Optional[int]:
        return getattr(self.backbone.config, "num_channels", 3)

    def _classifier(self) -> Optional[nn.Linear]:
        for name in ("classifier", "cls_classifier"):
            classifier = getattr(self.model, name, None)
            if isinstance(classifier, nn.Linear):
                return classifier
        return None

    @property
    def num_outputs(self) -> Optional[int]:
        head = self._classifier() or getattr(self.model, "visual_projection", None)
        if isinstance(head, nn.Linear):
            return head.out_features
        if getattr(self.model, "classifier", None) is not None:
            return None  # a classifier built without classes (Identity): known from its output
        return self._feature_width()

    @property
    def outputs_features(self) -> bool:
        return self._classifier() is None


@register_adapter
class HFVisionAdapter(TransformersHead, ViTAdapter):
    """transformers vision encoders with ``q_proj`` / ``k_proj`` / ``v_proj`` attention, alone
    or inside a classifier, an embedding model or an image-text model.

    What the model's head reads decides the query rows explained by default: the [class] row
    where it reads the [class] token (ViT, DeiT, ViT-MSN classifiers; CLIP's and DINOv3's
    pooled [class] token), the [class] and [dist] rows of DeiT's ``WithTeacher`` (the mean of
    its two heads, as timm's distilled DeiT), every row where it pools the tokens (DINOv2's
    classifier reads the [class] token and the mean of the patches; BEiT's mean pooling;
    I-JEPA), and SigLIP's and AIMv2's attention-pool heads as the last block of the flow.

    A forward pass's output object gives ``logits``, else ``image_embeds``, else
    ``pooler_output`` (skipped for ViT / DeiT / ViT-MSN, whose pooler is an extra dense + tanh
    layer: there, and for a ``ViTModel``, the [class] token of ``last_hidden_state``), else the
    [class] token of ``last_hidden_state``, or the mean of its tokens in a model without one
    (I-JEPA).

    Args:
        model: a transformers model of one of the families above.
        interpolate_pos_encoding: set when the model is called with
            ``interpolate_pos_encoding=True``, so that images of any size divisible by the
            patch size are accepted; otherwise only the configured image size is, except for
            the families that take any size (BEiT, Data2Vec-Vision, DINOv2, DINOv3, MLCD,
            SigLIP 2, the Idefics3 / SmolVLM towers).
    """

    family = "Hugging Face transformers vision encoders"
    examples = (
        "ViT, DeiT, BEiT, Data2Vec-Vision, DINOv2, DINOv3, ViT-MSN, ViT-MAE, I-JEPA, CLIP, "
        "MetaCLIP 2, AltCLIP, Chinese-CLIP, CLIPSeg, OWL-ViT, MLCD, SigLIP, SigLIP 2, AIMv2: "
        "classifiers, bare and embedding models, image-text models"
    )
    layer_example = (
        "model.vit.layers[i].attention, or model.vision_model.encoder.layers[i].self_attn"
    )

    def __init__(self, model: nn.Module, interpolate_pos_encoding: bool = False) -> None:
        super().__init__(model)
        self.interpolate_pos_encoding = interpolate_pos_encoding
        self.encoder = _vision_encoder(model)
        if self.encoder is None:
            raise TypeError(
                f"Expected a transformers vision model with patch embeddings and a list of "
                f"layers, got a {type(model).__name__} without them."
            )
        self.kind = _model_type(self.encoder) or _model_type(model)
        self.blocks = _blocks(self.encoder)
        for index, layer in enumerate(self.blocks):
            attention = _layer_attention(layer)
            missing = [
                name for name in ("q_proj", "k_proj", "v_proj")
                if not hasattr(attention, name)
            ]
            if _is_self_attention_output(attention):
                continue
            if missing or _output_projection(attention) is None:
                raise TypeError(
                    f"Layer {index} of this {type(model).__name__} uses "
                    f"{type(attention).__name__} without q_proj, k_proj, v_proj and o_proj / "
                    f"out_proj; the transformers adapter supports attention with these "
                    f"projections (transformers 5). Upgrade transformers or write an adapter "
                    f"for this attention."
                )
        config = self.encoder.config
        self.patch_size = to_2tuple(config.patch_size)
        # SigLIP 2 takes any size, and has none configured.
        self.image_size = to_2tuple(getattr(config, "image_size", 0))

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return (
            _is_transformers_model(model)
            and _model_type(model) in _FAMILIES
            and not any(task in type(model).__name__ for task in _DENSE_TASKS)
            and _vision_encoder(model) is not None
        )

    # ------------------------------------------------------------------ the blocks

    def attention_modules(self) -> List[nn.Module]:
        return [_layer_attention(layer) for layer in self.blocks] + self.latent_query_modules()

    @property
    def _classifier_pools_tokens(self) -> bool:
        """Whether the model is a classifier over the mean of the tokens of an image-text
        family's tower (CLIP, MetaCLIP 2: the patches; SigLIP, SigLIP 2: every token), which
        leaves the tower's own pooling (SigLIP's attention-pool head) unread."""
        return hasattr(self.model, "classifier") and _model_type(self.model) in _TOKEN_MEAN_HEADS

    def latent_query_modules(self) -> List[nn.Module]:
        head = getattr(self.encoder, "head", None)
        if head is None or self._classifier_pools_tokens:
            return []
        attention = getattr(head, "attention", None)
        if isinstance(attention, nn.MultiheadAttention):  # SigLIP: a probe over the tokens
            return [attention]
        return [head] if hasattr(head, "output_proj") else []  # AIMv2

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        if isinstance(attention, nn.MultiheadAttention):
            return multihead_attention_hooks(attention, record)
        if hasattr(attention, "output_proj"):
            return latent_pool_hooks(attention, record)
        if _is_self_attention_output(attention):
            return self_attention_output_hooks(attention, record)
        return hf_attention_hooks(attention, record)

    def model_hooks(self) -> List[Hook]:
        """ViT-MAE's patches kept in grid order; SigLIP 2's images cut into patches."""
        if self.kind == "vit_mae":
            return [Hook(self.encoder.embeddings, "pre_kwargs", _patches_in_order)]
        if self.kind == "siglip2_vision_model":
            return [Hook(self._naflex_model(), "pre_kwargs", self._images_as_patches)]
        return []

    def _naflex_model(self) -> nn.Module:
        """SigLIP 2's vision model, whose forward takes patches with their mask and shapes."""
        return getattr(self.model, "vision_model", self.model)

    def _images_as_patches(self, module: nn.Module, args: tuple, kwargs: dict):
        """A pre-hook on SigLIP 2's vision model: images (B, C, H, W) become the patches its
        processor makes, every patch real (:func:`~captum_daam._patches.images_as_patches`);
        patches from the processor pass as they are."""
        given = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
        images = given.get("pixel_values")
        if not isinstance(images, Tensor) or images.dim() != 4:
            return None  # patches already (ImageTextSimilarity makes them itself)
        return (), {**given.get("kwargs", {}), **images_as_patches(images, self.patch_size[0])}

    # ------------------------------------------------------------------ the tokens

    @property
    def _embeddings(self) -> nn.Module:
        return self.encoder.embeddings

    @property
    def has_class_token(self) -> bool:
        embeddings = self._embeddings
        return hasattr(embeddings, "cls_token") or hasattr(embeddings, "class_embedding")

    @property
    def num_prefix_tokens(self) -> int:
        embeddings = self._embeddings
        registers = getattr(embeddings, "register_tokens", None)
        return (
            int(self.has_class_token)
            + int(hasattr(embeddings, "distillation_token"))
            + (0 if registers is None else registers.shape[1])
        )

    @property
    def head_queries(self) -> Optional[Union[Tuple[int, ...], TokenRows]]:
        if self.latent_query_modules() or not self.has_class_token:
            return None
        model, kind = self.model, self.kind
        patches = TokenRows((), self.num_prefix_tokens)
        if hasattr(model, "distillation_classifier"):
            return (0, 1)  # DeiT WithTeacher: the mean of the [class] and [dist] heads
        if hasattr(model, "classifier"):
            if self._classifier_pools_tokens:
                return patches  # CLIP's classifier: the mean of the patch tokens
            if kind in ("dinov2", "dinov2_with_registers"):
                return TokenRows((0,), patches.start)  # [class] and the mean of the patches
            if kind in _MEAN_POOLING and getattr(self.encoder.config, "use_mean_pooling", True):
                return patches  # BEiT's mean of the patch tokens
            return (0,)
        pooler = getattr(self.encoder, "pooler", None)
        if kind in ("beit", "data2vec-vision") and pooler is not None and isinstance(
            getattr(pooler, "layernorm", None), nn.Module
        ):
            return patches  # BEiT's mean pooling
        return (0,)

    @property
    def reads_class_token(self) -> bool:
        """Whether the head reads the [class] token (DeiT's WithTeacher its [dist] token too,
        whose rows the paper's default leaves out with a warning, as for timm's DeiT)."""
        return isinstance(self.head_queries, tuple) and not isinstance(
            self.head_queries, TokenRows
        )

    # ------------------------------------------------------------------ the outputs

    def output_scores(self, output: Any) -> Tensor:
        """The (B, K) tensor DAAM explains (see the class docstring)."""
        if isinstance(output, Tensor):
            return output
        scores = scores_in_output(output, self.kind not in _DENSE_POOLERS, self.has_class_token)
        return output if scores is None else scores

    @property
    def backbone(self) -> nn.Module:
        return self.encoder

    def _feature_width(self) -> int:
        return self.encoder.config.hidden_size

    @property
    def image_dtype(self) -> Optional[torch.dtype]:
        """None: transformers' patch embeddings convert ``pixel_values`` themselves."""
        return None

    def grid_size(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        patch_h, patch_w = self.patch_size
        height, width = image_size
        mask_ratio = getattr(self.encoder.config, "mask_ratio", 0.0)
        if self.kind == "vit_mae" and mask_ratio > 0:
            raise ValueError(
                f"Expected a ViT-MAE that keeps every patch (config.mask_ratio = 0.0), got "
                f"mask_ratio={mask_ratio}: it drops that share of the patches at random in "
                f"every forward pass. Set model.config.mask_ratio = 0.0 to explain the whole "
                f"image."
            )
        if self.kind == "siglip2_vision_model" and (height % patch_h or width % patch_w):
            raise ValueError(
                f"Expected image height and width divisible by SigLIP 2's patch size "
                f"{patch_h}x{patch_w}, got {height}x{width}: DAAM cuts the images into patches "
                f"as its processor does, which resizes them to such a size first."
            )
        if self.kind in _ANY_SIZE:
            if height < patch_h or width < patch_w:
                raise ValueError(
                    f"Expected images of at least one {patch_h}x{patch_w} patch, got "
                    f"{height}x{width}."
                )
            return (height // patch_h, width // patch_w)
        if self.interpolate_pos_encoding:
            if height % patch_h or width % patch_w:
                raise ValueError(
                    f"Expected image height and width divisible by the patch size "
                    f"{patch_h}x{patch_w}, got {height}x{width}. Resize or pad the images."
                )
            return (height // patch_h, width // patch_w)
        expected_h, expected_w = self.image_size
        if (height, width) != (expected_h, expected_w):
            raise ValueError(
                f"This {type(self.model).__name__} takes {expected_h}x{expected_w} images (a "
                f"fixed {expected_h // patch_h}x{expected_w // patch_w} patch grid), got "
                f"{height}x{width}. Resize the images, or call the model with "
                f"interpolate_pos_encoding=True and build the adapter with "
                f"HFVisionAdapter(model, interpolate_pos_encoding=True)."
            )
        return (expected_h // patch_h, expected_w // patch_w)


#: The name this adapter had when it explained transformers' ViT alone.
HFViTAdapter = HFVisionAdapter
