"""DAAM on open_clip's own image towers (``open_clip.transformer.VisionTransformer``) equals an
explicit, independent float64 reference.

The reference re-runs the tower by hand: the patch convolution, the [class] embedding and the
positional embedding, ``ln_pre``, then per block the attention formed by hand from the
``in_proj_weight`` slices (q / k norms and head scales of the custom blocks written out) with
an explicit softmax over a full (B, H, Nq, N) matrix, ``out_proj``, the MLP; ``ln_post``, the
pooling ([class] token, average of the patch tokens, or the attentional pooler's latent queries
over every token, formed by hand the same way) and ``proj``. Gradients of the objective (a
feature, or importance-weighted features) are taken with plain autograd at each block's
head-concatenated attention output before ``out_proj``, and DESIGN.md's formulas are applied
with the full contribution tensors (reference.maps_from_explicit_blocks for the [class] rows,
reference.maps_from_every_query_row for every row and the latent rows).
"""

import copy
import warnings

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, _build_vision_tower
from open_clip.transformer import CustomResidualAttentionBlock, Transformer
from torch import Tensor, nn

from captum_daam import DAAM
from captum_daam.adapters import OpenClipVisionTransformerAdapter, adapter_for, explained_model
from captum_daam.adapters.timm_vit import TimmVisionTransformerAdapter
from helpers import (
    add_parameter_noise,
    assert_attributions_match,
    assert_close_relative,
    make_images,
    module_hook_count,
)
from reference import explicit_gradients, maps_from_every_query_row, maps_from_explicit_blocks

EMBED_DIM = 48
TARGETS = [3, 17, 40]
TOWERS = {
    # The paper's case: [class] token, pool 'tok'; LayerScale; a 4 x 6 grid.
    "tok": dict(layers=3, head_width=16, image_size=(32, 48), ls_init_value=0.5),
    "avg": dict(layers=2, head_width=32, pool_type="avg", image_size=64, patch_size=16),
    # CoCa's pooler: latent queries over every token, (pooled, tokens) returned; the pooler's
    # nn.MultiheadAttention has kdim = vdim = 64 != 48, so separate q / k / v weights.
    "attentional_pooler": dict(
        layers=2, attentional_pool=True, attn_pooler_queries=3, attn_pooler_heads=2,
        output_tokens=True,
    ),
    # CustomResidualAttentionBlock with open_clip's Attention: every option it reads.
    "custom_blocks": dict(
        layers=2, qk_norm=True, scale_heads=True, scale_attn_inner=True, scale_attn=True,
        scale_fc=True, final_ln_after_pool=True, pool_type="avg", no_ln_pre=True,
    ),
}


def tower(seed: int = 3, embed_dim: int = EMBED_DIM, **config) -> nn.Module:
    """An open_clip image tower (width 64, images 32 px, patches 8 px unless ``config`` says
    otherwise) with random weights and seeded noise on every parameter, in eval mode."""
    torch.manual_seed(0)
    config = {"width": 64, "image_size": 32, "patch_size": 8, **config}
    model = _build_vision_tower(embed_dim, CLIPVisionCfg(**config))
    return add_parameter_noise(model, 0.1, seed)


def sequence_first(model: nn.Module) -> nn.Module:
    """The same tower running its blocks sequence first (nn.MultiheadAttention with
    batch_first=False), as older open_clip releases did."""
    model = copy.deepcopy(model)
    blocks = model.transformer
    transformer = Transformer(
        blocks.width, blocks.layers, blocks.resblocks[0].attn.num_heads, batch_first=False,
        ls_init_value=0.5,
    )
    transformer.load_state_dict(blocks.state_dict())
    model.transformer = transformer
    return model.eval()


# --------------------------------------------------------------------------- the reference


def layer_norm(norm: nn.Module, x: Tensor) -> Tensor:
    """One of the tower's norms by hand: an identity, or a layer norm from its parameters."""
    if isinstance(norm, nn.Identity):
        return x
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def split_heads(x: Tensor, heads: int) -> Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, N, C) -> (B, H, N, d)


def merge_heads(x: Tensor) -> Tensor:
    return x.transpose(1, 2).flatten(2)  # (B, H, N, d) -> (B, N, C)


def multihead_attention(attention: nn.MultiheadAttention, query: Tensor, tokens: Tensor):
    """nn.MultiheadAttention by hand, batch first: ``query`` rows over ``tokens``."""
    heads = attention.num_heads
    if attention.in_proj_weight is not None:
        weights = attention.in_proj_weight.chunk(3)
    else:
        weights = (attention.q_proj_weight, attention.k_proj_weight, attention.v_proj_weight)
    biases = attention.in_proj_bias.chunk(3)
    q, k, v = (
        split_heads(x @ weight.T + bias, heads)
        for x, weight, bias in zip((query, tokens, tokens), weights, biases)
    )
    attn = torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1)
    pre_projection = merge_heads(attn @ v)
    out = pre_projection @ attention.out_proj.weight.T + attention.out_proj.bias
    return out, {"attn": attn, "v": v, "pre_projection": pre_projection}


def custom_attention(attention: nn.Module, tokens: Tensor):
    """open_clip's Attention by hand: q / k norms over the head width, per-head output scale,
    the inner norm before out_proj. A head's scale s scales its output s A v = A (s v): the
    values of the decomposition are s v."""
    heads = attention.num_heads
    projected = tokens @ attention.in_proj_weight.T + attention.in_proj_bias
    q, k, v = (split_heads(x, heads) for x in projected.chunk(3, dim=-1))
    q, k = layer_norm(attention.ln_q, q), layer_norm(attention.ln_k, k)
    attn = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
    if attention.head_scale is not None:
        v = v * attention.head_scale
    pre_projection = merge_heads(attn @ v)
    inner = layer_norm(attention.ln_inner, pre_projection)
    out = inner @ attention.out_proj.weight.T + attention.out_proj.bias
    return out, {"attn": attn, "v": v, "pre_projection": pre_projection}


def explicit_forward(model: nn.Module, images: Tensor, normalize: bool = False) -> dict:
    """The tower's forward by hand; ``normalize``: as a CLIP model's forward, L2-normalised."""
    batch = images.shape[0]
    x = F.conv2d(images, model.conv1.weight, stride=model.conv1.stride).flatten(2).transpose(1, 2)
    x = torch.cat([model.class_embedding.expand(batch, 1, -1), x], dim=1)
    x = layer_norm(model.ln_pre, x + model.positional_embedding)
    blocks = []
    for block in model.transformer.resblocks:
        z = layer_norm(block.ln_1, x)
        if isinstance(block, CustomResidualAttentionBlock):
            out, record = custom_attention(block.attn, z)
            out = layer_norm(block.ln_attn, out)
        else:
            out, record = multihead_attention(block.attn, z, z)
        x = x + block.ls_1(out)
        x = x + block.ls_2(block.mlp(layer_norm(block.ln_2, x)))
        blocks.append(record)

    def pool(tokens: Tensor) -> Tensor:
        return tokens[:, 0] if model.pool_type == "tok" else tokens[:, 1:].mean(dim=1)

    if model.attn_pool is not None:
        pooler = model.attn_pool
        latent = layer_norm(pooler.ln_q, pooler.query).expand(batch, -1, -1)
        out, record = multihead_attention(pooler.attn, latent, layer_norm(pooler.ln_k, x))
        blocks.append(record)
        pooled = pool(layer_norm(model.ln_post, out))
    elif model.final_ln_after_pool:
        pooled = layer_norm(model.ln_post, pool(x))
    else:
        pooled = pool(layer_norm(model.ln_post, x))
    features = pooled @ model.proj
    if normalize:
        features = features / features.norm(dim=-1, keepdim=True)
    return {"logits": features, "blocks": blocks}


def explicit_daam(
    model: nn.Module, images: Tensor, target=None, importance=None, normalize: bool = False
) -> dict:
    """DESIGN.md's block maps and flow: the [class] rows for pool 'tok', every row otherwise
    (and every latent row of the pooler); relu on the gradients for a feature target, none for
    importance weights (the objective sum_d w_d f_d)."""
    if importance is None:
        result, _, gradients = explicit_gradients(
            explicit_forward, model, images, target, normalize
        )
    else:
        model64 = copy.deepcopy(model).double()
        with torch.enable_grad():
            result = explicit_forward(model64, images.double(), normalize)
            score = (result["logits"] * importance.double()).sum()
            pre_projections = [block["pre_projection"] for block in result["blocks"]]
            gradients = torch.autograd.grad(score, pre_projections)
    reads_class_token = model.attn_pool is None and model.pool_type == "tok"
    maps_of = maps_from_explicit_blocks if reads_class_token else maps_from_every_query_row
    maps = maps_of(
        result["blocks"], gradients, 1, tuple(model.grid_size), relu_gradients=importance is None
    )
    return {"logits": result["logits"].detach(), **maps}


def importance_weights(batch: int, seed: int = 5) -> Tensor:
    """Per-example weights in [0, 1], as min-max-normalised dimension-wise importance."""
    return torch.rand(batch, EMBED_DIM, generator=torch.Generator().manual_seed(seed))


def embedding(output) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


# --------------------------------------------------------------------------- exactness


@pytest.fixture(scope="module", params=sorted(TOWERS) + ["sequence_first"])
def case(request):
    if request.param == "sequence_first":
        model = sequence_first(tower(**TOWERS["tok"]))
    else:
        model = tower(**TOWERS[request.param])
    return request.param, model, make_images(3, *model.image_size)


def test_reference_reproduces_the_towers_embedding(case):
    name, model, images = case
    expected = explicit_daam(model, images, target=TARGETS)
    with torch.no_grad():
        assert_close_relative(expected["logits"], embedding(model(images)).double(), 1e-5)
    blocks = len(model.transformer.resblocks) + (model.attn_pool is not None)
    assert expected["block_maps"].shape == (3, blocks, *model.grid_size)


def test_flow_equals_reference_with_importance_weights(case):
    name, model, images = case
    weights = importance_weights(3)
    expected = explicit_daam(model, images, importance=weights)
    assert (expected["block_maps"].flatten(2).amax(-1) > 0).all(), name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        daam = DAAM(model)
        assert_attributions_match(daam, images, None, expected, importance=weights)
    assert module_hook_count(model) == 0


def test_flow_equals_reference_for_a_feature_target(case):
    name, model, images = case
    expected = explicit_daam(model, images, target=TARGETS)
    assert (expected["block_maps"].flatten(2).amax(-1) > 0).all(), name
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_attributions_match(DAAM(model), images, TARGETS, expected)
    assert module_hook_count(model) == 0


def test_adapter_reads_the_towers_pooling():
    adapters = {name: adapter_for(tower(**config)) for name, config in TOWERS.items()}
    for name, adapter in adapters.items():
        assert isinstance(adapter, OpenClipVisionTransformerAdapter), name
        assert adapter.has_class_token and adapter.num_prefix_tokens == 1, name
        assert adapter.num_outputs == EMBED_DIM and adapter.outputs_features, name
        assert adapter.in_channels == 3, name
    assert adapters["tok"].reads_class_token and adapters["tok"].head_queries == (0,)
    assert adapters["tok"].grid_size((32, 48)) == (4, 6)
    for name in ("avg", "attentional_pooler", "custom_blocks"):
        assert not adapters[name].reads_class_token and adapters[name].head_queries is None
    pooler = adapters["attentional_pooler"]
    assert pooler.latent_query_modules() == [pooler.model.attn_pool.attn]
    assert pooler.attention_modules()[-1] is pooler.model.attn_pool.attn
    assert len(pooler.attention_modules()) == 3


# --------------------------------------------------------------------------- inside CLIP


def small_clip(**vision) -> CLIP:
    torch.manual_seed(0)
    text = CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=1)
    model = CLIP(EMBED_DIM, CLIPVisionCfg(**vision), text)
    return add_parameter_noise(model, 0.1, 3)


def test_adapter_is_found_for_the_visual_tower_of_a_whole_clip_model():
    clip = small_clip(width=64, layers=2, head_width=16, image_size=32, patch_size=8)
    images = make_images(3, 32, 32)
    assert explained_model(clip) is clip.visual
    adapter = adapter_for(clip)
    assert isinstance(adapter, OpenClipVisionTransformerAdapter) and adapter.model is clip.visual
    weights = importance_weights(3)
    expected = explicit_daam(clip.visual, images, importance=weights)
    assert_attributions_match(DAAM(clip.visual), images, None, expected, importance=weights)
    # The adapter found in the CLIP model, for its normalised image features.
    normalised = explicit_daam(clip.visual, images, importance=weights, normalize=True)
    with torch.no_grad():
        assert_close_relative(normalised["logits"], clip(images)[0].double(), 1e-5)

    def encode_image(inputs: Tensor) -> Tensor:
        return clip.encode_image(inputs, normalize=True)

    daam = DAAM(encode_image, adapter=adapter)
    assert_attributions_match(daam, images, None, normalised, importance=weights)
    assert module_hook_count(clip) == 0


def test_adapter_is_found_in_vit_b_32():
    clip = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    adapter = adapter_for(clip)
    assert isinstance(adapter, OpenClipVisionTransformerAdapter) and adapter.model is clip.visual
    assert adapter.grid_size((224, 224)) == (7, 7) and adapter.num_outputs == 512
    assert adapter.reads_class_token and len(adapter.attention_modules()) == 12
    with pytest.raises(ValueError, match="224x224"):
        adapter.grid_size((256, 256))


def test_timm_trunk_of_an_open_clip_model_gets_the_timm_adapter():
    """A TimmModel tower (SigLIP style: timm_pool='map', timm_proj='none') is explained by the
    timm adapter, found for its trunk, with the attention-pool head as the last block."""
    clip = small_clip(timm_model_name="test_vit", image_size=160, timm_pool="map", timm_proj="none")
    trunk = clip.visual.trunk
    adapter = adapter_for(clip)
    assert isinstance(adapter, TimmVisionTransformerAdapter) and adapter.model is trunk
    assert explained_model(clip.visual) is trunk
    assert adapter.latent_query_modules() == [trunk.attn_pool]
    # The tower's forward is its trunk's (no projection): the same maps either way.
    images = make_images(2, 160, 160)
    through_tower = DAAM(clip.visual).attribute(images, target=[3, 5], return_flow=True)
    direct = DAAM(trunk).attribute(images, target=[3, 5], return_flow=True)
    assert through_tower.shape == (2, len(trunk.blocks) + 1, 10, 10)
    assert_close_relative(through_tower, direct, 1e-6)
    assert module_hook_count(clip) == 0


def test_siglip_config_finds_the_timm_adapter():
    model = open_clip.create_model("ViT-B-16-SigLIP", pretrained=None)
    adapter = adapter_for(model)
    assert isinstance(adapter, TimmVisionTransformerAdapter)
    assert adapter.model is model.visual.trunk
    assert adapter.latent_query_modules() == [model.visual.trunk.attn_pool]


# --------------------------------------------------------------------------- checks


def test_frozen_tower_gives_the_same_maps():
    # Locked (open_clip's own lock()), nn.MultiheadAttention takes its fused fast path.
    model = tower(**TOWERS["tok"])
    images = make_images(2, 32, 48)
    unfrozen = DAAM(model).attribute(images, target=[5, 6], return_flow=True)
    model.lock()
    frozen = DAAM(model).attribute(images, target=[5, 6], return_flow=True)
    assert_close_relative(frozen, unfrozen, 1e-5)
    assert not any(parameter.requires_grad for parameter in model.parameters())


def assert_untouched(model: nn.Module, requires_grad: list, training: list) -> None:
    assert module_hook_count(model) == 0
    assert [parameter.requires_grad for parameter in model.parameters()] == requires_grad
    assert [module.training for module in model.modules()] == training


def test_bad_images_are_refused_before_the_forward():
    model = tower(**TOWERS["tok"])
    requires_grad = [parameter.requires_grad for parameter in model.parameters()]
    training = [module.training for module in model.modules()]
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"takes 32x48 images .*4x6.*got 32x32"):
            DAAM(model).attribute(make_images(1, 32, 32), target=0)
        with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
            DAAM(model).attribute(torch.rand(1, 1, 32, 48), target=0)
        with pytest.raises(ValueError, match=f"output width {EMBED_DIM}"):
            DAAM(model).attribute(make_images(1, 32, 48), importance=torch.rand(64))
    finally:
        handle.remove()
    assert calls == []
    assert_untouched(model, requires_grad, training)


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(scaled_cosine_attn=True), "scaled_cosine_attn=True"),
        (dict(attentional_pool="parallel", attn_pooler_queries=2), "attentional_pool='parallel'"),
        (dict(pool_type="none"), "pool_type='none'"),
        (dict(attentional_pool=True, attn_pooler_queries=2, pool_type="none"), "latent query"),
    ],
    ids=["scaled_cosine", "parallel_poolers", "no_pooling", "pooler_without_pooling"],
)
def test_unsupported_towers_are_refused_by_name(config, match):
    model = tower(embed_dim=64, layers=1, **config)
    with pytest.raises(TypeError, match=match):
        adapter_for(model)
    with pytest.raises(TypeError, match=match):
        DAAM(model)
    assert module_hook_count(model) == 0


@pytest.mark.parametrize("name", ["tok", "custom_blocks"])
def test_a_masked_call_is_refused_and_leaves_nothing_behind(name):
    model = tower(**TOWERS[name])
    requires_grad = [parameter.requires_grad for parameter in model.parameters()]
    training = [module.training for module in model.modules()]
    tokens = 1 + model.grid_size[0] * model.grid_size[1]

    def masked_forward(images: Tensor) -> Tensor:
        x = model.transformer(model._embeds(images), attn_mask=torch.zeros(tokens, tokens))
        return model._pool(x)[0] @ model.proj

    daam = DAAM(masked_forward, adapter=adapter_for(model))
    with pytest.raises(ValueError, match="without an attn_mask|unmasked attention"):
        daam.attribute(make_images(1, *model.image_size), target=0)
    assert_untouched(model, requires_grad, training)
