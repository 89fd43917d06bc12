"""Brain MRI slices for the denoisers: built-in volumes, folders of JPEG/PNG, NIfTI files, and splits by volume.

Every source ends as a `SliceSet` of single-channel float32 slices in [0, 1] with one group per volume or patient,
so that `split_by_group` never puts parts of one scan on both sides of the split (the seed code split after
augmentation and so trained on copies of its test images). Augmentation is applied later, per item, in
`pipeline.SliceDataset`, and only to the training side.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes
from PIL import Image, ImageOps, UnidentifiedImageError

# The training views moved to the light `pipeline` module (no nibabel); kept importable from here.
from mri_platform.pipeline import SliceDataset, augmentation, intensity_augmentation  # noqa: F401

PLANES = ("axial", "coronal", "sagittal")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
NIFTI_SUFFIXES = (".nii", ".nii.gz")

# After per-volume normalisation to [0, 1], voxels above this are head; the rest is background and noise.
FOREGROUND = 0.1
# A slice is kept when its head fills at least this much of its bounding box ...
MIN_FILL = 0.15
# ... its box's longer side is at least this fraction of the longest along the same plane of the volume ...
MIN_EXTENT = 0.25
# ... and its head area is at least this fraction of the largest along that plane (drops blurry caps and poles).
MIN_AREA = 0.15
# Black border added around the head's box, on each side, as a fraction of the box's longer side.
MARGIN = 0.05
# Spatial axes shorter than this are not a volume one can slice (a 2D image stored as NIfTI, a single slab).
MIN_DIM = 4
# Array axis of the slice direction once a volume is in RAS+ canonical orientation.
_PLANE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}

_MNI = ("nilearn", "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
_HELD_OUT_VOLUMES = (
    ("nibabel", "tests/data/example4d.nii.gz"),
    ("dipy", "data/files/S0_10slices.nii.gz"),
    ("dipy", "data/files/aniso_vox.nii.gz"),
)
_HELD_OUT_SLICE = ("dipy", "data/files/t1_coronal_slice.npy")


class DataError(ValueError):
    """Bad input data; the message names the file, what was wrong and what to do."""


class _Skip(Exception):
    """One input cannot be used; the reason is recorded in `SliceSet.skipped` and the others go on."""


@dataclass
class SliceSet:
    """Single-channel slices ready for the models."""

    images: np.ndarray
    """(N, size, size) float32 in [0, 1]; at native size, where slices differ in shape, an (N,) object array of
    (H, W) float32 arrays (see `pack`)."""
    groups: np.ndarray
    """(N,) str: the volume or patient each slice came from; splits never cut a group."""
    names: list[str]
    """(N,) where each slice came from, e.g. "example4d.nii.gz:axial:12" or "yes/Y1.jpg"."""
    source: str
    """Human description of the source, e.g. "builtin" or "folder:/data/kaggle"."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(path, reason) of inputs that were skipped, so that a user can see what was left out and why."""

    def __post_init__(self) -> None:
        ragged = self.images.ndim == 1 and self.images.dtype == object
        if not (self.images.ndim == 3 or ragged) or not (len(self.images) == len(self.groups) == len(self.names)):
            raise ValueError(
                f"SliceSet needs images (N, H, W) with one group and name each; got images {self.images.shape}, "
                f"{len(self.groups)} groups, {len(self.names)} names"
            )

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: np.ndarray) -> SliceSet:
        """The slices at `index` (integer positions or a boolean mask), keeping source and skipped."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        return SliceSet(
            images=self.images[index],
            groups=self.groups[index],
            names=[self.names[i] for i in index],
            source=self.source,
            skipped=list(self.skipped),
        )

    def fingerprint(self) -> str:
        """Short hash of pixels and names: the data version that checkpoints and runs record."""
        digest = hashlib.sha256(str(self.images.shape).encode())
        if self.images.dtype == object:
            for image in self.images:
                digest.update(str(image.shape).encode())
                digest.update(np.ascontiguousarray(image, dtype=np.float32).tobytes())
        else:
            digest.update(np.ascontiguousarray(self.images, dtype=np.float32).tobytes())
        digest.update("\n".join(self.names).encode())
        return digest.hexdigest()[:12]

    @property
    def size(self) -> int | str:
        """The side of every slice, or 'native' where the slices keep their own sizes."""
        return int(self.images.shape[-1]) if self.images.dtype != object else "native"

    def by_shape(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(indices, (n, H, W) stack) per slice shape, in order of first appearance: what a model can batch.

        A set of equal-sized slices is one group holding them all, so the fixed-seed evaluation noise drawn per
        group (`noise.fixed_noisy_groups`) is exactly what it was before native sizes existed.
        """
        if self.images.dtype != object:
            return [(np.arange(len(self.images)), self.images)]
        order: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(self.images):
            order.setdefault(image.shape, []).append(i)
        return [(np.array(index), np.stack([self.images[i] for i in index])) for index in order.values()]


# ---------------------------------------------------------------------------------------------------------------
# Shared image operations


def _checked_size(size: int | str) -> int | str:
    """The side length as a plain int (also the in-process cache key), or 'native'; refuses sizes no model can use."""
    if size == "native":
        return size
    if isinstance(size, str) and size.isdigit():
        size = int(size)
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 8:
        raise ValueError(f"size must be 'native' or an integer of at least 8 pixels, got {size!r}")
    return int(size)


def pack(images: Sequence[np.ndarray]) -> np.ndarray:
    """Slices as one (N, H, W) array when they share a shape, else as an (N,) object array of (H, W) arrays."""
    if len({image.shape for image in images}) <= 1:
        return np.stack(images) if len(images) else np.zeros((0, 0, 0), np.float32)
    packed = np.empty(len(images), dtype=object)
    for i, image in enumerate(images):  # item by item: numpy would otherwise try to broadcast the arrays
        packed[i] = image
    return packed


def _resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Lanczos resampling (anti-aliased when shrinking, as Pillow widens the kernel), clipped back to [0, 1]."""
    height, width = shape
    resized = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32)).resize(
        (width, height), Image.Resampling.LANCZOS
    )
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def _pad_square(image: np.ndarray) -> np.ndarray:
    """Centres the image on a square black canvas with a small margin, so the head keeps its aspect ratio."""
    height, width = image.shape
    side = int(round(max(height, width) * (1 + 2 * MARGIN)))
    canvas = np.zeros((side, side), dtype=np.float32)
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top : top + height, left : left + width] = image
    return canvas


def _square_pixels(image: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """Resamples to square pixels at the finer spacing: a 4 x 5 mm pixel would otherwise squash the head."""
    row_mm, col_mm = spacing
    if np.isclose(row_mm, col_mm, rtol=1e-3):
        return image
    finest = min(row_mm, col_mm)
    height, width = image.shape
    return _resize(image, (max(1, round(height * row_mm / finest)), max(1, round(width * col_mm / finest))))


# ---------------------------------------------------------------------------------------------------------------
# Volumes


def intensity_window(volume: np.ndarray) -> tuple[float, float]:
    """The intensities mapped to 0 and 1: percentiles of the non-zero voxels ignore the background and outliers."""
    foreground = volume[volume != 0]
    if foreground.size == 0:
        raise _Skip("every voxel is zero (or NaN); nothing to slice")
    low, high = (float(v) for v in np.percentile(foreground, [0.5, 99.5]))
    if high <= low:
        raise _Skip(f"constant intensity ({low:g}); there is no image in it")
    return low, high


def _normalise(volume: np.ndarray) -> np.ndarray:
    """Robust per-volume scaling to [0, 1] with :func:`intensity_window`."""
    volume = np.nan_to_num(volume.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = intensity_window(volume)
    return np.clip((volume - low) / (high - low), 0.0, 1.0)


def _oriented(volume: np.ndarray, spacing: Sequence[float], plane: str) -> tuple[np.ndarray, tuple[float, float]]:
    """Stack of slices (n, rows, cols) of a RAS+ volume, shown as a radiology viewer shows them.

    Up is superior (anterior in axial slices); the patient's right is on the viewer's left (anterior on the left
    in sagittal slices). Returns the stack and its (row, column) pixel spacing in mm.
    """
    axis = _PLANE_AXIS[plane]
    first, second = (a for a in range(3) if a != axis)
    stack = np.moveaxis(volume, axis, 0)  # (n, first, second)
    stack = np.swapaxes(stack, 1, 2)[:, ::-1, ::-1]  # (n, rows = second reversed, cols = first reversed)
    return stack, (float(spacing[second]), float(spacing[first]))


def _head_boxes(stack: np.ndarray, spacing: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box (r0, r1, c0, c1, inclusive) of each slice's head and whether the slice is worth keeping.

    Edge slices of a volume are mostly background or a small cap of the head; they teach the model little and
    make the metrics look better than they are, so slices whose head is small or sparse are dropped.
    """
    mask = stack > FOREGROUND
    rows, cols = mask.any(axis=2), mask.any(axis=1)  # (n, R), (n, C)
    r0, r1 = rows.argmax(axis=1), rows.shape[1] - 1 - rows[:, ::-1].argmax(axis=1)
    c0, c1 = cols.argmax(axis=1), cols.shape[1] - 1 - cols[:, ::-1].argmax(axis=1)
    height, width = r1 - r0 + 1, c1 - c0 + 1
    count = mask.sum(axis=(1, 2))
    has_head = count > 0
    extent = np.where(has_head, np.maximum(height * spacing[0], width * spacing[1]), 0.0)
    fill = count / (height * width)
    area = count * spacing[0] * spacing[1]
    keep = has_head & (fill >= MIN_FILL) & (extent >= MIN_EXTENT * extent.max()) & (area >= MIN_AREA * area.max())
    return np.stack([r0, r1, c0, c1], axis=1), keep


def _slice_images(
    stack: np.ndarray, spacing: tuple[float, float], size: int | str
) -> tuple[list[int], list[np.ndarray]]:
    """Indices and finished (size, size) images of the slices in `stack` that show enough head.

    At 'native' size the head's square box keeps its own pixels (resampled to square pixels, never scaled).
    """
    boxes, keep = _head_boxes(stack, spacing)
    indices, images = [], []
    for k in np.flatnonzero(keep):
        r0, r1, c0, c1 = boxes[k]
        head = _square_pixels(stack[k, r0 : r1 + 1, c0 : c1 + 1], spacing)
        indices.append(int(k))
        square = _pad_square(head)
        images.append(square if size == "native" else _resize(square, (size, size)))
    return indices, images


def _read_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The first 3D volume of a NIfTI file in RAS+ orientation, normalised, with its voxel sizes in mm."""
    try:
        image = nib.load(path)
    except Exception as exc:  # nibabel raises many types for garbage; all mean "not a readable NIfTI"
        raise _Skip(f"not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    return _volume_of(image)


def _nifti_from_bytes(content: bytes) -> nib.Nifti1Image | nib.Nifti2Image:
    """A NIfTI image from a file's bytes (gzipped or not), as read from S3 without a local copy."""
    try:
        if content[:2] == b"\x1f\x8b":
            content = gzip.decompress(content)
        if len(content) >= 4 and int.from_bytes(content[:4], "little") == 540:  # sizeof_hdr 540: NIfTI-2
            return nib.Nifti2Image.from_bytes(content)
        return nib.Nifti1Image.from_bytes(content)
    except Exception as exc:  # garbage, truncated archives, wrong magic
        raise _Skip(f"not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc


def _volume_of(image) -> tuple[np.ndarray, np.ndarray]:
    """`_read_volume` of an image nibabel has opened."""
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise _Skip(f"not a NIfTI image (nibabel read it as {type(image).__name__})")
    shape = image.shape
    if len(shape) < 3 or min(shape[:3]) < MIN_DIM:
        raise _Skip(
            f"expected a 3D or 4D volume with at least {MIN_DIM} voxels along each spatial axis, got shape {shape}"
        )
    try:
        if len(shape) > 3:  # 4D (time, diffusion directions): the first volume
            image = image.slicer[(slice(None),) * 3 + (0,) * (len(shape) - 3)]
        image = nib.as_closest_canonical(image)
        data = image.get_fdata(dtype=np.float32)
    except Exception as exc:  # truncated or corrupt data block behind a valid header
        raise _Skip(f"could not read the image data ({type(exc).__name__}: {exc})") from exc
    spacing = voxel_sizes(image.affine)
    spacing = np.where(np.isfinite(spacing) & (spacing > 0), spacing, 1.0)
    return _normalise(data), spacing


def _volume_slices(
    path: Path | bytes, label: str, planes: Sequence[str], size: int | str
) -> tuple[list[str], list[np.ndarray]]:
    """Names and images of the usable slices of one NIfTI file (a path, or the file's bytes) along the planes."""
    volume, spacing = _volume_of(_nifti_from_bytes(path)) if isinstance(path, bytes) else _read_volume(path)
    names, images = [], []
    for plane in planes:
        indices, plane_images = _slice_images(*_oriented(volume, spacing, plane), size)
        names += [f"{label}:{plane}:{k}" for k in indices]
        images += plane_images
    if not images:
        raise _Skip(f"no slice along {', '.join(planes)} shows enough head (all near-empty)")
    return names, images


def _check_planes(planes: Sequence[str] | str) -> tuple[str, ...]:
    """Validated planes without duplicates; a bare string is one plane, not a sequence of letters."""
    planes = (planes,) if isinstance(planes, str) else tuple(planes)
    planes = tuple(str(p).strip().lower() for p in planes)  # "axial, Coronal" split on commas by a CLI
    unknown = [p for p in planes if p not in PLANES]
    if unknown or not planes:
        raise DataError(f"unknown or missing plane(s) {unknown or list(planes)}; valid planes are {', '.join(PLANES)}")
    return tuple(dict.fromkeys(planes))


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _find_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files below `folder` with one of `suffixes` (any case), sorted; hidden files and folders are ignored."""
    found = []
    for path in folder.rglob("*"):
        hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
        if not hidden and path.name.lower().endswith(suffixes) and path.is_file():
            found.append(path)
    return sorted(found)


def _nifti_files(paths: str | Path | Sequence[str | Path]) -> tuple[list[Path], str]:
    """The NIfTI files that `paths` names (files, folders searched recursively) and a description of them."""
    given = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
    if not given:
        raise DataError("no NIfTI path given; pass a .nii/.nii.gz file, a list of them, or a folder holding them")
    files: list[Path] = []
    for path in given:
        if path.is_dir():
            files += _find_files(path, NIFTI_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path} does not exist; pass a .nii/.nii.gz file or a folder holding them")
    if not files:
        raise DataError(f"no NIfTI files (.nii, .nii.gz) found in {', '.join(map(str, given))}")
    description = f"nifti:{given[0]}" + (f" (+{len(given) - 1} more)" if len(given) > 1 else "")
    return files, description


def _labels(files: list[Path]) -> list[str]:
    """Short, unique labels: paths relative to the files' common folder (just the name for a single file)."""
    absolute = [f.absolute() for f in files]
    root = Path(os.path.commonpath([f.parent for f in absolute]))
    return [f.relative_to(root).as_posix() for f in absolute]


def load_nifti(
    paths: str | Path | Sequence[str | Path], planes: Sequence[str] = ("axial",), size: int | str = 64
) -> SliceSet:
    """Slices of NIfTI volumes (one group per file) along `planes`, preprocessed like the built-in volumes.

    Unreadable, 2D or flat files are skipped with a reason while others load; none loading is an error.
    """
    size = _checked_size(size)
    planes = _check_planes(planes)
    files, source = _nifti_files(paths)
    names, images, groups, skipped = [], [], [], []
    for path, label in zip(files, _labels(files), strict=True):
        try:
            if not _is_nifti(path):
                raise _Skip("not a NIfTI file (expected .nii or .nii.gz)")
            file_names, file_images = _volume_slices(path, label, planes, size)
        except _Skip as skip:
            skipped.append((str(path), str(skip)))
            continue
        names += file_names
        images += file_images
        groups += [label] * len(file_images)
    if not images:
        hint = "Check that the files are 3D or 4D brain volumes that nibabel can open."
        raise DataError(_nothing_usable(source, len(files), skipped, "NIfTI volumes", hint))
    return SliceSet(pack(images), np.array(groups, dtype=str), names, source, skipped)


def _nothing_usable(source: str, n_found: int, skipped: list[tuple[str, str]], what: str, hint: str) -> str:
    reasons = "; ".join(f"{path}: {reason}" for path, reason in skipped[:3])
    more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
    return f"no usable {what} in {source}: {n_found} file(s) found, all skipped: {reasons}{more}. {hint}"


# ---------------------------------------------------------------------------------------------------------------
# Built-in data: real MRI shipped inside installed packages


def _package_file(package: str, relative: str) -> Path:
    """Path of a data file inside an installed package, so nothing is downloaded or hard-coded."""
    path = Path(str(resources.files(package).joinpath(relative)))
    if not path.is_file():
        raise DataError(f"built-in data file {relative} is missing from the installed {package} package; reinstall it")
    return path


def _t1_slice(size: int | str) -> np.ndarray:
    """dipy's single real T1 coronal slice (stored upright), preprocessed like a one-slice volume."""
    array = np.load(_package_file(*_HELD_OUT_SLICE))
    stack = _normalise(array)[np.newaxis]  # (1, rows, cols)
    _, images = _slice_images(stack, (1.0, 1.0), size)
    return images[0]


@lru_cache(maxsize=4)
def _builtin(size: int | str) -> tuple[SliceSet, SliceSet]:
    mni = _package_file(*_MNI)
    names, images = _volume_slices(mni, mni.name, PLANES, size)
    train = SliceSet(pack(images), np.array(["mni152"] * len(images)), names, "builtin")

    names, images, groups = [], [], []
    for package, relative in _HELD_OUT_VOLUMES:
        path = _package_file(package, relative)
        volume_names, volume_images = _volume_slices(path, path.name, ("axial",), size)
        names += volume_names
        images += volume_images
        groups += [path.name] * len(volume_images)
    t1_name = Path(_HELD_OUT_SLICE[1]).name
    names.append(f"{t1_name}:coronal:0")
    images.append(_t1_slice(size))
    groups.append(t1_name)
    held_out = SliceSet(pack(images), np.array(groups), names, "builtin")
    return train, held_out


def _copy(slices: SliceSet) -> SliceSet:
    images = pack([image.copy() for image in slices.images]) if slices.images.dtype == object else slices.images.copy()
    return SliceSet(images, slices.groups.copy(), list(slices.names), slices.source, list(slices.skipped))


def load_builtin(size: int | str = 64) -> tuple[SliceSet, SliceSet]:
    """(train, held_out) from real MRI inside installed packages: works offline and needs no data set.

    Train: every usable slice along the three planes of the MNI152 T1 template (nilearn). Held out, from other
    scanners and contrasts and never trained on: axial slices of an EPI run (nibabel), a diffusion b0 and an
    anisotropic-voxel volume (dipy), and one real T1 coronal slice (dipy); one group per file. The split is
    fixed by volume. Copies are returned, so callers may modify them without touching the in-process cache.
    """
    size = _checked_size(size)
    train, held_out = _builtin(size)
    return _copy(train), _copy(held_out)


# ---------------------------------------------------------------------------------------------------------------
# Folders of JPEG/PNG (the Kaggle brain-tumour layout)


def _to_gray(image: Image.Image) -> np.ndarray:
    """Gray pixels in [0, 1] for any Pillow mode.

    8-bit images are divided by 255 as the report did. 16- and 32-bit images are divided by their own maximum,
    since such files often use only 10 or 12 of their bits. Transparent pixels become black background.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        pixels = np.clip(np.asarray(image, dtype=np.float32), 0.0, None)
        peak = pixels.max(initial=0.0)
        return pixels / peak if peak > 0 else pixels
    if image.mode in ("P", "PA", "LA", "La", "RGBA", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def _read_picture(content: bytes, size: int | str) -> np.ndarray:
    """One image file's bytes as a (size, size) gray image (the whole picture resized, never cropped), or at its
    own size with 'native'."""
    if not content:
        raise _Skip("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(content)) as image:
            image.load()
            if image.width == 0 or image.height == 0:
                raise _Skip(f"image has zero size ({image.width} x {image.height})")
            pixels = _to_gray(image)
    except _Skip:
        raise
    except UnidentifiedImageError as exc:
        raise _Skip("not a readable image: Pillow does not recognise its content (corrupt, or not an image)") from exc
    except Exception as exc:  # Pillow raises many types for corrupt or truncated files
        raise _Skip(f"not a readable image ({type(exc).__name__}: {exc})") from exc
    if pixels.max() - pixels.min() < 1e-6:
        raise _Skip(f"constant image (every pixel is {pixels.flat[0]:.3g}); there is nothing to denoise")
    return pixels if size == "native" else _resize(pixels, (size, size))


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _Skip(f"cannot read the file ({exc.strerror or exc})") from exc


def load_folder(path: str | Path, size: int | str = 64) -> SliceSet:
    """Every JPEG/PNG below `path` (any size, gray or colour) as a gray slice; one group per file.

    Unusable files are skipped with a reason, and byte-identical copies (the Kaggle archive ships its images
    twice) are skipped as duplicates so that one image cannot land on both sides of a split.
    """
    size = _checked_size(size)
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(
            f"image folder {folder} does not exist (or is not a folder); pass the folder that holds the images "
            "(e.g. the one with yes/ and no/ in it)"
        )
    files = _find_files(folder, IMAGE_SUFFIXES)
    if not files:
        raise DataError(
            f"no image files found in {folder}; accepted extensions are {', '.join(IMAGE_SUFFIXES)} (any case), "
            "searched recursively (e.g. yes/ and no/ subfolders)"
        )
    names, images, skipped, seen = [], [], [], {}
    for file in files:
        name = file.relative_to(folder).as_posix()
        try:
            content = _read_bytes(file)
            digest = hashlib.sha256(content).hexdigest()
            if content and digest in seen:
                raise _Skip(f"exact duplicate of {seen[digest]}")
            seen[digest] = name
            images.append(_read_picture(content, size))
            names.append(name)
        except _Skip as skip:
            skipped.append((str(file), str(skip)))
    source = f"folder:{folder}"
    if not images:
        hint = "Check that the files are brain MRI pictures that open in an image viewer."
        raise DataError(_nothing_usable(source, len(files), skipped, "images", hint))
    return SliceSet(pack(images), np.array(names, dtype=str), names, source, skipped)


# ---------------------------------------------------------------------------------------------------------------
# Splits and entry points


def split_by_group(slices: SliceSet, test_fraction: float = 0.2, seed: int = 0) -> tuple[SliceSet, SliceSet]:
    """(train, test) with whole groups on each side, so no volume or patient is both trained on and tested.

    Groups are shuffled with `seed` and moved to test until it holds at least `test_fraction` of the slices;
    each side keeps at least one group.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    groups, counts = np.unique(slices.groups, return_counts=True)
    if len(groups) < 2:
        raise DataError(
            f"cannot split {slices.source}: all {len(slices)} slices come from one volume/patient "
            f"({groups[0] if len(groups) else 'none'}). The split is by volume or patient so that no scan is "
            "both trained on and tested; one group cannot be split. Provide more volumes (at least two)."
        )
    order = np.random.default_rng(seed).permutation(len(groups))
    test_groups, n_test = [], 0
    for i in order[:-1]:
        test_groups.append(groups[i])
        n_test += counts[i]
        if n_test >= test_fraction * len(slices):
            break
    is_test = np.isin(slices.groups, test_groups)
    return slices.subset(np.flatnonzero(~is_test)), slices.subset(np.flatnonzero(is_test))


def _is_builtin(data: str | Path | None) -> bool:
    return data is None or (isinstance(data, str) and data == "builtin")


def _load_path(data: str | Path, planes: Sequence[str], size: int | str) -> SliceSet:
    """Dispatches a path: NIfTI file or folder of NIfTI only -> volumes, other folder -> images."""
    path = Path(data)
    if path.is_dir():
        if not _find_files(path, IMAGE_SUFFIXES) and _find_files(path, NIFTI_SUFFIXES):
            return load_nifti(path, planes, size)
        return load_folder(path, size)
    if _is_nifti(path):
        if not path.is_file():
            raise DataError(f"NIfTI file {path} does not exist")
        return load_nifti(path, planes, size)
    raise DataError(
        f"expected 'builtin', a folder of JPEG/PNG images, or NIfTI files (.nii, .nii.gz); got {str(data)!r}"
        + ("" if path.exists() else " (no such file or folder)")
    )


def load_splits(
    data: str | Path | None = None,
    *,
    planes: Sequence[str] = ("axial",),
    size: int | str = 64,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[SliceSet, SliceSet]:
    """(train, test) for training, split by volume or patient.

    The built-in data has its fixed split (test_fraction, seed and planes do not apply to it); other sources are
    loaded whole and split by `split_by_group`.
    """
    size = _checked_size(size)
    planes = _check_planes(planes)
    if _is_builtin(data):
        return load_builtin(size)
    return split_by_group(_load_path(data, planes, size), test_fraction, seed)


def load_any(data: str | Path | None, *, planes: Sequence[str] = ("axial",), size: int | str = 64) -> SliceSet:
    """The whole source, for evaluation; for the built-in data only the held-out part, which was never trained on."""
    size = _checked_size(size)
    planes = _check_planes(planes)
    if _is_builtin(data):
        return load_builtin(size)[1]
    return _load_path(data, planes, size)


def file_slices(
    content: bytes, label: str, *, planes: Sequence[str] = ("axial",), size: int | str = 64
) -> tuple[list[str], list[np.ndarray], str | None]:
    """One file's usable slices from its bytes: a NIfTI volume (by its name) sliced along `planes`, else an image.

    Returns (names, images, None), or ([], [], why) for a file that is skipped: what each Ray Data task runs on the
    files it reads (`streaming`), so both paths slice, resize and normalise the same way.
    """
    size = _checked_size(size)
    try:
        if label.lower().endswith(NIFTI_SUFFIXES):
            names, images = _volume_slices(content, label, _check_planes(planes), size)
            return names, images, None
        return [label], [_read_picture(content, size)], None
    except _Skip as skip:
        return [], [], str(skip)
