"""Data loading on real MRI only: the volumes shipped in nibabel/dipy/nilearn, and image files written from them."""

import shutil
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from mri_platform.data import (
    DataError,
    SliceDataset,
    SliceSet,
    load_any,
    load_builtin,
    load_folder,
    load_nifti,
    load_splits,
    split_by_group,
)

EXAMPLE4D = Path(str(resources.files("nibabel").joinpath("tests/data/example4d.nii.gz")))
ANISO = Path(str(resources.files("dipy").joinpath("data/files/aniso_vox.nii.gz")))
SIZE = 32


@pytest.fixture(scope="module")
def builtin() -> tuple[SliceSet, SliceSet]:
    return load_builtin()


@pytest.fixture(scope="module")
def real_slices(builtin) -> list[np.ndarray]:
    """A dozen held-out slices, stretched to reach 1.0 so that 8- and 16-bit files hold the same picture."""
    held_out = builtin[1]
    picks = np.linspace(0, len(held_out) - 1, 12).astype(int)
    return [held_out.images[i] / held_out.images[i].max() for i in picks]


def _to_uint8(image: np.ndarray, side: int) -> np.ndarray:
    resized = Image.fromarray((image * 255).round().astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC)
    return np.asarray(resized)


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory, real_slices) -> Path:
    """The Kaggle layout: yes/ as RGB JPEG, no/ as gray PNG, odd sizes, plus broken and irrelevant files."""
    root = tmp_path_factory.mktemp("kaggle")
    (root / "yes").mkdir()
    (root / "no").mkdir()
    for i, image in enumerate(real_slices[:6]):
        gray = _to_uint8(image, 80 + 16 * i)
        Image.fromarray(np.stack([gray] * 3, axis=-1)).save(root / "yes" / f"Y{i}.JPG", quality=95)
    for i, image in enumerate(real_slices[6:]):
        Image.fromarray(_to_uint8(image, 100 + 8 * i)).save(root / "no" / f"N{i}.png")
    (root / "yes" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg at all " * 20)
    jpeg = (root / "yes" / "Y0.JPG").read_bytes()
    (root / "yes" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "no" / "empty.png").write_bytes(b"")
    Image.fromarray(np.zeros((90, 90), np.uint8)).save(root / "no" / "blank.png")
    shutil.copy(root / "no" / "N0.png", root / "no" / "N0_copy.png")
    (root / "notes.txt").write_text("not an image")
    (root / ".DS_Store").write_bytes(b"\x00\x01")
    return root


@pytest.fixture(scope="module")
def nifti_folder(tmp_path_factory, real_slices) -> Path:
    """Two real volumes, a garbage file, a truncated copy and a 2D image stored as NIfTI."""
    root = tmp_path_factory.mktemp("nifti")
    shutil.copy(EXAMPLE4D, root / "example4d.nii.gz")
    (root / "sub").mkdir()
    shutil.copy(ANISO, root / "sub" / "aniso_vox.nii.gz")
    (root / "garbage.nii.gz").write_bytes(np.random.default_rng(0).bytes(2000))
    whole = EXAMPLE4D.read_bytes()
    (root / "truncated.nii.gz").write_bytes(whole[: len(whole) // 3])
    nib.Nifti1Image(real_slices[0], np.eye(4)).to_filename(root / "flat.nii")
    return root


# ----------------------------------------------------------------------------------------------------- built-in


def test_builtin_is_real_slices_split_by_volume(builtin):
    train, held_out = builtin
    for part in (train, held_out):
        assert part.images.dtype == np.float32 and part.images.shape[1:] == (64, 64)
        assert part.images.min() >= 0 and part.images.max() <= 1
        assert len(part.names) == len(part.groups) == len(part)
    assert 200 <= len(train) <= 1000 and 20 <= len(held_out) <= 200
    assert set(train.groups) == {"mni152"}
    assert {name.split(":")[1] for name in train.names} == {"axial", "coronal", "sagittal"}
    assert set(held_out.groups) == {
        "example4d.nii.gz",
        "S0_10slices.nii.gz",
        "aniso_vox.nii.gz",
        "t1_coronal_slice.npy",
    }
    assert not set(train.groups) & set(held_out.groups)
    # No slice is mostly background: the near-empty edge slices were dropped.
    assert (train.images > 0.1).mean(axis=(1, 2)).min() > 0.1


def test_builtin_returns_copies_and_other_sizes(builtin):
    train, _ = builtin
    first = load_builtin()[0]
    first.images[:] = 0
    assert load_builtin()[0].fingerprint() == train.fingerprint()
    small_train, small_held_out = load_builtin(SIZE)
    assert small_train.images.shape[1:] == (SIZE, SIZE) and len(small_held_out) == len(builtin[1])


def test_load_splits_and_load_any_builtin(builtin):
    train, held_out = load_splits(None)
    assert train.fingerprint() == builtin[0].fingerprint()
    assert held_out.fingerprint() == builtin[1].fingerprint()
    assert load_any("builtin").fingerprint() == builtin[1].fingerprint()


# ------------------------------------------------------------------------------------------------- image folders


def test_folder_loads_images_and_names_what_it_skipped(kaggle):
    slices = load_folder(kaggle, size=SIZE)
    assert len(slices) == 12
    assert slices.images.shape == (12, SIZE, SIZE) and slices.images.dtype == np.float32
    assert slices.images.min() >= 0 and slices.images.max() <= 1
    assert slices.names[0] == "no/N0.png" and "yes/Y0.JPG" in slices.names
    assert list(slices.groups) == slices.names
    assert slices.source == f"folder:{kaggle}"
    reasons = {Path(path).name: reason for path, reason in slices.skipped}
    assert set(reasons) == {"broken.jpg", "truncated.jpg", "empty.png", "blank.png", "N0_copy.png"}
    assert "0 bytes" in reasons["empty.png"]
    assert "constant" in reasons["blank.png"]
    assert "not a readable image" in reasons["broken.jpg"]
    assert "duplicate of no/N0.png" in reasons["N0_copy.png"]


def test_colour_modes_give_the_same_gray_image(tmp_path, real_slices):
    gray = _to_uint8(real_slices[3], 96)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(tmp_path / "rgb.png")
    Image.fromarray(gray).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(gray).convert("LA").save(tmp_path / "alpha.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "deep16.png")
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(tmp_path / "rgb.jpg", quality=95)
    slices = load_folder(tmp_path, size=SIZE)
    images = dict(zip(slices.names, slices.images, strict=True))
    for name in ("rgb.png", "palette.png", "alpha.png", "deep16.png"):
        np.testing.assert_allclose(images[name], images["gray.png"], atol=2e-3, err_msg=name)
    assert np.abs(images["rgb.jpg"] - images["gray.png"]).mean() < 0.02


def test_folder_of_only_bad_files_names_folder_and_reasons(tmp_path):
    (tmp_path / "yes").mkdir()
    (tmp_path / "yes" / "Y1.jpg").write_bytes(b"garbage" * 50)
    (tmp_path / "yes" / "Y2.png").write_bytes(b"")
    with pytest.raises(DataError, match="2 file") as error:
        load_folder(tmp_path)
    assert str(tmp_path) in str(error.value) and "Y1.jpg" in str(error.value)


def test_missing_or_imageless_folder_says_so(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_folder(tmp_path / "nowhere")
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"no image files.*\.jpg"):
        load_folder(tmp_path)


# ---------------------------------------------------------------------------------------------------------- NIfTI


def test_nifti_file_slices_one_group(tmp_path):
    path = tmp_path / "example4d.nii.gz"
    shutil.copy(EXAMPLE4D, path)
    slices = load_nifti(path, size=SIZE)
    assert slices.images.shape[1:] == (SIZE, SIZE) and len(slices) > 10
    assert set(slices.groups) == {"example4d.nii.gz"}
    assert slices.names[0].startswith("example4d.nii.gz:axial:")
    assert slices.images.min() >= 0 and slices.images.max() <= 1


def test_planes_add_their_slices_and_unknown_plane_is_refused():
    axial = load_nifti(ANISO, planes=("axial",), size=SIZE)
    coronal = load_nifti(ANISO, planes="coronal", size=SIZE)
    every = load_nifti(ANISO, planes=("axial", " Coronal", "sagittal"), size=SIZE)
    assert len(axial) + len(coronal) < len(every)
    assert every.names[: len(axial)] == axial.names
    with pytest.raises(DataError, match="axial, coronal, sagittal"):
        load_nifti(ANISO, planes=("transverse",))


def test_orientation_on_disk_does_not_change_the_slices(tmp_path):
    """The same head stored left-right flipped (with the matching affine) gives the same slices."""
    image = nib.load(ANISO)
    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = image.shape[0] - 1
    flipped = nib.Nifti1Image(np.asarray(image.dataobj)[::-1].copy(), image.affine @ flip)
    flipped.to_filename(tmp_path / "flipped.nii.gz")
    original = load_nifti(ANISO, planes=("axial", "coronal"), size=SIZE)
    again = load_nifti(tmp_path / "flipped.nii.gz", planes=("axial", "coronal"), size=SIZE)
    np.testing.assert_allclose(again.images, original.images, atol=1e-5)


def test_thick_slices_keep_the_head_shape(tmp_path):
    """Every other axial slice with twice the thickness: coronal slices look the same, not squashed."""
    image = nib.load(EXAMPLE4D)
    data = np.asarray(image.dataobj)[..., 0]
    thick = image.affine @ np.diag([1.0, 1, 2, 1])
    nib.Nifti1Image(data[..., ::2], thick).to_filename(tmp_path / "thick.nii.gz")
    fine = load_nifti(EXAMPLE4D, planes="coronal", size=SIZE)
    coarse = load_nifti(tmp_path / "thick.nii.gz", planes="coronal", size=SIZE)
    assert coarse.names == [name.replace("example4d", "thick") for name in fine.names]
    assert np.abs(coarse.images - fine.images).mean() < 0.05


def test_nifti_folder_skips_bad_files(nifti_folder):
    slices = load_nifti(nifti_folder, size=SIZE)
    assert set(slices.groups) == {"example4d.nii.gz", "sub/aniso_vox.nii.gz"}
    reasons = {Path(path).name: reason for path, reason in slices.skipped}
    assert set(reasons) == {"garbage.nii.gz", "truncated.nii.gz", "flat.nii"}
    assert "expected a 3D or 4D volume" in reasons["flat.nii"] and "(64, 64)" in reasons["flat.nii"]


def test_nan_voxels_become_background(tmp_path):
    image = nib.load(ANISO)
    data = np.asarray(image.dataobj).astype(np.float32)
    data[:5] = np.nan
    nib.Nifti1Image(data, image.affine).to_filename(tmp_path / "nan.nii.gz")
    slices = load_nifti(tmp_path / "nan.nii.gz", size=SIZE)
    assert np.isfinite(slices.images).all() and len(slices) > 10


def test_no_usable_nifti_is_an_error(tmp_path):
    (tmp_path / "a.nii").write_bytes(b"nothing here" * 40)
    with pytest.raises(DataError, match=r"no usable NIfTI.*1 file"):
        load_nifti(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_nifti(tmp_path / "missing.nii.gz")


# --------------------------------------------------------------------------------------------- splits, dispatch


def test_split_keeps_groups_apart_and_follows_the_seed(kaggle):
    slices = load_folder(kaggle, size=SIZE)
    train, test = split_by_group(slices, test_fraction=0.25, seed=0)
    assert not set(train.groups) & set(test.groups)
    assert sorted(train.names + test.names) == sorted(slices.names)
    assert len(test) >= 0.25 * len(slices) and len(train) > 0
    assert test.source == slices.source and test.skipped == slices.skipped
    again = split_by_group(slices, test_fraction=0.25, seed=0)[1]
    assert again.names == test.names
    others = [split_by_group(slices, test_fraction=0.25, seed=seed)[1].names for seed in range(1, 6)]
    assert any(sorted(names) != sorted(test.names) for names in others)


def test_split_refuses_one_group_and_bad_fraction(kaggle):
    slices = load_folder(kaggle, size=SIZE)
    with pytest.raises(DataError, match="one group cannot be split"):
        split_by_group(slices.subset(np.array([0, 0])))
    with pytest.raises(ValueError, match="test_fraction"):
        split_by_group(slices, test_fraction=1.0)


def test_load_splits_dispatches_on_the_path(kaggle, nifti_folder, tmp_path):
    train, test = load_splits(str(kaggle), size=SIZE, test_fraction=0.2, seed=3)
    assert train.source.startswith("folder:") and len(train) + len(test) == 12
    train, test = load_splits(str(nifti_folder), size=SIZE, test_fraction=0.3)
    assert {*train.groups, *test.groups} == {"example4d.nii.gz", "sub/aniso_vox.nii.gz"}
    assert load_any(str(nifti_folder / "example4d.nii.gz"), size=SIZE).source.startswith("nifti:")
    with pytest.raises(DataError, match="one group cannot be split"):
        load_splits(str(nifti_folder / "example4d.nii.gz"), size=SIZE)
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="expected 'builtin'"):
        load_splits(str(tmp_path / "table.csv"))


# ------------------------------------------------------------------------------------------------ set and dataset


def test_fingerprint_is_the_data_version(builtin):
    _, held_out = builtin
    assert len(held_out.fingerprint()) == 12
    changed = held_out.subset(np.arange(len(held_out)))
    assert changed.fingerprint() == held_out.fingerprint()
    changed.images[0, 10, 10] += 0.01
    assert changed.fingerprint() != held_out.fingerprint()
    assert held_out.subset(np.arange(1, len(held_out))).fingerprint() != held_out.fingerprint()


def test_augmentation_changes_images_but_keeps_shape_and_range(builtin):
    images = builtin[1].images[:8]
    plain = SliceDataset(images, augment=False)
    torch.manual_seed(0)
    augmented = SliceDataset(images, augment=True)
    assert torch.equal(plain[0], torch.from_numpy(images[0])[None])
    for i in range(len(images)):
        item = augmented[i]
        assert item.shape == (1, 64, 64) and item.dtype == torch.float32
        assert item.min() >= 0 and item.max() <= 1
        assert not torch.allclose(item, plain[i], atol=1e-3)


def test_native_size_keeps_each_slices_own_resolution():
    from mri_platform.data import load_builtin as load

    train, held_out = load("native")
    small_train, _ = load(64)
    assert train.images.dtype == object and len(train) == len(small_train)  # the same slices, at their own size
    shapes = {image.shape for image in train.images}
    assert len(shapes) > 3 and all(h == w for h, w in shapes)  # square boxes of the head, sizes differing
    assert max(h for h, _ in shapes) > 64 and min(h for h, _ in {i.shape for i in held_out.images}) < 64
    groups = held_out.by_shape()
    assert sorted(int(i) for index, _ in groups for i in index) == list(range(len(held_out)))
    assert all(stack.shape[1:] == held_out.images[index[0]].shape for index, stack in groups)
    assert held_out.fingerprint() != load("native")[0].fingerprint()
    assert held_out.subset(np.array([0, 5])).images[1].shape == held_out.images[5].shape


def test_patches_are_cut_from_slices_of_any_size(builtin):
    train, _ = builtin
    from mri_platform.data import load_builtin as load

    native = load("native")[0].images
    dataset = SliceDataset(native, augment=True, patch=48, intensity=True, length=200)
    assert len(dataset) == 200  # a fixed number of items per epoch, whatever the data's size
    torch.manual_seed(0)
    items = torch.stack([dataset[i] for i in range(40)])
    assert items.shape == (40, 1, 48, 48) and items.min() >= 0 and items.max() <= 1
    assert len({round(float(x.sum()), 3) for x in items}) == 40  # random places, zooms and turns
    with pytest.raises(ValueError, match="need --patch"):
        SliceDataset(native)
    tiny = SliceDataset(train.images[:2, :20, :20], patch=32)  # smaller than the patch: padded with background
    assert tiny[0].shape == (1, 32, 32) and float(tiny[0][0, 25:, 25:].abs().sum()) == 0.0


def test_intensity_augmentation_changes_contrast_within_range_and_keeps_the_background(builtin):
    from mri_platform.data import intensity_augmentation

    image = torch.from_numpy(builtin[0].images[200])[None]
    generator = torch.Generator().manual_seed(0)
    changed = [intensity_augmentation(image, generator) for _ in range(40)]
    assert all(c.min() >= 0 and c.max() <= 1 and c.shape == image.shape for c in changed)
    background = image == 0
    assert all(float(c[background].abs().max()) == 0.0 for c in changed)  # black stays black

    def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
        head = image > 0.1
        return float(torch.corrcoef(torch.stack([a[head], b[head]]))[0, 1])

    correlations = [correlation(c, image) for c in changed]
    assert min(correlations) < 0.5 < max(correlations)  # some draws reorder the tissues, others keep them
