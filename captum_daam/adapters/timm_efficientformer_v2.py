"""timm ``EfficientFormerV2`` (efficientformerv2_s0, _s1, _s2, _l): attention in the last two
stages, on NCHW feature maps, no [class] token; the head averages the last map (a distilled
pair of heads, averaged at inference).

Two attention modules, both linear in their values once their weights are held fixed:

- ``Attention2d`` (the last blocks of stages 3 and 4): q, k and v from 1x1 ``ConvNorm``s
  (stage 3's after a strided depthwise ``stride_conv``, so its tokens lie on a grid half as
  fine), the logits ``q k^T * scale`` plus a learned bias per head and offset, mixed across
  heads before and after the softmax (``talking_head1`` / ``talking_head2``, 1x1 convolutions
  over the heads, the second with a bias). So a head's output row i is
  ``sum_n M[h, i, n] v[h, n]`` with ``M = talking_head2(softmax(talking_head1(logits)))``:
  weights that need not be positive nor sum to one.
- ``Attention2dDownsample`` (the downsampling into stage 4): strided queries (a depthwise
  convolution plus pooling of the input), keys and values on the finer grid, a plain softmax.

Both add ``v_local``, a depthwise 3x3 ``ConvNorm`` of the values (strided in the downsampling
one), to the attention output: a mixing of each value channel's tokens with weights of its
own. The block's mixing therefore has one "head" per value channel, of width one:
``A[c, i, n] = M[h(c), i, n] + K[c, i, n]``, K the convolution's (times its BatchNorm's scale);
the convolution's bias and the BatchNorm's shift reach every row alike and are no token's
(``BlockRecord.residual``). The output is watched where it leaves the mixing: at the input of
``upsample`` (stage 3's, back to the finer grid) or of ``act``, the activation before ``proj``.
The stem, the convolution blocks and the downsampling convolutions are not blocks of the flow.
"""

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.models.efficientformer_v2 import (
    Attention2d,
    ConvNorm,
    EfficientFormerV2,
)
from torch import Tensor, nn

from ..decompose import Mixing, attention_probabilities
from .base import (
    BlockLayout,
    BlockRecord,
    Hook,
    output_grid,
    register_adapter,
    tokens_first,
)
from .pooled import PooledAdapter

__all__ = ["TimmEfficientFormerV2Adapter", "HeadsAndChannelsMixing"]


class HeadsAndChannelsMixing(Mixing):
    """A mixing per head, shared by the head's channels, plus a depthwise convolution of each
    channel's tokens, laid out as one head per channel (width one).

    Args:
        heads: (B, H, Nq, N) the heads' mixing weights.
        kernel: (C, 1, kh, kw) the depthwise convolution's weights (a BatchNorm's scale
            folded in), C = H * d channels ordered head by head.
        stride, padding: the convolution's.
        key_grid: (h, w) the grid of the N tokens (the convolution's input).
        query_grid: (h', w') the grid of the Nq query rows (its output).
    """

    def __init__(
        self,
        heads: Tensor,
        kernel: Tensor,
        stride: Tuple[int, int],
        padding: Tuple[int, int],
        key_grid: Tuple[int, int],
        query_grid: Tuple[int, int],
    ) -> None:
        self.heads, self.kernel = heads, kernel
        self.stride, self.padding = stride, padding
        self.key_grid, self.query_grid = key_grid, query_grid

    @property
    def num_queries(self) -> int:
        return self.heads.shape[-2]

    def _per_channel(self, heads: Tensor) -> Tensor:
        """(B, H, ...) -> (B, C, ...), each head repeated over its channels."""
        return heads.repeat_interleave(self.kernel.shape[0] // heads.shape[1], dim=1)

    def __call__(self) -> Tensor:
        compute_dtype = torch.promote_types(self.heads.dtype, torch.float32)
        tokens = self.key_grid[0] * self.key_grid[1]
        channels = self.kernel.shape[0]
        with torch.no_grad():
            # The convolution of each one-hot token map: K[c, i, n] = conv_c(e_n)[i].
            one_hot = torch.eye(tokens, dtype=compute_dtype, device=self.kernel.device)
            one_hot = one_hot.view(tokens, 1, *self.key_grid).expand(-1, channels, -1, -1)
            local = F.conv2d(
                one_hot, self.kernel.to(compute_dtype), stride=self.stride,
                padding=self.padding, groups=channels,
            ).flatten(2).permute(1, 2, 0)  # (C, Nq, N)
            return self._per_channel(self.heads.to(compute_dtype)) + local

    def transposed_mix(self, weights: Tensor) -> Tensor:
        compute_dtype = torch.promote_types(self.heads.dtype, torch.float32)
        batch, channels, rows, _ = weights.shape
        heads = self.heads.shape[1]
        with torch.no_grad():
            weights = weights.to(compute_dtype)[..., 0]  # (B, C, Nq)
            per_head = weights.unflatten(1, (heads, -1)).transpose(-2, -1)  # (B, H, Nq, d)
            mixed = self.heads.to(compute_dtype).transpose(-2, -1) @ per_head  # (B, H, N, d)
            mixed = mixed.transpose(-2, -1).flatten(1, 2)  # (B, C, N)
            # The convolution's transpose: what the gradient of conv(v) at v would be.
            local = torch.nn.grad.conv2d_input(
                (batch, channels, *self.key_grid), self.kernel.to(compute_dtype),
                weights.reshape(batch, channels, *self.query_grid), stride=self.stride,
                padding=self.padding, groups=channels,
            )
            return (mixed + local.flatten(2)).unsqueeze(-1)


def _batch_norm_affine(norm: nn.BatchNorm2d, inputs: Tensor) -> Tuple[Tensor, Tensor]:
    """(scale, shift) per channel of what ``norm`` does to ``inputs`` (B, C, h, w): the
    running statistics in eval mode, the batch's in training mode, as BatchNorm uses them."""
    if norm.training or norm.running_mean is None:
        mean = inputs.mean(dim=(0, 2, 3))
        variance = inputs.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, variance = norm.running_mean, norm.running_var
    scale = (variance + norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight.detach()
    shift = -mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias.detach()
    return scale, shift


def _check_conv_norm(module: ConvNorm, where: str) -> None:
    if type(module.conv) is not nn.Conv2d or not isinstance(module.bn, nn.BatchNorm2d):
        raise TypeError(
            f"{where} is a {type(module.conv).__name__} with a {type(module.bn).__name__}; "
            f"the timm EfficientFormerV2 adapter supports a Conv2d with static padding and a "
            f"BatchNorm2d, as timm builds them."
        )


def efficientformer_v2_attention_hooks(
    attention: nn.Module, record: BlockRecord
) -> List[Hook]:
    """Hooks that fill ``record`` from one call of timm's EfficientFormerV2 ``Attention2d`` or
    ``Attention2dDownsample``: q, k, v from their ``ConvNorm``s, the heads' mixing (read after
    ``talking_head2``, or formed from q, k and the attention biases), ``v_local``'s kernel and
    the shift it adds, the output watched where it enters ``upsample`` or ``act``."""
    heads = attention.num_heads
    conv, norm = attention.v_local.conv, attention.v_local.bn
    talking = isinstance(attention, Attention2d)
    call: Dict[str, Tensor] = {}

    def by_heads(maps: Tensor) -> Tensor:  # (B, H * e, h, w) -> (B, H, h * w, e), as timm
        return maps.detach().flatten(2).unflatten(1, (heads, -1)).transpose(-2, -1)

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            call[name] = output.detach()
        return hook

    def on_mixed(module: nn.Module, args: tuple) -> Tuple[Tensor, ...]:
        queries, keys, values = by_heads(call.pop("q")), by_heads(call.pop("k")), call.pop("v")
        with torch.no_grad():
            if talking:
                mixing = call.pop("mixed")  # (B, H, Nq, N), the module's own
            else:
                bias = attention.get_attention_biases(queries.device).detach()
                mixing = attention_probabilities(queries, keys, attention.scale, bias)
            scale, shift = _batch_norm_affine(norm, call.pop("local"))
            kernel = conv.weight.detach() * scale.view(-1, 1, 1, 1)
            constant = shift if conv.bias is None else shift + scale * conv.bias.detach()
            query_grid = tuple(args[0].shape[-2:])
            full = HeadsAndChannelsMixing(
                mixing, kernel, conv.stride, conv.padding, tuple(values.shape[-2:]), query_grid
            )
            first_row = torch.zeros_like(args[0], dtype=kernel.dtype).flatten(2).unsqueeze(-1)
            first_row[:, :, 0] = 1
            row = full.transposed_mix(first_row)[..., 0]  # (B, C, N): A[:, :, 0]
        rows = query_grid[0] * query_grid[1]
        record.residual = constant.view(1, -1, 1, 1).expand(values.shape[0], -1, rows, 1)
        record.set_attention(row, values.flatten(2).unsqueeze(-1), full)
        return (record.watch(args[0], tokens_first),) + tuple(args[1:])

    hooks = [
        Hook(attention.k, "forward", keep("k")),
        Hook(attention.v, "forward", keep("v")),
        Hook(conv, "forward", keep("local")),
    ]
    # Attention2dDownsample's q is a LocalGlobalQuery ending in a ConvNorm ``proj``.
    hooks.append(Hook(attention.q, "forward", keep("q")))
    if talking:
        hooks.append(Hook(attention.talking_head2, "forward", keep("mixed")))
    return hooks + [Hook(mixing_output_module(attention), "pre", on_mixed)]


def mixing_output_module(attention: nn.Module) -> nn.Module:
    """The module whose input is the mixing's output: ``upsample`` where the module has one
    (stage 3's strided attention), else ``act``."""
    upsample = getattr(attention, "upsample", None)
    return upsample if upsample is not None else attention.act


@register_adapter
class TimmEfficientFormerV2Adapter(PooledAdapter):
    """timm ``EfficientFormerV2``: every query row of every ``Attention2d`` and
    ``Attention2dDownsample`` explained, each on the grid its values lie on, with the
    depthwise ``v_local`` convolution as a mixing of each value channel; at the image size the
    model was built for."""

    family = "timm EfficientFormerV2"
    examples = "efficientformerv2_s0, _s1, _s2, efficientformerv2_l"
    layer_example = "model.stages[s].blocks[i].token_mixer"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        for index, attention in enumerate(self.attention_modules()):
            _check_conv_norm(attention.v_local, f"Attention {index}'s v_local")

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, EfficientFormerV2)

    def attention_modules(self) -> List[nn.Module]:
        modules = []
        for stage in self.model.stages:
            attention = getattr(stage.downsample, "attn", None)
            if attention is not None:
                modules.append(attention)
            modules += [block.token_mixer for block in stage.blocks
                        if block.token_mixer is not None]
        return modules

    def layouts(self, image_size: Tuple[int, int]) -> List[BlockLayout]:
        grid = output_grid(output_grid(image_size, self.model.stem.conv1.conv),
                           self.model.stem.conv2.conv)
        layouts = []
        for stage in self.model.stages:
            downsample = stage.downsample
            if not isinstance(downsample, nn.Identity):
                attention = downsample.attn
                if attention is not None:
                    layouts.append(self._layout(attention, grid, image_size))
                grid = output_grid(grid, downsample.conv.conv)
            for block in stage.blocks:
                attention = block.token_mixer
                if attention is None:
                    continue
                values = grid if attention.stride_conv is None else output_grid(
                    grid, attention.stride_conv.conv)
                layouts.append(self._layout(attention, values, image_size))
        return layouts

    @staticmethod
    def _layout(
        attention: nn.Module, grid: Tuple[int, int], image_size: Sequence[int]
    ) -> BlockLayout:
        if tuple(grid) != tuple(attention.resolution):
            raise ValueError(
                f"This EfficientFormerV2's attention biases cover a "
                f"{attention.resolution[0]}x{attention.resolution[1]} grid, but "
                f"{image_size[0]}x{image_size[1]} images give a {grid[0]}x{grid[1]} grid there. "
                f"Resize the images to the size the model was built for (224x224 for the "
                f"registered models, or the img_size it was created with)."
            )
        return BlockLayout(tuple(grid))

    def block_hooks(self, attention: nn.Module, record: BlockRecord) -> List[Hook]:
        return efficientformer_v2_attention_hooks(attention, record)
