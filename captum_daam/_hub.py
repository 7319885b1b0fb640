"""Models for ``captum-daam explain`` from the Hugging Face ecosystem: a local transformers
model folder (``save_pretrained``'s: ``config.json``, weights, the image processor's and the
tokenizer's files; or a Hub name, downloaded by transformers when online) and open_clip models
(``open_clip:NAME`` with random weights, ``open_clip:NAME@TAG`` with open_clip's pretrained
tag, ``open_clip:NAME@FILE`` with a local checkpoint).

Each comes with its preprocessing (the model's own: the folder's image processor, open_clip's
transform), as the model input and as the picture shown under the maps, and, for image-text
models, its tokenizer. transformers and open_clip are imported only here, when asked for.
"""

from pathlib import Path
from typing import Callable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from ._patches import patches_as_images

OPEN_CLIP_PREFIX = "open_clip:"


class LoadedModel(NamedTuple):
    """A model with its preprocessing and, for an image-text model, its tokenizer."""

    model: nn.Module
    #: (3, H, W) RGB in [0, 1] -> (model input (C, h, w), picture shown (3, h, w) in [0, 1]).
    preprocess: Callable[[Tensor], Tuple[Tensor, Tensor]]
    #: The tokenizer ImageTextSimilarity takes with ``texts=`` (a transformers tokenizer,
    #: open_clip's), or None where the model has none.
    tokenizer: Optional[Callable]
    #: Whether the model is an image-text model, whose forward needs texts.
    image_text: bool = False
    #: "softmax" or "sigmoid": how the image-text logits read as probabilities.
    text_probabilities: str = "softmax"


def is_transformers_folder(name: str) -> bool:
    """Whether ``name`` is a local folder holding a transformers model (its config.json)."""
    return (Path(name) / "config.json").is_file()


def is_open_clip_name(name: str) -> bool:
    return name.startswith(OPEN_CLIP_PREFIX)


def load_transformers(name: str, local_only: bool) -> LoadedModel:
    """The model class the folder's config names (``architectures``; ``AutoModel`` when it
    names none), its image processor and, where the folder has one, its tokenizer.

    Raises:
        ValueError: a one-line reason, when transformers is missing or cannot load it.
    """
    try:
        import transformers
    except ImportError as error:
        raise ValueError(
            "a transformers model needs transformers: pip install 'captum-daam[hf]'"
        ) from error
    try:
        config = transformers.AutoConfig.from_pretrained(name, local_files_only=local_only)
        architectures = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, architectures[0], None) if architectures else None
        model_class = model_class or transformers.AutoModel
        model = model_class.from_pretrained(name, local_files_only=local_only)
        processor = transformers.AutoImageProcessor.from_pretrained(
            name, local_files_only=local_only
        )
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"could not load the transformers model {name}: {_first_line(error)}")
    tokenizer = None
    if hasattr(model, "get_text_features"):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                name, local_files_only=local_only
            )
        except (OSError, ValueError, KeyError):
            tokenizer = None  # no texts can be given: said when --text is used

    def images(features) -> Tensor:
        # SigLIP 2's processor gives patches: the image they make back.
        if "spatial_shapes" in features:
            return patches_as_images(features)[0]
        return features["pixel_values"][0]

    def preprocess(rgb: Tensor) -> Tuple[Tensor, Tensor]:
        # The image is RGB in [0, 1] already: the processor's resize and crop, no rescale.
        shown = processor(images=rgb, do_rescale=False, do_normalize=False, return_tensors="pt")
        given = processor(images=rgb, do_rescale=False, return_tensors="pt")
        return images(given), images(shown).clamp(0, 1)

    probabilities = "sigmoid" if getattr(model, "logit_bias", None) is not None else "softmax"
    image_text = hasattr(model, "get_text_features")
    return LoadedModel(model, preprocess, tokenizer, image_text, probabilities)


def load_open_clip(name: str) -> LoadedModel:
    """``open_clip:NAME[@TAG_OR_FILE]``: the model, its evaluation transform and tokenizer.

    Raises:
        ValueError: a one-line reason, when open_clip is missing or cannot build it.
    """
    try:
        import open_clip
    except ImportError as error:
        raise ValueError(
            "an open_clip model needs open_clip: pip install 'captum-daam[clip]'"
        ) from error
    architecture, _, pretrained = name[len(OPEN_CLIP_PREFIX):].partition("@")
    if architecture not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip model {architecture!r}: expected one of open_clip.list_models(), "
            f"e.g. open_clip:ViT-B-32"
        )
    try:
        model, _, transform = open_clip.create_model_and_transforms(
            architecture, pretrained=pretrained or None
        )
    except Exception as error:  # open_clip raises many kinds for a missing or wrong checkpoint
        raise ValueError(
            f"could not build open_clip model {architecture} with pretrained={pretrained!r}: "
            f"{_first_line(error)}"
        ) from error
    try:
        tokenizer = open_clip.get_tokenizer(architecture)
    except Exception as error:  # a tokenizer from the Hub, offline
        raise ValueError(
            f"could not load the tokenizer of open_clip model {architecture}: "
            f"{_first_line(error)}"
        ) from error
    steps = list(transform.transforms)
    normalize = steps.pop() if type(steps[-1]).__name__ == "Normalize" else None

    def preprocess(rgb: Tensor) -> Tuple[Tensor, Tensor]:
        from torchvision.transforms.functional import to_pil_image

        picture = to_pil_image(rgb.clamp(0, 1))
        for step in steps:
            picture = step(picture)
        shown = picture.clamp(0, 1)
        return (normalize(shown) if normalize is not None else shown), shown

    probabilities = "sigmoid" if getattr(model, "logit_bias", None) is not None else "softmax"
    return LoadedModel(model, preprocess, tokenizer, True, probabilities)


def text_probabilities(logits: Tensor, kind: str) -> Tensor:
    """(T,) logits of one image as probabilities: a softmax over the texts (CLIP), or each
    text's sigmoid (SigLIP, trained with a sigmoid loss)."""
    return torch.sigmoid(logits) if kind == "sigmoid" else logits.softmax(-1)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0].strip() if text else type(error).__name__
