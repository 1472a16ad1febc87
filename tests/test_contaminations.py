"""Contamination generators: artifact placement, label dependence, variants, determinism, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from auditkit.data.contaminations import (
    CONTAMINATIONS,
    DEFAULT_PALETTE,
    ColouredBackground,
    Contamination,
    DecoyPatch,
    Stripe,
    TextTag,
    contaminate_dataset,
    default_palette,
    default_text_tags,
    make_contamination,
    render_text_tags,
    texture_field,
)
from auditkit.errors import DataError

KINDS = sorted(CONTAMINATIONS)


# ----------------------------------------------------------------------------- helpers


def digit_like(n: int, height: int = 28, width: int = 28, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """(n, C, H, W) float32 'digits': a few bright Gaussian blobs on an exactly-zero background."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    images = np.zeros((n, height, width), dtype=np.float32)
    for blob in range(3):
        cy = rng.uniform(0.3, 0.7, size=(n, 1, 1)) * height
        cx = rng.uniform(0.3, 0.7, size=(n, 1, 1)) * width
        sigma = rng.uniform(0.05, 0.12, size=(n, 1, 1)) * min(height, width)
        images += (rng.uniform(0.5, 0.95, size=(n, 1, 1))
                   * np.exp(-((rows - cy) ** 2 + (cols - cx) ** 2) / (2 * sigma**2)))
    images = np.clip(images, 0.0, 0.97)
    images[images < 0.05] = 0.0  # a dark background, as in MNIST
    stacked = np.stack([images * (1.0 - 0.1 * c) for c in range(channels)], axis=1)
    return torch.from_numpy(stacked.astype(np.float32))


def cycling_labels(n: int, num_classes: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64) % num_classes


def apply(contamination: Contamination, images, labels, variant, num_classes, seed=0):
    return contamination.apply(images, labels, variant, np.random.default_rng(seed), num_classes)


def changed_pixels(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) bool: pixels where any channel differs."""
    return (before != after).any(dim=1, keepdim=True)


def brightness(label: int, step: int) -> np.float32:
    return np.float32((255.0 - step * label) / 255.0)


def patch_value(out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) the single value shown on each image's mask (asserting it is single)."""
    values = []
    for image, m in zip(out, mask[:, 0].bool()):
        shown = image[:, m]
        assert shown.numel() > 0
        assert torch.all(shown == shown.flatten()[0]), "the artifact must have one value in every channel"
        values.append(shown.flatten()[0])
    return torch.stack(values)


def label_from_brightness(values: torch.Tensor, step: int) -> np.ndarray:
    return np.rint((255.0 - values.double().numpy() * 255.0) / step).astype(np.int64)


def assert_roughly_uniform(counts: np.ndarray, tolerance: float = 0.35) -> None:
    expected = counts.sum() / len(counts)
    assert np.all(np.abs(counts - expected) <= tolerance * expected), counts


def assert_binary_mask(mask: torch.Tensor, images: torch.Tensor) -> None:
    assert mask.dtype == torch.float32
    assert mask.shape == (images.shape[0], 1, *images.shape[2:])
    assert torch.all((mask == 0) | (mask == 1))


# ----------------------------------------------------------------------------- common interface


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 64, 48)])
def test_every_variant_has_the_documented_shapes_and_ranges(kind, shape):
    channels, height, width = shape
    images, labels = digit_like(12, height, width, channels), cycling_labels(12, 5)
    contamination = make_contamination(kind)
    assert contamination.kind == kind
    assert set(("contaminated", "permuted", "clean")) <= set(contamination.variants)
    for variant in contamination.variants:
        out, mask = apply(contamination, images, labels, variant, 5)
        assert out.dtype == torch.float32
        assert out.shape == (12, contamination.out_channels(channels), height, width)
        assert out.min() >= 0 and out.max() <= 1
        assert_binary_mask(mask, images)
        if variant == "clean":
            assert mask.sum() == 0
        else:
            assert torch.all(mask.flatten(1).sum(1) > 0), "every image carries the artifact"


@pytest.mark.parametrize("kind", KINDS)
def test_inputs_are_not_modified_in_place(kind):
    images, labels = digit_like(8, channels=3), cycling_labels(8, 10)
    images_before, labels_before = images.clone(), labels.clone()
    contamination = make_contamination(kind)
    for variant in contamination.variants:
        out, _ = apply(contamination, images, labels, variant, 10)
        out += 1  # the output must not alias the input either
    assert torch.equal(images, images_before) and torch.equal(labels, labels_before)


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_output_and_the_rng_advances(kind):
    images, labels = digit_like(16), cycling_labels(16, 10)
    contamination = make_contamination(kind)
    first = apply(contamination, images, labels, "permuted", 10, seed=5)
    again = apply(contamination, images, labels, "permuted", 10, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    rng = np.random.default_rng(5)
    one = contamination.apply(images, labels, "permuted", rng, 10)
    two = contamination.apply(images, labels, "permuted", rng, 10)
    assert torch.equal(one[0], first[0])
    assert not torch.equal(one[0], two[0]), "a second call on the same rng must draw new randomness"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [1, 7, 512])
def test_contaminate_dataset_is_independent_of_chunk_size(kind, chunk_size):
    images, labels = digit_like(23, channels=3), cycling_labels(23, 10)
    contamination = make_contamination(kind)
    whole = apply(contamination, images, labels, "contaminated", 10, seed=11)
    chunked = contaminate_dataset(images, labels, contamination, "contaminated", 11, 10, chunk_size=chunk_size)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


@pytest.mark.parametrize("kind", KINDS)
def test_an_empty_batch_gives_empty_outputs(kind):
    contamination = make_contamination(kind)
    out, mask = contaminate_dataset(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.int64), contamination,
                                    "contaminated", 0, 10)
    assert out.shape == (0, contamination.out_channels(1), 28, 28) and mask.shape == (0, 1, 28, 28)


def test_contaminate_dataset_accepts_numpy_and_infers_num_classes():
    images, labels = digit_like(10), cycling_labels(10, 10)
    contamination = DecoyPatch()
    from_numpy = contaminate_dataset(images.numpy(), labels.numpy(), contamination, "contaminated", 3)
    from_torch = contaminate_dataset(images, labels, contamination, "contaminated", 3, 10)
    assert torch.equal(from_numpy[0], from_torch[0])


@pytest.mark.parametrize("kind", KINDS)
def test_params_are_json_and_rebuild_the_same_generator(kind):
    contamination = make_contamination(kind)
    params = json.loads(json.dumps(contamination.params()))
    assert params.pop("kind") == kind
    assert make_contamination(kind, **params) == contamination


def test_non_default_params_round_trip():
    for contamination in (
        TextTag(strings="ABC, XYZ", mask_margin=2),
        ColouredBackground(palette=[(1, 0, 0), (0, 1, 0)], stroke_colour=[1, 1, 0], texture="perlin"),
        Stripe(width=3, max_offset=4, step=10),
    ):
        params = json.loads(json.dumps(contamination.params()))
        assert make_contamination(params.pop("kind"), **params) == contamination


# ----------------------------------------------------------------------------- errors


def test_unknown_kind_lists_the_known_ones():
    with pytest.raises(DataError, match="decoy-patch.*coloured-background.*text-tag.*stripe"):
        make_contamination("watermark")


def test_unknown_parameter_is_named():
    with pytest.raises(DataError, match="'patch_sise'"):
        make_contamination("decoy-patch", patch_sise=3)


@pytest.mark.parametrize(
    "kind, params, name",
    [
        ("decoy-patch", {"patch_size": 0}, "patch_size"),
        ("decoy-patch", {"patch_size": "4"}, "patch_size"),
        ("decoy-patch", {"step": 0}, "step"),
        ("decoy-patch", {"step": True}, "step"),
        ("coloured-background", {"bias": 1.5}, "bias"),
        ("coloured-background", {"bias": "high"}, "bias"),
        ("coloured-background", {"noise_mix": -0.1}, "noise_mix"),
        ("coloured-background", {"texture": "plaid"}, "texture"),
        ("coloured-background", {"foreground": "yes"}, "foreground"),
        ("coloured-background", {"stroke_threshold": 0}, "stroke_threshold"),
        ("coloured-background", {"stroke_colour": (1, 1)}, "stroke_colour"),
        ("coloured-background", {"palette": [(1, 0, 0), (1, 0, 0)]}, "palette"),
        ("coloured-background", {"palette": [(2, 0, 0)]}, "palette"),
        ("text-tag", {"strings": ["ABC", "ABC"]}, "strings"),
        ("text-tag", {"strings": ["ABC", ""]}, "strings"),
        ("text-tag", {"strings": ["ABC", "Ä"]}, "strings"),
        ("text-tag", {"mask_margin": -1}, "mask_margin"),
        ("stripe", {"width": 0}, "width"),
        ("stripe", {"max_offset": -1}, "max_offset"),
        ("stripe", {"step": 1.5}, "step"),
    ],
)
def test_invalid_parameters_raise_data_error_naming_them(kind, params, name):
    with pytest.raises(DataError, match=name):
        make_contamination(kind, **params)


@pytest.mark.parametrize(
    "contamination, num_classes, height, match",
    [
        (DecoyPatch(step=30), 10, 28, "step"),  # 30 * 9 > 255
        (DecoyPatch(patch_size=9), 10, 8, "patch_size"),
        (Stripe(step=100), 5, 28, "step"),
        (Stripe(width=20, max_offset=10), 2, 28, "width"),
        (TextTag(strings=("A", "B", "C")), 2, 28, "strings"),
        (ColouredBackground(palette=[(1, 0, 0), (0, 1, 0)]), 3, 28, "palette"),
        (DecoyPatch(), 1, 28, "num_classes"),
    ],
)
def test_parameters_that_do_not_fit_the_data_raise_data_error(contamination, num_classes, height, match):
    images, labels = digit_like(4, height, height), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(DataError, match=match):
        apply(contamination, images, labels, "contaminated", num_classes)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_variants_labels_and_images_raise_data_error(kind):
    contamination = make_contamination(kind)
    images, labels = digit_like(4), cycling_labels(4, 10)
    with pytest.raises(DataError, match="variant"):
        apply(contamination, images, labels, "shuffled", 10)
    for bad_labels in (torch.tensor([0, 1, 2, 10]), torch.tensor([0, -1, 2, 3])):
        with pytest.raises(DataError, match="labels"):
            apply(contamination, images, bad_labels, "contaminated", 10)
    with pytest.raises(DataError, match="labels"):
        apply(contamination, images, labels.float(), "contaminated", 10)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        apply(contamination, images * 2, labels, "contaminated", 10)
    with pytest.raises(DataError, match="C = 1 or 3"):
        apply(contamination, images.repeat(1, 2, 1, 1), labels, "contaminated", 10)


def test_only_the_coloured_background_has_an_inverted_variant():
    with pytest.raises(DataError, match="inverted"):
        apply(DecoyPatch(), digit_like(2), cycling_labels(2, 2), "inverted", 2)
    assert "inverted" in ColouredBackground.variants


# ----------------------------------------------------------------------------- decoy patch


def test_decoy_contaminated_patch_is_a_corner_square_with_the_label_grey_level():
    images, labels = digit_like(40), cycling_labels(40, 10)
    out, mask = apply(DecoyPatch(), images, labels, "contaminated", 10)
    assert torch.equal(changed_pixels(images, out), mask.bool())
    corners = set()
    for m in mask[:, 0].bool().numpy():
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        assert m.sum() == 16 and len(rows) == 4 and len(cols) == 4
        assert rows[0] in (0, 24) and cols[0] in (0, 24)
        corners.add((rows[0], cols[0]))
    assert len(corners) == 4, "all four corners are used"
    expected = torch.tensor([brightness(y, 25) for y in labels.tolist()])
    assert torch.equal(patch_value(out, mask), expected)
    assert torch.equal(out[~mask.bool().expand_as(out)], images[~mask.bool().expand_as(images)])


def test_decoy_permuted_shows_another_label_uniformly():
    images, labels = torch.zeros(2000, 1, 8, 8), cycling_labels(2000, 10)
    out, mask = apply(DecoyPatch(), images, labels, "permuted", 10)
    shown = label_from_brightness(patch_value(out, mask), 25)
    offsets = (shown - labels.numpy()) % 10
    assert np.all(offsets != 0), "a permuted patch never shows the image's own label"
    assert_roughly_uniform(np.bincount(offsets, minlength=10)[1:])


def test_decoy_clean_is_unchanged_with_empty_masks():
    images, labels = digit_like(10, 64, 48, 3), cycling_labels(10, 10)
    out, mask = apply(DecoyPatch(), images, labels, "clean", 10)
    assert torch.equal(out, images) and mask.sum() == 0


def test_decoy_different_seeds_pick_different_corners():
    images, labels = digit_like(40), cycling_labels(40, 10)
    _, mask_a = apply(DecoyPatch(), images, labels, "contaminated", 10, seed=1)
    _, mask_b = apply(DecoyPatch(), images, labels, "contaminated", 10, seed=2)
    assert not torch.equal(mask_a, mask_b)


@given(
    height=st.integers(3, 40),
    width=st.integers(3, 40),
    channels=st.sampled_from([1, 3]),
    num_classes=st.integers(2, 11),
    patch_size=st.integers(1, 3),
    data=st.data(),
)
def test_decoy_property_on_random_sizes_and_labels(height, width, channels, num_classes, patch_size, data):
    labels = torch.tensor(data.draw(st.lists(st.integers(0, num_classes - 1), min_size=1, max_size=6)))
    images = digit_like(len(labels), height, width, channels, seed=height * width)
    contamination = DecoyPatch(patch_size=patch_size, step=255 // (num_classes - 1))
    for variant in ("contaminated", "permuted"):
        out, mask = apply(contamination, images, labels, variant, num_classes, seed=data.draw(st.integers(0, 99)))
        assert_binary_mask(mask, images)
        assert torch.all(mask.flatten(1).sum(1) == patch_size**2)
        # The patch value differs from every image pixel (which are 0 or < 0.97 blobs), unless it is 0.
        assert torch.all(changed_pixels(images, out) <= mask.bool())
        outside = ~mask.bool().expand_as(out)
        assert torch.equal(out[outside], images[outside])
        shown = label_from_brightness(patch_value(out, mask), contamination.step)
        if variant == "contaminated":
            assert np.array_equal(shown, labels.numpy())
        else:
            assert np.all(shown != labels.numpy()) and np.all((shown >= 0) & (shown < num_classes))


# ----------------------------------------------------------------------------- stripe


def stripe_columns(mask: torch.Tensor) -> list[np.ndarray]:
    return [np.flatnonzero(m.any(0)) for m in mask[:, 0].bool().numpy()]


@pytest.mark.parametrize("width, stripe_width, max_offset", [(28, 1, 2), (224, 6, 15), (112, 3, 8)])
def test_stripe_is_a_full_height_column_band_near_an_edge(width, stripe_width, max_offset):
    images, labels = digit_like(40, 32, width), cycling_labels(40, 2)
    out, mask = apply(Stripe(), images, labels, "contaminated", 2)
    assert torch.equal(changed_pixels(images, out), mask.bool())
    sides, offsets = set(), set()
    for cols, m in zip(stripe_columns(mask), mask[:, 0].bool()):
        assert len(cols) == stripe_width and np.all(np.diff(cols) == 1)
        assert torch.all(m[:, cols]), "full image height"
        from_left, from_right = cols[0], width - 1 - cols[-1]
        assert min(from_left, from_right) <= max_offset
        sides.add(from_left < from_right)
        offsets.add(min(from_left, from_right))
    assert sides == {True, False} and len(offsets) > 1


@pytest.mark.parametrize("num_classes, step", [(2, 127), (5, 51), (10, 25)])
def test_stripe_brightness_follows_the_label_with_tap_steps(num_classes, step):
    images, labels = digit_like(30, 28, 40, 3), cycling_labels(30, num_classes)
    out, mask = apply(Stripe(), images, labels, "contaminated", num_classes)
    expected = torch.tensor([brightness(y, step) for y in labels.tolist()])
    assert torch.equal(patch_value(out, mask), expected)


def test_stripe_permuted_swaps_two_classes_and_spreads_over_five():
    labels = cycling_labels(40, 2)
    out, mask = apply(Stripe(), digit_like(40), labels, "permuted", 2)
    assert np.array_equal(label_from_brightness(patch_value(out, mask), 127), 1 - labels.numpy())
    labels = cycling_labels(2000, 5)
    out, mask = apply(Stripe(), torch.zeros(2000, 1, 8, 8), labels, "permuted", 5)
    offsets = (label_from_brightness(patch_value(out, mask), 51) - labels.numpy()) % 5
    assert np.all(offsets != 0)
    assert_roughly_uniform(np.bincount(offsets, minlength=5)[1:], tolerance=0.2)


def test_stripe_clean_is_unchanged():
    images = digit_like(5, 28, 40, 3)
    out, mask = apply(Stripe(), images, cycling_labels(5, 2), "clean", 2)
    assert torch.equal(out, images) and mask.sum() == 0


# ----------------------------------------------------------------------------- text tag


def test_default_text_tags():
    assert default_text_tags(2) == ("ABC", "XYZ")
    assert default_text_tags(5) == ("ABC", "DEF", "GHI", "JKL", "MNO")
    assert default_text_tags(10)[7:] == ("VWX", "008", "009")
    assert len(set(default_text_tags(30))) == 30


@pytest.mark.parametrize("height, width", [(28, 28), (64, 48), (224, 224), (512, 512), (48, 200)])
def test_text_tags_span_about_a_third_of_the_width(height, width):
    tags = render_text_tags(default_text_tags(5), height, width)
    widest = max(t.shape[1] for t in tags) / width
    tallest = max(t.shape[0] for t in tags) / height
    assert all(t.size > 0 and t.dtype == np.uint8 for t in tags)
    # 35% of the width, or 35% of the height for wide, flat images; one-pixel slack at 28 px.
    assert 0.30 <= max(widest, tallest) <= 0.40 + 1.5 / min(height, width)


def crop_to(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


@pytest.mark.parametrize("variant", ["contaminated", "permuted"])
def test_text_tag_shows_the_label_tag_in_a_corner(variant):
    height, width, num_classes = 64, 48, 5
    images, labels = torch.zeros(40, 1, height, width), cycling_labels(40, num_classes)
    out, mask = apply(TextTag(), images, labels, variant, num_classes)
    assert torch.equal(changed_pixels(images, out), mask.bool())  # on black, every tag pixel changes
    tags = [t.astype(np.float32) / 255 for t in render_text_tags(default_text_tags(num_classes), height, width)]
    corners = set()
    for image, m, y in zip(out[:, 0].numpy(), mask[:, 0].bool().numpy(), labels.tolist()):
        shown = [k for k, tag in enumerate(tags) if np.array_equal(crop_to(image, m), tag)]
        assert len(shown) == 1
        assert (shown[0] == y) == (variant == "contaminated")
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        corners.add((rows[0] < height // 2, cols[0] < width // 2))
        assert rows[-1] - rows[0] < height // 2 and cols[-1] - cols[0] < width // 2
    assert len(corners) == 4


def test_text_tag_on_digits_changes_only_masked_pixels():
    images, labels = digit_like(40, channels=3), cycling_labels(40, 2)
    out, mask = apply(TextTag(), images, labels, "contaminated", 2)
    assert torch.all(mask.flatten(1).sum(1) > 0)
    assert torch.all(changed_pixels(images, out) <= mask.bool())
    assert torch.all(out >= images), "white text only brightens"
    # The draws do not depend on pixel values, so the same seed on black images gives alpha.
    alpha, _ = apply(TextTag(), torch.zeros_like(images), labels, "contaminated", 2)
    assert torch.allclose(out, (1 - alpha) * images + alpha, atol=1e-6)


def test_text_tag_permuted_swaps_the_two_pneu_tags():
    height = width = 40
    images, labels = torch.zeros(20, 1, height, width), cycling_labels(20, 2)
    out, mask = apply(TextTag(), images, labels, "permuted", 2)
    tags = [t.astype(np.float32) / 255 for t in render_text_tags(("ABC", "XYZ"), height, width)]
    for image, m, y in zip(out[:, 0].numpy(), mask[:, 0].bool().numpy(), labels.tolist()):
        assert np.array_equal(crop_to(image, m), tags[1 - y])


def test_text_tag_user_strings_and_mask_margin():
    images, labels = torch.zeros(6, 1, 64, 64), cycling_labels(6, 3)
    plain = apply(TextTag(strings="L, R, C"), images, labels, "contaminated", 3)
    wide = apply(TextTag(strings=("L", "R", "C"), mask_margin=2), images, labels, "contaminated", 3)
    assert torch.equal(plain[0], wide[0])
    tags = [t.astype(np.float32) / 255 for t in render_text_tags(("L", "R", "C"), 64, 64)]
    for image, m, y in zip(plain[0][:, 0].numpy(), plain[1][:, 0].bool().numpy(), labels.tolist()):
        assert np.array_equal(crop_to(image, m), tags[y])
    assert torch.all(wide[1] >= plain[1]) and wide[1].sum() > plain[1].sum()
    # The margin is a 5x5 dilation: the mask's bounding box grows by 2 px on each side (away from edges).
    for p, w in zip(plain[1][:, 0].bool().numpy(), wide[1][:, 0].bool().numpy()):
        assert crop_to(w, w).shape == (crop_to(p, p).shape[0] + 4, crop_to(p, p).shape[1] + 4)


# ----------------------------------------------------------------------------- coloured background


def test_coloured_palette_is_distinct_and_extends_with_hues():
    assert np.array_equal(default_palette(10), np.array(DEFAULT_PALETTE, dtype=np.float32))
    for num_classes in (2, 10, 17):
        palette = default_palette(num_classes)
        distances = np.linalg.norm(palette[:, None] - palette[None], axis=-1) + np.eye(num_classes)
        assert palette.shape == (num_classes, 3) and distances.min() > 0.1
        assert palette.min() >= 0 and palette.max() <= 1


def shown_colours(out: torch.Tensor, palette: np.ndarray) -> np.ndarray:
    """Index of the palette colour at pixel (0, 0) (a flat, zero-alpha background pixel)."""
    corner = out[:, :, 0, 0].numpy()
    return np.argmin(np.linalg.norm(corner[:, None] - palette[None], axis=-1), axis=1)


def test_coloured_background_bias_rate():
    num_classes, contamination = 10, ColouredBackground(bias=0.9, noise_mix=0.0)
    labels = cycling_labels(2000, num_classes)
    out, _ = apply(contamination, torch.zeros(2000, 1, 8, 8), labels, "contaminated", num_classes)
    shown = shown_colours(out, default_palette(num_classes))
    kept = shown == labels.numpy()
    assert abs(kept.mean() - 0.9) < 0.025  # 0.025 is 3.7 standard deviations
    assert_roughly_uniform(np.bincount((shown - labels.numpy())[~kept] % num_classes, minlength=10)[1:], 0.6)


def test_coloured_background_bias_extremes():
    labels = cycling_labels(200, 10)
    images = torch.zeros(200, 1, 8, 8)
    always = apply(ColouredBackground(bias=1.0, noise_mix=0.0), images, labels, "contaminated", 10)[0]
    never = apply(ColouredBackground(bias=0.0, noise_mix=0.0), images, labels, "contaminated", 10)[0]
    assert np.array_equal(shown_colours(always, default_palette(10)), labels.numpy())
    assert np.all(shown_colours(never, default_palette(10)) != labels.numpy())


def test_coloured_permuted_is_uniform_over_the_palette_and_inverted_is_the_next_class():
    labels = cycling_labels(2000, 10)
    images, contamination = torch.zeros(2000, 1, 8, 8), ColouredBackground(noise_mix=0.0)
    out, _ = apply(contamination, images, labels, "permuted", 10)
    offsets = (shown_colours(out, default_palette(10)) - labels.numpy()) % 10
    assert_roughly_uniform(np.bincount(offsets, minlength=10))  # own colour included
    out, _ = apply(contamination, images[:30], labels[:30], "inverted", 10)
    assert np.array_equal(shown_colours(out, default_palette(10)), (labels[:30].numpy() + 1) % 10)


def test_coloured_background_formula_and_mask():
    images, labels = digit_like(20), cycling_labels(20, 10)
    contamination = ColouredBackground(bias=1.0, noise_mix=0.4)
    out, mask = apply(contamination, images, labels, "contaminated", 10)
    alpha = images  # single-channel input: alpha is the grey level
    assert torch.equal(mask.bool(), alpha < 0.1)
    # Where alpha == 0 the pixel is the background c * ((1 - m) + m t), between 0.6 c and c.
    colour = torch.from_numpy(default_palette(10))[labels][:, :, None, None]
    background = (alpha == 0).expand_as(out)
    colour = colour.expand_as(out)[background]
    assert torch.all(out[background] >= 0.6 * colour - 1e-6) and torch.all(out[background] <= colour + 1e-6)
    assert (out[background] < 0.9 * colour).any(), "the texture darkens some pixels"
    # Strokes are white: the brightest stroke pixels are near-white in every channel.
    bright = (alpha > 0.9).expand_as(out)
    assert out[bright].min() > 0.9


def test_coloured_textures_differ_and_stay_in_range():
    images, labels = digit_like(10), cycling_labels(10, 10)
    outs = {}
    for texture in ("noise", "smooth", "perlin"):
        out, _ = apply(ColouredBackground(texture=texture), images, labels, "contaminated", 10, seed=4)
        assert out.min() >= 0 and out.max() <= 1
        outs[texture] = out
    assert not torch.equal(outs["noise"], outs["smooth"]) and not torch.equal(outs["smooth"], outs["perlin"])
    rng = np.random.default_rng(0)
    fields = {texture: texture_field(texture, rng, 64, 48) for texture in ("noise", "smooth", "perlin")}
    roughness = {texture: np.abs(np.diff(t, axis=1)).mean() for texture, t in fields.items()}
    assert all(t.shape == (64, 48) and t.min() >= 0 and t.max() <= 1 for t in fields.values())
    assert max(roughness["smooth"], roughness["perlin"]) < roughness["noise"] / 5
    assert not np.allclose(fields["smooth"], fields["perlin"], atol=0.05)


def test_coloured_foreground_colours_the_strokes():
    images, labels = digit_like(20), cycling_labels(20, 10)
    out, mask = apply(ColouredBackground(foreground=True, bias=1.0), images, labels, "contaminated", 10)
    assert torch.equal(mask.bool(), images >= 0.1)
    background = (images == 0)[:, 0]
    grey = out.permute(1, 0, 2, 3)[:, background]
    assert torch.all(grey == grey[0:1]) and grey.max() <= 0.4, "a dark grey background with no colour"
    colour = torch.from_numpy(default_palette(10))[labels][:, :, None, None]
    # out = alpha c + (1 - alpha) * 0.4 t with t in [0, 1]: the grey term lies in [0, 0.4 (1 - alpha)].
    grey_term = out - images * colour
    assert torch.all(grey_term >= -1e-6) and torch.all(grey_term <= 0.4 * (1 - images) + 1e-6)


def test_coloured_clean_is_the_grey_digit_in_three_channels():
    rgb = digit_like(6, 64, 48, 3)
    out, mask = apply(ColouredBackground(), rgb, cycling_labels(6, 10), "clean", 10)
    assert ColouredBackground().out_channels(1) == 3
    assert torch.allclose(out, rgb.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)) and mask.sum() == 0


def test_coloured_custom_palette_and_stroke_colour():
    contamination = ColouredBackground(palette=[(0, 0, 1), (0, 1, 0)], stroke_colour=(1, 0, 0), bias=1.0, noise_mix=0)
    images = torch.zeros(2, 1, 8, 8)
    images[:, :, 4, 4] = 1.0
    out, _ = apply(contamination, images, torch.tensor([0, 1]), "contaminated", 2)
    assert out[0, :, 0, 0].tolist() == [0, 0, 1] and out[1, :, 0, 0].tolist() == [0, 1, 0]
    assert out[0, :, 4, 4].tolist() == [1, 0, 0]


def test_coloured_mask_threshold_is_strict():
    images = torch.zeros(1, 1, 8, 8)
    images[0, 0, 0, :3] = torch.tensor([0.25, 0.5, 0.75])
    _, background = apply(ColouredBackground(stroke_threshold=0.5), images, torch.tensor([0]), "contaminated", 2)
    _, strokes = apply(ColouredBackground(stroke_threshold=0.5, foreground=True), images, torch.tensor([0]),
                       "contaminated", 2)
    assert background[0, 0, 0, :3].tolist() == [1, 0, 0] and strokes[0, 0, 0, :3].tolist() == [0, 1, 1]
    assert torch.equal(background + strokes, torch.ones_like(background))
