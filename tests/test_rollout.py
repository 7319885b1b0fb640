"""AttentionRollout and GradientRollout equal explicit computations, for every family with
full self-attention.

Each family's test file has an explicit forward pass that forms every attention matrix by
hand, (B, H, N, N), in the graph; the references below take those matrices, and, for the
gradient rollout, their gradients with plain autograd (in float64 on a copy of the model),
and apply the two rules as the papers write them, with full (N, N) products.
"""

import copy
import weakref
from typing import Callable, Dict, List, Tuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import test_adapter_beit_eva as beit_eva
import test_adapter_hf as hf
import test_adapter_torchvision as tv
from captum_daam import AttentionRollout, GradientRollout
from helpers import assert_close_relative, make_images, make_model, module_hook_count
from reference import explicit_forward, resolve_targets

# --------------------------------------------------------------------------- #
# The two rules, explicitly
# --------------------------------------------------------------------------- #


def explicit_attention_rollout(attentions: List[torch.Tensor]) -> torch.Tensor:
    """Abnar & Zuidema: R = prod_l (mean_h A_l + I) / rowsum, first block rightmost."""
    tokens = attentions[0].shape[-1]
    identity = torch.eye(tokens, dtype=attentions[0].dtype)
    rollout = identity.expand(attentions[0].shape[0], tokens, tokens)
    for attention in attentions:
        mixed = attention.mean(dim=1) + identity
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed @ rollout
    return rollout


def explicit_gradient_rollout(
    attentions: List[torch.Tensor], gradients: List[torch.Tensor]
) -> torch.Tensor:
    """Chefer et al.: R = I; for each block R = R + mean_h(relu(dA * A)) @ R."""
    tokens = attentions[0].shape[-1]
    rollout = torch.eye(tokens, dtype=attentions[0].dtype).expand(
        attentions[0].shape[0], tokens, tokens
    )
    for attention, gradient in zip(attentions, gradients):
        rollout = rollout + (gradient * attention).clamp(min=0).mean(dim=1) @ rollout
    return rollout


def explicit_rollouts(
    forward: Callable[[torch.nn.Module, torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]],
    model: torch.nn.Module,
    images: torch.Tensor,
    target,
    num_prefix_tokens: int,
    grid: Tuple[int, int],
) -> Dict[str, torch.Tensor]:
    model = copy.deepcopy(model).double()
    with torch.enable_grad():
        logits, attentions = forward(model, images.double())
        targets = resolve_targets(target, logits)
        score = logits[torch.arange(len(logits)), targets].sum()
        gradients = torch.autograd.grad(score, attentions)
    attentions = [attention.detach() for attention in attentions]

    def class_row(rollout: torch.Tensor) -> torch.Tensor:
        return rollout[:, 0, num_prefix_tokens:].reshape(len(images), 1, *grid)

    return {
        "attention_rollout": class_row(explicit_attention_rollout(attentions)),
        "gradient_rollout": class_row(explicit_gradient_rollout(attentions, gradients)),
    }


# --------------------------------------------------------------------------- #
# Families
# --------------------------------------------------------------------------- #


def timm_forward(model, images):
    result = explicit_forward(model, images)
    return result["logits"], [block["attn"] for block in result["blocks"]]


def torchvision_forward(model, images):
    result = tv.explicit_forward(model, images)
    return result["logits"], [block["attn"] for block in result["blocks"]]


def hf_forward(model, images):
    result = hf.explicit_hf_forward(model, images)
    return result["outputs"]["logits"], [block["attn"] for block in result["blocks"]]


def beit_eva_forward(model, images):
    result = beit_eva.explicit_forward(model, images)
    return result["logits"], [block["attn"] for block in result["blocks"]]


def small_vit(**kwargs):
    return make_model("vit_small_patch16_224", img_size=64, depth=3, num_classes=11, **kwargs)


CASES = {
    # name: (model factory, forward, image size, prefix tokens, grid)
    "deit_tiny": (lambda: make_model("deit_tiny_patch16_224"), timm_forward, 224, 1, (14, 14)),
    "vit_small_unfused_registers": (
        lambda: _unfused(small_vit(reg_tokens=2)),
        timm_forward,
        64,
        3,
        (4, 4),
    ),
    "deit_distilled": (
        lambda: make_model("deit_tiny_distilled_patch16_224", img_size=64, depth=3),
        timm_forward,
        64,
        2,
        (4, 4),
    ),
    "torchvision": (lambda: tv.small_model(), torchvision_forward, 64, 1, (4, 4)),
    "hf_eager": (lambda: hf.make_hf_vit("eager"), hf_forward, 64, 1, (4, 4)),
    "hf_sdpa": (lambda: hf.make_hf_vit("sdpa"), hf_forward, 64, 1, (4, 4)),
    "beit_rel_pos": (
        lambda: beit_eva.small_beit(use_rel_pos_bias=True, **beit_eva.TOKEN),
        beit_eva_forward,
        32,
        1,
        (4, 4),
    ),
    "eva_rope": (
        lambda: beit_eva.small_eva(ref_feat_shape=(4, 4), **beit_eva.TOKEN),
        beit_eva_forward,
        32,
        1,
        (4, 4),
    ),
}


def _unfused(model):
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    make, forward, size, prefix, grid = CASES[request.param]
    return make(), forward, size, prefix, grid


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("target", [[3, 7, 0], None], ids=["three_targets", "predicted"])
def test_rollouts_equal_the_explicit_rules(case, target):
    model, forward, size, prefix, grid = case
    images = make_images(3, size, size)
    expected = explicit_rollouts(forward, model, images, target, prefix, grid)
    attention = AttentionRollout(model).attribute(images)
    gradient = GradientRollout(model).attribute(images, target=target)
    assert attention.shape == gradient.shape == (3, 1, *grid)
    # The same call as for other attributions; the rollout does not depend on the target.
    assert torch.equal(AttentionRollout(model).attribute(images, target=[1, 2, 3]), attention)
    assert_close_relative(attention, expected["attention_rollout"])
    assert_close_relative(gradient, expected["gradient_rollout"])
    # Not vacuous: the gradient term changes the map (R = I alone would give zeros here).
    assert float(expected["gradient_rollout"].amax()) > 0


def test_layer_restricts_the_rollouts_to_those_blocks():
    model = small_vit()
    images = make_images(2, 64, 64)
    chosen = [model.blocks[2].attn, model.blocks[0].attn]

    def two_blocks(explicit_model, x):
        logits, attentions = timm_forward(explicit_model, x)
        return logits, [attentions[0], attentions[2]]

    expected = explicit_rollouts(two_blocks, model, images, [1, 2], 1, (4, 4))
    attention = AttentionRollout(model, layer=chosen).attribute(images)
    gradient = GradientRollout(model, layer=chosen).attribute(images, target=[1, 2])
    assert_close_relative(attention, expected["attention_rollout"])
    assert_close_relative(gradient, expected["gradient_rollout"])


def test_class_attention_models_are_refused():
    cait = make_model("cait_xxs24_224", img_size=64, depth=2)
    for method in (AttentionRollout, GradientRollout):
        with pytest.raises(TypeError, match="class-attention blocks"):
            method(cait)


def test_peak_memory_is_about_one_blocks_attention_matrix():
    """(B, H, N, N) matrices are freed block by block: at most three distinct ones (the
    logits and A of a block, or A and dA) are alive at any time, whatever the depth."""
    model = small_vit()
    images = make_images(2, 64, 64)
    shape = (2, 6, 17, 17)
    alive: List[weakref.ref] = []
    most = [0]

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and tuple(out.shape) == shape:
                alive.append(weakref.ref(out))
                tensors = [ref() for ref in alive]
                storages = {t.untyped_storage().data_ptr() for t in tensors if t is not None}
                most[0] = max(most[0], len(storages))
            return out

    for method, kwargs in ((AttentionRollout, {}), (GradientRollout, {"target": [1, 2]})):
        alive.clear()
        most[0] = 0
        with Track():
            method(model).attribute(images, **kwargs)
        assert 0 < most[0] <= 3, (method.__name__, most[0])


def test_bad_input_fails_before_the_forward_and_leaves_nothing():
    model = small_vit()
    calls = []
    model.patch_embed.register_forward_pre_hook(lambda module, args: calls.append(1))
    before = module_hook_count(model)
    with pytest.raises(ValueError, match="Expected target classes"):
        GradientRollout(model).attribute(make_images(1, 64, 64), target=11)
    with pytest.raises(ValueError, match="takes 64x64 images"):
        AttentionRollout(model).attribute(make_images(1, 32, 32))
    with pytest.raises(ValueError, match="Expected target classes below the model's 11 outputs"):
        AttentionRollout(model).attribute(make_images(1, 64, 64), target=11)
    with pytest.raises(ValueError, match="finite"):
        AttentionRollout(model).attribute(torch.full((1, 3, 64, 64), float("nan")))
    assert calls == [] and module_hook_count(model) == before
    assert all(parameter.grad is None for parameter in model.parameters())
