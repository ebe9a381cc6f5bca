"""Building a database from images: the VQ's own input size, every PIL image mode without saturation,
NaN keys refused (issue 14: each test pins a failure reported against an earlier version, named in
its docstring)."""

import numpy as np
import pytest
import torch

import arrag_kernels as ak
from arrag_kernels.demo import procedural_images
from arrag_kernels.models import get_adapter, tiny_janus_config
from arrag_kernels.retrieval.images import pil_to_tensor


def test_vq_encodes_at_its_own_input_size(tiny_images):
    """A VQ that downsamples 2x under a vision tower of patch 4: images used to be resized to the vision
    tower's 32 px, encoded into a 16x16 latent grid and stored as if it were the 8x8 generation grid."""
    config = tiny_janus_config(grid=8, patch_size=4)
    config.vq_config.channel_multiplier = [1, 2]  # one downsampling: 2x
    from transformers import JanusForConditionalGeneration

    torch.manual_seed(0)
    model = JanusForConditionalGeneration(config).eval()
    adapter = get_adapter(model)
    assert adapter.grid == (8, 8) and adapter.image_size == 16 and config.vision_config.image_size == 32
    db = ak.PatchDatabase.build(tiny_images[:2], model, progress=False)
    assert len(db) == 2 * 7 * 6  # the 8x8 grid's official entries, not a 16x16 grid's
    small = torch.nn.functional.interpolate(tiny_images[:1], size=(16, 16), mode="bicubic", align_corners=False)
    latents, tokens = adapter.encode(small.clamp(-1, 1))
    assert latents.shape[1:3] == (8, 8) and db.values[0] == tokens[0, 1, 1]
    with pytest.raises(ValueError, match=r"onto a 16x16 latent grid, expected \(8, 8\); encode images of 16x16"):
        adapter.encode(tiny_images[:1])


IMAGE_MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]


def _in_mode(rgb, mode):
    """``rgb`` (an 8-bit RGB PIL image) in ``mode``; high-depth modes hold the luma on their own scale."""
    from PIL import Image

    if mode == "I;16":
        return Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
    if mode == "I":
        return Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.int32) * 257))
    if mode == "F":
        return Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.float32) / 255.0)
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", IMAGE_MODES)
def test_image_modes_convert_without_saturation(mode):
    """A 16-bit ramp (I;16) used to come out 97% white from convert("RGB")."""
    rgb = procedural_images(1, 40, seed=3)[0]
    image = _in_mode(rgb, mode)
    assert image.mode == mode
    got = pil_to_tensor(image, 32)
    # expected: Pillow's own 8-bit conversion of the same picture (grey levels for the grey modes)
    grey = mode in ("1", "L", "LA", "I;16", "I", "F")
    expected = pil_to_tensor(rgb.convert("1" if mode == "1" else "L") if grey else image.convert("RGB"), 32)
    assert got.shape == (3, 32, 32) and got.min() >= -1 and got.max() <= 1
    assert (got - expected).abs().max() < 3 / 127.5, f"{mode}: max error {(got - expected).abs().max():.4f}"


def test_ramp_16_bit_is_not_saturated():
    from PIL import Image

    ramp = Image.fromarray(np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16))
    assert ramp.mode == "I;16"
    t = pil_to_tensor(ramp, 32)
    assert abs(t.mean().item()) < 0.01 and (t > 0.99).float().mean() < 0.05


def test_building_from_files_of_every_mode(tiny_model, tmp_path):
    """One database from a folder holding every mode (TIFF for the modes PNG cannot store)."""
    rgb = procedural_images(len(IMAGE_MODES), 32, seed=4)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (mode, im) in enumerate(zip(IMAGE_MODES, rgb)):
        suffix = ".tif" if mode in ("CMYK", "I", "F") else ".png"
        _in_mode(im, mode).save(folder / f"{i:02d}{suffix}")
    built = ak.PatchDatabase.build(folder, tiny_model, progress=False)
    assert built.meta.num_images == len(IMAGE_MODES) and len(built) == len(IMAGE_MODES) * 42


def test_nan_keys_are_rejected(tiny_model, tiny_db):
    """NaN keys used to be stored; every later distance to them is NaN."""
    images = torch.zeros(2, 3, 32, 32)
    images[1, :, 5, 5] = float("nan")
    with pytest.raises(ak.DatabaseError, match=r"keys of images 0..1: row \d+ holds NaN or inf"):
        ak.PatchDatabase.build(images, tiny_model, progress=False)
    keys = tiny_db.keys.clone()
    keys[7, 3] = float("nan")
    with pytest.raises(ak.DatabaseError, match="keys: row 7 holds NaN or inf"):
        ak.PatchDatabase(keys, tiny_db.values, tiny_db.meta)
