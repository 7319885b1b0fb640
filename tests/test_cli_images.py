"""Image files to RGB in [0, 1]: every mode Pillow opens, checked against values computed here
with numpy from the arrays the files were made of; refusals; decompression bombs."""

import numpy as np
import pytest
from PIL import Image

from captum_daam._images import BACKGROUND, load_rgb
from captum_daam.cli import main
from captum_daam.data import make_shapes

HEIGHT, WIDTH = 5, 7


@pytest.fixture
def rng():
    return np.random.default_rng(20240)


def _saved(image: Image.Image, path, mode: str, **options):
    """Save ``image`` and check that Pillow opens the file in ``mode``: the test is about that
    mode, not about another one a format happens to convert it to."""
    image.save(path, **options)
    with Image.open(path) as reopened:
        assert reopened.mode == mode
    return path


def _loaded(path) -> np.ndarray:
    rgb = load_rgb(path)
    assert rgb.dtype.is_floating_point and rgb.shape == (3, HEIGHT, WIDTH)
    return rgb.permute(1, 2, 0).double().numpy()


def _over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Straight alpha over the white background, written out channel by channel."""
    alpha = alpha[..., None].astype(np.float64)
    return colour * alpha + 1.0 * (1 - alpha)


def test_the_background_for_transparency_is_white():
    assert BACKGROUND == 1.0


def test_bilevel_1(tmp_path, rng):
    bits = rng.random((HEIGHT, WIDTH)) > 0.5
    path = _saved(Image.fromarray(bits), tmp_path / "bits.png", "1")
    expected = np.repeat(np.where(bits, 1.0, 0.0)[..., None], 3, axis=-1)
    np.testing.assert_array_equal(_loaded(path), expected)


def test_greyscale_L(tmp_path, rng):
    grey = rng.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)
    path = _saved(Image.fromarray(grey), tmp_path / "grey.png", "L")
    np.testing.assert_allclose(_loaded(path), np.stack([grey / 255.0] * 3, -1), atol=1e-7)


def test_greyscale_with_alpha_LA_over_white(tmp_path, rng):
    grey_alpha = rng.integers(0, 256, (HEIGHT, WIDTH, 2), dtype=np.uint8)
    grey_alpha[0, 0, 1], grey_alpha[0, 1, 1] = 0, 255  # fully transparent, fully opaque
    path = _saved(Image.fromarray(grey_alpha, "LA"), tmp_path / "grey_alpha.png", "LA")
    grey = np.stack([grey_alpha[..., 0] / 255.0] * 3, -1)
    expected = _over_white(grey, grey_alpha[..., 1] / 255.0)
    loaded = _loaded(path)
    np.testing.assert_allclose(loaded, expected, atol=1e-6)
    assert np.all(loaded[0, 0] == 1.0)  # fully transparent: white, whatever the grey under it
    np.testing.assert_allclose(loaded[0, 1], grey_alpha[0, 1, 0] / 255.0, atol=1e-7)


def _palette_image(rng, colours: int = 4):
    palette = rng.integers(0, 256, (colours, 3), dtype=np.uint8)
    indices = rng.integers(0, colours, (HEIGHT, WIDTH), dtype=np.uint8)
    indices[0, :colours] = np.arange(colours)  # every entry is used
    image = Image.fromarray(indices, "P")
    image.putpalette(palette.flatten().tolist())
    return image, palette, indices


def test_palette_P(tmp_path, rng):
    image, palette, indices = _palette_image(rng)
    path = _saved(image, tmp_path / "palette.png", "P")
    np.testing.assert_allclose(_loaded(path), palette[indices] / 255.0, atol=1e-7)


def test_palette_P_with_a_transparent_entry(tmp_path, rng):
    image, palette, indices = _palette_image(rng)
    path = _saved(image, tmp_path / "palette_t.png", "P", transparency=2)
    expected = np.where((indices == 2)[..., None], 1.0, palette[indices] / 255.0)
    np.testing.assert_allclose(_loaded(path), expected, atol=1e-7)


def test_palette_P_with_alpha_per_entry(tmp_path, rng):
    image, palette, indices = _palette_image(rng)
    entry_alpha = np.array([255, 128, 0, 40], dtype=np.uint8)
    path = _saved(image, tmp_path / "palette_a.png", "P", transparency=entry_alpha.tobytes())
    expected = _over_white(palette[indices] / 255.0, entry_alpha[indices] / 255.0)
    np.testing.assert_allclose(_loaded(path), expected, atol=1e-6)


def test_palette_with_alpha_PA(tmp_path, rng):
    image, palette, indices = _palette_image(rng)
    alpha = rng.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)
    with_alpha = image.convert("PA")
    with_alpha.putalpha(Image.fromarray(alpha))
    path = _saved(with_alpha, tmp_path / "palette_alpha.tif", "PA")
    expected = _over_white(palette[indices] / 255.0, alpha / 255.0)
    np.testing.assert_allclose(_loaded(path), expected, atol=1e-6)


def test_RGB(tmp_path, rng):
    rgb = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    path = _saved(Image.fromarray(rgb), tmp_path / "rgb.png", "RGB")
    np.testing.assert_allclose(_loaded(path), rgb / 255.0, atol=1e-7)


def test_RGB_with_a_transparent_colour(tmp_path, rng):
    rgb = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    rgb[1, 2] = rgb[3, 4] = (10, 20, 30)
    path = _saved(Image.fromarray(rgb), tmp_path / "rgb_t.png", "RGB", transparency=(10, 20, 30))
    keyed = np.all(rgb == (10, 20, 30), axis=-1)
    expected = np.where(keyed[..., None], 1.0, rgb / 255.0)
    np.testing.assert_allclose(_loaded(path), expected, atol=1e-7)


def test_RGBA_over_white(tmp_path, rng):
    rgba = rng.integers(0, 256, (HEIGHT, WIDTH, 4), dtype=np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)  # transparent black: shown white, not black
    path = _saved(Image.fromarray(rgba), tmp_path / "rgba.png", "RGBA")
    expected = _over_white(rgba[..., :3] / 255.0, rgba[..., 3] / 255.0)
    loaded = _loaded(path)
    np.testing.assert_allclose(loaded, expected, atol=1e-6)
    assert np.all(loaded[0, 0] == 1.0)


def test_CMYK_naive_formula(tmp_path, rng):
    cmyk = rng.integers(0, 256, (HEIGHT, WIDTH, 4), dtype=np.uint8)
    path = _saved(Image.fromarray(cmyk, "CMYK"), tmp_path / "cmyk.tif", "CMYK")
    c, m, y, k = (cmyk[..., i] / 255.0 for i in range(4))
    expected = np.stack([(1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k)], -1)
    np.testing.assert_allclose(_loaded(path), expected, atol=1e-6)


def test_YCbCr_as_JPEG_defines_it(tmp_path, rng):
    ycbcr = rng.integers(16, 236, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    path = _saved(Image.fromarray(ycbcr, "YCbCr"), tmp_path / "ycbcr.tif", "YCbCr")
    y, cb, cr = (ycbcr[..., i].astype(np.float64) for i in range(3))
    expected = np.stack(  # JFIF: full-range ITU-R BT.601
        [y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
         y + 1.772 * (cb - 128)], -1,
    )
    expected = np.clip(expected, 0, 255) / 255.0
    np.testing.assert_allclose(_loaded(path), expected, atol=1.01 / 255)  # Pillow rounds to 8 bits


@pytest.mark.parametrize(
    "mode, extension, dtype",
    [("I;16", "png", "<u2"), ("I;16B", "tif", ">u2")],
)
def test_16_bit_greyscale_is_scaled_by_65535(tmp_path, rng, mode, extension, dtype):
    grey = rng.integers(0, 65536, (HEIGHT, WIDTH)).astype(dtype)
    grey[0, :3] = (0, 257, 65535)
    image = Image.frombytes(mode, (WIDTH, HEIGHT), grey.tobytes())
    path = _saved(image, tmp_path / f"grey16.{extension}", mode)
    loaded = _loaded(path)
    np.testing.assert_allclose(loaded, np.stack([grey / 65535.0] * 3, -1), atol=1e-7)
    np.testing.assert_allclose(loaded[0, :3, 0], [0.0, 1 / 255, 1.0], atol=1e-7)
    assert loaded.std() > 0.1  # not the all-white image convert("RGB") makes of it


def test_16_bit_greyscale_with_a_transparent_value(tmp_path, rng):
    grey = rng.integers(0, 65536, (HEIGHT, WIDTH)).astype(np.uint16)
    grey[2, 3] = 1234
    path = _saved(Image.fromarray(grey), tmp_path / "grey16_t.png", "I;16", transparency=1234)
    expected = np.where((grey == 1234)[..., None], 1.0, np.stack([grey / 65535.0] * 3, -1))
    np.testing.assert_allclose(_loaded(path), expected, atol=1e-7)


def test_32_bit_integers_I_within_16_bits_are_scaled_by_65535(tmp_path, rng):
    values = rng.integers(0, 65536, (HEIGHT, WIDTH)).astype(np.int32)
    path = _saved(Image.fromarray(values), tmp_path / "int32.tif", "I")
    np.testing.assert_allclose(_loaded(path), np.stack([values / 65535.0] * 3, -1), atol=1e-7)


def test_a_16_bit_pgm_opened_as_I(tmp_path):
    path = tmp_path / "grey.pgm"
    values = (np.arange(HEIGHT * WIDTH).reshape(HEIGHT, WIDTH) * 1000).astype(">u2")
    path.write_bytes(f"P5\n{WIDTH} {HEIGHT}\n65535\n".encode() + values.tobytes())
    with Image.open(path) as opened:
        assert opened.mode == "I"
    np.testing.assert_allclose(_loaded(path), np.stack([values / 65535.0] * 3, -1), atol=1e-7)


@pytest.mark.parametrize("bad_value", [-1, 70_000])
def test_32_bit_integers_outside_16_bits_are_refused(tmp_path, rng, bad_value):
    values = rng.integers(0, 65536, (HEIGHT, WIDTH)).astype(np.int32)
    values[1, 1] = bad_value
    path = _saved(Image.fromarray(values), tmp_path / "int32.tif", "I")
    with pytest.raises(ValueError, match=f"32-bit integers from .*{bad_value}.*0-65535"):
        load_rgb(path)


def test_float_F_within_0_1_is_taken_as_it_is(tmp_path, rng):
    values = rng.random((HEIGHT, WIDTH)).astype(np.float32)
    values[0, :2] = (0.0, 1.0)
    path = _saved(Image.fromarray(values), tmp_path / "float.tif", "F")
    np.testing.assert_allclose(_loaded(path), np.stack([values] * 3, -1), atol=0)


@pytest.mark.parametrize("bad_value", [1.5, -0.25, np.nan, np.inf])
def test_float_F_outside_0_1_is_refused(tmp_path, rng, bad_value):
    values = rng.random((HEIGHT, WIDTH)).astype(np.float32)
    values[2, 2] = bad_value
    path = _saved(Image.fromarray(values), tmp_path / "float.tif", "F")
    with pytest.raises(ValueError, match=r"floating-point values .*expected values in \[0, 1\]"):
        load_rgb(path)


def test_a_mode_it_does_not_convert_is_refused_by_name(tmp_path):
    path = _saved(Image.new("LAB", (WIDTH, HEIGHT)), tmp_path / "lab.tif", "LAB")
    with pytest.raises(ValueError, match="mode 'LAB'.*expected one of"):
        load_rgb(path)


def test_exif_orientation_is_applied(tmp_path, rng):
    rgb = rng.integers(0, 256, (WIDTH, HEIGHT, 3), dtype=np.uint8)  # stored on its side
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "sideways.png"
    Image.fromarray(rgb).save(path, exif=exif)
    upright = np.rot90(rgb, k=-1)  # numpy's clockwise quarter turn
    np.testing.assert_allclose(_loaded(path), upright / 255.0, atol=1e-7)


def test_text_file_and_folder_are_refused(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="expected an image file Pillow can decode"):
        load_rgb(text)
    with pytest.raises(ValueError, match="is a folder, expected an image file"):
        load_rgb(tmp_path)


@pytest.mark.parametrize("limit", [1000, 3000])  # 64 x 64 > 2 x 1000: Pillow errs; > 3000: warns
def test_a_decompression_bomb_is_refused(tmp_path, monkeypatch, limit):
    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(ValueError, match="too large to decode safely"):
        load_rgb(path)


def _shape_png(path, seed: int) -> np.ndarray:
    images, _, _ = make_shapes(1, seed=seed)
    pixels = (images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def test_explain_refuses_a_decompression_bomb_in_one_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "big.png"
    _shape_png(path, seed=3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    out = tmp_path / "out"
    code = main(["explain", str(path), "--model", "tiny-vit", "--out", str(out), "--no-progress"])
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("captum-daam: error: image ") and "too large" in error
    assert error.count("\n") == 1
    assert not out.exists()


def test_a_16_bit_png_is_explained_as_its_8_bit_twin(tmp_path, capsys):
    """The same picture as 8 and as 16 bits (value x 257) gives the same flow; clipping to
    white, as convert("RGB") does, would give another one."""
    pixels = _shape_png(tmp_path / "eight.png", seed=6)
    grey = pixels.mean(-1).round().astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "eight.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    with Image.open(tmp_path / "sixteen.png") as opened:
        assert opened.mode == "I;16"
    flows = {}
    for name in ("eight", "sixteen"):
        out = tmp_path / name
        code = main(["explain", str(tmp_path / f"{name}.png"), "--model", "tiny-vit",
                     "--out", str(out), "--save-raw", "--no-progress"])
        assert code == 0
        flows[name] = np.load(out / f"{name}_daam.npz")["flow"]
    np.testing.assert_allclose(flows["sixteen"], flows["eight"], rtol=1e-5, atol=1e-7)
    white = tmp_path / "white.png"
    Image.fromarray(np.full_like(grey, 255)).save(white)
    assert main(["explain", str(white), "--model", "tiny-vit", "--out", str(tmp_path / "white"),
                 "--save-raw", "--no-progress"]) == 0
    assert not np.allclose(np.load(tmp_path / "white" / "white_daam.npz")["flow"], flows["eight"])
