"""Slow, explicit, independent reference implementation of DAAM for timm ViTs.

This module is a *specification in code*. The test suite compares the
``captum_daam`` package against it, so it deliberately:

* imports nothing from ``captum_daam``;
* uses no module hooks and never calls ``Attention.forward`` or
  ``scaled_dot_product_attention``: every attention matrix is formed by hand
  as an explicit ``(B, H, N, N)`` tensor;
* builds the full per-token contribution tensor ``F_l`` of shape ``(B, N, C)``
  instead of the cheaper per-head contraction;
* by default runs in float64 on a deep copy of the model, so that it is more
  precise than the float32 implementation under test.

Method (see DESIGN.md section 1, Liao et al. 2025, arXiv 2503.14640)::

    A_l = softmax(q k^T * scale)                       (B, H, N, N)
    O_l = A_l @ v                                      (B, H, N, d) -> (B, N, C)
    F_l[b, n, (h, e)] = A_l[b, h, 0, n] * v_l[b, h, n, e]          (B, N, C)
    g_l[b, c] = d y_target / d O_l[b, 0, c]                        (B, C)
    cam_l[b, n] = relu( sum_c w_l[b, c] * F_l[b, n, c] ),  w = relu(g) or g
    D_l = cam_1 + ... + cam_l                          (the DAAM flow)

Supported models: ``timm.models.vision_transformer.VisionTransformer`` and
subclasses (e.g. ``timm.models.deit.VisionTransformerDistilled``) built from
the standard pre-norm ``Block`` with the standard ``Attention`` module, with or
without register tokens, ``qk_norm``, ``scale_attn_norm``, LayerScale
(``init_values``), gated attention, ``dynamic_img_size`` and fused or
non-fused attention (the flag is irrelevant here: attention is always
computed explicitly). The [class] rows need a [class] token; every row
(``queries="all"``) does not (``class_token=False``, registers first).
"""

import copy
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from timm.layers.attention import Attention as TimmAttention
from timm.models.vision_transformer import Block as TimmBlock

__all__ = [
    "explicit_attention",
    "explicit_forward",
    "explicit_daam",
    "maps_from_explicit_blocks",
    "maps_from_every_query_row",
    "area_resample",
    "explicit_gradients",
    "flow_on_the_finest_grid",
    "resolve_targets",
    "patch_grid_size",
]


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #


def patch_grid_size(model: torch.nn.Module, images: torch.Tensor) -> Tuple[int, int]:
    """Return the patch grid ``(gh, gw)`` the model produces for ``images``.

    For ``dynamic_img_size`` models the grid depends on the input:
    ``(H // patch_h, W // patch_w)`` (rounded up when ``dynamic_img_pad`` is
    on, because timm then pads the image to a multiple of the patch size).
    Otherwise it is the fixed ``model.patch_embed.grid_size``.
    """
    patch_embed = model.patch_embed
    if getattr(model, "dynamic_img_size", False):
        height, width = images.shape[-2:]
        ph, pw = patch_embed.patch_size
        if getattr(patch_embed, "dynamic_img_pad", False):
            return (-(-height // ph), -(-width // pw))  # ceil division
        return (height // ph, width // pw)
    gh, gw = patch_embed.grid_size
    return (int(gh), int(gw))


def resolve_targets(
    target: Union[None, int, Sequence[int], torch.Tensor],
    logits: torch.Tensor,
) -> torch.Tensor:
    """Turn a Captum-style ``target`` into a ``(B,)`` long tensor of class indices.

    * ``None``: the predicted class, ``logits.argmax(-1)`` per example;
    * ``int`` (or 0-d tensor): the same class for every example;
    * list / tuple / 1-D tensor of length B: one class per example.
    """
    batch = logits.shape[0]
    device = logits.device
    if target is None:
        return logits.detach().argmax(dim=-1).to(torch.long)
    if isinstance(target, torch.Tensor):
        if target.dim() == 0:
            return torch.full((batch,), int(target.item()), dtype=torch.long, device=device)
        targets = target.reshape(-1).to(device=device, dtype=torch.long)
    elif isinstance(target, int):
        return torch.full((batch,), target, dtype=torch.long, device=device)
    else:
        targets = torch.tensor([int(t) for t in target], dtype=torch.long, device=device)
    if targets.numel() != batch:
        raise ValueError(f"target has {targets.numel()} entries for a batch of {batch}")
    return targets


def _attention_bias(
    attn_mask: Optional[torch.Tensor], like: torch.Tensor
) -> Optional[torch.Tensor]:
    """Additive attention bias with the semantics timm / SDPA give ``attn_mask``.

    A boolean mask means "True = may attend" (False becomes -inf); any other
    mask is added to the scores as is.
    """
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, dtype=like.dtype, device=like.device)
        return bias.masked_fill(~attn_mask, float("-inf"))
    return attn_mask.to(like.dtype)


def _check_supported(model: torch.nn.Module) -> None:
    """Fail loudly on architectures this reference does not describe."""
    for index, blk in enumerate(model.blocks):
        if not isinstance(blk, TimmBlock):
            raise TypeError(
                f"block {index} is {type(blk).__name__}; the reference only covers timm's "
                "pre-norm vision_transformer.Block"
            )
        if not isinstance(blk.attn, TimmAttention):
            raise TypeError(
                f"block {index} attention is {type(blk.attn).__name__}; the reference only "
                "covers timm.layers.attention.Attention"
            )


# --------------------------------------------------------------------------- #
# Explicit attention and forward pass
# --------------------------------------------------------------------------- #


def explicit_attention(
    attn: TimmAttention,
    z: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """Re-compute one timm ``Attention`` module by hand.

    Args:
        attn: a ``timm.layers.attention.Attention`` module.
        z: its input, the normalised tokens ``blk.norm1(x)``, shape (B, N, dim).
        attn_mask: optional mask, same semantics as timm (bool: True = attend;
            float: additive bias).

    Returns:
        dict with
          * ``q``, ``k``: (B, H, N, d), after ``q_norm`` / ``k_norm``;
          * ``v``: (B, H, N, d);
          * ``attn``: the attention probabilities A = softmax(q k^T * scale),
            (B, H, N, N), rows sum to one;
          * ``pre_projection``: A @ v with heads concatenated, (B, N, C). Heads
            are laid out as timm does, ``O.transpose(1, 2).reshape(B, N, C)``,
            i.e. channel ``c = h * d + e``. This is the tensor DAAM
            differentiates with respect to (before ``norm``, gate and ``proj``);
          * ``out``: ``proj(gate * norm(pre_projection))``, what
            ``attn.forward`` would return (before the residual / LayerScale).
    """
    batch, tokens, _ = z.shape
    heads, head_dim = attn.num_heads, attn.head_dim

    # The gate (if any) is computed from the attention input, exactly as timm.
    gate = attn.gate(z).sigmoid() if attn.gate is not None else None

    # qkv: (B, N, 3*C) -> (B, N, 3, H, d) -> (3, B, H, N, d)
    qkv = attn.qkv(z).reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = attn.q_norm(q)
    k = attn.k_norm(k)

    scores = (q @ k.transpose(-2, -1)) * attn.scale  # (B, H, N, N)
    bias = _attention_bias(attn_mask, scores)
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(dim=-1)  # A_l, explicit
    probs_used = attn.attn_drop(probs)  # identity in eval mode

    per_head_output = probs_used @ v  # (B, H, N, d)
    pre_projection = per_head_output.transpose(1, 2).reshape(batch, tokens, heads * head_dim)

    y = attn.norm(pre_projection)
    if gate is not None:
        y = y * gate
    out = attn.proj_drop(attn.proj(y))
    return {
        "q": q,
        "k": k,
        "v": v,
        "attn": probs,
        "pre_projection": pre_projection,
        "out": out,
    }


def explicit_forward(
    model: torch.nn.Module,
    images: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
) -> Dict[str, object]:
    """Run a timm ViT by hand, exposing every block's attention explicitly.

    The steps mirror ``VisionTransformer.forward_features`` + ``forward_head``
    (timm 1.0.x)::

        x = patch_embed(images); x = _pos_embed(x); x = patch_drop(x); x = norm_pre(x)
        for blk in blocks:
            out = <explicit attention of blk.norm1(x)>
            x = x + drop_path1(ls1(out))
            x = x + drop_path2(ls2(mlp(norm2(x))))
        logits = forward_head(norm(x))

    ``forward_head`` is the model's own: for ``VisionTransformer`` it is
    pool (class token / avg / ...) -> fc_norm -> head_drop -> head; for
    ``VisionTransformerDistilled`` it is ``(head(x[:, 0]) + head_dist(x[:, 1])) / 2``
    (no pool, no fc_norm).

    Put the model in eval mode for deterministic results (dropout, drop-path,
    patch-drop). A distilled model with ``distilled_training`` on and in train
    mode returns two heads; that case is rejected.

    Args:
        model: timm ``VisionTransformer`` (or subclass).
        images: (B, 3, H, W), same dtype / device as the model.
        attn_mask: optional attention mask passed to every block (timm semantics).

    Returns:
        dict with
          * ``logits``: (B, num_classes);
          * ``blocks``: list of L dicts, one per block, each with ``attn``
            (B, H, N, N), ``q``, ``k``, ``v`` (B, H, N, d), ``pre_projection``
            (B, N, C) and ``out`` (B, N, dim), see :func:`explicit_attention`;
          * ``tokens``: final token states after ``model.norm``, (B, N, dim);
          * ``num_prefix_tokens``: class + distillation + register tokens;
          * ``grid_size``: (gh, gw) patch grid for these images.
    """
    _check_supported(model)

    x = model.patch_embed(images)  # (B, N_patch, C), or (B, gh, gw, C) if dynamic_img_size
    x = model._pos_embed(x)  # prepends class / dist / register tokens, adds pos-embed
    x = model.patch_drop(x)
    x = model.norm_pre(x)

    blocks: List[Dict[str, torch.Tensor]] = []
    for blk in model.blocks:
        record = explicit_attention(blk.attn, blk.norm1(x), attn_mask=attn_mask)
        x = x + blk.drop_path1(blk.ls1(record["out"]))
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        blocks.append(record)

    tokens = model.norm(x)
    logits = model.forward_head(tokens)
    if isinstance(logits, (tuple, list)):
        raise ValueError(
            "model.forward_head returned several outputs (distilled model in "
            "distilled-training train mode); call model.eval() first"
        )

    grid_size = patch_grid_size(model, images)
    num_prefix = int(model.num_prefix_tokens)
    if tokens.shape[1] != num_prefix + grid_size[0] * grid_size[1]:
        raise ValueError(
            f"{tokens.shape[1]} tokens do not match {num_prefix} prefix tokens + grid "
            f"{grid_size} (is patch_drop active? use model.eval())"
        )
    return {
        "logits": logits,
        "blocks": blocks,
        "tokens": tokens,
        "num_prefix_tokens": num_prefix,
        "grid_size": grid_size,
    }


# --------------------------------------------------------------------------- #
# DAAM
# --------------------------------------------------------------------------- #


def explicit_daam(
    model: torch.nn.Module,
    images: torch.Tensor,
    target: Union[None, int, Sequence[int], torch.Tensor] = None,
    relu_gradients: bool = True,
    dtype: Optional[torch.dtype] = torch.float64,
    attn_mask: Optional[torch.Tensor] = None,
    importance: Optional[torch.Tensor] = None,
    queries: str = "class",
) -> Dict[str, object]:
    """Reference DAAM block maps and flow for a timm ViT, computed explicitly.

    With ``queries="all"`` the maps split every query row of the attention output, each
    weighted by its own gradient (:func:`maps_from_every_query_row`), instead of the [class]
    row alone.

    With ``importance`` (D,) or (B, D), the objective is the self-supervised one,
    ``sum_b sum_d importance[b, d] * output[b, d]``, instead of the target scores.

    Steps:

    1. ``explicit_forward`` (on a deep copy cast to ``dtype`` unless
       ``dtype`` is None, in which case the model is used as is).
    2. targets: ``resolve_targets(target, logits)`` (None -> argmax).
    3. ``score = sum_b logits[b, target_b]``; ``g_l = d score / d pre_projection_l``
       for all blocks at once with ``torch.autograd.grad``; the [class] row
       ``g_l[:, 0, :]`` (B, C) is the channel importance. Examples do not
       interact in a ViT, so the batch sum gives each example its own gradient.
    4. ``F_l[b, n, h*d + e] = A_l[b, h, 0, n] * v_l[b, h, n, e]`` (B, N, C).
    5. ``cam_l[b, n] = relu(sum_c w[b, c] * F_l[b, n, c])`` with
       ``w = relu(g)`` if ``relu_gradients`` (supervised DAAM) else ``g``
       (the self-supervised variant).
    6. drop the ``num_prefix_tokens`` leading tokens, reshape to (gh, gw);
       flow = cumulative sum over blocks.

    Args:
        model: timm ViT in eval mode (not modified; a deep copy is cast).
        images: (B, 3, H, W).
        target: None, int, or one class index per example.
        relu_gradients: clamp the gradient weights at zero (supervised DAAM).
        dtype: computation dtype, float64 by default; None keeps the model's.
        attn_mask: optional attention mask (timm semantics) for every block.

    Returns:
        dict (all tensors detached, in the computation dtype) with
          * ``logits``: (B, num_classes);
          * ``targets``: (B,) long;
          * ``block_maps``: (B, L, gh, gw), cam_l per block;
          * ``flow``: (B, L, gh, gw), D_l = cam_1 + ... + cam_l; ``flow[:, -1]``
            is the final DAAM map;
          * ``contributions``: list of L tensors F_l, (B, N, C), all tokens
            including the prefix tokens;
          * ``class_outputs``: list of L tensors ``pre_projection_l[:, 0, :]``
            (B, C) (equals ``F_l.sum(1)``);
          * ``class_gradients``: list of L tensors ``g_l[:, 0, :]`` (B, C),
            before any relu;
          * ``class_attention``: list of L tensors ``A_l[:, :, 0, :]`` (B, H, N);
          * ``num_prefix_tokens``: int; ``grid_size``: (gh, gw).
    """
    if dtype is not None:
        model = copy.deepcopy(model).to(dtype)
        images = images.to(dtype)
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(dtype)

    # A leaf input that requires grad guarantees a graph down to block 1 even
    # when the model's parameters are frozen.
    images = images.detach().clone().requires_grad_(True)

    with torch.enable_grad():
        result = explicit_forward(model, images, attn_mask=attn_mask)
        logits = result["logits"]
        if importance is None:
            targets = resolve_targets(target, logits)
            batch_index = torch.arange(logits.shape[0], device=logits.device)
            score = logits[batch_index, targets].sum()
        else:
            targets = None
            score = (logits * importance.to(logits.dtype)).sum()

        pre_projections = [record["pre_projection"] for record in result["blocks"]]
        gradients = torch.autograd.grad(score, pre_projections)

    if queries == "class" and getattr(model, "cls_token", None) is None:
        raise ValueError("the [class] rows need a [class] token (model.cls_token is None)")
    reduce = maps_from_explicit_blocks if queries == "class" else maps_from_every_query_row
    maps = reduce(
        result["blocks"],
        gradients,
        result["num_prefix_tokens"],
        result["grid_size"],
        relu_gradients=relu_gradients,
    )
    return dict(
        maps,
        logits=logits.detach(),
        targets=targets,
        num_prefix_tokens=result["num_prefix_tokens"],
        grid_size=result["grid_size"],
    )


def maps_from_explicit_blocks(
    blocks: Sequence[Dict[str, torch.Tensor]],
    gradients: Sequence[torch.Tensor],
    num_prefix_tokens: int,
    grid_size: Tuple[int, int],
    relu_gradients: bool = True,
) -> Dict[str, object]:
    """Steps 4-6 of :func:`explicit_daam`, shared by the references of every model family.

    Args:
        blocks: per block of the flow, ``attn`` (B, H, Q, N), the explicit attention
            probabilities whose query 0 is the [class] token (Q = N for self-attention,
            Q = 1 for class attention), ``v`` (B, H, N, d) and ``pre_projection``
            (B, Q, C), the head-concatenated attention output.
        gradients: per block, d objective / d pre_projection, (B, Q, C).
        num_prefix_tokens: leading tokens (of the N keys) that are not patches.
        grid_size: (gh, gw), row-major patch grid of the remaining N - num_prefix tokens.
        relu_gradients: clamp the channel weights at zero (supervised DAAM).

    Returns:
        dict with ``block_maps`` and ``flow`` (B, L, gh, gw), and per block lists
        ``contributions`` F_l (B, N, C), ``class_outputs`` (B, C), ``class_gradients``
        (B, C, before any relu) and ``class_attention`` (B, H, N).
    """
    gh, gw = grid_size
    contributions, class_outputs, class_gradients, class_attention = [], [], [], []
    maps = []
    for record, grad in zip(blocks, gradients):
        attn = record["attn"].detach()
        v = record["v"].detach()  # (B, H, N, d)
        batch, heads, tokens, head_dim = v.shape

        # F[b, n, h, e] = A[b, h, 0, n] * v[b, h, n, e], written out by broadcasting.
        class_row = attn[:, :, 0, :]  # (B, H, N): how much [class] reads token n
        contribution = class_row.unsqueeze(-1) * v  # (B, H, N, d)
        contribution = contribution.permute(0, 2, 1, 3).reshape(batch, tokens, heads * head_dim)

        g = grad[:, 0, :].detach()  # (B, C), gradient w.r.t. the [class] row
        weights = g.clamp(min=0) if relu_gradients else g
        cam = (contribution * weights.unsqueeze(1)).sum(dim=-1).clamp(min=0)  # (B, N)
        patch_cam = cam[:, num_prefix_tokens:].reshape(batch, gh, gw)

        contributions.append(contribution)
        class_outputs.append(record["pre_projection"][:, 0, :].detach())
        class_gradients.append(g)
        class_attention.append(class_row)
        maps.append(patch_cam)

    block_maps = torch.stack(maps, dim=1)  # (B, L, gh, gw)
    return {
        "block_maps": block_maps,
        "flow": torch.cumsum(block_maps, dim=1),
        "contributions": contributions,
        "class_outputs": class_outputs,
        "class_gradients": class_gradients,
        "class_attention": class_attention,
    }


def maps_from_every_query_row(
    blocks: Sequence[Dict[str, torch.Tensor]],
    gradients: Sequence[torch.Tensor],
    num_prefix_tokens: int,
    grid_size: Tuple[int, int],
    relu_gradients: bool = True,
) -> Dict[str, object]:
    """Block maps from every query row, for heads that pool the tokens (not the [class] one).

    Every row i of the attention output is a sum over the tokens it reads,
    O[b, i, (h, e)] = sum_n A[b, h, i, n] v[b, h, n, e]; the summands are kept apart as
    F[b, i, n, (h, e)] = A[b, h, i, n] * v[b, h, n, e], (B, Q, N, C), weighted by the gradient
    at their own row and summed over rows and channels:

        cam[b, n] = relu( sum_i sum_c w[b, i, c] * F[b, i, n, c] ),  w = relu(g) or g

    Args: as :func:`maps_from_explicit_blocks`, with ``attn`` (B, H, Q, N) every query row.

    Returns:
        dict with ``block_maps`` and ``flow`` (B, L, gh, gw) and, per block, ``contributions``
        F (B, Q, N, C).
    """
    gh, gw = grid_size
    contributions, maps = [], []
    for record, grad in zip(blocks, gradients):
        attn = record["attn"].detach()  # (B, H, Q, N)
        v = record["v"].detach()  # (B, H, N, d)
        batch, heads, tokens, head_dim = v.shape
        queries = attn.shape[2]
        # F[b, i, n, h, e] = A[b, h, i, n] * v[b, h, n, e], written out by broadcasting.
        contribution = attn.unsqueeze(-1) * v.unsqueeze(2)  # (B, H, Q, N, d)
        contribution = contribution.permute(0, 2, 3, 1, 4).reshape(
            batch, queries, tokens, heads * head_dim
        )
        g = grad.detach()  # (B, Q, C), every row's own gradient
        weights = g.clamp(min=0) if relu_gradients else g
        cam = (contribution * weights.unsqueeze(2)).sum(dim=(1, 3)).clamp(min=0)  # (B, N)
        maps.append(cam[:, num_prefix_tokens:].reshape(batch, gh, gw))
        contributions.append(contribution)
    block_maps = torch.stack(maps, dim=1)
    return {
        "block_maps": block_maps,
        "flow": torch.cumsum(block_maps, dim=1),
        "contributions": contributions,
    }


def area_resample(maps: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, gh, gw), area-weighted: every cell split evenly over the cells of the
    common multiple grid, whose cells are then summed into the cells of ``grid``."""
    batch, height, width = maps.shape
    rows, columns = math.lcm(height, grid[0]), math.lcm(width, grid[1])
    share = (rows // height) * (columns // width)
    fine = maps.repeat_interleave(rows // height, 1).repeat_interleave(columns // width, 2) / share
    return fine.reshape(batch, grid[0], rows // grid[0], grid[1], columns // grid[1]).sum((2, 4))


def flow_on_the_finest_grid(block_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """The flow (B, L, gh, gw) of block maps (B, h_l, w_l) on their own grids: each brought to
    the finest of the grids (the most cells; the first of equals) by :func:`area_resample`,
    then accumulated."""
    grid = max((tuple(block.shape[-2:]) for block in block_maps), key=lambda g: g[0] * g[1])
    return torch.stack([area_resample(block, grid) for block in block_maps], dim=1).cumsum(1)


def explicit_gradients(forward, model: torch.nn.Module, images: torch.Tensor, target, *args):
    """The gradients a family's reference needs, in float64 with plain autograd.

    ``forward(model, images, *args)``, a family's explicit forward pass, runs on a float64 copy
    of ``model`` and returns a dict with ``logits`` (B, K) and ``blocks``, each block a dict
    with its ``pre_projection`` (the attention output before the output projection).

    Returns:
        (result, targets, gradients): ``forward``'s dict, the (B,) targets (None: the
        predicted classes) and, per block, d (sum of the target scores) / d pre_projection.
    """
    model = copy.deepcopy(model).double()
    with torch.enable_grad():
        result = forward(model, images.double(), *args)
        logits = result["logits"]
        targets = resolve_targets(target, logits)
        score = logits[torch.arange(logits.shape[0]), targets].sum()
        pre_projections = [block["pre_projection"] for block in result["blocks"]]
        gradients = torch.autograd.grad(score, pre_projections)
    return result, targets, gradients
