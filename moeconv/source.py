"""Read a safetensors checkpoint: headers and index only, validated; tensor data by zero-copy slices.

Nothing a file claims is trusted: header length, JSON, dtypes, shapes and byte ranges are checked
against each other and against the file size before anything else looks at them, and every failure
is a CheckpointError whose one-line message names the file (and key) and says what is wrong.

Which files make the checkpoint (the loader's choice, as transformers makes it):
  1. `model.safetensors` in the folder, if present;
  2. else `model.safetensors.index.json` and the shards it names;
  3. else every root-level `*.safetensors` file.
Subfolders are never read (gpt-oss repos hold `original/` and `metal/` copies of the weights).
Pickled weights (`.bin`, `.pt`, `.pth`, `.ckpt`) are never read: unpickling runs code.
"""

from __future__ import annotations  # torch is imported by the first tensor read, not here

import json
import math
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from moeconv import directio, dtypes
from moeconv.errors import CheckpointError
from moeconv.format import HEADER_CAP, INDEX_NAME, SINGLE_NAME, TensorInfo, check_header, unique_object
from moeconv.format import quote as _q
from moeconv.keys import natural_key

if TYPE_CHECKING:
    import torch

INDEX_CAP = 100_000_000  # an index larger than this is not an index
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate one .safetensors header: (tensors, __metadata__, data_start).

    Reads only the header. Sizes are checked against the file size before anything is allocated.
    Tensors are returned in order of their begin offset.
    """
    path = Path(path).absolute()
    name = str(path)
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            if size < 8:
                raise CheckpointError(
                    f"{name}: file is {size} bytes, shorter than the 8-byte header length; not a safetensors file (truncated download?)"
                )
            handle.seek(0)
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > HEADER_CAP:
                raise CheckpointError(
                    f"{name}: header length {header_len} is over the {HEADER_CAP}-byte limit of safetensors; not a safetensors file or corrupt"
                )
            if header_len > size - 8:
                raise CheckpointError(
                    f"{name}: header length {header_len} goes beyond the file size ({size} bytes); the file is truncated or not safetensors"
                )
            raw = handle.read(header_len)
    except OSError as error:
        raise CheckpointError(f"{name}: cannot read: {error.strerror or error}") from None
    data_start = 8 + header_len
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{name}: header is not UTF-8 (byte {error.start}); not a safetensors file or corrupt") from None
    try:
        header = json.loads(text, object_pairs_hook=unique_object)
    except ValueError as error:  # JSONDecodeError or a duplicate key
        raise CheckpointError(f"{name}: header is not valid JSON ({error}); the file is corrupt") from None
    except RecursionError:
        raise CheckpointError(
            f"{name}: header JSON is nested too deeply to be a safetensors header; the file is corrupt"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: header is JSON {type(header).__name__}, not an object; the file is corrupt")
    return check_header(path, header, data_start, size)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def allowed_target(path: Path, root: Path) -> bool:
    """Does the real file behind `path` live inside the checkpoint folder?

    The one exception is the huggingface_hub cache, where snapshots/<rev>/<file> is a symlink into
    ../../blobs/: refusing it would refuse every downloaded model.
    """
    real, real_root = path.resolve(), root.resolve()
    if _inside(real, real_root):
        return True
    if real_root.parent.name == "snapshots":
        return _inside(real, real_root.parent.parent / "blobs")
    return False


def _load_json(path: Path, what: str) -> object:
    try:
        size = path.stat().st_size
        if size > INDEX_CAP:
            raise CheckpointError(f"{path}: {what} is {size} bytes, too large to be a {what}")
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read {what}: {error.strerror or error}") from None
    except (UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({error})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: {what} JSON is nested too deeply to be a {what}") from None


class Checkpoint:
    """A safetensors checkpoint: every tensor's header entry, the shard files and config.json.

    Tensor data is read only by `read`, zero-copy from the memory-mapped shard.

    A checkpoint planned from headers fetched remotely (moeconv.hub) has shard files that may not be
    on disk yet: `fetch(path)` brings one there before its first read, `evict(path)` deletes one
    (--low-disk), and `listing` names the source's root-level files with their sizes.
    """

    def __init__(
        self,
        root: Path,
        files: list[Path],
        tensors: dict[str, TensorInfo],
        config: dict | None,
        *,
        origin: str | None = None,
        listing: dict[str, int | None] | None = None,
        fetch: Callable[[Path], None] | None = None,
        evict: Callable[[Path], None] | None = None,
    ):
        self.root = root
        self.files = files
        self.tensors = tensors
        self.config = config
        self.origin = origin or str(root)  # what the user named: a path, or "org/name@commit"
        self.listing = listing  # root-level file name -> size; None: read the folder
        self.fetch = fetch
        self.evict = evict
        self._fetched: set[Path] = set()
        self._readers: dict[Path, directio.Reader] = {}
        self._lock = threading.Lock()

    # -- opening ----------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        """A folder (single file, index + shards, or all root-level .safetensors) or one .safetensors file."""
        checkpoint = cls._open(path)
        checkpoint.origin = str(path)  # as given, so the report does not depend on the folder it ran in
        return checkpoint

    @classmethod
    def _open(cls, path: str | Path) -> Checkpoint:
        path = Path(path).expanduser().absolute()
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or folder")
        if path.is_file():
            if path.name.endswith(".index.json"):
                root = path.parent
                return cls._from_files(root, cls._index_files(root, path))
            if path.suffix in PICKLE_SUFFIXES:
                raise CheckpointError(
                    f"{path}: pickled weights are not read (unpickling runs code); convert to .safetensors first"
                )
            if path.suffix != ".safetensors":
                raise CheckpointError(f"{path}: not a .safetensors file or a checkpoint folder")
            return cls._from_files(path.parent, {path: None})
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a file or folder")
        root = path
        if (root / SINGLE_NAME).is_file():
            return cls._from_files(root, {root / SINGLE_NAME: None})
        if (root / INDEX_NAME).is_file():
            return cls._from_files(root, cls._index_files(root, root / INDEX_NAME))
        found = sorted(p for p in root.iterdir() if p.suffix == ".safetensors" and p.is_file())
        if found:
            return cls._from_files(root, dict.fromkeys(found))
        pickled = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
        if pickled:
            raise CheckpointError(
                f"{root}: only pickled weights here ({', '.join(pickled[:3])}{', ...' if len(pickled) > 3 else ''}); "
                "they are not read (unpickling runs code): convert them to .safetensors first"
            )
        raise CheckpointError(f"{root}: no .safetensors files in this folder (subfolders are not read)")

    @staticmethod
    def _index_files(root: Path, index_path: Path) -> dict[Path, set[str]]:
        """Shard path -> keys the index assigns to it, after checking every path stays in the folder."""
        index = _load_json(index_path, "index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f'{index_path}: index has no "weight_map" object; it is not a safetensors index')
        shards: dict[Path, set[str]] = {}
        for key, shard in weight_map.items():
            if not isinstance(shard, str) or not shard:
                raise CheckpointError(f"{index_path}: key {_q(key)} maps to {json.dumps(shard)}, not a shard file name")
            relative = Path(shard)
            if relative.is_absolute() or ".." in relative.parts or len(relative.parts) != 1:
                raise CheckpointError(
                    f"{index_path}: key {_q(key)} names shard {_q(shard)} outside the checkpoint folder; refusing to read it"
                )
            shard_path = root / relative
            if not shard_path.is_file():
                raise CheckpointError(f"{index_path}: key {_q(key)} names shard {_q(shard)}, which is missing from {root}")
            if not allowed_target(shard_path, root):
                raise CheckpointError(
                    f"{index_path}: shard {_q(shard)} is a symlink to {shard_path.resolve()}, outside the checkpoint folder; refusing to read it"
                )
            shards.setdefault(shard_path, set()).add(key)
        if not shards:
            raise CheckpointError(f'{index_path}: index "weight_map" is empty')
        return shards

    @classmethod
    def from_headers(
        cls,
        root: Path,
        headers: dict[str, tuple[dict, int, int]],
        weight_map: dict[str, str] | None,
        **hooks,
    ) -> Checkpoint:
        """A checkpoint from already-decoded headers: file name -> (header JSON object, data start, file size).

        The shard files need not exist (a hub repo planned from ranged header reads); the same checks
        as for files on disk apply (`check_header`, index vs shards). `weight_map` is the index's
        (None: no index). config.json is read from `root` if present. `hooks` go to the constructor.
        """
        root = Path(root).absolute()
        files: dict[Path, set[str] | None] = {}
        for name in headers:
            relative = Path(name)
            if relative.is_absolute() or ".." in relative.parts or len(relative.parts) != 1:
                raise CheckpointError(f"{root}: shard {_q(name)} is not a root-level file of the checkpoint; refusing to read it")
            files[root / name] = None if weight_map is None else set()
        if weight_map is not None:
            for key, name in weight_map.items():
                if root / str(name) not in files:
                    raise CheckpointError(f"{root}: the index maps tensor {_q(key)} to {_q(str(name))}, which has no header")
                files[root / name].add(key)

        def read(path: Path):
            header, data_start, size = headers[path.name]
            return check_header(path, header, data_start, size)

        checkpoint = cls._from_files(root, files, read)
        for name, value in hooks.items():
            setattr(checkpoint, name, value)
        return checkpoint

    @classmethod
    def _from_files(cls, root: Path, files: dict[Path, set[str] | None], read=read_header) -> Checkpoint:
        """Read every header; `files` maps a shard to the keys its index claims (None: no index)."""
        found: dict[str, TensorInfo] = {}
        for path in sorted(files, key=lambda p: p.name):
            claimed = files[path]
            if read is read_header and not allowed_target(path, root):
                raise CheckpointError(
                    f"{path}: a symlink to {path.resolve()}, outside the checkpoint folder; refusing to read it"
                )
            tensors, _, _ = read(path)
            for key, info in tensors.items():
                if key in found:
                    raise CheckpointError(f"{path}: tensor {_q(key)} is also in {found[key].file}; a key must live in one shard")
                # A shard key the index does not name is an error, not a warning: loaders follow the
                # index and would silently drop it, so the checkpoint is not what it looks like.
                if claimed is not None and key not in claimed:
                    raise CheckpointError(
                        f"{path}: tensor {_q(key)} is in this shard but the index does not map it here; the index is stale or wrong"
                    )
                found[key] = info
            if claimed is not None:
                missing = sorted(claimed - tensors.keys(), key=natural_key)
                if missing:
                    raise CheckpointError(
                        f"{path}: the index maps tensor {_q(missing[0])} to this shard but the shard lacks it"
                        f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; the index is stale or the shard incomplete"
                    )
        config = None
        config_path = root / "config.json"
        if config_path.is_file():
            config = _load_json(config_path, "config")
            if not isinstance(config, dict):
                raise CheckpointError(f"{config_path}: config is not a JSON object")
        ordered = {key: found[key] for key in sorted(found, key=natural_key)}
        return cls(root, sorted(files, key=lambda p: p.name), ordered, config)

    # -- reading ----------------------------------------------------------------------------------

    def _ready(self, file: Path) -> None:
        """A remote shard: download it before its first read (no-op for local files)."""
        if self.fetch is not None and file not in self._fetched:
            with self._lock:
                if file not in self._fetched:
                    self.fetch(file)
                    self._fetched.add(file)

    def _reader(self, file: Path) -> directio.Reader:
        if file not in self._readers:
            self._ready(file)
            with self._lock:
                if file not in self._readers:
                    try:
                        self._readers[file] = directio.Reader(file)
                    except OSError as error:
                        raise CheckpointError(f"{file}: cannot open: {error.strerror or error}") from None
        return self._readers[file]

    def _locate(
        self, key: str, start: int | None, stop: int | None, within: int | None
    ) -> tuple[TensorInfo, tuple[int, ...], int, int]:
        """(info, shape, file offset, byte count) of rows start:stop of `key` (of row `within`'s own
        first axis, with `within`): always one contiguous byte range."""
        info = self.tensors.get(key)
        if info is None:
            raise CheckpointError(f"{self.root}: no tensor {_q(key)} in this checkpoint")
        if not info.shape:
            if start is not None or stop is not None:
                raise CheckpointError(f"{info.file}: tensor {_q(key)} is 0-d; it has no rows to slice")
            return info, (), info.begin, info.nbytes
        dims, begin, span = info.shape, info.begin, info.nbytes  # what start:stop slices
        if within is not None:
            if len(dims) < 2 or not 0 <= within < dims[0]:
                raise CheckpointError(f"{info.file}: tensor {_q(key)} {list(dims)} has no row {within} to slice within")
            span = info.nbytes // dims[0]
            dims, begin = dims[1:], begin + within * span
        first, last, _ = slice(start, stop).indices(dims[0])
        count = max(last - first, 0)
        offset = begin + first * (span // max(dims[0], 1))
        return info, (count, *dims[1:]), offset, count * math.prod(dims[1:]) * dtypes.itemsize(info.dtype)

    def read(self, key: str, start: int | None = None, stop: int | None = None, *, within: int | None = None) -> torch.Tensor:
        """The tensor, or rows start:stop of its first axis (never a whole shard). With `within`:
        rows start:stop of the second axis of row `within` (a slice of one expert of a stacked
        tensor, also one contiguous byte range).

        The bytes are read into fresh memory, not viewed through an mmap: every mapped page a
        conversion touches stays in the process's resident set until the file is closed, so peak
        RSS would grow with the input (1.6 GB for one gpt-oss-120b layer).
        """
        import torch

        info, shape, offset, _ = self._locate(key, start, stop, within)
        data = self.read_bytes(key, start, stop, within=within)
        dtype = dtypes.to_torch(info.dtype)
        if not data.nbytes:
            return torch.empty(shape, dtype=dtype)
        if offset % dtype.itemsize:  # read into a page at the file's offset: copy to view as wider elements
            data = memoryview(bytearray(data))
        return torch.frombuffer(data, dtype=torch.uint8).view(dtype).view(shape)

    def read_bytes(self, key: str, start: int | None = None, stop: int | None = None, *, within: int | None = None) -> memoryview:
        """The bytes `read` would return as a tensor (what a pass-through copy writes)."""
        info, _, offset, nbytes = self._locate(key, start, stop, within)
        try:
            return self._reader(info.file).read(offset, nbytes)
        except OSError as error:
            raise CheckpointError(f"{info.file}: cannot read tensor {_q(info.key)}: {error.strerror or error}") from None
        except EOFError:
            raise CheckpointError(
                f"{info.file}: tensor {_q(info.key)} ends beyond the end of the file; the file changed or is truncated"
            ) from None

    def release_file(self, file: Path) -> None:
        """Close a shard and delete it through the `evict` hook (--low-disk); only remote sources have one."""
        if self.evict is None:
            raise CheckpointError(f"{self.origin}: a local checkpoint's files are never deleted (--low-disk is for hub repos)")
        with self._lock:
            self._fetched.discard(file)
            reader = self._readers.pop(file, None)
        if reader is not None:
            reader.close()
        self.evict(file)

    def close(self) -> None:
        with self._lock:
            readers, self._readers = list(self._readers.values()), {}
        for reader in readers:
            reader.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        """Pickled without open files or locks (a plan sent to another process reopens them)."""
        state = dict(self.__dict__)
        state.update(_readers={}, _lock=None, _fetched=set())
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.root)!r}, {len(self.tensors)} tensors in {len(self.files)} files)"
