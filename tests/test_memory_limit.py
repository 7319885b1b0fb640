"""internal_batch_size under a real memory limit: a batch that does not fit in memory is
explained in chunks, with the same maps as in one pass.

The test runs in a child process whose address space is capped (RLIMIT_AS) a fixed budget
above what it uses after a warm-up; the model is sized so that one pass over the whole batch
needs about twice the budget and one chunk a fraction of it.
"""

import subprocess
import sys
import textwrap

import pytest

resource = pytest.importorskip("resource", reason="RLIMIT_AS exists on POSIX systems only")

CHILD = textwrap.dedent(
    """
    import resource

    import timm
    import torch

    from captum_daam import DAAM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    # 1025 tokens, 12 heads, attention formed explicitly: about 100 MiB per example.
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=128, patch_size=4, depth=1,
        num_heads=12, num_classes=10,
    ).eval()
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    images = torch.randn(16, 3, 128, 128)
    targets = torch.arange(16) % 10
    daam = DAAM(model)
    daam.attribute(images[:2], target=targets[:2])  # warm-up: threads, allocator, lazy init

    def address_space():
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("VmSize:"))
        return int(line.split()[1]) * 1024

    budget = 800 * 2**20
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (address_space() + budget, hard))
    try:
        chunked = daam.attribute(images, target=targets, internal_batch_size=2)
        try:
            daam.attribute(images, target=targets)
            whole_batch = "fitted"
        except (RuntimeError, MemoryError) as error:
            whole_batch = "out of memory" if "memory" in str(error).lower() else repr(error)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    unlimited = daam.attribute(images, target=targets)
    print("whole batch under the limit:", whole_batch)
    print("largest difference:", float((chunked - unlimited).abs().max()))
    print("largest value:", float(unlimited.abs().max()))
    """
)


def test_a_batch_too_large_for_memory_is_explained_in_chunks():
    if not hasattr(resource, "RLIMIT_AS") or sys.platform != "linux":
        pytest.skip("needs Linux's RLIMIT_AS and /proc/self/status")
    result = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "whole batch under the limit: out of memory" in result.stdout, result.stdout
    difference = float(result.stdout.split("largest difference:")[1].split()[0])
    largest = float(result.stdout.split("largest value:")[1].split()[0])
    assert largest > 0 and difference <= 1e-5 * largest
