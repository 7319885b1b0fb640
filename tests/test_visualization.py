"""Figures, animations and overlays of the flow, on small hand-made flows (no model needed)."""

import sys

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from matplotlib import pyplot as plt
from matplotlib.figure import Figure
from PIL import Image

from captum_daam.decompose import scale_flow
from captum_daam.visualization import flow_figure, overlay, save_flow_animation

NUM_MAPS, GRID, SIDE = 4, 8, 64


def moving_spot_flow(num_maps=NUM_MAPS, grid=GRID):
    """A flow whose block maps each add a smooth spot further along the diagonal: D_l differ."""
    rows = torch.arange(grid, dtype=torch.float32)
    cams = torch.empty(num_maps, grid, grid)
    for block in range(num_maps):
        centre = (1 + 2 * block) % grid
        squared_distance = (rows[:, None] - centre) ** 2 + (rows[None, :] - centre) ** 2
        cams[block] = (block + 1) * torch.exp(-squared_distance / 4.5)
    return cams.cumsum(0) + 0.05


def gradient_image():
    rows = torch.linspace(0.0, 1.0, SIDE)
    return torch.stack(
        [
            rows[:, None].expand(SIDE, SIDE),
            rows[None, :].expand(SIDE, SIDE),
            torch.full((SIDE, SIDE), 0.5),
        ]
    )


def panel_pixels(figure, panel):
    return np.asarray(figure.axes[panel].get_images()[0].get_array())


def gif_frames(path):
    with Image.open(path) as animation:
        frames = []
        for index in range(animation.n_frames):
            animation.seek(index)
            frames.append(np.asarray(animation.convert("RGB")))
        return animation.n_frames, animation.size, animation.info, frames


# --- overlay -----------------------------------------------------------------------------------


def test_overlay_blends_image_and_colour_map_by_alpha():
    image = torch.full((3, 16, 16), 0.2)
    jet = colormaps["jet"]
    for value in (0.0, 1.0):
        picture = overlay(image, torch.full((2, 2), value), alpha=0.25)
        expected = np.rint(255 * (0.75 * 0.2 + 0.25 * np.asarray(jet(value)[:3])))
        assert picture.dtype == np.uint8 and picture.shape == (16, 16, 3)
        assert np.array_equal(picture, np.broadcast_to(expected.astype(np.uint8), (16, 16, 3)))
    assert np.array_equal(overlay(image, torch.zeros(3, 3), alpha=0.0), np.full((16, 16, 3), 51))


def test_overlay_upsamples_any_grid_to_the_image():
    image = torch.zeros(1, 3, 32, 48)
    half = torch.tensor([[0.0, 1.0]])  # (1, 2): left half cold, right half hot
    picture = overlay(image, half[None], alpha=1.0)
    assert picture.shape == (32, 48, 3)
    cold, hot = (np.rint(255 * np.asarray(colormaps["jet"](v)[:3])) for v in (0.0, 1.0))
    assert np.array_equal(picture[:, 0], np.broadcast_to(cold, (32, 3)))
    assert np.array_equal(picture[:, -1], np.broadcast_to(hot, (32, 3)))


def test_overlay_rejects_unscaled_maps_and_normalised_images():
    with pytest.raises(ValueError, match=r"scaled to \[0, 1\].*scale_flow"):
        overlay(gradient_image(), torch.full((4, 4), 3.0))
    with pytest.raises(ValueError, match=r"image values in \[0, 1\].*normalisation"):
        overlay(gradient_image() * 2 - 1, torch.zeros(4, 4))
    with pytest.raises(ValueError, match="alpha"):
        overlay(gradient_image(), torch.zeros(4, 4), alpha=1.5)
    with pytest.raises(ValueError, match="cmap"):
        overlay(gradient_image(), torch.zeros(4, 4), cmap="no-such-map")


# --- flow_figure -------------------------------------------------------------------------------


def test_figure_has_the_image_then_one_titled_panel_per_block():
    figure = flow_figure(gradient_image(), moving_spot_flow(), title="a flow")
    assert isinstance(figure, Figure)
    assert [axis.get_title() for axis in figure.axes] == [
        "image",
        "block 1",
        "block 2",
        "block 3",
        "block 4",
    ]
    assert figure.get_suptitle() == "a flow"
    assert np.array_equal(
        panel_pixels(figure, 0), np.rint(gradient_image().permute(1, 2, 0).numpy() * 255)
    )


def test_figure_titles_use_block_numbers_of_a_flow_over_a_subset_of_blocks():
    flow = moving_spot_flow()[None]  # (1, L, gh, gw) as DAAM returns for one image
    figure = flow_figure(
        gradient_image()[None], flow, blocks=[0, -1], block_numbers=[9, 10, 11, 12]
    )
    assert [axis.get_title() for axis in figure.axes] == ["image", "block 9", "block 12"]


def test_figure_grid_drops_unused_axes_and_renders_headless(tmp_path):
    open_figures = plt.get_fignums()
    figure = flow_figure(gradient_image(), moving_spot_flow(num_maps=12), columns=5)
    assert len(figure.axes) == 13  # a 3 x 5 grid, two empty cells removed
    figure.savefig(tmp_path / "flow.png")
    assert (tmp_path / "flow.png").stat().st_size > 0
    assert plt.get_fignums() == open_figures  # nothing registered with pyplot


def test_figure_panels_are_overlays_of_the_whole_flow_scaled_before_blocks_are_picked():
    flow = moving_spot_flow()
    for scaling in ("paper", "shared", "per_map"):
        figure = flow_figure(
            gradient_image(), flow, blocks=[1], scaling=scaling, alpha=0.6, cmap="viridis"
        )
        expected = overlay(gradient_image(), scale_flow(flow[None], scaling)[0, 1], 0.6, "viridis")
        assert np.array_equal(panel_pixels(figure, 1), expected)
    # "shared" over the whole flow differs from scaling the one shown map on its own
    alone = overlay(gradient_image(), scale_flow(flow[None, 1:2], "shared")[0, 0])
    assert not np.array_equal(
        panel_pixels(flow_figure(gradient_image(), flow, [1], "shared"), 1), alone
    )


def test_the_three_scalings_give_different_overlays():
    flow = moving_spot_flow()
    panels = {
        scaling: panel_pixels(flow_figure(gradient_image(), flow, blocks=[0], scaling=scaling), 1)
        for scaling in ("paper", "shared", "per_map")
    }
    assert not np.array_equal(panels["paper"], panels["shared"])
    assert not np.array_equal(panels["paper"], panels["per_map"])
    assert not np.array_equal(panels["shared"], panels["per_map"])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(image=torch.rand(2, 3, SIDE, SIDE)), ValueError, r"one image.*images\[i\]"),
        (dict(image=torch.rand(1, SIDE, SIDE)), ValueError, r"\(3, H, W\)"),
        (dict(image=torch.rand(3, SIDE, SIDE) * 5), ValueError, r"\[0, 1\]"),
        (dict(image=np.zeros((3, SIDE, SIDE))), TypeError, "torch.Tensor"),
        (dict(flow=torch.rand(2, NUM_MAPS, GRID, GRID)), ValueError, r"flow\[i\]"),
        (dict(flow=torch.rand(GRID, GRID)), ValueError, r"\(L, gh, gw\)"),
        (dict(flow=torch.full((NUM_MAPS, GRID, GRID), float("nan"))), ValueError, "finite"),
        (dict(blocks=[NUM_MAPS]), ValueError, r"out of range.*0-based.*0\.\.3"),
        (dict(blocks=[-NUM_MAPS - 1]), ValueError, "out of range"),
        (dict(blocks=[]), ValueError, "at least one block"),
        (dict(blocks=[1.0]), TypeError, "int indices"),
        (dict(block_numbers=[1, 2]), ValueError, r"one block number per map.*\(4\), got 2"),
        (dict(scaling="log"), ValueError, r"scaling.*'log'"),
        (dict(alpha=-0.1), ValueError, "alpha"),
        (dict(columns=0), ValueError, "columns"),
    ],
)
def test_figure_rejects_bad_inputs_with_a_clear_message(kwargs, error, message):
    arguments = dict(image=gradient_image(), flow=moving_spot_flow())
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        flow_figure(**arguments)


def test_all_zero_flow_and_uint8_image_are_drawn(tmp_path):
    # Captum's visualize_image_attr asserts on an all-zero map; DAAM can return one
    figure = flow_figure((gradient_image() * 255).round().to(torch.uint8), torch.zeros(2, 4, 4))
    cold = overlay(gradient_image(), torch.zeros(4, 4))
    assert np.abs(panel_pixels(figure, 2).astype(int) - cold).max() <= 1
    save_flow_animation(gradient_image(), torch.zeros(2, 4, 4), tmp_path / "zero.gif")


# --- save_flow_animation -----------------------------------------------------------------------


def test_gif_has_one_labelled_frame_per_block_enlarged_and_looping(tmp_path):
    path = save_flow_animation(
        gradient_image(), moving_spot_flow(), str(tmp_path / "flow.gif"), duration_ms=250
    )
    assert path == tmp_path / "flow.gif"
    count, size, info, frames = gif_frames(path)
    assert count == NUM_MAPS
    assert size == (256, 256)  # a 64 x 64 image is enlarged to a short side of 256
    assert info["loop"] == 0 and info["duration"] == 250
    assert frames[0].shape == (256, 256, 3)


def test_gif_frames_follow_the_flow_and_not_only_the_label(tmp_path):
    def mean_change_below_label(frames):  # GIF palettes differ per frame: compare on average
        below = slice(128, None)
        return [np.abs(a[below].astype(int) - b[below]).mean() for a, b in zip(frames, frames[1:])]

    _, _, _, moving = gif_frames(
        save_flow_animation(gradient_image(), moving_spot_flow(), tmp_path / "a.gif")
    )
    assert min(mean_change_below_label(moving)) > 10
    steady_flow = moving_spot_flow()[:1].repeat(NUM_MAPS, 1, 1)  # the same map in every block
    _, _, _, steady = gif_frames(
        save_flow_animation(gradient_image(), steady_flow, tmp_path / "b.gif", scaling="per_map")
    )
    assert max(mean_change_below_label(steady)) < 1
    assert all(not np.array_equal(a[:32], b[:32]) for a, b in zip(steady, steady[1:]))  # labels


def test_animation_frames_are_the_figure_overlays_at_frame_size(tmp_path):
    flow = moving_spot_flow()
    path = save_flow_animation(
        gradient_image(), flow, tmp_path / "flow.gif", blocks=[2], size=(SIDE, SIDE)
    )
    count, size, _, frames = gif_frames(path)
    assert (count, size) == (1, (SIDE, SIDE))
    expected = overlay(gradient_image(), scale_flow(flow[None], "paper")[0, 2])
    # GIF keeps 256 colours per frame: compare below the label, within quantisation error
    difference = np.abs(frames[0][32:].astype(int) - expected[32:].astype(int))
    assert difference.mean() < 4


def test_animation_size_sets_width_then_height(tmp_path):
    path = save_flow_animation(
        gradient_image(), moving_spot_flow(), tmp_path / "flow.gif", size=(96, 48)
    )
    assert gif_frames(path)[1] == (96, 48)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(path="flow.png"), r"\.gif or \.mp4"),
        (dict(size=(0, 10)), r"\(width, height\)"),
        (dict(size=256), r"\(width, height\)"),
        (dict(duration_ms=0), "duration_ms"),
        (dict(blocks=[7]), "out of range"),
    ],
)
def test_animation_rejects_bad_inputs_before_writing(tmp_path, kwargs, message):
    arguments = dict(image=gradient_image(), flow=moving_spot_flow(), path="flow.gif")
    arguments.update(kwargs)
    arguments["path"] = tmp_path / arguments["path"]
    with pytest.raises(ValueError, match=message):
        save_flow_animation(**arguments)
    assert list(tmp_path.iterdir()) == []


def test_mp4_without_imageio_ffmpeg_says_what_to_install(tmp_path, monkeypatch):
    for module in ("imageio", "imageio.v2", "imageio_ffmpeg"):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(ImportError, match=r'pip install "captum-daam\[video\]"'):
        save_flow_animation(gradient_image(), moving_spot_flow(), tmp_path / "flow.mp4")
    assert list(tmp_path.iterdir()) == []


def test_mp4_has_one_frame_per_block_at_even_size(tmp_path):
    import imageio_ffmpeg  # in the test extra, so that this runs in CI

    path = save_flow_animation(
        gradient_image(), moving_spot_flow(), tmp_path / "flow.mp4", size=(99, 64)
    )
    assert path.stat().st_size > 0
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    assert frames == NUM_MAPS
    reader = imageio_ffmpeg.read_frames(str(path))
    assert next(reader)["size"] == (100, 64)  # H.264 needs even sides
    reader.close()
