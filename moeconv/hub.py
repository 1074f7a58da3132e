"""Hub repo ids as sources, through huggingface_hub: its cache (HF_HOME / HF_HUB_CACHE), its token
(HF_TOKEN, the stored login, or --token), its offline mode (HF_HUB_OFFLINE) and --revision.

Online, a repo is planned from headers alone: `model_info` gives the commit and the root-level files
with their sizes, `get_safetensors_metadata` the shard headers (ranged requests), so a dry run of a
65 GB repo downloads config.json and the index and nothing else. Each header is checked by the same
rules as a file on disk (`source.check_header`); the data start is the file size minus the data
buffer's length, so offsets are exact. A run then downloads, per file, only the root-level shards the
plan reads and the small companion files (never `original/`, `metal/` or other subfolders), and
checks each downloaded shard's header against the one it planned with.

Offline (HF_HUB_OFFLINE=1), the cached snapshot of the revision is the checkpoint.

`--low-disk` deletes an input shard from the cache once no later output tensor needs it: the blob
and the snapshot's symlink to it, so huggingface_hub downloads it again next time.
Pickled weights are never downloaded or read.
"""

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from moeconv.errors import CheckpointError, HubError, InternalError
from moeconv.format import INDEX_NAME, SINGLE_NAME
from moeconv.source import PICKLE_SUFFIXES, Checkpoint, read_header

# org/name, as huggingface_hub accepts it: no leading ".", "/" or "~", exactly one "/".
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def is_repo_id(src: str) -> bool:
    """Is SRC a hub repo id rather than a local path? Anything that looks like a path is local: it
    starts with ".", "/" or "~", has more than one "/" (or none), names a .safetensors or .json file,
    or its first folder exists here (so a mistyped `examples/tiny-gpt-os` is "no such folder", never a
    hub request)."""
    if REPO_ID.fullmatch(src) is None or src.endswith((".safetensors", ".json")):
        return False
    return not Path(src.split("/")[0]).exists()


def open_source(src: str, *, revision: str | None = None, token: str | None = None, low_disk: bool = False) -> Checkpoint:
    """A local checkpoint (folder or file) or a hub repo id, headers only."""
    if not is_repo_id(src):
        given = [flag for flag, value in (("--revision", revision), ("--token", token), ("--low-disk", low_disk)) if value]
        if given:
            what = "local files are never deleted" if low_disk else "a local path has no revisions or tokens"
            raise HubError(f"{src}: {' and '.join(given)} only apply to hub repo ids (org/name); {what}")
        if REPO_ID.fullmatch(src) and not Path(src).exists() and not src.endswith((".safetensors", ".json")):
            first = src.split("/")[0]
            raise CheckpointError(
                f"{src}: no such file or folder (read as a local path because ./{first} exists here; a hub repo id is"
                " read from any other folder)"
            )
        return Checkpoint.open(src)
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:  # read from the environment when huggingface_hub is imported
        return _open_cached(src, revision, token)
    return _open_remote(src, revision, token)


def fetch_inputs(plan, *, low_disk: bool = False) -> None:
    """Before a run: download the companion files and (unless low_disk) every shard the plan reads.

    With low_disk, shards are fetched one by one as execute first reads them (Checkpoint.fetch)."""
    source = plan.source
    if source.fetch is None:
        return
    fetch_companions(plan)
    if not low_disk:
        needed = {source.tensors[key].file for tensor in plan.tensors.values() for key in tensor.sources}
        for file in sorted(needed):
            source.fetch(file)


def fetch_companions(plan) -> None:
    """Download the small files a run copies next to the shards (no-op for local paths)."""
    source = plan.source
    if source.fetch is not None:
        for name in plan.companion_files:
            source.fetch(source.root / name)


def on_this_machine(checkpoint: Checkpoint, token: str | None = None) -> None:
    """Point a hub checkpoint planned on another machine (a Ray task's) at this machine's
    huggingface_hub cache (its HF_HOME, HF_HUB_OFFLINE and token, or `token`), with fetch and evict
    hooks of its own: each shard is downloaded there when first read, and checked against the
    header it was planned with."""
    repo_folder, commit = checkpoint.root.parent.parent.name, checkpoint.root.name
    if checkpoint.root.parent.name != "snapshots" or not repo_folder.startswith("models--"):
        raise InternalError(f"{checkpoint.root}: not a huggingface_hub cache snapshot; cannot find it on this machine")
    repo_id = repo_folder.removeprefix("models--").replace("--", "/")  # repo ids never hold "--"
    root = _snapshot_dir(repo_id, commit)
    checkpoint.tensors = {key: replace(info, file=root / info.file.name) for key, info in checkpoint.tensors.items()}
    checkpoint.files = [root / file.name for file in checkpoint.files]
    checkpoint.root = root
    hooks, holder = _hooks(repo_id, commit, token)
    checkpoint.fetch, checkpoint.evict = hooks["fetch"], hooks["evict"]
    holder.append(checkpoint)


# ---- errors ----------------------------------------------------------------------------------------


@contextmanager
def _hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """huggingface_hub's exceptions (multi-line, some OSErrors) -> one-line HubError saying the fix."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hf

    at = f"{repo_id}@{revision}" if revision else repo_id
    # Newer huggingface_hub versions add these; a missing one simply never matches.
    not_cached = tuple(
        getattr(hf, name) for name in ("LocalEntryNotFoundError", "IncompleteSnapshotError", "DryRunError") if hasattr(hf, name)
    )
    try:
        yield
    except hf.GatedRepoError:
        raise HubError(f"{at}: gated repo: accept its terms on the hub, then pass a token (--token or HF_TOKEN)") from None
    except hf.RevisionNotFoundError:
        raise HubError(f"{repo_id}: revision {revision!r} not found (a branch, tag or commit hash of the repo)") from None
    except hf.RepositoryNotFoundError:
        raise HubError(f"{at}: no such repo on the hub, or it is private and needs a token (--token or HF_TOKEN)") from None
    except not_cached:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise HubError(f"{at}: not in the huggingface_hub cache ({constants.HF_HUB_CACHE}) and {why}") from None
    except hf.EntryNotFoundError as error:
        raise HubError(f"{at}: a file is missing from the repo: {_first_line(error)}") from None
    except hf.HFValidationError as error:
        raise HubError(f"{repo_id}: not a valid repo id: {_first_line(error)}") from None
    except (hf.HfHubHTTPError, hf.SafetensorsParsingError, hf.NotASafetensorsRepoError, OSError) as error:
        raise HubError(f"{at}: hub request failed: {_first_line(error)}") from None
    except Exception as error:  # the HTTP client's own connection errors (httpx, or requests before 1.0)
        if type(error).__module__.split(".")[0].startswith(("httpx", "requests", "urllib3")):
            raise HubError(
                f"{at}: read as a hub repo id (no local folder '{repo_id.split('/')[0]}' here), but cannot reach the hub"
                f" ({type(error).__name__}); check the network, or set HF_HUB_OFFLINE=1 to use the cache"
            ) from None
        raise


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _weight_files(at: str, listing: dict[str, int | None]) -> list[str]:
    """The root-level weight files a loader would read (as Checkpoint.open chooses them); refuse
    pickle-only repos before anything is downloaded."""
    safetensors = sorted(name for name in listing if name.endswith(".safetensors"))
    if safetensors:
        return safetensors
    pickled = sorted(name for name in listing if name.endswith(PICKLE_SUFFIXES))
    if pickled:
        raise HubError(
            f"{at}: only pickled weights ({', '.join(pickled[:3])}{', ...' if len(pickled) > 3 else ''}); "
            "they are never downloaded or unpickled (unpickling runs code): use a repo with .safetensors"
        )
    raise HubError(f"{at}: no .safetensors weights at the repo's root (subfolders are not read)")


# ---- the cache ------------------------------------------------------------------------------------


def _snapshot_dir(repo_id: str, commit: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return (
        Path(constants.HF_HUB_CACHE).expanduser().resolve()
        / repo_folder_name(repo_id=repo_id, repo_type="model")
        / "snapshots"
        / commit
    )


def evict_cached(path: Path) -> None:
    """Delete a file of a cache snapshot: the blob and the snapshot's symlink to it (huggingface_hub
    then downloads it again when asked). Anything not inside a cache snapshot is refused."""
    path = Path(path)
    repo_folder = path.parent.parent.parent
    if path.parent.parent.name != "snapshots" or not repo_folder.name.startswith("models--"):
        raise InternalError(f"{path}: not a file of a huggingface_hub cache snapshot; refusing to delete it")
    if path.is_symlink():
        blob = path.resolve()
        path.unlink()
        if blob.parent == repo_folder.resolve() / "blobs":
            blob.unlink(missing_ok=True)
    elif path.exists():
        path.unlink()  # a cache without symlinks (Windows) holds the file itself


def _hooks(repo_id: str, commit: str, token: str | None) -> tuple[dict, list]:
    """fetch/evict hooks for a checkpoint in the cache snapshot of `commit`; the list receives the
    checkpoint (the fetch hook checks each downloaded shard against the header it was planned from)."""
    from huggingface_hub import hf_hub_download

    holder: list[Checkpoint] = []

    def fetch(path: Path) -> None:
        with _hub_errors(repo_id, commit):
            local = Path(hf_hub_download(repo_id, path.name, revision=commit, token=token))
        if local.resolve() != path.resolve():
            raise InternalError(f"{repo_id}: {path.name} was downloaded to {local}, not to {path}")
        checkpoint = holder[0]
        if path in checkpoint.files:
            found, _, _ = read_header(path)
            planned = {key: info for key, info in checkpoint.tensors.items() if info.file == path}
            if found != planned:
                raise CheckpointError(
                    f"{path}: the downloaded shard's header differs from the one the hub reported when planning; "
                    "the repo changed or the download is corrupt: delete it from the cache and run again"
                )

    return {"fetch": fetch, "evict": evict_cached}, holder


# ---- opening --------------------------------------------------------------------------------------


def _remote_header(file_metadata, name: str, size: int | None) -> tuple[dict, int, int]:
    """(header JSON, data start, size) from huggingface_hub's SafetensorsFileMetadata.

    The header length is not part of it; the file size is: tensors fill the buffer up to the end of
    the file (the format's rule, checked by check_header), so the data starts at size - buffer length."""
    header: dict = {
        key: {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": list(info.data_offsets)}
        for key, info in file_metadata.tensors.items()
    }
    header["__metadata__"] = dict(file_metadata.metadata or {})
    if size is None:
        raise HubError(f"{name}: the hub did not report the file's size; cannot place its tensors")
    buffer = max((info.data_offsets[1] for info in file_metadata.tensors.values()), default=0)
    if size - buffer < 8:
        raise CheckpointError(f"{name}: the hub reports {size} bytes, less than its header claims ({buffer} bytes of data)")
    return header, size - buffer, size


def _open_remote(repo_id: str, revision: str | None, token: str | None) -> Checkpoint:
    from huggingface_hub import HfApi, hf_hub_download

    api = HfApi(token=token)
    with _hub_errors(repo_id, revision):
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    commit = info.sha
    at = f"{repo_id}@{commit[:12]}"
    listing = {s.rfilename: s.size for s in info.siblings or () if "/" not in s.rfilename}
    weights = _weight_files(at, listing)
    with _hub_errors(repo_id, commit):
        for name in ("config.json", INDEX_NAME):
            if name in listing:
                hf_hub_download(repo_id, name, revision=commit, token=token)
        if SINGLE_NAME in listing or INDEX_NAME in listing:  # the loader's choice, as in Checkpoint.open
            metadata = api.get_safetensors_metadata(repo_id, revision=commit)
            files_metadata = metadata.files_metadata
            weight_map = metadata.weight_map if metadata.sharded else None
        else:
            files_metadata = {n: api.parse_safetensors_file_metadata(repo_id, n, revision=commit) for n in weights}
            weight_map = None
    headers = {name: _remote_header(meta, f"{at}/{name}", listing.get(name)) for name, meta in files_metadata.items()}
    hooks, holder = _hooks(repo_id, commit, token)
    checkpoint = Checkpoint.from_headers(_snapshot_dir(repo_id, commit), headers, weight_map, origin=at, listing=listing, **hooks)
    holder.append(checkpoint)
    return checkpoint


def _open_cached(repo_id: str, revision: str | None, token: str | None) -> Checkpoint:
    """HF_HUB_OFFLINE: huggingface_hub resolves the revision (refs/<name> or a commit) to a cached snapshot."""
    from huggingface_hub import snapshot_download

    with _hub_errors(repo_id, revision):
        folder = Path(
            snapshot_download(
                repo_id, revision=revision, token=token, allow_patterns=["config.json", INDEX_NAME], ignore_patterns=["*/*"]
            )
        )
    at = f"{repo_id}@{folder.name[:12]}"
    listing = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}  # a deleted blob's link is not a file
    if SINGLE_NAME not in listing and INDEX_NAME in listing:
        missing = sorted(read_index_names(folder / INDEX_NAME) - listing.keys())
        if missing:
            raise HubError(
                f"{at}: shard {missing[0]} is not in the huggingface_hub cache ({folder.parent.parent}) and HF_HUB_OFFLINE is set"
            )
    else:
        _weight_files(at, listing)
    hooks, holder = _hooks(repo_id, folder.name, token)
    checkpoint = Checkpoint.open(folder)
    checkpoint.origin = at
    checkpoint.fetch, checkpoint.evict = hooks["fetch"], hooks["evict"]
    holder.append(checkpoint)
    return checkpoint


def read_index_names(index_path: Path) -> set[str]:
    """Shard names an index maps keys to (validation is Checkpoint.open's)."""
    import json

    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map") or {}
    except (OSError, ValueError, AttributeError, RecursionError):
        return set()
    if not isinstance(weight_map, dict):
        return set()  # Checkpoint.open says what is wrong with it
    return {name for name in weight_map.values() if isinstance(name, str)}
