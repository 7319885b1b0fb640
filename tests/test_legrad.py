"""LeGrad equals an explicit computation, block by block, written out here.

For each family the model is re-run by hand in float64 (on a copy), every block's attention
formed as an explicit (B, H, N, N) matrix from its q and k. For each block l separately, the
block is recomputed from its (detached) input with A^l a leaf tensor, its output z^l read by
the model's own layers after the last block, s^l = tail(z^l)[b, target], and
torch.autograd.grad(s^l, A^l) gives dA^l through block l alone. The map is then the LeGrad
rule as the paper writes it: relu, mean over heads and query rows, the patch columns, the
mean over blocks and a min-max per image. No package code and no hooks are used.
"""

import copy
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import pytest
import torch
from timm.models.vision_transformer import ParallelThingsBlock

import test_adapter_hf as hf
import test_adapter_torchvision as tv
from captum.attr import LayerAttribution
from captum_daam import LeGrad
from captum_daam.adapters import GenericAdapter, adapter_for
from helpers import (
    add_parameter_noise,
    assert_close_relative,
    make_images,
    make_model,
    module_hook_count,
)
from reference import resolve_targets

# --------------------------------------------------------------------------- #
# Explicit blocks: (q, k, scale, finish), where finish(A) is the block's output for
# attention probabilities A, the values and the rest of the block computed from the input
# --------------------------------------------------------------------------- #


def _heads(tokens: torch.Tensor, heads: int) -> torch.Tensor:  # (B, N, C) -> (B, H, N, d)
    return tokens.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merged(per_head: torch.Tensor) -> torch.Tensor:  # (B, H, N, d) -> (B, N, C)
    return per_head.transpose(1, 2).flatten(2)


def timm_parts(model):
    def stem(images):
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))

    def block(blk, x):
        attn = blk.attn
        q, k, v = attn.qkv(blk.norm1(x)).chunk(3, dim=-1)
        q, k, v = (_heads(t, attn.num_heads) for t in (q, k, v))

        def finish(probs):
            x1 = x + blk.ls1(attn.proj(attn.norm(_merged(probs @ v))))
            return x1 + blk.ls2(blk.mlp(blk.norm2(x1)))

        return attn.q_norm(q), attn.k_norm(k), attn.scale, finish

    def tail(x):
        return model.forward_head(model.norm(x))

    return stem, list(model.blocks), block, tail


def hf_parts(model):
    def stem(images):
        return model.vit.embeddings(images)

    def block(layer, x):
        attention = layer.attention
        z = layer.layernorm_before(x)
        heads = attention.num_attention_heads
        q, k, v = (_heads(p(z), heads) for p in (attention.q_proj, attention.k_proj,
                                                attention.v_proj))

        def finish(probs):
            x1 = x + attention.o_proj(_merged(probs @ v))
            return x1 + layer.mlp(layer.layernorm_after(x1))

        return q, k, attention.head_dim**-0.5, finish

    def tail(x):
        return model.classifier(model.vit.layernorm(x)[:, 0])

    return stem, list(model.vit.layers), block, tail


def torchvision_parts(model):
    def stem(images):
        tokens = model.conv_proj(images).flatten(2).transpose(1, 2)
        cls = model.class_token.expand(len(images), -1, -1)
        return torch.cat([cls, tokens], dim=1) + model.encoder.pos_embedding

    def block(layer, x):
        attention = layer.self_attention
        projected = layer.ln_1(x) @ attention.in_proj_weight.T + attention.in_proj_bias
        q, k, v = (_heads(t, attention.num_heads) for t in projected.chunk(3, dim=-1))

        def finish(probs):
            out = _merged(probs @ v) @ attention.out_proj.weight.T + attention.out_proj.bias
            x1 = x + out
            return x1 + layer.mlp(layer.ln_2(x1))

        return q, k, q.shape[-1] ** -0.5, finish

    def tail(x):
        return model.heads(model.encoder.ln(x)[:, 0])

    return stem, list(model.encoder.layers), block, tail


def explicit_legrad(
    parts: Callable,
    model: torch.nn.Module,
    images: torch.Tensor,
    target,
    num_prefix_tokens: int,
    grid: Tuple[int, int],
    blocks: Optional[Sequence[int]] = None,
) -> dict:
    model = copy.deepcopy(model).double()
    stem, layers, block, tail = parts(model)
    batch = len(images)
    with torch.no_grad():  # the forward pass, for the blocks' inputs and the logits
        x = stem(images.double())
        inputs = []
        for layer in layers:
            inputs.append(x)
            q, k, scale, finish = block(layer, x)
            x = finish((q @ k.transpose(-2, -1) * scale).softmax(dim=-1))
        logits = tail(x)
    targets = resolve_targets(target, logits)
    layer_maps = []
    for index in range(len(layers)) if blocks is None else blocks:
        with torch.enable_grad():
            q, k, scale, finish = block(layers[index], inputs[index])
            probs = (q @ k.transpose(-2, -1) * scale).softmax(dim=-1).requires_grad_(True)
            score = tail(finish(probs))[torch.arange(batch), targets].sum()
            (gradient,) = torch.autograd.grad(score, probs)
        columns = gradient.clamp(min=0).mean(dim=1).mean(dim=1)  # heads, then query rows
        layer_maps.append(columns[:, num_prefix_tokens:].reshape(batch, 1, *grid))
    raw = torch.stack(layer_maps).mean(dim=0)
    flat = raw.flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    normalized = (raw - low.view(-1, 1, 1, 1)) / (high - low).view(-1, 1, 1, 1)
    return {"logits": logits, "layer_maps": layer_maps, "raw": raw, "normalized": normalized}


# --------------------------------------------------------------------------- #
# Families
# --------------------------------------------------------------------------- #


def tiny_vit(**kwargs):
    model = make_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, num_classes=7, **kwargs
    )
    return add_parameter_noise(model, 0.1, seed=1)


CASES = {
    # name: (model factory, explicit parts, image size, prefix tokens, grid)
    "vit_class_token": (lambda: tiny_vit(), timm_parts, 32, 1, (4, 4)),
    "vit_mean_pooled_no_class_token": (
        lambda: tiny_vit(global_pool="avg", class_token=False), timm_parts, 32, 0, (4, 4),
    ),
    "vit_registers": (lambda: tiny_vit(reg_tokens=2), timm_parts, 32, 3, (4, 4)),
    "hf_vit": (
        lambda: add_parameter_noise(hf.make_hf_vit("sdpa"), 0.05, seed=2), hf_parts, 64, 1,
        (4, 4),
    ),
    "torchvision_vit": (lambda: tv.small_model(), torchvision_parts, 64, 1, (4, 4)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    make, parts, size, prefix, grid = CASES[request.param]
    return make(), parts, size, prefix, grid


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("target", [[3, 6, 0], None], ids=["three_targets", "predicted"])
def test_legrad_equals_the_explicit_rule(case, target):
    model, parts, size, prefix, grid = case
    images = make_images(3, size, size)
    expected = explicit_legrad(parts, model, images, target, prefix, grid)
    with torch.no_grad():
        logits = model(images)
    assert_close_relative(expected["logits"], getattr(logits, "logits", logits).double(), 1e-5)
    assert all(float(layer_map.amax()) > 0 for layer_map in expected["layer_maps"])
    legrad = LeGrad(model, layer=every_block(model))
    raw = legrad.attribute(images, target=target, normalize=False)
    assert raw.shape == (3, 1, *grid)
    assert_close_relative(raw, expected["raw"])
    normalized = legrad.attribute(images, target=target)
    assert_close_relative(normalized, expected["normalized"])
    # the default: the last two blocks, as the authors' LeWrapper(layer_index=-2)
    last_two = torch.stack(expected["layer_maps"][-2:]).mean(dim=0)
    assert_close_relative(LeGrad(model).attribute(images, target=target, normalize=False),
                          last_two)
    assert module_hook_count(model) == 0


def every_block(model):
    return adapter_for(model).attention_modules()


def test_internal_batch_size_and_input_shaped_give_the_same_maps():
    model = tiny_vit()
    images = make_images(3, 32, 32)
    legrad = LeGrad(model)
    maps = legrad.attribute(images, target=[1, 2, 3])
    assert torch.allclose(
        legrad.attribute(images, target=[1, 2, 3], internal_batch_size=2), maps, atol=1e-6
    )
    shaped = legrad.attribute((images,), target=[1, 2, 3], input_shaped=True,
                              interpolate_mode="nearest")
    assert isinstance(shaped, tuple) and shaped[0].shape == images.shape
    expected = LayerAttribution.interpolate(maps, (32, 32), "nearest").expand(-1, 3, -1, -1)
    assert torch.equal(shaped[0], expected)


def test_layer_averages_the_chosen_blocks_only():
    model = tiny_vit()
    images = make_images(2, 32, 32)
    expected = explicit_legrad(timm_parts, model, images, [4, 5], 1, (4, 4), blocks=[0, 2])
    maps = LeGrad(model, layer=[model.blocks[2].attn, model.blocks[0].attn]).attribute(
        images, target=[4, 5], normalize=False
    )
    assert_close_relative(maps, expected["raw"])
    # Without the last block: the predicted class is still the model's own output's.
    expected = explicit_legrad(timm_parts, model, images, None, 1, (4, 4), blocks=[0, 1])
    maps = LeGrad(model, layer=[model.blocks[0].attn, model.blocks[1].attn]).attribute(
        images, normalize=False
    )
    assert_close_relative(maps, expected["raw"])


def test_models_without_full_self_attention_are_refused():
    with pytest.raises(TypeError, match="class-attention blocks"):
        LeGrad(make_model("cait_xxs24_224", img_size=32, patch_size=8, depth=2))
    swin = make_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4,
                      depths=(1, 1), num_heads=(1, 2), embed_dim=16)
    with pytest.raises(ValueError, match="attend within windows"):
        LeGrad(swin).attribute(make_images(1, 32, 32), target=0)
    pit = make_model("pit_ti_224", img_size=64)
    with pytest.raises(ValueError, match="read different grids"):
        LeGrad(pit).attribute(make_images(1, 64, 64), target=0)
    parallel = make_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                          block_fn=ParallelThingsBlock)
    with pytest.raises(ValueError, match="separate branches"):
        LeGrad(parallel).attribute(make_images(1, 32, 32), target=0)
    assert module_hook_count(swin) == module_hook_count(pit) == module_hook_count(parallel) == 0
    vit = tiny_vit()
    adapter = GenericAdapter([block.attn for block in vit.blocks], head_queries="class")
    with pytest.raises(TypeError, match="adapter_for"):
        LeGrad(vit, adapter=adapter)


def test_errors_leave_nothing_behind():
    model = tiny_vit()
    before = module_hook_count(model)
    flags = [parameter.requires_grad for parameter in model.parameters()]
    calls: List[int] = []
    model.patch_embed.register_forward_pre_hook(lambda module, args: calls.append(1))
    before += 1
    with pytest.raises(ValueError, match="Expected target classes"):
        LeGrad(model).attribute(make_images(1, 32, 32), target=7)
    with pytest.raises(ValueError, match="takes 32x32 images"):
        LeGrad(model).attribute(make_images(1, 64, 64))
    assert calls == []

    def failing(images):
        model(images)
        raise ValueError("after the forward pass")

    legrad = LeGrad(failing, adapter=adapter_for(model))
    with pytest.raises(ValueError, match="after the forward pass"):
        legrad.attribute(make_images(2, 32, 32), target=1)
    assert module_hook_count(model) == before
    assert [parameter.requires_grad for parameter in model.parameters()] == flags
    assert not model.training
    assert all(parameter.grad is None for parameter in model.parameters())
    # The model still runs as before, and LeGrad on it too.
    images = make_images(2, 32, 32)
    expected = explicit_legrad(timm_parts, model, images, 1, 1, (4, 4))
    assert_close_relative(LeGrad(model, layer=every_block(model)).attribute(images, target=1),
                          expected["normalized"])


def test_training_mode_warns():
    model = tiny_vit().train()
    with pytest.warns(UserWarning, match="training mode"):
        LeGrad(model).attribute(make_images(1, 32, 32), target=0)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LeGrad(model).attribute(make_images(1, 32, 32), target=0)
