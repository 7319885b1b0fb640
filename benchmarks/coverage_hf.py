"""Census of Hugging Face transformers' vision models and open_clip's model configs: which DAAM
explains exactly, which it refuses and why (benchmarks/coverage.py is timm's).

transformers: every class of the installed version's auto mappings for image classification,
image features (``MODEL_FOR_IMAGE_MAPPING_NAMES``, and the ``MODEL_MAPPING_NAMES`` entries whose
config is a vision config, the vision encoders of multimodal models among them) and backbones,
the image-text models (zero-shot image classification, and the other dual encoders with image
and text features) and their vision towers (``CLIPVisionModel``, ``SiglipVisionModel``, ...),
and the heads of the other vision tasks (video classification, detection, segmentation, depth,
masked image modelling, ...), which DAAM should refuse with their true reason. Each class is
built with random weights from a small config: its config class's defaults with the widths,
depths, heads, windows and image size shrunk wherever the config has them (``SMALL``, the
sub-configs likewise), or from the default config where the small one cannot be built or its
forward pass fails on an image (the record's ``config_errors`` say why); nothing is downloaded
(``HF_HUB_OFFLINE``).

open_clip: every ``open_clip.list_models()`` name, built as ``open_clip.create_model(name,
pretrained=None)`` (random weights, full size).

Every model is built on the meta device first (no memory, no weights) to count its parameters
(up to ``--max-params``) and to ask the adapters, which refuse a model in their constructor,
before any work: a model no adapter takes is recorded as refused with the refusal's first two
sentences (whether it has attention at all), as the timm census does. The others are explained
for one random image at the config's image size with DAAM's defaults; an image-text model
through ``ImageTextSimilarity(model, input_ids=random ids)`` (three random texts). The checks,
the tolerance and the outcomes are the timm census's (benchmarks/coverage.py: exact, runs,
refused, crashed, not built). The output the checks compare with is read where it enters the
attention module's output projection (``o_proj``, ``out_proj``, ``output.dense``,
``output_proj``, open_clip's ``ln_inner``, timm's layouts) and, in ``nn.MultiheadAttention``,
which applies ``out_proj`` inside ``F.multi_head_attention_forward``, by running that function
with an identity projection and applying the module's own projection to what it returns.

    python benchmarks/coverage_hf.py --threads 1                 # everything, up to 700M
    python benchmarks/coverage_hf.py --names 'ViT*' 'open_clip:ViT-B-32' --out /tmp/some
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: a download fails at once
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import fnmatch  # noqa: E402
import inspect  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple  # noqa: E402

import open_clip  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from transformers.models.auto import modeling_auto  # noqa: E402

from captum_daam import ImageTextSimilarity  # noqa: E402
from captum_daam.adapters import adapter_for  # noqa: E402
from captum_daam.adapters.verify import output_projection_input  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _census, beside this file
from _census import (  # noqa: E402
    checked,
    first_sentence,
    noise_zero_weights,
    projection_input_hooks,
    run_census,
)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
OPEN_CLIP = "open_clip:"

#: The auto mappings listed, in order (a class listed by several keeps the first task).
MAPPINGS = (
    ("image classification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
    ("image features", "MODEL_FOR_IMAGE_MAPPING_NAMES"),
    ("backbone", "MODEL_FOR_BACKBONE_MAPPING_NAMES"),
    ("image-text", "MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
)
#: The other vision tasks' heads: listed to see that DAAM refuses them with a true reason.
OTHER_TASKS = (
    ("video classification", "MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES"),
    ("object detection", "MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES"),
    ("zero-shot object detection", "MODEL_FOR_ZERO_SHOT_OBJECT_DETECTION_MAPPING_NAMES"),
    ("semantic segmentation", "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES"),
    ("instance segmentation", "MODEL_FOR_INSTANCE_SEGMENTATION_MAPPING_NAMES"),
    ("universal segmentation", "MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES"),
    ("image segmentation", "MODEL_FOR_IMAGE_SEGMENTATION_MAPPING_NAMES"),
    ("masked image modeling", "MODEL_FOR_MASKED_IMAGE_MODELING_MAPPING_NAMES"),
    ("depth estimation", "MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES"),
    ("normal estimation", "MODEL_FOR_NORMAL_ESTIMATION_MAPPING_NAMES"),
    ("keypoint detection", "MODEL_FOR_KEYPOINT_DETECTION_MAPPING_NAMES"),
    ("pose estimation", "MODEL_FOR_POSE_ESTIMATION_MAPPING_NAMES"),
    ("mask generation", "MODEL_FOR_MASK_GENERATION_MAPPING_NAMES"),
    ("image matting", "MODEL_FOR_IMAGE_MATTING_MAPPING_NAMES"),
    ("image-to-image", "MODEL_FOR_IMAGE_TO_IMAGE_MAPPING_NAMES"),
    ("causal image modeling", "MODEL_FOR_CAUSAL_IMAGE_MODELING_MAPPING_NAMES"),
)
#: Generative multimodal models: not vision models, though their configs hold a vision one.
GENERATIVE = (
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
)
TOWER_SUFFIXES = ("VisionModel", "VisionModelWithProjection")

#: The small config: these values wherever the config class takes the parameter with a larger
#: int default (image_size: an int or a pair).
SMALL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_layers": 2,
    "num_attention_heads": 2,
    "num_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "projection_dim": 32,
    "d_model": 32,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "num_queries": 10,
    "num_global_layers": 1,
    "num_frames": 2,
    "window_size": 2,
    "image_size": 64,
}
#: Parameters that, as lists, give each stage's depth / heads / width (hierarchical models).
DEPTH_LISTS = ("depths",)
HEAD_LISTS = ("num_heads", "num_attention_heads")
WIDTH_LISTS = ("hidden_sizes", "embed_dims")
SMALL_HEAD_WIDTH = 16
SMALL_IMAGE = 64  # without an image size in the config: the small config's images
DEFAULT_IMAGE = 224  # and the default config's
TEXTS, TEXT_LENGTH = 3, 8


# --------------------------------------------------------------------------- the classes


def _mapping(name: str) -> Dict[str, Any]:
    return getattr(modeling_auto, name, {})


def _class_names(value: Any) -> Tuple[str, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _config_class(model_type: str) -> Optional[type]:
    try:
        return transformers.CONFIG_MAPPING[model_type]
    except (KeyError, ValueError, ImportError, AttributeError):
        return None


def _sub_configs(config_class: type) -> Dict[str, type]:
    return dict(getattr(config_class, "sub_configs", None) or {})


def _is_vision_config(config_class: Optional[type]) -> bool:
    """A config of images alone: an image size or channels, no vocabulary, no sub-configs."""
    if config_class is None or _sub_configs(config_class):
        return False
    parameters = inspect.signature(config_class).parameters
    return ("image_size" in parameters or "num_channels" in parameters) and (
        "vocab_size" not in parameters)


def _is_image_text(model_type: str, class_name: str) -> bool:
    """A dual encoder: vision and text sub-configs, image and text features."""
    subs = _sub_configs(_config_class(model_type) or object)
    if not {"vision_config", "text_config"} <= set(subs):
        return False
    model_class = getattr(transformers, class_name, None)
    return model_class is not None and all(
        hasattr(model_class, name) for name in ("get_image_features", "get_text_features"))


def transformers_classes() -> List[Tuple[str, str, str]]:
    """(class name, model type, task) of every vision model class listed (module docstring)."""
    entries: Dict[str, Tuple[str, str, str]] = {}

    def add(class_name: str, model_type: str, task: str) -> None:
        entries.setdefault(class_name, (class_name, model_type, task))

    generative = {key for name in GENERATIVE for key in _mapping(name)}
    image_text: List[Tuple[str, str]] = []
    for task, name in MAPPINGS:
        for model_type, value in _mapping(name).items():
            for class_name in _class_names(value):
                add(class_name, model_type, task)
                if task == "image-text":
                    image_text.append((class_name, model_type))
    for model_type, value in modeling_auto.MODEL_MAPPING_NAMES.items():
        class_name = _class_names(value)[0]
        if _is_vision_config(_config_class(model_type)):
            add(class_name, model_type, "image features")
        elif model_type not in generative and _is_image_text(model_type, class_name):
            add(class_name, model_type, "image-text")
            image_text.append((class_name, model_type))
    for class_name, model_type in image_text:  # their vision towers, from their modules
        module = sys.modules.get(getattr(getattr(transformers, class_name, None),
                                         "__module__", ""))
        for tower in getattr(module, "__all__", ()):
            if tower.endswith(TOWER_SUFFIXES):
                add(tower, model_type, "vision tower")
    for task, name in OTHER_TASKS:
        for model_type, value in _mapping(name).items():
            for class_name in _class_names(value):
                add(class_name, model_type, task)
    return list(entries.values())


# --------------------------------------------------------------------------- small configs


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _smaller_image(value: Any) -> Any:
    if _is_int(value) and value > SMALL_IMAGE:
        return SMALL_IMAGE
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_int, value)):
        return type(value)(min(side, SMALL_IMAGE) for side in value)
    return None


def small_kwargs(config_class: type) -> Dict[str, Any]:
    """The parameters that shrink ``config_class``'s defaults (the module docstring)."""
    default = config_class()
    defaults = default.to_dict()
    parameters = inspect.signature(config_class).parameters
    kwargs: Dict[str, Any] = {}
    for key, small in SMALL.items():
        value = defaults.get(key)
        if key not in parameters:
            continue
        if key == "image_size":
            smaller = _smaller_image(value)
            if smaller is not None:
                kwargs[key] = smaller
        elif _is_int(value) and value > small:
            kwargs[key] = small
    patch = defaults.get("patch_size")
    if "patch_size" in parameters and "image_size" in kwargs and _is_int(patch) and patch > 8:
        kwargs["patch_size"] = 16  # a 4 x 4 grid of the small image
    for key in DEPTH_LISTS:
        if key in parameters and isinstance(defaults.get(key), list):
            kwargs[key] = [1] * len(defaults[key])
    heads = next((defaults[key] for key in HEAD_LISTS
                  if key in parameters and isinstance(defaults.get(key), list)
                  and defaults[key] and all(map(_is_int, defaults[key]))), None)
    if heads is not None:  # each stage's heads relative to the first's, SMALL_HEAD_WIDTH wide
        fewer = [max(1, count // heads[0]) for count in heads]
        for key in HEAD_LISTS:
            if isinstance(defaults.get(key), list) and key in parameters:
                kwargs[key] = fewer
        for key in WIDTH_LISTS:
            if key in parameters and isinstance(defaults.get(key), list) and (
                    len(defaults[key]) == len(fewer)):
                kwargs[key] = [SMALL_HEAD_WIDTH * count for count in fewer]
        if "embed_dim" in parameters and _is_int(defaults.get("embed_dim")):
            kwargs["embed_dim"] = SMALL_HEAD_WIDTH * fewer[0]
    if "use_pretrained_backbone" in parameters:
        kwargs["use_pretrained_backbone"] = False
    for key, sub_class in _sub_configs(config_class).items():
        sub_config = getattr(default, key, None)  # the default's own, as the parent set it
        given: Dict[str, Any] = {}
        if isinstance(sub_config, transformers.PretrainedConfig):
            sub_class = type(sub_config)
            own = inspect.signature(sub_class).parameters
            try:
                plain = sub_class().to_dict()
            except Exception:  # noqa: BLE001 - a sub-config without defaults keeps its own
                continue
            given = {name: value for name, value in sub_config.to_dict().items()
                     if name in own and value != plain.get(name)}
            given["model_type"] = sub_config.model_type
        if key not in parameters or sub_class is transformers.AutoConfig:
            continue
        try:
            kwargs[key] = {**given, **small_kwargs(sub_class)}
        except Exception:  # noqa: BLE001
            continue
    return kwargs


def default_config(config_class: type) -> Any:
    parameters = inspect.signature(config_class).parameters
    if "use_pretrained_backbone" in parameters:  # never a download
        return config_class(use_pretrained_backbone=False)
    return config_class()


def _pair_size(value: Any) -> Optional[Tuple[int, int]]:
    if _is_int(value):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_int, value)):
        return tuple(value)
    if isinstance(value, dict) and {"height", "width"} <= set(value):
        return value["height"], value["width"]
    return None


def image_shape(config: Any, small: bool) -> Tuple[int, int, int]:
    """(channels, height, width) of the config's images (its vision config's)."""
    for holder in (getattr(config, "vision_config", None), config):
        size = _pair_size(getattr(holder, "image_size", None))
        if size is not None:
            return getattr(holder, "num_channels", 3) or 3, size[0], size[1]
    side = SMALL_IMAGE if small else DEFAULT_IMAGE
    return getattr(config, "num_channels", 3) or 3, side, side


def random_input_ids(vocabulary: int, length: int) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(1, max(2, min(vocabulary, 1000)), (TEXTS, length), generator=generator)


def text_vocabulary(config: Any) -> int:
    return int(getattr(getattr(config, "text_config", None), "vocab_size", None) or 1000)


# --------------------------------------------------------------------------- the checks' reading


def projection_input(attention: nn.Module) -> nn.Module:
    """The module whose input is ``attention``'s output before its projection: timm's layouts
    (:func:`~captum_daam.adapters.verify.output_projection_input`), else open_clip's
    ``ln_inner`` (an identity unless scale_attn_inner, before ``out_proj``), transformers'
    ``o_proj`` / ``out_proj``, a BERT-style ``output.dense`` (Swin, PVT, Data2Vec-Vision) or
    AIMv2's head ``output_proj``."""
    try:
        return output_projection_input(attention)
    except LookupError:
        pass
    for path in ("ln_inner", "o_proj", "out_proj", "output.dense", "output_proj"):
        try:
            return attention.get_submodule(path)
        except AttributeError:
            continue
    raise LookupError(f"{type(attention).__name__} has no known output projection")


class _MultiheadProjectionInputs(TorchFunctionMode):
    """Reads the head-concatenated output of each ``nn.MultiheadAttention`` before its
    ``out_proj``, which ``F.multi_head_attention_forward`` applies inside (no module boundary):
    the call runs with an identity output projection (exact: each output is one input times
    1), its output, (tgt, B, C), is read as the records' (B, tgt, C) rows, and the module's own
    projection is applied to them as the function applies it (the same ``F.linear`` on the same
    (tgt * B, C) rows), so the module's output is unchanged and autograd's gradient at the rows
    read is the gradient at the projection's input."""

    def __init__(self, modules: Sequence[nn.MultiheadAttention], own: List[Tensor]) -> None:
        super().__init__()
        self.weights = {id(module.out_proj.weight) for module in modules}
        self.own = own

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.multi_head_attention_forward:
            return func(*args, **kwargs)
        call = _MHA_SIGNATURE.bind(*args, **kwargs)
        weight, bias = call.arguments["out_proj_weight"], call.arguments["out_proj_bias"]
        if id(weight) not in self.weights or call.arguments["query"].dim() != 3:
            return func(*args, **kwargs)
        call.arguments["out_proj_weight"] = torch.eye(
            weight.shape[0], dtype=weight.dtype, device=weight.device)
        call.arguments["out_proj_bias"] = None
        heads_output, attention_weights = func(*call.args, **call.kwargs)
        rows = heads_output.transpose(0, 1)  # (B, tgt, C)
        self.own.append(rows)
        queries, batch, channels = heads_output.shape
        projected = F.linear(rows.transpose(0, 1).reshape(queries * batch, channels), weight, bias)
        return projected.view(queries, batch, -1), attention_weights


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


@contextmanager
def read_projection_inputs(
    attentions: Sequence[nn.Module], own: List[Tensor]
) -> Iterator[Set[int]]:
    """The reading of check (1): pre-hooks on :func:`projection_input`'s module, and for
    ``nn.MultiheadAttention`` the input of its functional output projection (the adapter's
    anchor there is the projected output, so not consulted)."""
    multihead = [module for module in attentions if isinstance(module, nn.MultiheadAttention)]
    others = [module for module in attentions if not isinstance(module, nn.MultiheadAttention)]
    with projection_input_hooks(others, own, projection_input), \
            _MultiheadProjectionInputs(multihead, own):
        yield {index for index, module in enumerate(attentions)
               if isinstance(module, nn.MultiheadAttention)}


# --------------------------------------------------------------------------- one model


def _where(error: BaseException) -> str:
    """The file of the innermost frame that raised ``error``, from its package on."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    path = frames[-1].filename
    for root in ("site-packages" + os.sep, REPOSITORY):
        if root in path:
            return path.split(root, 1)[1]
    return os.path.basename(path)


def _count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def _on_meta(build: Callable[[], nn.Module]) -> Optional[nn.Module]:
    """The model built on the meta device (no memory, no weights), or None where it cannot be
    (then counted once built)."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return build()
    except Exception:  # noqa: BLE001
        return None


def _refusal(skeleton: nn.Module) -> Optional[Dict[str, object]]:
    """The refusal of every adapter, which refuse a model in their constructor before any
    work (so on the meta device, as the timm census does): its first two sentences say
    whether the model has attention at all; None where an adapter takes the model."""
    try:
        adapter_for(skeleton)
    except TypeError as error:
        return {"status": "refused", "reason": first_sentence(error, 2),
                "raised_in": _where(error)}
    except Exception:  # noqa: BLE001 - the check with weights tells what it is
        return None
    return None


def _explained(model: nn.Module, image_text: bool, vocabulary: int, length: int) -> nn.Module:
    if not image_text:
        return model
    return ImageTextSimilarity(model, input_ids=random_input_ids(vocabulary, length))


def _forward_error(module: Callable[[], nn.Module], images: Tensor) -> Optional[str]:
    """None where the model runs on ``images``, else its error's first line."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module()(images)
        return None
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {first_sentence(error)}"


def census_transformers(
    entry: Tuple[str, str, str],
    max_params: float,
    tolerance: float,
    before_building: Callable[[Dict[str, object]], None],
) -> Dict[str, object]:
    """The record of one transformers class: built from the small config where it builds and
    runs on an image, else from the default config, then checked."""
    class_name, model_type, task = entry
    record: Dict[str, object] = {"name": class_name, "family": model_type, "task": task}
    started = time.perf_counter()
    try:
        model_class = getattr(transformers, class_name)
        config_class = model_class.config_class
    except Exception as error:  # noqa: BLE001 - a census records every failure
        return dict(record, status="not built", reason=f"transformers cannot import it: "
                    f"{type(error).__name__}: {first_sentence(error)}")
    image_text = task == "image-text"
    attempts: List[str] = []
    candidates: List[Tuple[str, nn.Module, Tuple[int, int, int], Optional[str]]] = []
    for label in ("small", "default"):
        try:
            if label == "small":
                config = config_class(**small_kwargs(config_class))
            else:
                config = default_config(config_class)
        except Exception as error:  # noqa: BLE001
            attempts.append(f"{label} config: {type(error).__name__}: {first_sentence(error)}")
            continue
        skeleton = _on_meta(lambda: model_class(config))
        params = None if skeleton is None else _count(skeleton)
        if params is not None and params > max_params:
            attempts.append(f"{label} config: {params / 1e6:.0f}M parameters, above this "
                            f"census's {max_params / 1e6:.0f}M")
            record.setdefault("params", params)
            continue
        refusal = None if skeleton is None or candidates else _refusal(skeleton)
        del skeleton
        if refusal is not None:
            if attempts:
                record["config_errors"] = attempts
            return dict(record, config=label, params=params, **refusal,
                        seconds=round(time.perf_counter() - started, 1))
        if not candidates:
            before_building(dict(record, params=params))
        try:
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = model_class(config).eval()
        except Exception as error:  # noqa: BLE001
            attempts.append(f"{label} config: {type(error).__name__}: {first_sentence(error)}")
            continue
        shape = image_shape(config, label == "small")
        images = torch.rand(1, *shape, generator=torch.Generator().manual_seed(0))
        vocabulary = text_vocabulary(config)
        failure = _forward_error(
            lambda: _explained(model, image_text, vocabulary, TEXT_LENGTH), images)
        candidates.append((label, model, shape, failure))
        if failure is None:
            break
        attempts.append(f"{label} config: the model's forward pass: {failure}")
    if not candidates:
        return dict(record, status="not built", reason="; ".join(attempts))
    label, model, shape, failure = next(
        (candidate for candidate in candidates if candidate[3] is None), candidates[0])
    record.update(config=label, params=_count(model), input_size=list(shape[1:]))
    if attempts:  # why not the small config, or why the model fails on its own
        record["config_errors"] = attempts
    del candidates

    def prepare() -> Tuple[nn.Module, Tensor]:
        record["zero_weights_noised"] = noise_zero_weights(model)
        explained = _explained(model, image_text, text_vocabulary(model.config), TEXT_LENGTH)
        images = torch.rand(1, *shape, generator=torch.Generator().manual_seed(0))
        return explained, images

    return checked(record, prepare, tolerance, read_projection_inputs, started, _where)


def census_open_clip(
    name: str,
    max_params: float,
    tolerance: float,
    before_building: Callable[[Dict[str, object]], None],
) -> Dict[str, object]:
    """The record of one open_clip config, built at full size with random weights."""
    record: Dict[str, object] = {"name": OPEN_CLIP + name, "task": "image-text"}
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            skeleton = open_clip.create_model(name, pretrained=None, device="meta")
    except Exception as error:  # noqa: BLE001
        return dict(record, family="open_clip", status="not built",
                    reason=f"open_clip cannot build it: {type(error).__name__}: "
                    f"{first_sentence(error)}")
    visual = skeleton.visual
    trunk = getattr(visual, "trunk", None)
    record["family"] = "open_clip " + type(visual).__name__ + (
        f" ({type(trunk).__name__})" if trunk is not None else "")
    record["params"] = _count(skeleton)
    if record["params"] > max_params:
        return dict(record, status="not built", reason=f"{record['params'] / 1e6:.0f}M "
                    f"parameters, above this census's {max_params / 1e6:.0f}M")
    refusal = _refusal(skeleton)
    if refusal is not None:
        return dict(record, **refusal)
    size = _pair_size(getattr(visual, "image_size", None)) or (DEFAULT_IMAGE, DEFAULT_IMAGE)
    record["input_size"] = list(size)
    vocabulary = int(getattr(skeleton, "vocab_size", None) or 1000)
    length = int(getattr(skeleton, "context_length", None) or 77)
    del skeleton, visual, trunk
    before_building(record)
    started = time.perf_counter()

    def prepare() -> Tuple[nn.Module, Tensor]:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = open_clip.create_model(name, pretrained=None).eval()
        record["zero_weights_noised"] = noise_zero_weights(model)
        images = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
        return ImageTextSimilarity(model, input_ids=random_input_ids(vocabulary, length)), images

    return checked(record, prepare, tolerance, read_projection_inputs, started, _where)


# --------------------------------------------------------------------------- the summary

STATUSES = ("exact", "runs", "refused", "crashed", "not built")
NO_ADAPTER = "DAAM has no adapter"


#: What a refusal's message says, by a phrase of it: the summary's groups.
REFUSAL_KINDS = (
    ("It has no attention module", "no adapter: no attention module (convolutional or MLP)"),
    ("mix no tokens", "no adapter: attention that mixes no tokens"),
    ("are of no supported family", "no adapter: attention modules of no supported family"),
    ("It is a detection model", "no adapter: a detection model"),
    ("It is a video model", "no adapter: a video model"),
    ("Expected the model to return class scores", "output: neither class scores nor features"),
    ("add_pooling_layer=False", "output: token features only (built without a pooler)"),
    ("Expected one Vision Transformer inside", "several Vision Transformers inside"),
    ("Expected an image-text model", "ImageTextSimilarity: not an image-text model"),
)


def refusal_kind(reason: str) -> str:
    """The summary's group of a refusal: :data:`REFUSAL_KINDS`, else its reason."""
    return next((kind for phrase, kind in REFUSAL_KINDS if phrase in reason), reason)


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def summary(records: List[Dict[str, object]], settings: Dict[str, object]) -> str:
    counts = Counter(record["status"] for record in records)
    lines = [
        f"transformers {settings['transformers']}, open_clip {settings['open_clip']}, torch "
        f"{settings['torch']}, CPU; random weights, batch 1, one image at the config's image "
        f"size. transformers classes from a small config (or their default config where the "
        f"small one fails to build or to run on an image: the config column), open_clip models "
        f"at full size, up to the parameter limit of the run that checked them (the latest "
        f"run's: {settings['max_params'] / 1e6:.0f}M); image-text models through "
        f"ImageTextSimilarity with {TEXTS} random texts. Checks and tolerance "
        f"({settings['tolerance']:.0e}) are the timm census's (coverage.md); refusals for want "
        f"of an adapter are the adapters' own, on the meta device, before any work.",
        "",
        f"{len(records)} models: " + ", ".join(f"{counts[status]} {status}"
                                              for status in STATUSES),
        "",
        _row(("family", "models", "tasks", *STATUSES, "queries")),
        _row(["---"] * (4 + len(STATUSES))),
    ]
    by_family: Dict[str, List[Dict[str, object]]] = defaultdict(list)
    for record in records:
        by_family[str(record.get("family", "?"))].append(record)
    for family in sorted(by_family, key=lambda name: (-len(by_family[name]), name)):
        group = by_family[family]
        family_counts = Counter(record["status"] for record in group)
        tasks = sorted({str(record.get("task", "")) for record in group})
        queries = sorted({record["queries"] for record in group if "queries" in record})
        lines.append(_row((family, len(group), ", ".join(tasks),
                           *(family_counts[status] for status in STATUSES),
                           ", ".join(queries) or "-")))
    kinds: Dict[str, List[str]] = defaultdict(list)
    for record in records:
        if record["status"] == "refused":
            kinds[refusal_kind(str(record["reason"]))].append(str(record["name"]))
    lines += ["", "Refused, by reason:", ""]
    for kind in sorted(kinds, key=lambda name: (-len(kinds[name]), name)):
        lines.append(f"- {kind} ({len(kinds[kind])}): {', '.join(kinds[kind])}")
    lines += ["", "Not exact and not refused, and why:", ""]
    for record in records:
        if record["status"] in ("runs", "crashed", "not built"):
            lines.append(f"- {record['name']} ({record.get('family')}, {record.get('task')}): "
                         f"{record['status']}: {record.get('reason', '')}")
    lines += ["", "Every model checked:", "",
              _row(("model", "task", "status", "config", "input", "blocks", "grids", "queries",
                    "blocks with a positive map", "decomposition error", "map error",
                    "seconds")),
              _row(["---"] * 12)]
    for record in records:
        if "blocks" not in record and record["status"] not in ("runs", "crashed"):
            continue
        grids = " ".join(f"{grid[0]}x{grid[1]}" for grid in record.get("grids", []))
        errors = [f"{record[key]:.1e}" if key in record else "" for key in
                  ("decomposition_error", "map_error")]
        head = " + attention pool" if record.get("attention_pool_head") else ""
        size = "x".join(str(side) for side in record.get("input_size", []))
        lines.append(_row((
            record["name"], record.get("task", ""), record["status"],
            record.get("config", "full"), size, f"{record.get('blocks', '')}{head}", grids,
            record.get("queries", ""), record.get("blocks_with_positive_map", ""), *errors,
            record.get("seconds", ""))))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--names", nargs="*", default=["*"],
                        help="fnmatch patterns of transformers class names and open_clip names "
                        f"(prefixed {OPEN_CLIP!r}); default: every one")
    parser.add_argument("--max-params", type=float, default=700e6,
                        help="build models up to this many parameters (default 700e6)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest relative error of an exact model (default 1e-4)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch CPU threads")
    parser.add_argument("--out", default=os.path.join(RESULTS, "coverage_hf"),
                        help="path prefix of the .json and .md results")
    parser.add_argument("--recheck", action="store_true",
                        help="check the named models again even where --out has them")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    transformers.logging.set_verbosity_error()
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "initialized randomly"
    entries = {entry[0]: entry for entry in transformers_classes()}
    every_name = list(entries) + [OPEN_CLIP + name for name in open_clip.list_models()]
    names = [name for name in every_name
             if any(fnmatch.fnmatch(name, pattern) for pattern in args.names)]
    settings = {"max_params": args.max_params, "tolerance": args.tolerance,
                "threads": args.threads, "transformers": transformers.__version__,
                "open_clip": open_clip.__version__, "torch": torch.__version__}

    def census_one(name: str, before: Callable[[Dict[str, object]], None]) -> Dict[str, object]:
        if name.startswith(OPEN_CLIP):
            return census_open_clip(name[len(OPEN_CLIP):], args.max_params, args.tolerance,
                                    before)
        return census_transformers(entries[name], args.max_params, args.tolerance, before)

    return run_census(every_name, names, census_one, args.out, settings, args.recheck, summary)


if __name__ == "__main__":
    sys.exit(main())
