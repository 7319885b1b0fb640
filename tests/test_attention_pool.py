"""Attention-pool heads (timm's ``AttentionPoolLatent``, ``global_pool='map'``: SigLIP, SigLIP2,
AIMv2, Perception Encoder, NaFlexViT map) are the last block of the flow, explained from their
latent query rows over the tokens they read, and equal an explicit float64 reference.

The reference runs each family's blocks with the attention formed by hand (the families' own
test references), then the head by hand: the latent query projected and split into heads, keys
and values from ``kv`` over the final tokens (the patch tokens, or every token with the prefix
tokens for Eva and ``pool_include_prefix=True``), softmax(q k^T * scale) as an explicit
(B, H, latent_len, N) matrix, its output before ``proj`` differentiated with plain autograd.
Each latent row's output is split over the tokens it reads, F[i, n, (h, e)] = A[h, i, n] v[h, n, e],
weighted by the gradient at its own row, summed over rows and channels and relu'd
(reference.maps_from_every_query_row); the prefix tokens are dropped from the grid.
"""

import copy
import warnings
from typing import Callable, Dict, List

import pytest
import torch
from timm.layers import AttentionPoolLatent
from timm.models.eva import Eva
from timm.models.naflexvit import NaFlexVit
from torch import Tensor, nn

from captum_daam import DAAM, AttentionRollout, GradientRollout
from captum_daam.adapters import adapter_for
from helpers import (
    assert_close_relative,
    make_images,
    make_model,
    module_hook_count,
    set_fused_attention,
)
from reference import (
    explicit_attention,
    maps_from_every_query_row,
    maps_from_explicit_blocks,
    resolve_targets,
)
from test_adapter_beit_eva import explicit_eva_forward
from test_adapter_naflexvit import explicit_forward as explicit_naflexvit_forward

NUM_CLASSES = 9
TARGETS = [3, 8, 0]


def explicit_pool(pool: AttentionPoolLatent, tokens: Tensor) -> Dict[str, Tensor]:
    """timm's AttentionPoolLatent by hand, its attention an explicit (B, H, latent_len, N)."""
    batch, count, channels = tokens.shape
    heads, width, latent = pool.num_heads, pool.head_dim, pool.latent_len
    if pool.pos_embed is not None:
        tokens = tokens + pool.pos_embed.unsqueeze(0)
    q = pool.q(pool.latent.expand(batch, -1, -1)).reshape(batch, latent, heads, width)
    q = pool.q_norm(q.transpose(1, 2))
    k, v = pool.kv(tokens).reshape(batch, count, 2, heads, width).permute(2, 0, 3, 1, 4)
    k = pool.k_norm(k)
    probabilities = (q @ k.transpose(-2, -1) * width**-0.5).softmax(dim=-1)
    pre_projection = (probabilities @ v).transpose(1, 2).reshape(batch, latent, heads * width)
    out = pool.proj(pre_projection)
    if pool.mlp is not None:
        out = out + pool.mlp(pool.norm(out))
    pooled = out[:, 0] if pool.pool == "token" else out.mean(1) if pool.pool == "avg" else out
    return dict(attn=probabilities, v=v, pre_projection=pre_projection, pooled=pooled)


def explicit_vit_forward(model: nn.Module, images: Tensor) -> Dict[str, object]:
    """A timm VisionTransformer's blocks by hand (reference.explicit_attention per block);
    the head is the model's ``forward_head``, replaced by :func:`explicit_daam`."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
    records = []
    for block in model.blocks:
        record = explicit_attention(block.attn, block.norm1(x))
        x = x + block.ls1(record["out"])
        x = x + block.ls2(block.mlp(block.norm2(x)))
        records.append(record)
    return {"logits": model.forward_head(model.norm(x)), "blocks": records}


FORWARDS: Dict[type, Callable] = {
    Eva: explicit_eva_forward,
    NaFlexVit: explicit_naflexvit_forward,
}


def explicit_daam(
    model: nn.Module, images: Tensor, grid, target=None, queries: str = "all"
) -> Dict[str, object]:
    """Block maps and flow of the blocks then the head, in float64. The blocks by every row
    (``queries='all'``) or their [class] rows; the head by every latent row."""
    model = copy.deepcopy(model).double()
    prefix = model.num_prefix_tokens
    reads_prefix = getattr(model, "pool_include_prefix", True)  # Eva's head reads every token
    head: Dict[str, Tensor] = {}

    def explicit_head(tokens: Tensor) -> Tensor:
        head.update(explicit_pool(model.attn_pool, tokens if reads_prefix else tokens[:, prefix:]))
        return model.head(model.head_drop(model.fc_norm(head["pooled"])))

    model.forward_head = explicit_head  # the family's forward ends in the head
    forward = FORWARDS.get(type(model), explicit_vit_forward)
    with torch.enable_grad():
        result = forward(model, images.double())
        logits = result["logits"]
        targets = resolve_targets(target, logits)
        score = logits[torch.arange(len(logits)), targets].sum()
        blocks = result["blocks"]
        gradients = torch.autograd.grad(
            score, [block["pre_projection"] for block in blocks] + [head["pre_projection"]]
        )
    reduce = maps_from_every_query_row if queries == "all" else maps_from_explicit_blocks
    block_maps = reduce(blocks, gradients[:-1], prefix, grid)["block_maps"]
    head_map = maps_from_every_query_row(
        [head], gradients[-1:], prefix if reads_prefix else 0, grid
    )["block_maps"]
    maps = torch.cat([block_maps, head_map], dim=1)
    return dict(
        logits=logits.detach(),
        block_maps=maps,
        flow=maps.cumsum(dim=1),
        head=head,
        head_gradient=gradients[-1],
    )


def sharpen(model: nn.Module, seed: int = 0, factor: float = 4.0) -> nn.Module:
    """Seeded noise on every parameter (the latent, the zero-initialised biases and head) and
    query / key weights scaled, so that every token and latent row matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
            if name.endswith(("qkv.weight", "q.weight", "kv.weight")):
                parameter.mul_(factor)
    return model.eval()


def vit(**kwargs) -> nn.Module:
    options = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=4)
    return sharpen(
        make_model("vit_small_patch16_224", num_classes=NUM_CLASSES, **{**options, **kwargs})
    )


SMALL_EVA = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)

MODELS: Dict[str, Callable[[], nn.Module]] = {
    # SigLIP / SigLIP2: no [class] token, the head reads the patch tokens.
    "vit_map_siglip": lambda: vit(class_token=False, global_pool="map"),
    # A [class] token that the head does not read, and registers.
    "vit_map_class_token_registers": lambda: vit(global_pool="map", reg_tokens=2),
    # The head reads the prefix tokens too (timm's pool_include_prefix=True).
    "vit_map_reads_prefix": lambda: vit(
        class_token=False, reg_tokens=1, global_pool="map", pool_include_prefix=True
    ),
    # Perception Encoder's layout: Eva with an attention pool over every token.
    "eva_map": lambda: sharpen(
        Eva(**SMALL_EVA, num_classes=NUM_CLASSES, global_pool="map", num_reg_tokens=1)
    ),
    "naflexvit_map": lambda: sharpen(
        NaFlexVit(
            num_classes=NUM_CLASSES,
            patch_size=8,
            embed_dim=64,
            depth=2,
            num_heads=4,
            class_token=False,
            global_pool="map",
            pos_embed_grid_size=(4, 4),
        )
    ),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_case(request):
    return request.param, MODELS[request.param]()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("target", [TARGETS, None], ids=["targets", "predicted"])
def test_the_head_is_the_last_block_of_the_flow_and_equals_the_reference(
    model_case, target, fused
):
    case, model = model_case
    set_fused_attention(model, fused)
    model.attn_pool.fused_attn = fused
    images = make_images(3, 32, 32)
    expected = explicit_daam(model, images, (4, 4), target)
    with torch.no_grad():
        assert_close_relative(expected["logits"], model(images).double(), 1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default explains the head in full: no warning
        flow = DAAM(model).attribute(images, target=target, return_flow=True)
    assert flow.shape == (3, len(model.blocks) + 1, 4, 4)  # one map more than blocks
    assert_close_relative(flow, expected["flow"])
    block_maps = DAAM(model).attribute(images, target=target, return_flow=True, accumulate=False)
    assert_close_relative(block_maps, expected["block_maps"])
    assert float(expected["block_maps"][:, -1].amax()) > 0  # the head's map is not empty
    assert module_hook_count(model) == 0


def test_the_heads_decomposition_adds_up_to_its_own_output():
    """The head's latent row splits over the tokens it reads: summed over them, the
    contributions give its output before proj, read by a hook that is not the adapter's."""
    model = vit(class_token=False, global_pool="map")
    images = make_images(2, 32, 32)
    outputs: List[Tensor] = []
    handle = model.attn_pool.proj.register_forward_pre_hook(
        lambda module, args: outputs.append(args[0].detach())
    )
    try:
        with torch.no_grad():
            model(images)
    finally:
        handle.remove()
    expected = explicit_daam(model, images, (4, 4), [1, 2])
    head = expected["head"]
    attention, values = head["attn"].detach(), head["v"].detach()  # (B, H, 1, N), (B, H, N, d)
    contributions = attention.squeeze(2).unsqueeze(-1) * values  # (B, H, N, d)
    summed = contributions.sum(dim=2).flatten(1)  # heads concatenated, (B, C)
    assert_close_relative(summed.float(), outputs[0][:, 0], 1e-5)


def test_the_map_from_the_gradient_of_autograd_at_the_heads_output():
    """The head's map is relu(sum_n-contributions . relu(gradient)): formed here from the
    reference's explicit attention and autograd's gradient, and compared with DAAM's."""
    model = vit(class_token=False, global_pool="map")
    images = make_images(3, 32, 32)
    expected = explicit_daam(model, images, (4, 4), TARGETS)
    head, gradient = expected["head"], expected["head_gradient"]  # gradient (B, 1, C)
    weights = gradient.clamp(min=0).unflatten(-1, (4, -1)).transpose(1, 2)  # (B, H, 1, d)
    per_token = (head["attn"].detach().transpose(-2, -1) @ weights * head["v"].detach()).sum(-1)
    by_hand = per_token.sum(1).clamp(min=0).reshape(3, 4, 4)
    maps = DAAM(model).attribute(images, target=TARGETS, return_flow=True, accumulate=False)
    assert_close_relative(maps[:, -1], by_hand)


def test_every_latent_row_is_explained():
    """A head of two latent queries averaged (latent_len=2, pool_type='avg'): both rows."""
    model = vit(class_token=False, global_pool="map")
    torch.manual_seed(1)
    model.attn_pool = AttentionPoolLatent(64, num_heads=4, latent_len=2, pool_type="avg")
    sharpen(model, seed=2)
    images = make_images(3, 32, 32)
    expected = explicit_daam(model, images, (4, 4), TARGETS)
    assert expected["head"]["attn"].shape == (3, 4, 2, 16)
    # In float64: the sharpened first block leaves float32 at about 1e-4 of the largest value.
    flow = DAAM(model.double()).attribute(images.double(), target=TARGETS, return_flow=True)
    assert_close_relative(flow, expected["flow"], 1e-9)


def test_a_class_token_model_with_an_attention_pool_explained_from_its_class_rows():
    """queries='class' on a [class]-token model whose head is an attention pool: the blocks by
    their [class] rows (with the warning that the head does not read it), the head by its
    latent row."""
    model = vit(global_pool="map")
    images = make_images(3, 32, 32)
    expected = explicit_daam(model, images, (4, 4), TARGETS, queries="class")
    with pytest.warns(UserWarning, match="global_pool='map'"):
        flow = DAAM(model).attribute(images, target=TARGETS, return_flow=True, queries="class")
    assert_close_relative(flow, expected["flow"])


def test_the_head_alone_as_layer():
    model = vit(class_token=False, global_pool="map")
    images = make_images(2, 32, 32)
    expected = explicit_daam(model, images, (4, 4), [1, 2])
    head_map = DAAM(model, layer=model.attn_pool).attribute(images, target=[1, 2])
    assert_close_relative(head_map[:, 0], expected["block_maps"][:, -1])


def test_adapter_says_the_head_has_latent_queries_and_rollouts_leave_it_out():
    model = vit(global_pool="map")
    adapter = adapter_for(model)
    assert adapter.attention_modules()[-1] is model.attn_pool
    assert adapter.latent_query_modules() == [model.attn_pool]
    images = make_images(2, 32, 32)
    for rollout in (AttentionRollout(model), GradientRollout(model)):
        assert [module for module in rollout.layer] == [block.attn for block in model.blocks]
        with pytest.warns(UserWarning, match="global_pool='map'"):
            assert rollout.attribute(images, target=[1, 2]).shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="attention-pool head"):
        AttentionRollout(model, layer=[model.blocks[0].attn, model.attn_pool])
    with pytest.raises(TypeError, match="has no \\[class\\] token"):
        AttentionRollout(vit(class_token=False, global_pool="map"))


def test_another_attention_pool_is_refused_with_its_name():
    model = make_model(
        "vit_small_patch16_224", img_size=32, patch_size=8, depth=1, global_pool="prr"
    )
    with pytest.raises(TypeError, match="AttentionPoolPrr \\(global_pool='prr'\\)"):
        DAAM(model)
