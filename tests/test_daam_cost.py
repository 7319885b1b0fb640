"""What DAAM computes, counted (not timed): one forward, one backward, no weight gradients,
and no (B, H, N, N) attention matrix when the model uses fused attention."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from captum_daam import DAAM
from helpers import make_images, make_model, set_fused_attention


class ShapeLog(TorchDispatchMode):
    """Records the shape of every tensor any operator produces, forward and backward."""

    def __init__(self):
        super().__init__()
        self.shapes = set()
        self.matmul_shapes = set()
        self.operators = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        name = str(func)
        self.operators.append(name)
        shapes = {tuple(t.shape) for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor)}
        self.shapes |= shapes
        if func.overloadpacket.__name__ in {"mm", "addmm", "bmm"}:
            self.matmul_shapes |= shapes
        return result


def test_fused_attention_forms_no_full_attention_matrix_and_no_weight_gradient():
    model = set_fused_attention(make_model("deit_tiny_patch16_224"), True)
    images = make_images(2)
    forward_calls = []
    handle = model.register_forward_hook(lambda *args: forward_calls.append(1))
    try:
        with ShapeLog() as log:
            DAAM(model).attribute(images, target=[1, 2], return_flow=True)
    finally:
        handle.remove()

    assert forward_calls == [1]
    assert (2, 3, 197, 197) not in log.shapes  # (B, H, N, N)
    assert (2, 3, 197) in log.shapes  # the [class] rows (B, H, N) are formed
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    assert log.matmul_shapes, "no matrix product was logged"
    assert not weight_shapes & log.matmul_shapes, "a weight gradient was computed"
    assert not [name for name in log.operators if "convolution_backward" in name]


def test_the_checks_can_see_what_they_rule_out():
    """Guards the test above: the log does see full attention matrices and weight gradients."""
    model = set_fused_attention(make_model("deit_tiny_patch16_224"), False)
    with ShapeLog() as log:
        DAAM(model).attribute(make_images(2), target=[1, 2])
    assert (2, 3, 197, 197) in log.shapes
    with ShapeLog() as log:
        model(make_images(2)).sum().backward()
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    assert weight_shapes <= log.matmul_shapes
