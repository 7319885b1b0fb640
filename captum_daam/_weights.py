"""Model weights for the command line: local checkpoints, and timm's pretrained weights without
waiting on a network that is not there.

timm 1.0 takes most pretrained weights from the Hugging Face Hub, through
``huggingface_hub.hf_hub_download``. Without a network, every file it tries (model.safetensors,
then pytorch_model.bin) is retried five times with back-off (1 + 2 + 4 + 8 + 8 s), so a missing
network costs about 50 s before any message. ``HF_HUB_ETAG_TIMEOUT`` and
``HF_HUB_DOWNLOAD_TIMEOUT`` bound each request, not the retries; ``HF_HUB_OFFLINE=1`` fails at
once but also stops an online user's download. So :func:`pretrained_model`:

1. loads weights already in the local cache from there, with no network access at all: the
   Hub cache, looked up with ``huggingface_hub.try_to_load_from_cache`` for the files timm
   would fetch, or torch's hub folder for weights timm takes from a URL;
2. otherwise, when ``HF_HUB_OFFLINE`` is set, fails at once;
3. otherwise opens one TCP connection to the weights' host (or to the proxy that reaches it),
   for at most :data:`PROBE_TIMEOUT_S` seconds: if that fails it fails at once, and if it
   succeeds timm downloads the weights as usual.
"""

import os
import re
import socket
import sys
import threading
import urllib.request
import warnings
import zipfile
from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple
from urllib.parse import urlparse

import torch
from torch import nn

__all__ = ["PROBE_TIMEOUT_S", "fit_checkpoint", "pretrained_model", "read_checkpoint"]

#: Longest wait, in seconds, for a connection to the host of the pretrained weights.
PROBE_TIMEOUT_S = 3.0

CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".tar", ".ckpt", ".npz")

_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;]*m")

# timm 1.0's load_state_dict_from_hf: a .bin file is first looked for as safetensors.
_SAFE_ALTERNATIVES = {
    "pytorch_model.bin": "model.safetensors",
    "open_clip_pytorch_model.bin": "open_clip_model.safetensors",
}


# ----------------------------------------------------------------- local checkpoints


def read_checkpoint(path: Path) -> Mapping[str, Any]:
    """The state dict in a checkpoint file, read without running code from it.

    safetensors files are read as they are; other files with ``torch.load(weights_only=True)``
    (through timm's ``load_state_dict``, which also unwraps a training checkpoint's
    ``state_dict``, ``model`` or EMA weights and strips DDP prefixes).

    Raises:
        ValueError: with a one-line reason: not a checkpoint, a whole pickled model rather
            than its state dict, or Python objects that a weights-only load refuses.
    """
    from timm.models import load_state_dict

    try:
        with warnings.catch_warnings():
            # the one-line reason below says it all; torch's warnings about the file would
            # come before it as lines of their own
            warnings.simplefilter("ignore")
            state_dict = load_state_dict(str(path))
    except Exception as error:  # torch.load and safetensors fail in many ways on a wrong file
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raise _unreadable(path, error) from error
    if not isinstance(state_dict, Mapping) or not all(
        isinstance(name, str) and isinstance(value, torch.Tensor)
        for name, value in state_dict.items()
    ):
        raise ValueError(
            f"checkpoint {path} holds a {type(state_dict).__name__} that is not a state dict: "
            f"expected parameter names mapped to tensors, as torch.save(model.state_dict(), "
            f"path) writes"
        )
    return state_dict


def fit_checkpoint(model: nn.Module, state_dict: Mapping[str, Any], path: Path, arch: str) -> None:
    """Load ``state_dict`` into ``model`` (strictly), or say in one line why it does not fit."""
    expected = model.state_dict()
    missing = [name for name in expected if name not in state_dict]
    unexpected = [name for name in state_dict if name not in expected]
    mismatched = [
        f"{name} is {tuple(state_dict[name].shape)} in the file, {tuple(value.shape)} in the model"
        for name, value in expected.items()
        if name in state_dict and tuple(state_dict[name].shape) != tuple(value.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} parameters missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if mismatched:
        problems.append(f"{len(mismatched)} of another shape (e.g. {mismatched[0]})")
    if problems:
        raise ValueError(
            f"checkpoint {path} does not fit the {arch} architecture: {'; '.join(problems)}. "
            f"Give its timm architecture with --arch NAME"
        )
    model.load_state_dict(state_dict, strict=True)


def _unreadable(path: Path, error: BaseException) -> ValueError:
    unsafe = _unsafe_globals(path)
    modules = [name for name in unsafe if _names_a_module_class(name)]
    if modules:
        own = sorted(name for name in modules if not name.startswith("torch.nn.")) or modules
        return ValueError(
            f"checkpoint {path} is a whole pickled model, saved with torch.save(model) (it "
            f"holds nn.Module classes such as {own[0]}), not a state dict: loading it would run "
            f"code from the file, "
            f"so captum-daam does not. Save its weights instead, with "
            f"torch.save(model.state_dict(), 'weights.pth') or "
            f"safetensors.torch.save_file(model.state_dict(), 'weights.safetensors'), and name "
            f"the architecture with --arch"
        )
    if unsafe:
        return ValueError(
            f"checkpoint {path} holds Python objects besides weights ({', '.join(unsafe[:3])}), "
            f"which a safe load (torch.load with weights_only=True) refuses: save "
            f"model.state_dict() alone, with torch.save or safetensors"
        )
    if path.suffix == ".safetensors":
        return ValueError(
            f"checkpoint {path} is not a valid safetensors file ({_first_line(error)})"
        )
    if not zipfile.is_zipfile(path) and not _starts_like_a_pickle(path):
        return ValueError(
            f"checkpoint {path} is not a PyTorch checkpoint: expected a state dict saved with "
            f"torch.save (a zip archive, or a pickle) or safetensors, got a file of another kind"
        )
    return ValueError(
        f"checkpoint {path} could not be read as a PyTorch checkpoint: expected a state dict "
        f"saved with torch.save or safetensors ({type(error).__name__}: {_first_line(error)})"
    )


def _starts_like_a_pickle(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(1) == b"\x80"  # the PROTO opcode that starts pickles since protocol 2


def _unsafe_globals(path: Path) -> List[str]:
    """The Python classes and functions a pickled checkpoint refers to, beyond tensors."""
    if path.suffix == ".safetensors":
        return []
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # not a zip checkpoint: perhaps torch's legacy format, plain pickles
        return _pickled_globals(path) if _starts_like_a_pickle(path) else []


def _pickled_globals(path: Path) -> List[str]:
    """The classes and functions named by the pickles at the start of a file (torch's legacy
    format: a few small pickles, then the object), read opcode by opcode, nothing run."""
    import pickletools

    names: List[str] = []
    with open(path, "rb") as handle:
        for _ in range(8):  # torch's legacy format: magic, protocol, system info, the object
            strings: List[str] = []
            try:
                for opcode, argument, _ in pickletools.genops(handle):
                    if opcode.name == "GLOBAL":
                        names.append(str(argument).replace(" ", "."))
                    elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(argument, str):
                        strings.append(argument)
            except Exception:  # past the pickles (raw tensor data), or not a pickle
                break
    # what a legacy state dict itself refers to: tensors, their storages, an OrderedDict
    return [name for name in dict.fromkeys(names)
            if not re.fullmatch(r"torch\._utils\..*|torch\.\w*Storage|collections\.OrderedDict",
                                name)]


def _names_a_module_class(qualified_name: str) -> bool:
    # Looked up among the modules already imported: nothing is imported on the file's say-so.
    if qualified_name.startswith("torch.nn.modules."):
        return True
    module_name, _, attribute = qualified_name.rpartition(".")
    found = getattr(sys.modules.get(module_name), attribute, None)
    return isinstance(found, type) and issubclass(found, nn.Module)


# ----------------------------------------------------------------- timm pretrained weights


def pretrained_model(name: str) -> nn.Module:
    """``timm.create_model(name, pretrained=True)``, from the local cache when the weights are
    there, and failing within :data:`PROBE_TIMEOUT_S` seconds when they must be downloaded
    and the network or the host is not there.

    Raises:
        ValueError: with a complete one-line message saying why and what to do offline.
    """
    import timm
    from timm.models import get_pretrained_cfg

    architecture = name.split(".")[0]
    offline_hint = (
        f"Offline, explain with weights you have, a state dict saved with torch.save or "
        f"safetensors: --model FILE --arch {architecture}; or with the bundled model: "
        f"--model tiny-vit"
    )
    try:
        config = get_pretrained_cfg(name)
    except RuntimeError as error:  # a tag timm does not know, e.g. deit_small_patch16_224.xyz
        raise ValueError(f"timm has no pretrained weights named {name}: {error}") from error
    if config is None or not (config.hf_hub_id or config.url or config.file):
        raise ValueError(
            f"timm has no pretrained weights for {name}. Explain a checkpoint of your own: "
            f"--model FILE --arch {architecture}"
        )
    if config.file:  # the registry names a local file: nothing to download
        return timm.create_model(name, pretrained=True)

    url, cache, cached = _weights_location(config)
    if cached is not None:
        overlay = dict(file=cached, custom_load=config.custom_load)
        try:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
        except Exception as error:  # a damaged download in the cache
            raise ValueError(
                f"the cached weights of {name} ({cached}) could not be loaded: "
                f"{_first_line(error)}. Delete the file to download them again"
            ) from error

    host = urlparse(url).hostname
    where = "the Hugging Face Hub" if config.hf_hub_id else host
    if config.hf_hub_id and _hub_offline():
        raise ValueError(
            f"could not download the pretrained weights of {name}: HF_HUB_OFFLINE is set, so "
            f"the Hugging Face Hub is not asked, and they are not in the local cache "
            f"({cache}). Unset HF_HUB_OFFLINE to download them. {offline_hint}"
        )
    reason = _unreachable(url, PROBE_TIMEOUT_S)
    if reason is not None:
        raise ValueError(
            f"could not download the pretrained weights of {name}: {reason}, so there is no "
            f"network or {where} is unreachable from here, and they are not in the local cache "
            f"({cache}). {offline_hint}"
        )
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as error:  # the connection opened, the download failed anyway
        raise ValueError(
            f"could not download the pretrained weights of {name} from {where}: "
            f"{_first_line(error)}. {offline_hint}"
        ) from error


def _weights_location(config: Any) -> Tuple[str, str, Optional[str]]:
    """Where timm fetches ``config``'s weights from (a URL), the cache folder it keeps them
    in, and the cached file when it is already there."""
    if config.hf_hub_id:  # timm asks the Hub first (huggingface_hub is one of its dependencies)
        from huggingface_hub import constants, try_to_load_from_cache

        repo_id, _, revision = config.hf_hub_id.partition("@")
        for filename in _hub_filenames(config):
            found = try_to_load_from_cache(repo_id, filename, revision=revision or None)
            if isinstance(found, str):  # else None, or a marker that the file does not exist
                return constants.ENDPOINT, constants.HF_HUB_CACHE, found
        return constants.ENDPOINT, constants.HF_HUB_CACHE, None
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    cached = os.path.join(folder, os.path.basename(urlparse(config.url).path))
    return config.url, folder, cached if os.path.isfile(cached) else None


def _hub_filenames(config: Any) -> List[str]:
    """The files timm asks the Hub for, in its order: a safetensors twin first."""
    filename = config.hf_hub_filename or "pytorch_model.bin"
    if filename.endswith(".safetensors") or config.custom_load == "hf":
        return [filename]
    if filename in _SAFE_ALTERNATIVES:
        return [_SAFE_ALTERNATIVES[filename], filename]
    if filename.endswith(".bin"):
        return [filename[: -len(".bin")] + ".safetensors", filename]
    return [filename]


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def _unreachable(url: str, timeout: float) -> Optional[str]:
    """None when a TCP connection to ``url``'s host, or to the proxy that reaches it, opens
    within ``timeout`` seconds (name lookup included); else why not, in words."""
    parts = urlparse(url)
    host = parts.hostname or ""
    address = (host, parts.port or (443 if parts.scheme == "https" else 80))
    via = ""
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        address = (proxy_parts.hostname or "", proxy_parts.port or 8080)
        via = f" through the proxy {address[0]}:{address[1]}"
    outcome: dict = {}

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
            outcome["open"] = True
        except OSError as error:
            outcome["error"] = error

    # In a thread, so that a slow name lookup (which has no timeout of its own) is bounded too.
    probe = threading.Thread(target=connect, name="captum-daam network probe", daemon=True)
    probe.start()
    probe.join(timeout)
    if outcome.get("open"):
        return None
    if "error" in outcome:
        return f"{host}{via} cannot be reached ({_first_line(outcome['error'])})"
    return f"{host}{via} did not answer within {timeout:g} s"


def _first_line(error: BaseException) -> str:
    text = _TERMINAL_CODES.sub("", str(error)).strip()  # torch.load's message is in bold
    return text.splitlines()[0].strip() if text else type(error).__name__
