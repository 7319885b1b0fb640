"""The bundled model: a tiny timm ViT trained on :func:`captum_daam.data.make_shapes`.

Its weights ship inside the package, so it loads without a network. It takes
``make_shapes`` images as they are, (B, 3, 64, 64) in [0, 1], with no separate normalisation.
"""

from importlib import resources

from timm.models.vision_transformer import VisionTransformer

from ..data import CLASSES, IMAGE_SIZE

__all__ = ["TINY_VIT_CONFIG", "TINY_VIT_WEIGHTS", "tiny_vit"]

TINY_VIT_CONFIG = dict(
    img_size=IMAGE_SIZE,
    patch_size=8,
    embed_dim=96,
    depth=6,
    num_heads=3,
    mlp_ratio=2.0,
    num_classes=len(CLASSES),
    class_token=True,
    global_pool="token",
)

TINY_VIT_WEIGHTS = "tiny_vit_shapes.safetensors"


def tiny_vit(pretrained: bool = True) -> VisionTransformer:
    """The bundled tiny ViT (patch 8, 6 blocks, [class] token, 5 shape classes), in eval mode.

    Args:
        pretrained: load the shipped weights (trained by ``python -m
            captum_daam.zoo.train_tiny_vit``); False gives random weights.

    Example::

        >>> from captum_daam.data import make_shapes
        >>> from captum_daam.zoo import tiny_vit
        >>> model = tiny_vit()
        >>> images, labels, masks = make_shapes(8, seed=5)
        >>> model(images).argmax(1).shape
        torch.Size([8])
    """
    model = VisionTransformer(**TINY_VIT_CONFIG)
    # Preprocessing for timm's data config: resize only; the model takes [0, 1] pixels as they are.
    model.pretrained_cfg = dict(
        input_size=(3, IMAGE_SIZE, IMAGE_SIZE), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
        interpolation="bilinear", crop_pct=1.0, crop_mode="center", num_classes=len(CLASSES),
        label_names=list(CLASSES),
    )
    if pretrained:
        from safetensors.torch import load_file

        weights = resources.files(__package__).joinpath(TINY_VIT_WEIGHTS)
        with resources.as_file(weights) as path:
            model.load_state_dict(load_file(str(path)))
    return model.eval()
