"""Local paths and object storage (`s3://`, `gs://`, any pyarrow URI) behind one set of calls.

Filesystems come from `pyarrow.fs.FileSystem.from_uri`, configured the standard way (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, Google's application credentials).

Safetensors files are read and written tensor by tensor here, so neither a worker reading its slices
of `--init-from` nor the driver writing the serving checkpoint ever holds a whole model:
- `TensorFile` reads one tensor with one ranged read (`open_input_file` is random access on S3 too);
- `write_safetensors_streamed` writes the header from the tensors' shapes, then each tensor as it comes.
The byte layout is the safetensors format's own (8-byte little-endian header length, JSON header,
raw little-endian data); files written here load with `safetensors.torch.load_file`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path

import pyarrow.fs as pafs
import torch

STORAGE_ENV_PREFIXES = ("AWS_", "GOOGLE_APPLICATION_CREDENTIALS", "GCS_")
"""Environment variables that configure object storage; the trainer hands them to its workers."""


def is_uri(path: str | os.PathLike | None) -> bool:
    """True for `scheme://...` paths (object storage), False for local paths."""
    return path is not None and "://" in str(path)


def filesystem_for(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path or a URI such as s3://bucket/key."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(str(path))
    return pafs.LocalFileSystem(), os.path.abspath(str(path))


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` for a local path or a URI (no normalisation of the URI's scheme)."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return str(Path(base, *parts))


def storage_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The object-storage settings of this process's environment (to hand to Ray workers)."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if k.startswith(STORAGE_ENV_PREFIXES)}


def remote_args() -> dict:
    """Ray remote options that hand this process's object-storage settings to tasks and actors
    (`ray_remote_args` of a Ray Data operator); empty when none are set."""
    env = storage_env()
    return {"runtime_env": {"env_vars": env}} if env else {}


def exists(path: str | os.PathLike) -> bool:
    """Whether a file or directory exists at `path`."""
    fs, p = filesystem_for(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_bytes(path: str | os.PathLike) -> bytes:
    fs, p = filesystem_for(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def upload_dir(local_dir: str | os.PathLike, dest: str) -> None:
    """Copy a local directory's files to `dest` (a URI or a local directory), overwriting same names."""
    fs, p = filesystem_for(dest)
    fs.create_dir(p, recursive=True)
    pafs.copy_files(str(Path(local_dir).resolve()), p, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def upload(local: str | os.PathLike, dest: str) -> None:
    """Copy a local file or directory to `dest` (a URI or local path); a missing `local` copies nothing."""
    p = Path(local)
    if p.is_dir():
        upload_dir(p, dest)
    elif p.is_file():
        fs, dst = filesystem_for(dest)
        with fs.open_output_stream(dst) as f:
            f.write(p.read_bytes())


def download_dir(src: str, local_dir: str | os.PathLike) -> Path:
    """Copy the files under `src` (a URI) into `local_dir`."""
    fs, p = filesystem_for(src)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{src} is not a directory on its storage")
    out = Path(local_dir)
    out.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(p, str(out.resolve()), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return out


def cache_root() -> Path:
    """Where copies of remote checkpoints are kept (`PALI_CACHE_DIR`, else ~/.cache/pali)."""
    return Path(os.environ.get("PALI_CACHE_DIR") or Path.home() / ".cache" / "pali")


def local_checkpoint(path: str | os.PathLike) -> Path:
    """A local directory holding the checkpoint at `path`: the path itself when local, else a cached copy.

    The copy is keyed by the URI and the remote files' sizes and modification times, downloaded into a
    temporary directory and renamed into place, so a half-finished download is never used.
    """
    if not is_uri(path):
        return Path(path)
    fs, p = filesystem_for(path)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True, allow_not_found=True))
    files = sorted((i.path, i.size, str(i.mtime)) for i in infos if i.type == pafs.FileType.File)
    if not files:
        raise FileNotFoundError(f"checkpoint {path} holds no files")
    key = hashlib.sha256(json.dumps([str(path), files]).encode()).hexdigest()[:16]
    out = cache_root() / "checkpoints" / f"{Path(p).name}-{key}"
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        download_dir(str(path), tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process finished the same copy first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --- safetensors, one tensor at a time ---

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


class ReadOnAccess(Mapping):
    """Base of the read-on-access weight mappings (name -> tensor): the names are known up front (`names`),
    a tensor is read or made only when it is indexed. Membership, iteration and length go through `names`:
    `Mapping`'s defaults would index, and so read, tensors."""

    @property
    def names(self) -> Collection[str]:
        raise NotImplementedError

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class TensorFile(ReadOnAccess):
    """A safetensors file on any storage as a read-on-access mapping name -> tensor.

    Opening reads only the header; `f[name]` reads that tensor's bytes with one ranged read.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        fs, p = filesystem_for(path)
        if fs.get_file_info(p).type != pafs.FileType.File:
            raise FileNotFoundError(f"{path} does not exist; expected a .safetensors file")
        self._fs, self._p = fs, p
        with fs.open_input_file(p) as f:
            size = f.size()
            (n,) = struct.unpack("<Q", f.read_at(8, 0))
            if n <= 0 or 8 + n > size:
                raise ValueError(f"{path} is not a safetensors file (header length {n}, file size {size})")
            header = json.loads(f.read_at(n, 8))
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries: dict[str, dict] = header
        self._base = 8 + n
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self._base + end > size:
            raise ValueError(f"{path} is truncated: its header needs {self._base + end} bytes, the file has {size}")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def _entry(self, name: str) -> dict:
        if name not in self._entries:
            raise KeyError(f"{name!r} is not in {self.path} (it holds {len(self._entries)} tensors)")
        return self._entries[name]

    @property
    def names(self) -> Collection[str]:
        return self._entries

    def __getitem__(self, name: str) -> torch.Tensor:
        e = self._entry(name)
        start, stop = e["data_offsets"]
        with self._fs.open_input_file(self._p) as f:
            buf = bytearray(f.read_at(stop - start, self._base + start))
        dtype = _DTYPES[e["dtype"]]
        if not buf:
            return torch.empty(e["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(e["shape"])


def write_safetensors_streamed(path: str | os.PathLike, specs: Iterable[tuple[str, torch.Size, torch.dtype]],
                               get: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose tensors are produced one at a time by `get(name)`.

    `specs` gives every tensor's (name, shape, dtype) up front (e.g. from a model on the meta device), so
    the header is written first and each tensor's bytes follow as it is read; at most one tensor is held.
    A tensor that does not match its spec is an error naming it (the partial file is the caller's to drop).
    """
    specs = list(specs)
    header: dict[str, dict] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, shape, dtype in specs:
        if dtype not in _NAMES:
            raise ValueError(f"{name}: dtype {dtype} has no safetensors name")
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    fs, p = filesystem_for(path)
    if not is_uri(path):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
    with fs.open_output_stream(p) as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for name, shape, dtype in specs:
            t = get(name)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{name}: got {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {dtype}")
            t = t.detach().cpu().contiguous()
            out.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            del t


@contextlib.contextmanager
def staged_dir(dest: str | os.PathLike, prefix: str = "pali-stage-"):
    """A local directory to write into, uploaded to `dest` on success when `dest` is a URI.

    For a local `dest` it yields `dest` itself (created); nothing is uploaded.
    """
    if not is_uri(dest):
        Path(dest).mkdir(parents=True, exist_ok=True)
        yield Path(dest)
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)
        upload_dir(tmp, str(dest))
