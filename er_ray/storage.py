"""Where a run's files live: a local folder, or a URI (`s3://bucket/prefix`, `gs://...`) read and written
through pyarrow's file systems, as Ray Tune does, so a driver and workers on different nodes share no disk.

A `Store` is one folder. Object stores have no atomic rename, so a folder counts as written when its
completion file is: `upload(local, last=...)` puts every other file first and that one last (a ticket's
`result.json`, an attack's `summary.json`); a single file is one PUT, whole or absent. Local folders keep their
tmp-then-rename writes. Readers that need a local copy (MLflow artifacts, model loading) `fetch` one into a
node-local cache; on a local store that is the folder itself.

A URI may carry pyarrow's options as its query (`s3://b/x?endpoint_override=host:9000&scheme=http`): they
stay with every path joined under it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

from er_ray.config import UserError


def is_uri(where: str | Path) -> bool:
    """`s3://…`, `gs://…` and the like; a local path (or `file://`) is not."""
    scheme = urlsplit(str(where)).scheme
    return len(scheme) > 1 and scheme != "file"  # "C:" is a drive letter, not a scheme


@dataclass(frozen=True)
class Store:
    """One folder: a pyarrow file system, that system's path of the folder, and the folder as written."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @classmethod
    def at(cls, where: str | Path) -> Store:
        if not is_uri(where):
            local = str(Path(str(where).removeprefix("file://")).expanduser().resolve())
            return cls(pafs.LocalFileSystem(), local, local)
        try:
            fs, path = pafs.FileSystem.from_uri(str(where))
        except (pa.ArrowInvalid, OSError, ValueError) as err:  # unknown scheme, bad options
            raise UserError(f"cannot open storage {redact(str(where))}: {str(err).splitlines()[0]}") from None
        return cls(fs, path.rstrip("/"), str(where))

    def __truediv__(self, name: str) -> Store:
        if self.local is not None:
            joined = str(Path(self.path) / name)
            return Store(self.fs, joined, joined)
        parts = urlsplit(self.uri)
        uri = urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{name}"))
        return Store(self.fs, f"{self.path}/{name}", uri)

    def with_name(self, name: str) -> Store:
        """The sibling `name` of this file or folder."""
        if self.local is not None:
            return Store.at(self.local.with_name(name))
        parts = urlsplit(self.uri)
        uri = urlunsplit(parts._replace(path=f"{parts.path.rstrip('/').rsplit('/', 1)[0]}/{name}"))
        return Store(self.fs, f"{self.path.rstrip('/').rsplit('/', 1)[0]}/{name}", uri)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def local(self) -> Path | None:
        """The folder as a local path, when it is on this machine's file system."""
        return Path(self.path) if isinstance(self.fs, pafs.LocalFileSystem) else None

    def __str__(self) -> str:
        return redact(self.uri)

    # ------------------------------------------------------------ single files

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """Whole or not at all: tmp + rename locally, one PUT on an object store."""
        if self.local is not None:
            self.local.parent.mkdir(parents=True, exist_ok=True)
            with _partial(self.local.with_name(self.local.name + ".tmp")) as tmp:
                tmp.write_bytes(data)
                tmp.replace(self.local)
            return
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def put(self, file: Path) -> None:
        """A local file to this path, streamed (a restart state is ~1.3 GB at BERT-base); whole or absent."""
        if self.local is not None:
            self.local.parent.mkdir(parents=True, exist_ok=True)
            with _partial(self.local.with_name(self.local.name + ".tmp")) as tmp:
                shutil.copyfile(file, tmp)
                tmp.replace(self.local)
            return
        pafs.copy_files(
            str(Path(file).resolve()),
            self.path,
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=self.fs,
        )

    def get(self, file: Path) -> Path:
        """This path's file to a local one."""
        pafs.copy_files(
            self.path,
            str(Path(file).resolve()),
            source_filesystem=self.fs,
            destination_filesystem=pafs.LocalFileSystem(),
        )
        return Path(file)

    # ------------------------------------------------------------ folders

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)  # object stores: nothing to do

    def children(self) -> list[str]:
        """Names of the sub-folders, sorted."""
        if not self.exists():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def bucket_gone(self) -> bool:
        """On an object store: this path's bucket no longer exists (deleted during a run)."""
        if self.local is not None:
            return False
        try:
            return self.fs.get_file_info(self.path.split("/", 1)[0]).type == pafs.FileType.NotFound
        except OSError:  # the store does not answer: not known to be gone
            return False

    def move(self, target: Store) -> None:
        """This folder to `target` on the same file system (object stores: copied, then deleted)."""
        try:
            self.fs.move(self.path, target.path)
        except NotImplementedError:  # pyarrow's S3 moves files, not folders
            pafs.copy_files(self.path, target.path, source_filesystem=self.fs, destination_filesystem=self.fs)
            self.fs.delete_dir(self.path)

    def upload(self, local: Path, last: str | None = None) -> None:
        """The files of `local` under this folder; `last` (the completion file) after all the others."""
        files = sorted(p for p in Path(local).rglob("*") if p.is_file() and p.name != last)
        for p in files:
            (self / p.relative_to(local).as_posix()).put(p)
        if last is not None and (Path(local) / last).is_file():
            (self / last).put(Path(local) / last)

    def fetch(self, cache: Path | None = None) -> Path:
        """A local copy of this folder (the folder itself when local), downloaded once per node into `cache`
        and named by the URI."""
        if self.local is not None:
            return self.local
        cache = Path(cache) if cache is not None else Path(tempfile.gettempdir()) / "er-ray-fetch"
        target = cache / f"{self.name}-{hashlib.sha1(self.uri.encode()).hexdigest()[:12]}"
        return target if target.is_dir() else self.download(target)

    def download(self, target: Path) -> Path:
        """This folder to the local folder `target`, renamed into place once whole (a reader never sees part
        of it); a copy another process made meanwhile wins."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        pafs.copy_files(
            self.path, str(tmp), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem()
        )
        try:
            os.rename(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        return target


@contextlib.contextmanager
def _partial(tmp: Path) -> Iterator[Path]:
    """A temporary file that a failed write (a full disk) does not leave behind."""
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# what an OSError of the storage means for a run: nothing a retry fixes, so the run stops and says so
_FAULTS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}
BUCKET_GONE = "the bucket does not exist (deleted during the run?)"
_BUCKET_GONE = re.compile(r"NO_SUCH_BUCKET|NoSuchBucket|bucket does not exist|Bucket '[^']*' not found", re.I)


def fault_line(err: BaseException, store: Store | None = None) -> str | None:
    """One line for a fault of the storage a run writes to (a full disk, a read-only one, a bucket deleted),
    found anywhere in `err`'s chain, Ray's wrapped task errors included, or, for an error that does not say
    (Tune's "Unable to set up cluster storage"), by looking at `store`'s bucket. `store` names the path when
    the error does not (pyarrow's do not). None for anything else."""
    where = str(store) if store is not None else None
    todo, seen = [err], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and (line := _os_fault(e, where)):
            return line
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return f"{BUCKET_GONE}: {where}" if store is not None and store.bucket_gone() else None


def _os_fault(e: OSError, where: str | None) -> str | None:
    text = str(e)
    what = _FAULTS.get(e.errno or 0) or next((v for v in _FAULTS.values() if v in text.lower()), None)
    if what is None and _BUCKET_GONE.search(text):
        what = BUCKET_GONE
    if what is None:
        return None
    path = e.filename2 or e.filename or where
    return f"{what}: {redact(str(path))}" if path else f"{what} ({text.splitlines()[0]})"


def redact(uri: str) -> str:
    """A URL or URI without the secrets it may hold: a password (`db://me:***@host`) or secret query options
    (they go into messages and MLflow params)."""
    uri = re.sub(r"://([^/:@]+):[^/@]*@", r"://\1:***@", uri)
    try:
        parts = urlsplit(uri)
    except ValueError:  # not a URL after all (a bracket in a sentence): the password pattern was all
        return uri
    if not parts.query:
        return uri
    keep = [
        q for q in parts.query.split("&") if not q.lower().startswith(("secret", "access_key", "session"))
    ]
    return urlunsplit(parts._replace(query="&".join(keep)))


@contextlib.contextmanager
def sqlite_lock(url: str) -> Iterator[None]:
    """For a `sqlite:///` database URL, the block runs alone among this machine's processes (an advisory lock on
    `<file>.lock`; the folder is made if missing); any other URL runs as it is."""
    if not url.startswith("sqlite:///"):
        yield
        return
    lock = Path(url.removeprefix("sqlite:///") + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
