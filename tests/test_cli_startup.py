"""``captum-daam --help`` and ``--version`` without torch, and the package's lazy public API."""

import importlib.metadata
import json
import subprocess
import sys

import pytest

import captum_daam

HEAVY = ("torch", "timm", "matplotlib", "torchvision", "captum", "numpy", "PIL")


def _run_in_a_fresh_interpreter(code: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_do_not_import_torch(flag):
    report = _run_in_a_fresh_interpreter(
        "import contextlib, io, json, sys\n"
        "from captum_daam.cli import main\n"
        "printed = io.StringIO()\n"
        "with contextlib.redirect_stdout(printed):\n"
        "    try:\n"
        f"        main([{flag!r}])\n"
        "    except SystemExit as exit:\n"
        "        code = exit.code\n"
        "loaded = sorted(name for name in sys.modules if name.split('.')[0] in "
        f"{HEAVY!r})\n"
        "print(json.dumps({'code': code, 'printed': printed.getvalue(), 'loaded': loaded}))\n"
    )
    assert report["code"] == 0
    assert report["loaded"] == []
    if flag == "--version":
        assert report["printed"].strip() == (
            f"captum-daam {importlib.metadata.version('captum-daam')}"
        )
    else:
        assert all(command in report["printed"] for command in ("demo", "explain", "check"))


def test_importing_the_package_and_its_version_does_not_import_torch():
    report = _run_in_a_fresh_interpreter(
        "import json, sys\n"
        "import captum_daam\n"
        "version = captum_daam.__version__\n"
        "print(json.dumps({'version': version, 'torch': 'torch' in sys.modules}))\n"
    )
    assert report == {"version": importlib.metadata.version("captum-daam"), "torch": False}


def test_every_public_name_is_importable_and_listed():
    report = _run_in_a_fresh_interpreter(
        "import json\n"
        "import captum_daam\n"
        "from captum_daam import DAAM\n"
        "from captum_daam import *\n"
        "names = {name: type(getattr(captum_daam, name)).__name__ "
        "for name in captum_daam.__all__}\n"
        "print(json.dumps({'daam': DAAM.__module__, 'names': names, "
        "'listed': sorted(set(captum_daam.__all__) - set(dir(captum_daam)))}))\n"
    )
    assert report["daam"] == "captum_daam.attr.daam"
    assert set(report["names"]) == set(captum_daam.__all__)
    assert report["names"]["metrics"] == "module" and report["names"]["DAAM"] != "module"
    assert report["listed"] == []


def test_the_lazy_names_are_the_objects_of_their_modules():
    from captum_daam import (
        adapters, attr, comparison, dataset, decompose, image_text, ssl, token_grid, viewer)

    defined_in = {"DAAM": attr, "AttentionRollout": attr, "GradientRollout": attr, "LeGrad": attr,
                  "MemoryBank": ssl, "TokenGrid": token_grid, "GenericAdapter": adapters,
                  "ViTAdapter": adapters, "adapter_for": adapters,
                  "register_adapter": adapters, "supported_families": adapters,
                  "accumulate": decompose, "block_map": decompose,
                  "class_token_contributions": decompose,
                  "paper_display_mapping": decompose, "per_map_scaling": decompose,
                  "scale_flow": decompose, "shared_linear_scaling": decompose,
                  "explain_dataset": dataset, "ImageTextSimilarity": image_text,
                  "compare": comparison, "view": viewer, "FlowView": viewer}
    assert set(defined_in) | {"metrics"} == set(captum_daam.__all__)
    for name, module in defined_in.items():
        assert getattr(captum_daam, name) is getattr(module, name)
    assert captum_daam.metrics is importlib.import_module("captum_daam.metrics")
    assert captum_daam.adapters is adapters  # submodules stay reachable as attributes


def test_an_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        captum_daam.nothing_here


def test_the_version_is_the_installed_one():
    assert captum_daam.__version__ == importlib.metadata.version("captum-daam")
