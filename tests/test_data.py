import numpy as np
import pytest
import torch
from PIL import Image

from helpers import write_faces
from facefuse.trainer.augment import BatchMixer, RandomShading, build_train_transform, explicit_pipeline, check_pipeline
from facefuse.trainer.config import AugmentConfig
from facefuse.trainer.data import (FaceDataset, eval_transform, open_rgb, read_identity_list, scan_identities,
                          split_holdout, verify_images)
from facefuse.core.errors import BadImageError, FacefuseError


@pytest.mark.parametrize("mode,ext", [("RGB", ".jpg"), ("L", ".pgm"), ("P", ".gif"), ("RGBA", ".png"),
                                      ("I;16", ".png"), ("L", ".png")])
def test_open_rgb_any_mode(tmp_path, mode, ext):
    arr = np.random.default_rng(1).integers(0, 255, (31, 47, 4)).astype(np.uint8)
    im = Image.fromarray(arr, "RGBA")
    im = im.convert(mode) if mode != "I;16" else Image.fromarray(arr[..., 0].astype(np.uint16) * 256)
    path = tmp_path / f"x{ext}"
    im.save(path)
    out = open_rgb(path)
    assert out.mode == "RGB" and out.size == (47, 31)
    t = eval_transform(32, (0.5,) * 3, (0.5,) * 3)(out)
    assert t.shape == (3, 32, 32) and t.dtype == torch.float32 and -1.001 <= float(t.min()) <= float(t.max()) <= 1.001


def test_rgba_alpha_composited_on_black(tmp_path):
    arr = np.full((8, 8, 4), 200, np.uint8)
    arr[..., 3] = 0
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    assert np.asarray(open_rgb(tmp_path / "a.png")).max() == 0


def test_real_grey_sets_load(lfw):
    data = lfw.parent
    for path in [next((data / "orl" / "s1").iterdir()), next((data / "yale").rglob("*.gif"))]:
        assert open_rgb(path).mode == "RGB"


@pytest.mark.parametrize("content,reason", [(b"", "not an image"), (b"hello world", "not an image"),
                                            ("truncated", "corrupt or truncated")])
def test_bad_images(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    if content == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(content)
    with pytest.raises(BadImageError, match=reason) as e:
        open_rgb(path)
    assert str(path) in str(e.value)
    with pytest.raises(BadImageError, match="no such file"):
        open_rgb(tmp_path / "missing.jpg")


def test_scan_and_exclude(faces, tmp_path):
    images, skipped = scan_identities(faces)
    assert images.classes == [f"person_{c:02d}" for c in range(4)] and len(images) == 24 and not skipped
    assert sorted(set(images.labels)) == [0, 1, 2, 3]
    ex = tmp_path / "exclude.txt"
    ex.write_text("person_01\n# comment\n\nperson_03\n")
    images, _ = scan_identities(faces, exclude=read_identity_list(ex))
    assert images.classes == ["person_00", "person_02"] and images.labels == [0] * 6 + [1] * 6


def test_scan_bad_inputs(tmp_path, faces):
    with pytest.raises(FacefuseError, match="no such folder"):
        scan_identities(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FacefuseError, match="no identity sub-folders"):
        scan_identities(tmp_path / "empty")
    (faces / "person_99").mkdir()
    with pytest.raises(FacefuseError, match="person_99: identity folder without images"):
        scan_identities(faces)
    images, skipped = scan_identities(faces, skip_bad=True)
    assert len(images.classes) == 4 and len(skipped) == 1
    (faces / "person_99").rmdir()
    (faces / "person_00" / "notes.txt").write_text("x")
    with pytest.raises(FacefuseError, match=r"notes.txt: not an image file"):
        scan_identities(faces)


def test_verify_images_counts_and_relabels(faces):
    (faces / "person_02" / "img_00.jpg").write_bytes(b"garbage")
    for p in (faces / "person_03").iterdir():
        p.write_bytes(b"garbage")
    images, _ = scan_identities(faces)
    with pytest.raises(FacefuseError, match=r"img_00.jpg: not an image .* \(and 6 more\); pass data.skip_bad=True"):
        verify_images(images, skip_bad=False)
    kept, bad = verify_images(images, skip_bad=True)
    assert len(bad) == 7 and len(kept) == 17 and kept.classes == ["person_00", "person_01", "person_02"]
    assert sorted(set(kept.labels)) == [0, 1, 2]


def test_split_holdout_keeps_one_per_identity(tmp_path):
    images, _ = scan_identities(write_faces(tmp_path / "f", n_identities=5, n_images=3))
    train, val = split_holdout(images, 0.5, seed=3)
    assert len(train) + len(val) == 15 and len(val) == round(0.5 * 15)
    assert set(train.labels) == set(range(5))  # every identity keeps a training image
    assert not set(train.paths) & set(val.paths)
    assert split_holdout(images, 0.5, seed=3)[1].paths == val.paths


def test_default_augment_pipeline_output():
    aug = AugmentConfig(color_jitter=0.3, perspective=0.2, randaugment=9, random_erasing=0.5, crop_scale=0.8,
                        vflip=0.1)
    tf = build_train_transform(aug, 64, (0.5,) * 3, (0.5,) * 3)
    x = tf(Image.new("RGB", (80, 70), (10, 200, 30)))
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32


def _probe(aug: AugmentConfig, image: Image.Image, size: int = 64) -> torch.Tensor:
    """The pipeline's output mapped back to [0, 1] (mean = std = 0.5)."""
    return build_train_transform(aug, size, (0.5,) * 3, (0.5,) * 3)(image) * 0.5 + 0.5


def test_shift_augmentations_do_what_they_say():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    colour = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    # grey-scale: three equal channels, the ITU-R 601 luma of the input (PIL's "L" conversion)
    grey = _probe(AugmentConfig(hflip=0, grayscale=1.0), colour)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    luma = torch.from_numpy(np.asarray(colour.convert("L"), dtype=np.float32) / 255)
    assert float((grey[0] - luma).abs().max()) <= 1.5 / 255
    # blur: a low-pass filter, so white noise loses most of its variance and keeps its mean
    plain = _probe(AugmentConfig(hflip=0), colour)
    blurred = _probe(AugmentConfig(hflip=0, blur=1.0), colour)
    assert float(blurred.var()) < 0.6 * float(plain.var()) and abs(float(blurred.mean() - plain.mean())) < 0.02
    # JPEG at quality 20-90: lossy but close on a smooth image
    ramp = Image.fromarray(np.broadcast_to(np.linspace(0, 255, 64, dtype=np.uint8), (64, 64))[..., None].repeat(3, 2))
    coded = _probe(AugmentConfig(hflip=0, jpeg=1.0), ramp)
    err = (coded - _probe(AugmentConfig(hflip=0), ramp)).abs()
    assert 0 < float(err.max()) and float(err.mean()) < 0.03


def test_zoom_out_leaves_a_black_border_of_the_expected_area():
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    out = _probe(AugmentConfig(hflip=0, zoom=(0.5, 0.5)), white)
    assert float(out[:, :4].max()) == 0 and float(out[:, 30:34, 30:34].min()) == 1.0  # border black, centre kept
    assert float((out[0] > 0.5).float().mean()) == pytest.approx(0.25, abs=0.03)  # a half-size square
    turned = _probe(AugmentConfig(hflip=0, rotate=45, zoom=(1.0, 1.0)), white)
    assert float(turned[:, 0, 0].max()) == 0 and float(turned[:, 32, 32].min()) == 1.0  # corners leave the frame


@pytest.mark.parametrize("strength", [0.3, 0.8])
def test_shading_is_a_linear_ramp_that_darkens_one_side(strength):
    torch.manual_seed(1)
    out = RandomShading(strength)(torch.full((3, 40, 50), 0.8))
    gain = out[0] / 0.8
    assert float(gain.max()) == pytest.approx(1.0) and float(gain.min()) >= 1 - strength - 1e-6
    ys, xs = torch.meshgrid(torch.arange(40.0), torch.arange(50.0), indexing="ij")
    design = torch.stack([torch.ones_like(xs), xs, ys], -1).reshape(-1, 3).double()
    fit = torch.linalg.lstsq(design, gain.reshape(-1, 1).double()).solution
    assert float((design @ fit - gain.reshape(-1, 1).double()).abs().max()) < 1e-5  # a plane: directional light
    assert torch.equal(out[0], out[2])  # the same gain on every channel


def test_pipeline_order_error_names_transform():
    steps = explicit_pipeline([["Resize", {"size": 32}], ["Normalize", {"mean": [0.5] * 3, "std": [0.5] * 3}]])
    with pytest.raises(FacefuseError, match=r"pipeline\[1\] \(Normalize\) needs a tensor image but receives a PIL"):
        check_pipeline(steps, 32)
    with pytest.raises(FacefuseError, match=r"pipeline\[0\]: unknown transform 'Blur'"):
        explicit_pipeline([["Blur", {}]])
    ok = explicit_pipeline([["RandomHorizontalFlip", {}], ["ToImage"], ["Resize", {"size": 32}],
                            ["CenterCrop", {"size": 32}], ["ToDtype"], ["Normalize", {"mean": [0.5] * 3, "std": [0.5] * 3}]])
    check_pipeline(ok, 32)
    with pytest.raises(FacefuseError, match="must end in a float"):
        check_pipeline(ok[:4], 32)


@pytest.mark.parametrize("mix", [{"mixup": 0.4}, {"cutmix": 1.0}, {"mixup": 0.2, "cutmix": 1.0}])
def test_batch_mixer_recovers_two_labels(mix):
    torch.manual_seed(0)
    mixer = BatchMixer(AugmentConfig(**mix), num_classes=7)
    x = torch.randn(6, 3, 16, 16)
    y = torch.tensor([0, 3, 3, 5, 1, 6])
    xm, ya, yb, lam = mixer(x, y)
    assert torch.equal(ya, y) and torch.equal(yb, y.roll(1)) and 0 <= lam <= 1
    if "cutmix" not in mix:  # mixup: exact convex combination of the rolled batch
        torch.testing.assert_close(xm, lam * x + (1 - lam) * x.roll(1, 0))


def test_dataset_returns_tensor_label(faces):
    images, _ = scan_identities(faces)
    ds = FaceDataset(images, eval_transform(32, (0.5,) * 3, (0.5,) * 3))
    x, y = ds[7]
    assert x.shape == (3, 32, 32) and y == 1


def test_decompression_bomb_is_a_bad_image_naming_the_file(tmp_path):
    """A PNG whose header claims 60000 x 60000 pixels is refused before decoding, with one error
    that names the file (not PIL's DecompressionBombError traceback)."""
    import struct
    import zlib

    from facefuse.core.images import open_rgb as core_open_rgb

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)  # 8-bit RGB
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    with pytest.raises(BadImageError, match="bomb.png: too many pixels"):
        core_open_rgb(bomb)
