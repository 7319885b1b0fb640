"""timm model names and their pretrained weights: from the local cache with no network, a
download only when the host answers, and otherwise a complete message at once, with no
retry loop. No test here opens a connection: the one probe is replaced."""

import dataclasses
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import numpy as np
import pytest
import timm
import timm.models
import timm.models._hub
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

import captum_daam._weights
from captum_daam.cli import main
from helpers import save_shape_pngs

NAME = "deit_tiny_patch16_224"


@pytest.fixture(scope="module")
def shape_png(tmp_path_factory):
    return str(save_shape_pngs(tmp_path_factory.mktemp("shapes"), 1, seed=8)[0][0])


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty Hugging Face and torch hub caches of the test's own."""
    hub, torch_hub = tmp_path / "hf-hub", tmp_path / "torch-hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(torch.hub, "_hub_dir", str(torch_hub))
    return hub, torch_hub


@pytest.fixture
def hub_online(monkeypatch):
    """As for a user without HF_HUB_OFFLINE (the test session sets it)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def downloads(monkeypatch):
    """Record every timm.create_model call; fail on any Hub download (the retry loop)."""
    calls = []
    create = timm.create_model

    def create_model(name, pretrained=False, **kwargs):
        calls.append((name, pretrained, kwargs.get("pretrained_cfg_overlay")))
        return create(name, pretrained=pretrained, **kwargs)

    def no_download(*args, **kwargs):
        raise AssertionError("hf_hub_download was called: it would wait on the network")

    monkeypatch.setattr(timm, "create_model", create_model)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    return calls


def _probe(monkeypatch, answer):
    """Replace the one network access, the probe's socket.create_connection."""
    probes = []

    def create_connection(address, timeout=None, *args, **kwargs):
        probes.append((address, timeout))
        return answer(address, timeout)

    monkeypatch.setattr(socket, "create_connection", create_connection)
    return probes


def _no_name_resolution(address, timeout):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


class _OpenConnection:
    def close(self):
        pass


def _one_line_error(captured):
    error = captured.err
    assert error.startswith("captum-daam: error: ") and error.count("\n") == 1, error
    return error.strip()


def _explain(image, model, out, *extra):
    return main(["explain", image, "--model", model, "--out", str(out), "--save-raw",
                 "--no-progress", *extra])


def test_without_network_it_fails_at_once_with_the_whole_message(
    tmp_path, shape_png, caches, hub_online, downloads, monkeypatch, capsys
):
    probes = _probe(monkeypatch, _no_name_resolution)
    code = _explain(shape_png, "deit_small_patch16_224", tmp_path / "out")
    assert code == 2
    error = _one_line_error(capsys.readouterr())
    host = urlparse(constants.ENDPOINT).hostname
    for fragment in (
        "could not download the pretrained weights of deit_small_patch16_224",
        f"{host} cannot be reached (",
        "Name or service not known",
        "no network or the Hugging Face Hub is unreachable from here",
        f"not in the local cache ({caches[0]})",
        "--model FILE --arch deit_small_patch16_224",
        "--model tiny-vit",
    ):
        assert fragment in error, error
    assert error.endswith("--model tiny-vit")  # complete: not cut at 160 characters
    assert len(error) > 160
    # one connection attempt, bounded, and no download (whose retries took ~50 s)
    assert probes == [((host, 443), captum_daam._weights.PROBE_TIMEOUT_S)]
    assert captum_daam._weights.PROBE_TIMEOUT_S <= 5
    assert [pretrained for _, pretrained, _ in downloads] == []
    assert not (tmp_path / "out").exists()


def test_a_host_that_does_not_answer_is_given_up_after_the_timeout(
    tmp_path, shape_png, caches, hub_online, downloads, monkeypatch, capsys
):
    release, entered, answered = threading.Event(), threading.Event(), threading.Event()
    monkeypatch.setattr(captum_daam._weights, "PROBE_TIMEOUT_S", 0.2)

    def hanging(address, timeout):  # a name lookup or connect that never returns in time
        entered.set()
        release.wait(30)
        answered.set()
        raise OSError("gave up")

    _probe(monkeypatch, hanging)
    try:
        code = _explain(shape_png, NAME, tmp_path / "out")
        # the command gave up while the host was still not answering: no wall clock needed
        gave_up_first = entered.is_set() and not answered.is_set()
    finally:
        release.set()
    assert code == 2
    assert gave_up_first
    assert "did not answer within 0.2 s" in _one_line_error(capsys.readouterr())
    assert downloads == []


def test_with_HF_HUB_OFFLINE_set_it_fails_without_asking_the_network(
    tmp_path, shape_png, caches, downloads, monkeypatch, capsys
):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    probes = _probe(monkeypatch, _no_name_resolution)
    assert _explain(shape_png, NAME, tmp_path / "out") == 2
    error = _one_line_error(capsys.readouterr())
    assert "HF_HUB_OFFLINE is set" in error and "Unset HF_HUB_OFFLINE" in error
    assert error.endswith("--model tiny-vit")
    assert probes == [] and downloads == []


def _cache_on_the_hub_layout(hub: Path, repo_id: str, state_dict) -> Path:
    """A Hugging Face cache entry as huggingface_hub lays it out: refs/main names a snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file(state_dict, str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"


@pytest.mark.parametrize("hub_offline", [False, True])
def test_weights_in_the_hub_cache_load_with_no_network(
    tmp_path, shape_png, caches, downloads, monkeypatch, hub_offline
):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", hub_offline)
    probes = _probe(monkeypatch, _no_name_resolution)
    torch.manual_seed(3)
    state_dict = timm.create_model(NAME).state_dict()
    repo_id = timm.models.get_pretrained_cfg(NAME).hf_hub_id
    cached = _cache_on_the_hub_layout(caches[0], repo_id, state_dict)
    checkpoint = tmp_path / "same.safetensors"
    save_file(state_dict, str(checkpoint))

    assert _explain(shape_png, NAME, tmp_path / "cached") == 0
    assert _explain(shape_png, str(checkpoint), tmp_path / "file", "--arch", NAME) == 0
    assert probes == []  # nothing asked of the network
    assert (NAME, True, {"file": str(cached), "custom_load": False}) in downloads
    flows = [np.load(tmp_path / folder / "shape_daam.npz")["flow"] for folder in ("cached", "file")]
    np.testing.assert_array_equal(flows[0], flows[1])  # the cached weights, not random ones


def test_online_the_weights_are_downloaded_as_timm_does(
    tmp_path, shape_png, caches, hub_online, monkeypatch, capsys
):
    probes = _probe(monkeypatch, lambda address, timeout: _OpenConnection())
    calls = []
    create = timm.create_model

    def create_model(name, pretrained=False, **kwargs):
        calls.append((name, pretrained, dict(kwargs)))
        return create(name, pretrained=False)  # stands in for the download

    monkeypatch.setattr(timm, "create_model", create_model)
    assert _explain(shape_png, NAME, tmp_path / "out") == 0
    assert len(probes) == 1
    assert (NAME, True, {}) in calls  # timm's own download: no override, no offline mode


def test_online_a_failed_download_is_reported_whole(
    tmp_path, shape_png, caches, hub_online, monkeypatch, capsys
):
    _probe(monkeypatch, lambda address, timeout: _OpenConnection())
    create = timm.create_model
    reason = "403 Forbidden: " + "the proxy refused the request " * 8

    def create_model(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError(reason)
        return create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    assert _explain(shape_png, NAME, tmp_path / "out") == 2
    error = _one_line_error(capsys.readouterr())
    assert f"from the Hugging Face Hub: {reason.strip()}." in error
    assert error.endswith("--model tiny-vit")


def _url_only(monkeypatch, url):
    """Pretend timm takes the weights from ``url`` rather than from the Hub."""
    real = timm.models.get_pretrained_cfg

    def get_pretrained_cfg(name, *args, **kwargs):
        config = real(name, *args, **kwargs)
        return dataclasses.replace(config, hf_hub_id=None, url=url)

    monkeypatch.setattr(timm.models, "get_pretrained_cfg", get_pretrained_cfg)


def test_weights_from_a_url_in_the_torch_cache_load_with_no_network(
    tmp_path, shape_png, caches, downloads, monkeypatch
):
    _url_only(monkeypatch, "https://weights.example.org/deit/deit_tiny-0123abcd.pth")
    probes = _probe(monkeypatch, _no_name_resolution)
    folder = caches[1] / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(timm.create_model(NAME).state_dict(), folder / "deit_tiny-0123abcd.pth")
    assert _explain(shape_png, NAME, tmp_path / "out") == 0
    assert probes == []
    assert (NAME, True, {"file": str(folder / "deit_tiny-0123abcd.pth"),
                         "custom_load": False}) in downloads


def test_weights_from_a_url_not_cached_and_no_network(
    tmp_path, shape_png, caches, downloads, monkeypatch, capsys
):
    _url_only(monkeypatch, "https://weights.example.org/deit/deit_tiny-0123abcd.pth")
    probes = _probe(monkeypatch, _no_name_resolution)
    assert _explain(shape_png, NAME, tmp_path / "out") == 2
    error = _one_line_error(capsys.readouterr())
    assert "weights.example.org cannot be reached" in error
    assert f"not in the local cache ({caches[1] / 'checkpoints'})" in error
    assert probes == [(("weights.example.org", 443), captum_daam._weights.PROBE_TIMEOUT_S)]
    assert [call for call in downloads if call[1]] == []


def test_the_probe_goes_through_a_configured_proxy(monkeypatch):
    monkeypatch.setenv("https_proxy", "http://proxy.internal:3128")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    probes = _probe(monkeypatch, _no_name_resolution)
    reason = captum_daam._weights._unreachable("https://huggingface.co", 1.0)
    assert probes == [(("proxy.internal", 3128), 1.0)]
    assert reason.startswith(
        "huggingface.co through the proxy proxy.internal:3128 cannot be reached"
    )
