"""TokenGrid: a ViT block's patch tokens as a (B, C, gh, gw) layer, for Captum's layer methods.

Captum's layer methods (``LayerGradCam``, ``LayerGradientXActivation``, ``LayerActivation``,
``LayerIntegratedGradients``, ...) take a module and read its output as a convolutional
feature map, (B, C, H, W). A Vision Transformer block outputs tokens, (B, N, C), on which
they average and sum over the wrong axes without a word. :class:`TokenGrid` is the module to
give them instead: while anything is hooked on it, the block's output passes through it, and
what Captum sees as its output is the block's patch tokens laid on the patch grid.
"""

import threading
import warnings
from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._warnings import warn_user
from .adapters import ViTAdapter, adapter_for
from .adapters.base import check_grid_size, square_grid
from .decompose import tokens_to_grid

__all__ = ["TokenGrid"]

# One lock for every TokenGrid's listener count: a lock attribute would make modules unpicklable.
_LISTENER_LOCK = threading.Lock()


class TokenGrid(nn.Module):
    r"""
    The patch tokens of a Vision Transformer block, seen as a (B, C, gh, gw) feature map, so
    that any Captum layer method can be pointed at a ViT block:
    ``LayerGradCam(model, TokenGrid(model, model.blocks[-1].norm1))`` is Grad-CAM on a ViT.

    A TokenGrid is a module that is not part of the model. When a hook is registered on it
    (Captum registers its own for the duration of each ``attribute`` call), it installs a
    forward hook on ``block``; on every forward pass that hook calls the TokenGrid with the
    block's output tokens (B, N, C), and the TokenGrid returns the patch tokens (prefix
    tokens dropped) as the grid (B, C, gh, gw), row-major as the patch embedding lays them
    out. The hooks on the TokenGrid see that grid as its output, may replace it (as
    ``LayerIntegratedGradients`` does), and the block's output is rebuilt from its prefix
    tokens and the grid they return. The rebuilt output has the same values, so the model's
    output does not change, and gradients with respect to the grid are gradients with respect
    to the block's patch tokens. When the last hook on the TokenGrid is removed, its hook on
    the block is removed too: after Captum's call, or an error in it, nothing is left on the
    model. A hook of your own on the TokenGrid keeps it attached until you remove it.

    The layer to choose: in a ViT whose head reads only the [class] token (timm's
    ``global_pool='token'``, torchvision, Hugging Face), the patch tokens of the **last**
    block's output never reach the output, so their gradient is zero and Grad-CAM there is
    zero everywhere (TokenGrid warns when the gradient it sees is zero). Take the last
    block's input instead, ``model.blocks[-1].norm1`` (timm, as pytorch-grad-cam does),
    ``model.encoder.layers[-1].ln_1`` (torchvision), ``model.vit.layers[-1].layernorm_before``
    (Hugging Face), or any earlier block. A model that pools its patch tokens
    (``global_pool='avg'``) can use its last block.

    Prefix tokens ([class], distillation, registers) are dropped. Their number is the
    adapter's, which is right for the blocks where the [class] token exists; CaiT's and
    XCiT's self-attention blocks (``model.blocks``) run before the [class] token is added,
    so give ``num_prefix_tokens=0`` for them.

    Methods that attribute to the layer input (``attribute_to_layer_input=True``) see the
    block's tokens, (B, N, C), not the grid: use the default, the layer output. Methods that
    replace the layer output (``LayerIntegratedGradients``) replace the patch tokens only;
    the prefix tokens keep the values of the forward pass. Layer integrated gradients then
    sum to F(x) minus F(x) with the block's patch tokens replaced by the baseline's, not to
    F(x) - F(baseline), the difference that Captum's convergence delta measures.

    Args:
        model (torch.nn.Module): The Vision Transformer that runs ``block``. When Captum is
                    given a forward function around it (e.g. ``lambda x: model(x).logits``
                    for a Hugging Face model), pass the model itself here.
        block (torch.nn.Module): A submodule of ``model`` whose output (or the first
                    element of whose output tuple) is the token sequence (B, N, C), [prefix
                    tokens..., patch tokens...]: a block, or a module inside a block that
                    keeps all tokens, such as its first norm. It stays the model's: the
                    TokenGrid does not hold it as a submodule.
        num_prefix_tokens (int, optional): Tokens before the patches in ``block``'s output.
                    Default: None, the adapter's ``num_prefix_tokens``.
        grid_size (tuple[int, int], optional): The patch grid (rows, columns). Default:
                    None, the adapter's grid for the number of patch tokens
                    (``adapter.grid_from_tokens``): the square grid, unless the adapter
                    knows better. Give it for non-square images.
        adapter (ViTAdapter, optional): The adapter of ``model``'s family. Default: None,
                    ``captum_daam.adapters.adapter_for(model)``; when ``num_prefix_tokens``
                    is given and no adapter knows the model, the grid is square unless
                    ``grid_size`` is given.

    Examples::

        >>> import timm, torch
        >>> from captum.attr import LayerAttribution, LayerGradCam
        >>> from captum_daam import TokenGrid
        >>> model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
        >>> images = torch.rand(2, 3, 224, 224)
        >>> grad_cam = LayerGradCam(model, TokenGrid(model, model.blocks[-1].norm1))
        >>> cam = grad_cam.attribute(images, target=[3, 7], relu_attributions=True)
        >>> cam.shape
        torch.Size([2, 1, 14, 14])
        >>> upsampled = LayerAttribution.interpolate(cam, (224, 224), "bilinear")
    """

    def __init__(
        self,
        model: nn.Module,
        block: nn.Module,
        *,
        num_prefix_tokens: Optional[int] = None,
        grid_size: Optional[Tuple[int, int]] = None,
        adapter: Optional[ViTAdapter] = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"Expected model to be a torch.nn.Module, got {type(model).__name__}. When "
                f"Captum is given a forward function, pass the model it runs."
            )
        if not isinstance(block, nn.Module):
            raise TypeError(f"Expected block to be a torch.nn.Module, got {type(block).__name__}.")
        if isinstance(block, TokenGrid):
            raise TypeError("Expected block to be a module of the model, got a TokenGrid.")
        block_name = next((name for name, module in model.named_modules() if module is block), None)
        if block_name is None:
            raise ValueError(
                f"Expected block to be a submodule of the model (e.g. one of its blocks), got a "
                f"{type(block).__name__} that is not one of the {type(model).__name__}'s modules."
            )
        if block_name == "":
            raise ValueError(
                "Expected block to be a submodule of the model, got the model itself; pass one "
                "of its blocks, whose output is the token sequence."
            )
        if num_prefix_tokens is not None:
            if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int):
                raise TypeError(
                    f"Expected num_prefix_tokens to be a non-negative int, got "
                    f"{num_prefix_tokens!r}."
                )
            if num_prefix_tokens < 0:
                raise ValueError(
                    f"Expected num_prefix_tokens to be a non-negative int, got "
                    f"{num_prefix_tokens}."
                )
        if grid_size is not None:
            grid_size = check_grid_size(grid_size)
        if adapter is None:
            adapter = _find_adapter(model, needed=num_prefix_tokens is None)
        elif not isinstance(adapter, ViTAdapter):
            raise TypeError(f"Expected adapter to be a ViTAdapter, got {type(adapter).__name__}.")
        # Not a submodule: the model owns the block, and TokenGrid.to() or .parameters() must
        # not reach into it.
        object.__setattr__(self, "block", block)
        self.block_name = block_name
        self.adapter = adapter
        self.num_prefix_tokens = (
            adapter.num_prefix_tokens if num_prefix_tokens is None else num_prefix_tokens
        )
        self.grid_size = grid_size
        self._listeners = 0
        self._block_handle: Optional[RemovableHandle] = None

    def forward(self, tokens: Tensor) -> Tensor:
        r"""
        Args:
            tokens (Tensor): The block's output, (B, N, C): the prefix tokens, then the patch
                        tokens in row-major grid order.

        Returns:
            *Tensor* of **grid**:
            - **grid** (*Tensor*): The patch tokens as (B, C, gh, gw), a view of ``tokens``.
        """
        grid_size = self.patch_grid(tokens)
        return tokens_to_grid(tokens.transpose(1, 2), self.num_prefix_tokens, grid_size)

    def patch_grid(self, tokens: Tensor) -> Tuple[int, int]:
        """The patch grid (gh, gw) of ``tokens``, (B, N, C), checked against their number.

        Raises:
            ValueError: when ``tokens`` is not (B, N, C), or its patch tokens do not fill the
                grid.
        """
        where = f"the output of {self.block_name} ({type(self.block).__name__})"
        if not isinstance(tokens, Tensor) or tokens.dim() != 3:
            got = f"shape {tuple(tokens.shape)}" if isinstance(tokens, Tensor) else type(tokens)
            raise ValueError(
                f"Expected {where} to be tokens shaped (B, N, C), got {got}. Give TokenGrid a "
                f"module whose output is the token sequence: a block, or its first norm."
            )
        num_tokens, prefix = tokens.shape[1], self.num_prefix_tokens
        num_patches = num_tokens - prefix
        if num_patches < 1:
            raise ValueError(
                f"Expected {where} to hold patch tokens after {prefix} prefix tokens, got "
                f"{num_tokens} tokens. Give TokenGrid a module that keeps the patch tokens."
            )
        no_prefix_hint = (
            " If this module's output has no prefix tokens (as CaiT's and XCiT's model.blocks), "
            "give num_prefix_tokens=0."
            if prefix
            else ""
        )
        if self.grid_size is not None:
            grid = self.grid_size
        elif self.adapter is None:
            grid = square_grid(num_patches)
        else:
            try:
                grid = tuple(self.adapter.grid_from_tokens(num_patches))
            except ValueError:
                grid = None
        if grid is None:
            raise ValueError(
                f"Expected {where} to hold patch tokens on a square grid, got {num_patches} "
                f"patch tokens after {prefix} prefix tokens ({num_tokens} tokens in all). For "
                f"a non-square grid, give grid_size=(rows, columns).{no_prefix_hint}"
            )
        rows, columns = grid
        if rows * columns != num_patches:
            raise ValueError(
                f"Expected {where} to hold {rows}x{columns} = {rows * columns} patch tokens after "
                f"{prefix} prefix tokens, got {num_patches} ({num_tokens} tokens in all). Check "
                f"grid_size.{no_prefix_hint}"
            )
        return rows, columns

    def extra_repr(self) -> str:
        grid = "from the token count" if self.grid_size is None else f"{self.grid_size}"
        return (
            f"block={self.block_name} ({type(self.block).__name__}), "
            f"num_prefix_tokens={self.num_prefix_tokens}, grid_size={grid}"
        )

    # Hooks registered on the TokenGrid attach it to the block for as long as they are there.

    def register_forward_hook(self, hook: Callable[..., Any], **kwargs: Any) -> RemovableHandle:
        return self._listen(super().register_forward_hook(hook, **kwargs))

    def register_forward_pre_hook(self, hook: Callable[..., Any], **kwargs: Any) -> RemovableHandle:
        return self._listen(super().register_forward_pre_hook(hook, **kwargs))

    def register_full_backward_hook(
        self, hook: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> RemovableHandle:
        return self._listen(super().register_full_backward_hook(hook, *args, **kwargs))

    def register_full_backward_pre_hook(
        self, hook: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> RemovableHandle:
        return self._listen(super().register_full_backward_pre_hook(hook, *args, **kwargs))

    def _listen(self, handle: RemovableHandle) -> RemovableHandle:
        with _LISTENER_LOCK:
            if self._listeners == 0:
                self._block_handle = self.block.register_forward_hook(self._on_block_output)
            self._listeners += 1
        return _ListenerHandle(handle, self._release)

    def _release(self) -> None:
        with _LISTENER_LOCK:
            self._listeners -= 1
            if self._listeners == 0 and self._block_handle is not None:
                self._block_handle.remove()
                self._block_handle = None

    def _on_block_output(self, block: nn.Module, args: Any, output: Any) -> Any:
        tokens = output[0] if isinstance(output, tuple) and output else output
        if not isinstance(tokens, Tensor):
            raise TypeError(
                f"Expected the output of {self.block_name} ({type(block).__name__}) to be a "
                f"tensor of tokens, or a tuple whose first element is one, got "
                f"{type(output).__name__}. Give TokenGrid a module that returns the tokens."
            )
        rows, columns = self.patch_grid(tokens)  # checks the shape before anything runs
        expected = (tokens.shape[0], tokens.shape[2], rows, columns)
        grid = self(tokens)  # runs the hooks on the TokenGrid (Captum's), which may replace it
        if not isinstance(grid, Tensor) or tuple(grid.shape) != expected:
            got = tuple(grid.shape) if isinstance(grid, Tensor) else type(grid).__name__
            raise ValueError(
                f"Expected the hooks on the TokenGrid to keep its output shaped {expected}, "
                f"got {got}."
            )
        if grid.requires_grad:
            grid.register_hook(self._warn_if_zero)
        rebuilt = torch.cat([tokens[:, : self.num_prefix_tokens], _grid_to_tokens(grid)], dim=1)
        return (rebuilt,) + output[1:] if isinstance(output, tuple) else rebuilt

    def _warn_if_zero(self, gradient: Tensor) -> None:
        if not bool(gradient.any()):
            warn_user(
                f"The gradient at the patch tokens of {self.block_name} is zero: the output "
                f"does not depend on them. After the last block of a ViT whose head reads the "
                f"[class] token, only that token matters; use the last block's input (its "
                f"first norm, e.g. model.blocks[-1].norm1) or an earlier block."
            )


class _ListenerHandle(RemovableHandle):
    """The handle of a hook on a TokenGrid: it removes the same hook, and then lets the
    TokenGrid remove its hook on the block once no hook on the TokenGrid is left."""

    def __init__(self, handle: RemovableHandle, release: Callable[[], None]) -> None:
        # The same hook id and dictionaries: RemovableHandle.__init__ would take a new id.
        self.__dict__.update(handle.__dict__)
        self._release: Optional[Callable[[], None]] = release

    def remove(self) -> None:
        super().remove()
        release, self._release = self._release, None
        if release is not None:
            release()


def _grid_to_tokens(grid: Tensor) -> Tensor:
    """(B, C, gh, gw) -> (B, gh * gw, C), the inverse of TokenGrid's view."""
    return grid.flatten(2).transpose(1, 2)


def _find_adapter(model: nn.Module, needed: bool) -> Optional[ViTAdapter]:
    """The registered adapter of ``model``, or None when there is none and it is not needed."""
    try:
        # The adapters' warnings are about DAAM's [class]-token flow, not about TokenGrid.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return adapter_for(model)
    except TypeError as error:
        if not needed:
            return None
        raise TypeError(
            f"TokenGrid takes the number of prefix tokens from the model's adapter, but none "
            f"takes this model ({error}) Give num_prefix_tokens= (and grid_size= for a "
            f"non-square grid) to use TokenGrid without an adapter."
        ) from error
