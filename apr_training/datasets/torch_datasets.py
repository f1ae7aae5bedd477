"""Torch datasets, the scene-equalising sampler and a seeded DataLoader factory.

* :class:`CameraPoseDataset`: one image + its absolute pose and scene id (MS-Transformer, PAE training, evaluation).
* :class:`RelPoseDataset`: iAPR training pairs; yields the query image, the neighbour pose and the relative pose
  query→neighbour (model_spec.md §7.4).
* :class:`SceneEqualizedSampler`: the ``equalize_scenes`` option (model_spec.md §3).
* :func:`make_loader`: DataLoader with a seeded generator and per-worker numpy/random seeding.

Images are decoded with Pillow (:func:`load_rgb`) into ``H x W x 3`` uint8 arrays and handed to the
transform. ``cache_in_ram`` keeps the images in memory after one read, in a single numpy buffer (no per-image Python
objects), so DataLoader workers forked later share it copy-on-write instead of duplicating it. ``"resized"`` keeps
them decoded **at training resolution** (shorter side = the transform's resize, uint8) in a memory-mapped file that
every worker and every DDP rank shares through the page cache, bounded by ``max_bytes`` (images past the bound are
read from disk); the transform's own resize is then an identity, so samples are bit-identical to uncached ones.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from apr_localizer.geometry import flip_relative, quat_normalize

from .labels import LabelTable, validate_images
from .pairs import PairTable

__all__ = [
    "CameraPoseDataset",
    "ImageCacheOptions",
    "ImageStore",
    "RelPoseDataset",
    "SceneEqualizedSampler",
    "load_rgb",
    "make_loader",
    "seed_worker",
]

CacheMode = bool | str | None


@dataclass(frozen=True)
class ImageCacheOptions:
    """The ``"resized"`` image cache: shorter side (``data.resize``), the memory-mapped file, its byte budget."""

    short_side: int
    file: Path
    max_bytes: int | None = None


_CACHE_MODES = ("encoded", "decoded", "resized")


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as an ``H x W x 3`` uint8 RGB array.

    Decoded with Pillow from the file's bytes (PNG is lossless, so any decoder gives the same pixels). Grey and
    palette images are expanded to RGB, alpha is dropped and 16-bit images are scaled to 8 bit (``>> 8``).
    Pillow uses no thread pool, so decoding is safe in forked DataLoader workers (OpenCV's pool is not).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    return _decode_rgb(data, path)


def _decode_rgb(data: bytes | memoryview | np.ndarray, path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                grey = (np.asarray(im).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
                return np.repeat(grey[:, :, None], 3, axis=2)
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"image {path} could not be decoded ({exc}); expected a PNG/JPEG image file") from None


class ImageStore:
    """Image files by index, optionally cached in RAM.

    Args:
        paths: absolute image paths.
        cache: ``False``/``None`` (read every time), ``"encoded"`` or ``True`` (keep the file bytes: PNG/JPEG
            decoding still runs every time, memory ~ the files' size), ``"decoded"`` (keep the decoded uint8
            pixels: no decoding later, memory = sum of H*W*3; refused if it exceeds 80 % of the available RAM),
            ``"resized"`` (decoded and resized to shorter side ``short_side`` in the memory-mapped ``cache_file``,
            at most ``max_bytes``; reused when it exists for the same images and size).
        workers: threads used to fill the cache (Pillow releases the GIL while decoding).
        progress: show a tqdm bar while filling the cache.
        short_side, cache_file, max_bytes: the ``"resized"`` cache.

    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        cache: CacheMode = False,
        workers: int = 4,
        progress: bool = True,
        short_side: int | None = None,
        cache_file: str | Path | None = None,
        max_bytes: int | None = None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        if cache is True:
            cache = "encoded"
        if cache not in (False, None, *_CACHE_MODES):
            raise ValueError(f"cache_in_ram is {cache!r}; expected False, True, 'encoded' or 'decoded'")
        self.cache = cache or None
        self._buffer: np.ndarray | None = None
        self._offsets: np.ndarray | None = None
        self._shapes: np.ndarray | None = None
        if self.cache == "encoded":
            self._fill_encoded(workers, progress)
        elif self.cache == "decoded":
            self._fill_decoded(workers, progress)
        elif self.cache == "resized":
            if short_side is None or cache_file is None:
                raise ValueError("cache_in_ram='resized' needs short_side (data.resize) and a cache_file")
            self._open_resized(int(short_side), Path(cache_file), max_bytes, workers, progress)

    def __len__(self) -> int:
        """Return the number of images."""
        return len(self.paths)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache (0 without a cache)."""
        return 0 if self._buffer is None else int(self._buffer.nbytes)

    def load(self, i: int) -> np.ndarray:
        """Image ``i`` as ``H x W x 3`` uint8 RGB (read-only view when cached decoded)."""
        if self.cache is None or (self.cache == "resized" and not self._cached[i]):
            return load_rgb(self.paths[i])
        start, stop = int(self._offsets[i]), int(self._offsets[i + 1])
        chunk = self._buffer[start:stop]
        if self.cache == "encoded":
            return _decode_rgb(chunk, self.paths[i])
        return np.asarray(chunk).reshape(tuple(self._shapes[i]))

    # ----------------------------------------------------------------------------------------- cache filling
    def _map(self, fn: Callable[[int], Any], workers: int, progress: bool, desc: str) -> list[Any]:
        from tqdm import tqdm

        n = len(self.paths)
        with ThreadPoolExecutor(max_workers=max(1, min(workers, os.cpu_count() or 1))) as pool:
            return list(tqdm(pool.map(fn, range(n)), total=n, desc=desc, disable=not progress or n < 100))

    def _fill_encoded(self, workers: int, progress: bool) -> None:
        missing = [p for p in self.paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images to cache are missing, e.g. {missing[0]}")
        sizes = np.array([p.stat().st_size for p in self.paths], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._buffer = np.empty(int(self._offsets[-1]), dtype=np.uint8)

        def read(i: int) -> None:
            with self.paths[i].open("rb") as f:
                n = f.readinto(memoryview(self._buffer[self._offsets[i] : self._offsets[i + 1]]))
            if n != sizes[i]:
                raise OSError(f"image {self.paths[i]} changed size while it was being cached")

        self._map(read, workers, progress, "caching image files")
        self._buffer.flags.writeable = False

    def _fill_decoded(self, workers: int, progress: bool) -> None:
        from PIL import Image

        shapes = np.zeros((len(self.paths), 3), dtype=np.int64)
        for i, p in enumerate(self.paths):
            if not p.is_file():
                raise FileNotFoundError(f"image {p} to cache does not exist")
            with Image.open(p) as im:  # reads the header only
                shapes[i] = (im.height, im.width, 3)
        sizes = shapes.prod(axis=1)
        total = int(sizes.sum())
        available = _available_memory()
        if available is not None and total > 0.8 * available:
            raise MemoryError(
                f"cache_in_ram='decoded' needs {total / 2**30:.1f} GiB for {len(self.paths)} images but only "
                f"{available / 2**30:.1f} GiB are available; use cache_in_ram='encoded' or False"
            )
        self._shapes = shapes
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._buffer = np.empty(total, dtype=np.uint8)

        def decode(i: int) -> None:
            img = load_rgb(self.paths[i])
            if img.shape != tuple(shapes[i]):
                raise ValueError(f"image {self.paths[i]} decoded to {img.shape}; its header says {tuple(shapes[i])}")
            self._buffer[self._offsets[i] : self._offsets[i + 1]] = img.reshape(-1)

        self._map(decode, workers, progress, "decoding images into RAM")
        self._buffer.flags.writeable = False

    def _open_resized(self, short: int, file: Path, max_bytes: int | None, workers: int, progress: bool) -> None:
        """Map (or build, then map) the training-resolution cache; images past ``max_bytes`` stay uncached."""
        import hashlib
        import json

        from PIL import Image

        from apr_localizer.fileio import atomic_path, atomic_write_text

        from .transforms import resize_shorter_uint8

        shapes = np.zeros((len(self.paths), 3), dtype=np.int64)
        for i, p in enumerate(self.paths):
            with Image.open(p) as im:  # header only
                h, w = im.height, im.width
            shapes[i] = (short, max(1, int(short * w / h)), 3) if h <= w else (max(1, int(short * h / w)), short, 3)
        sizes = shapes.prod(axis=1)
        cached = np.cumsum(sizes) <= (max_bytes if max_bytes is not None else np.inf)
        self._cached, self._shapes = cached, shapes
        self._offsets = np.concatenate([[0], np.cumsum(np.where(cached, sizes, 0))]).astype(np.int64)
        total = int(self._offsets[-1])
        key = hashlib.sha256(json.dumps([short, total, [str(p) for p in self.paths]]).encode()).hexdigest()
        index = file.with_suffix(".json")
        meta = {"key": key, "bytes": total, "images": int(cached.sum())}
        fresh = index.is_file() and file.is_file() and json.loads(index.read_text()) == meta
        if not total:
            return
        if not fresh:
            with atomic_path(file) as tmp:
                buf = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(total,))

                def fill(i: int) -> None:
                    if cached[i]:
                        img = resize_shorter_uint8(load_rgb(self.paths[i]), short)
                        if img.shape != tuple(shapes[i]):
                            raise ValueError(f"image {self.paths[i]} resized to {img.shape}, expected {shapes[i]}")
                        buf[self._offsets[i] : self._offsets[i + 1]] = img.reshape(-1)

                self._map(fill, workers, progress, "caching images at training resolution")
                buf.flush()
                del buf
            atomic_write_text(index, json.dumps(meta))
        self._buffer = np.load(file, mmap_mode="r")

    @property
    def cached_images(self) -> int:
        """How many images the cache holds."""
        if self.cache == "resized":
            return int(self._cached.sum())
        return len(self.paths) if self.cache else 0


def _store(paths: Sequence[Path], cache: CacheMode, options: ImageCacheOptions | None) -> ImageStore:
    if cache != "resized":
        return ImageStore(paths, cache)
    if options is None:
        raise ValueError("cache_in_ram='resized' needs cache_options (shorter side and cache file)")
    return ImageStore(paths, cache, short_side=options.short_side, cache_file=options.file, max_bytes=options.max_bytes)


def _available_memory() -> int | None:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a pinned dependency
        return None
    return int(psutil.virtual_memory().available)


def _default_transform() -> Callable[[np.ndarray], torch.Tensor]:
    from apr_localizer.preprocess import EvalTransform

    return EvalTransform()


def _unit_quat(poses: np.ndarray) -> np.ndarray:
    """``(N, 7)`` poses with unit quaternions (sign kept)."""
    if not len(poses):
        return np.asarray(poses, dtype=np.float64)
    return np.concatenate([poses[:, :3], quat_normalize(poses[:, 3:], canonical=False)], axis=1)


def _frozen(a: np.ndarray, dtype) -> np.ndarray:
    out = np.array(a, dtype=dtype, copy=True)
    out.flags.writeable = False
    return out


# --------------------------------------------------------------------------------------------- datasets
class CameraPoseDataset(Dataset):
    """Absolute-pose dataset over a label table.

    Item ``i`` is a dict:

    * ``image``: ``transform(rgb)``, e.g. ``(3, 224, 224)`` float32;
    * ``pose``: ``(7,)`` float32 ``[x, y, z, qw, qx, qy, qz]`` as in the labels (quaternion not normalised);
    * ``scene``: int64 scalar tensor, the scene id;
    * ``index``: ``i``.

    Args:
        labels: the label table.
        root: dataset root (default: ``labels.root``).
        transform: ``H x W x 3`` uint8 RGB → tensor; default: :class:`apr_localizer.preprocess.EvalTransform`.
        cache_in_ram: ``False``, ``True``/``"encoded"``, ``"decoded"`` or ``"resized"`` (see :class:`ImageStore`).
        check_files: verify up front that every image exists (:func:`validate_images`).
        cache_options: where and how big the ``"resized"`` cache is.

    """

    def __init__(
        self,
        labels: LabelTable,
        root: str | Path | None = None,
        transform: Callable[[np.ndarray], torch.Tensor] | None = None,
        cache_in_ram: CacheMode = False,
        check_files: bool = True,
        cache_options: ImageCacheOptions | None = None,
    ) -> None:
        self.labels = labels
        if check_files:
            paths = validate_images(labels, root)
        else:
            paths = [labels.image_path(i, root) for i in range(len(labels))]
        self.transform = transform if transform is not None else _default_transform()
        self.images = _store(paths, cache_in_ram, cache_options)
        self._pose = _frozen(labels.pose, np.float32)
        self._scene = _frozen(labels.scene_id, np.int64)

    def __len__(self) -> int:
        """Return the number of images."""
        return len(self._pose)

    @property
    def scene_ids(self) -> np.ndarray:
        """``(N,)`` int64 scene id of every item (read-only)."""
        return self._scene

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Load, transform and label item ``i``."""
        i = int(i)
        return {
            "image": self.transform(self.images.load(i)),
            "pose": torch.tensor(self._pose[i]),
            "scene": torch.tensor(self._scene[i], dtype=torch.int64),
            "index": i,
        }


class RelPoseDataset(Dataset):
    """iAPR training pairs (model_spec.md §7.4).

    For pair (a, b) with stored ``rel_ab``, the pair is swapped with probability ``swap_prob``; after the optional
    swap, image "1" is the **query** and image "2" the **neighbour**. Upstream uses only image 1, pose 2 and
    scene 2, so item ``i`` is a dict:

    * ``image``: ``transform(image 1)`` (the query), e.g. ``(3, 224, 224)`` float32; image 2 is never decoded;
    * ``pose``: ``(7,)`` float32 pose of image 2 (the neighbour fed to the PAE), quaternion normalised when
      ``normalize_neighbour`` (as the neighbour estimates of the iAPR loop at test time);
    * ``scene``: int64 scalar tensor, scene id of image 2;
    * ``rel_pose``: ``(7,)`` float32 rel(1→2) = ``relative_pose(pose 1, pose 2)`` (``rel_ab``, or
      ``flip_relative(rel_ab)`` = rel(b→a) after a swap), the regression target;
    * ``query_pose``: ``(7,)`` float32 pose of image 1 (as stored; not a model input);
    * ``swapped``: whether the pair was swapped; ``index``: ``i``.

    The stored arrays are read-only: unlike upstream (model_spec.md §10.10), a swap never inverts them in place, so
    labels stay correct with ``num_workers=0`` and persistent workers. The swap draw uses torch's global generator
    (seeded per DataLoader worker by :func:`make_loader`).

    Args:
        pairs: the pairs table.
        root: dataset root (default: ``pairs.root``).
        transform: image transform (default: :class:`apr_localizer.preprocess.EvalTransform`; training uses
            :class:`apr_training.datasets.transforms.TrainTransform`).
        swap_prob: probability of swapping a pair, in [0, 1].
        cache_in_ram: ``False``, ``True``/``"encoded"`` or ``"decoded"`` (see :class:`ImageStore`); each distinct
            image is cached once.
        check_files: verify up front that every image exists.
        normalize_neighbour: unit-normalise the neighbour quaternion.
        cache_options: where and how big the ``"resized"`` cache is.

    """

    def __init__(
        self,
        pairs: PairTable,
        root: str | Path | None = None,
        transform: Callable[[np.ndarray], torch.Tensor] | None = None,
        swap_prob: float = 0.5,
        cache_in_ram: CacheMode = False,
        check_files: bool = True,
        normalize_neighbour: bool = True,
        cache_options: ImageCacheOptions | None = None,
    ) -> None:
        if not 0.0 <= swap_prob <= 1.0:
            raise ValueError(f"swap_prob is {swap_prob}; expected a probability in [0, 1]")
        base = Path(root) if root is not None else pairs.root
        if base is None:
            raise ValueError("no dataset root: pass root=... or read the pairs with read_pairs(dataset_root=...)")
        self.pairs = pairs
        self.swap_prob = float(swap_prob)
        self.normalize_neighbour = normalize_neighbour
        self.transform = transform if transform is not None else _default_transform()
        unique: dict[str, int] = {}
        for p in (*pairs.img_path_a, *pairs.img_path_b):
            unique.setdefault(p, len(unique))
        self._image_a = _frozen([unique[p] for p in pairs.img_path_a], np.int64)
        self._image_b = _frozen([unique[p] for p in pairs.img_path_b], np.int64)
        paths = [base / p for p in unique]
        if check_files:
            missing = [p for p in paths if not p.is_file()]
            if missing:
                shown = ", ".join(str(m) for m in missing[:5])
                src = f" of {pairs.source}" if pairs.source is not None else ""
                raise FileNotFoundError(
                    f"{len(missing)} of {len(paths)} images{src} are missing under dataset root {base}: {shown}"
                )
        self.images = _store(paths, cache_in_ram, cache_options)
        self._pose_a = _frozen(pairs.pose_a, np.float64)
        self._pose_b = _frozen(pairs.pose_b, np.float64)
        self._neighbour_a = _frozen(_unit_quat(pairs.pose_a) if normalize_neighbour else pairs.pose_a, np.float32)
        self._neighbour_b = _frozen(_unit_quat(pairs.pose_b) if normalize_neighbour else pairs.pose_b, np.float32)
        self._rel_ab = _frozen(pairs.rel_ab, np.float64)
        self._scene_a = _frozen(pairs.scene_id_a, np.int64)
        self._scene_b = _frozen(pairs.scene_id_b, np.int64)

    def __len__(self) -> int:
        """Return the number of pairs."""
        return len(self._rel_ab)

    def _swap(self) -> bool:
        if self.swap_prob <= 0.0:
            return False
        if self.swap_prob >= 1.0:
            return True
        return bool(torch.rand(()) < self.swap_prob)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Pair ``i``, swapped with probability ``swap_prob``."""
        i = int(i)
        swapped = self._swap()
        if swapped:
            query_img, query_pose = self._image_b[i], self._pose_b[i]
            neighbour, scene = self._neighbour_a[i], self._scene_a[i]
            rel = flip_relative(self._rel_ab[i])  # a new array: rel(b→a)
        else:
            query_img, query_pose = self._image_a[i], self._pose_a[i]
            neighbour, scene = self._neighbour_b[i], self._scene_b[i]
            rel = self._rel_ab[i]
        return {
            "image": self.transform(self.images.load(int(query_img))),
            "pose": torch.tensor(neighbour),
            "scene": torch.tensor(scene, dtype=torch.int64),
            "rel_pose": torch.tensor(rel, dtype=torch.float32),
            "query_pose": torch.tensor(query_pose, dtype=torch.float32),
            "swapped": swapped,
            "index": i,
        }


# --------------------------------------------------------------------------------------------- sampling
class SceneEqualizedSampler(Sampler[int]):
    """``equalize_scenes`` (model_spec.md §3) as a sampler.

    An epoch has ``max_scene_count x num_scenes`` indices: every real index once, plus ``L - N`` extra draws that
    each pick a scene with probability proportional to its deficit (``max_scene_count - count``) and then a uniform
    random item of that scene, so every scene gets ``max_scene_count`` items in expectation. ``num_scenes`` is the
    number of scenes present in ``scene_ids``.

    Deterministic: epoch ``e`` uses a generator seeded from ``(seed, e)``; call :meth:`set_epoch` every epoch. With
    ``num_replicas > 1`` (DDP) every rank builds the same epoch list, pads it to a multiple of ``num_replicas``
    and takes every ``num_replicas``-th index from ``rank``.

    Args:
        scene_ids: ``(N,)`` scene id per dataset item, or a dataset with a ``scene_ids`` attribute.
        shuffle: shuffle the epoch list (otherwise real indices first, in order, then the extra draws).
        seed: base seed.
        num_replicas: number of DDP processes.
        rank: this process's rank.

    """

    def __init__(
        self,
        scene_ids: Sequence[int] | np.ndarray | Dataset,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        ids = getattr(scene_ids, "scene_ids", scene_ids)
        self.scene_ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(self.scene_ids) == 0:
            raise ValueError("SceneEqualizedSampler needs a non-empty dataset")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank is {rank}; expected 0 <= rank < num_replicas ({num_replicas})")
        self.shuffle = shuffle
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self.scenes, counts = np.unique(self.scene_ids, return_counts=True)
        self.counts = counts.astype(np.int64)
        self.members = [np.flatnonzero(self.scene_ids == s) for s in self.scenes]
        self.total_size = int(self.counts.max()) * len(self.scenes)

    def set_epoch(self, epoch: int) -> None:
        """Select the random stream of ``epoch``."""
        self.epoch = int(epoch)

    def epoch_indices(self) -> np.ndarray:
        """All ``max_scene_count x num_scenes`` indices of the current epoch (before the DDP split)."""
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch & 0xFFFFFFFF])
        deficit = self.counts.max() - self.counts
        n_extra = int(deficit.sum())
        extra = np.zeros(0, dtype=np.int64)
        if n_extra:
            scene_pos = rng.choice(len(self.scenes), size=n_extra, p=deficit / deficit.sum())
            extra = np.empty(n_extra, dtype=np.int64)
            for k, members in enumerate(self.members):
                sel = scene_pos == k
                extra[sel] = members[rng.integers(0, len(members), size=int(sel.sum()))]
        out = np.concatenate([np.arange(len(self.scene_ids), dtype=np.int64), extra])
        if self.shuffle:
            out = out[rng.permutation(len(out))]
        return out

    def __iter__(self) -> Iterator[int]:
        """Yield the indices of this rank and epoch."""
        idx = self.epoch_indices()
        if self.num_replicas > 1:
            pad = (-len(idx)) % self.num_replicas
            if pad:
                idx = np.concatenate([idx, idx[:pad]])
            idx = idx[self.rank :: self.num_replicas]
        return iter(idx.tolist())

    def __len__(self) -> int:
        """Return the number of indices per epoch for this rank."""
        return -(-self.total_size // self.num_replicas)


# --------------------------------------------------------------------------------------------- loader
def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy and ``random`` from the worker's torch seed.

    Torch seeds each worker with ``base_seed + worker_id`` (``base_seed`` drawn from the loader's generator), so
    augmentation is reproducible for a fixed loader seed and differs between workers and epochs.
    """
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = False,
    workers: int = 0,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
    seed: int = 0,
    drop_last: bool = False,
    sampler: Sampler | None = None,
    prefetch_factor: int | None = None,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """DataLoader with a generator seeded by ``seed`` and :func:`seed_worker` in every worker.

    Args:
        dataset: the dataset.
        batch_size: items per batch.
        shuffle: reshuffle every epoch (ignored when ``sampler`` is given; the sampler decides the order).
        workers: worker processes (0: load in the main process).
        pin_memory: default: ``torch.cuda.is_available()``.
        persistent_workers: keep workers between epochs; default: ``workers > 0``.
        seed: seeds the shuffling order and the workers' base seed.
        drop_last: drop the last incomplete batch.
        sampler: e.g. :class:`SceneEqualizedSampler`.
        prefetch_factor: batches prefetched per worker (only with ``workers > 0``).
        collate_fn: custom collate function (default: torch's).

    """
    if batch_size < 1:
        raise ValueError(f"batch_size is {batch_size}; expected at least 1")
    if workers < 0:
        raise ValueError(f"workers is {workers}; expected 0 or more")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs["persistent_workers"] = True if persistent_workers is None else bool(persistent_workers)
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else bool(pin_memory),
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=seed_worker,
        collate_fn=collate_fn,
        **kwargs,
    )
