"""What a run writes: checked against what it reads before any work, written atomically.

``RunFiles`` collects the files a command reads (the model, its external data, calibration
and training data) and the files it writes (the model and its ``<out>.data`` side file, the
report, plots, JSON); ``check`` refuses, before any work, an output that is any file the run
reads or another output of the run, and an output whose folder is missing or not writable.

``atomic_file`` is the one way a file is written: a temp file in the target's folder, fsync,
the user's umask applied (``mkstemp`` creates 0600), then ``os.replace``. An ``OSError``
(full disk, read-only folder) becomes a one-line ``OnnxpruneError``. Inside ``transaction``
every file a write created is removed again when the run fails or is interrupted, so a
report never names a model that is not there. ``sigterm_as_interrupt`` turns SIGTERM into a
``KeyboardInterrupt`` (``Terminated``) so a killed run cleans up like Ctrl-C.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from onnxprune.errors import OnnxpruneError

# the formats matplotlib's Agg backend writes (matplotlib's own list), by file extension
PLOT_FORMATS = ("eps", "jpeg", "jpg", "pdf", "pgf", "png", "ps", "raw", "rgba", "svg", "svgz",
                "tif", "tiff", "webp")

# CLI attribute -> how a message names it; a string value is a path, anything else is not
READ_ARGS = {"input": "the input file", "model": "the input file", "models": "an input model",
             "calib": "the --calib file", "train": "the --train file", "val": "the --val file",
             "data": "the --data file", "config": "the --config file"}
WRITE_ARGS = {"output": "output path", "report": "--report path", "plot": "--plot path",
              "json": "--json path"}
MODEL_WRITES = {"output"}   # written by save_model: also checked for its <out>.data side file
PLOT_WRITES = {"plot"}


def external_data_paths(model_path: str | os.PathLike) -> list[Path]:
    """The external-data files an ONNX file refers to, read without loading any data; an
    unreadable file gives none (loading it reports why)."""
    try:
        stat = os.stat(model_path)
    except OSError:
        return []
    return list(_external_data_paths(str(model_path), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=8)
def _external_data_paths(model_path: str, mtime_ns: int, size: int) -> tuple[Path, ...]:
    """``external_data_paths`` of one version of a file (a run asks several times, and a
    large model takes a second to read)."""
    import onnx

    from onnxprune.protostream import load_stubbed

    def without_data(tensor: onnx.TensorProto) -> onnx.TensorProto:
        return onnx.TensorProto(name=tensor.name, external_data=tensor.external_data)

    try:   # large inline tensors are read one at a time and dropped
        model = load_stubbed(model_path, without_data, 1 << 16)
    except Exception:  # load_model gives the one-line error later
        return ()
    folder = Path(model_path).parent
    found: dict[str, None] = {}
    for tensor in _tensors(model.graph):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value:
                found[entry.value] = None
    return tuple(folder / location for location in found)


def _tensors(graph) -> Iterator:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """One file under two names: ``samefile`` when both exist, resolved paths otherwise."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


@dataclass
class RunFiles:
    """The files one run reads and writes, as (how a message names it, path)."""

    reads: list[tuple[str, Path]] = field(default_factory=list)
    writes: list[tuple[str, Path]] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    external: set[Path] = field(default_factory=set)   # the models that keep external data

    def read(self, role: str, path: str | os.PathLike | None) -> RunFiles:
        if path:
            self.reads.append((role, Path(path)))
        return self

    def read_model(self, role: str, path: str | os.PathLike | None) -> RunFiles:
        """The model and every external-data file it names."""
        if path:
            self.read(role, path)
            for data in external_data_paths(path):
                self.read(f"{role}'s external data ({data.name})", data)
                self.external.add(Path(path))
        return self

    def write(self, role: str, path: str | os.PathLike | None, model: bool = False,
              plot: bool = False) -> RunFiles:
        if path:
            path = Path(path)
            self.writes.append((role, path))
            if model:
                self.writes.append((f"{role}'s external-data file", _side_file(path)))
            if plot:
                self.plots.append(path)
        return self

    @classmethod
    def from_args(cls, args) -> RunFiles:
        """The files a parsed command line names (``READ_ARGS``, ``WRITE_ARGS``)."""
        files = cls()
        for name, role in READ_ARGS.items():
            value = getattr(args, name, None)
            for path in value if isinstance(value, list) else [value]:
                if isinstance(path, str | os.PathLike) and str(path) != "-":
                    if name in ("input", "model", "models"):
                        files.read_model(role, path)
                    else:
                        files.read(role, path)
        for name, role in WRITE_ARGS.items():
            value = getattr(args, name, None)
            if isinstance(value, str | os.PathLike) and str(value) != "-":
                files.write(role, value, model=name in MODEL_WRITES, plot=name in PLOT_WRITES)
        return files

    def check(self) -> None:
        """Raise a one-line ``OnnxpruneError`` for the first output that would destroy an
        input or another output, or that cannot be written where it is."""
        for i, (role, out) in enumerate(self.writes):
            for read_role, read in self.reads:
                if same_file(out, read):
                    raise OnnxpruneError(f"{out}: {role} is {read_role}; choose another name")
            for other_role, other in self.writes[:i]:
                if same_file(out, other):
                    raise OnnxpruneError(f"{out}: {role} is also the {other_role}; choose "
                                         "another name")
            check_writable(out)
        for plot in self.plots:
            check_plot(plot)


def _side_file(path: Path) -> Path:
    return path.with_name(f"{path.name}.data")


def check_writable(path: str | os.PathLike) -> None:
    """The output is not a folder, and its folder exists and takes new files."""
    path = Path(path)
    if path.is_dir():
        raise OnnxpruneError(f"{path}: is a directory")
    folder = Path(os.path.dirname(os.path.abspath(path)))
    if not folder.exists():
        raise OnnxpruneError(f"{path}: output folder {folder} does not exist")
    if not folder.is_dir():
        raise OnnxpruneError(f"{path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OnnxpruneError(f"{path}: output folder {folder} is not writable")


def plot_format(path: str | os.PathLike) -> str:
    """The image format a plot path asks for (png without an extension)."""
    return Path(path).suffix.lower().lstrip(".") or "png"


def check_plot(path: str | os.PathLike) -> None:
    """An image extension matplotlib writes, and matplotlib there (found, not imported)."""
    if plot_format(path) not in PLOT_FORMATS:
        raise OnnxpruneError(f"{path}: not an image extension; use one of "
                             f"{', '.join('.' + f for f in PLOT_FORMATS)}")
    if importlib.util.find_spec("matplotlib") is None:
        raise OnnxpruneError("--plot needs matplotlib: pip install 'onnxprune[plot]'")


# --- writing ------------------------------------------------------------------------------

def current_umask() -> int:
    """The process umask, read without changing it where Linux says it (/proc), else set
    (restrictively, for an instant) and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _fsync(fd: int) -> None:
    os.fsync(fd)


def _sync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder: str) -> None:
    """Make the rename durable; a file system that cannot sync a folder is fine."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class TempFile:
    """A temp file beside ``target``: ``seal`` (fsync, umask mode), then ``commit`` (rename
    over the target) or ``discard``."""

    def __init__(self, target: str | os.PathLike) -> None:
        self.target = Path(target)
        self.folder = os.path.dirname(os.path.abspath(self.target))
        self.committed = False
        self.path = ""
        try:
            fd, self.path = tempfile.mkstemp(prefix=f".{self.target.name}.", suffix=".tmp",
                                             dir=self.folder)
            os.close(fd)
        except OSError as exc:
            raise write_error(self.target, exc) from exc

    def seal(self) -> None:
        _sync_file(self.path)
        os.chmod(self.path, 0o666 & ~current_umask())

    def commit(self) -> None:
        os.replace(self.path, self.target)
        self.committed = True
        created(self.target)
        _sync_folder(self.folder)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            if self.path and os.path.lexists(self.path):
                os.unlink(self.path)
        if self.committed:
            with contextlib.suppress(OSError):
                os.unlink(self.target)


def write_error(path: str | os.PathLike, exc: OSError) -> OnnxpruneError:
    reason = exc.strerror or str(exc)
    return OnnxpruneError(f"{path}: cannot write: {reason}")


@contextlib.contextmanager
def atomic_files(*targets: str | os.PathLike) -> Iterator[list[str]]:
    """Temp paths for ``targets``: write them in the block; on success each is synced, given
    the umask's mode and renamed over its target in the order given, on any failure none is
    left (nor a target this call already renamed). OSError -> one-line OnnxpruneError."""
    temps: list[TempFile] = []
    try:
        for target in targets:
            temps.append(TempFile(target))
        yield [t.path for t in temps]
        for temp in temps:
            temp.seal()
        for temp in temps:
            temp.commit()
    except BaseException as exc:
        for temp in temps:
            temp.discard()
        if isinstance(exc, OSError):
            failed = next((t.target for t in temps if not t.committed), targets[0])
            raise write_error(failed, exc) from exc
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[str]:
    """``atomic_files`` for one target: yields its temp path."""
    with atomic_files(target) as (tmp,):
        yield tmp


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    """A matplotlib figure, written like every output, in the format its extension names
    (png without one)."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format=plot_format(path))


# --- the run: what it created, and signals ------------------------------------------------

_runs: list[list[Path]] = []


def created(path: Path) -> None:
    """Record a file this run wrote (removed again if the run fails)."""
    if _runs:
        _runs[-1].append(path)


@contextlib.contextmanager
def transaction() -> Iterator[list[Path]]:
    """Every file written in the block is removed when the block raises (error, Ctrl-C,
    SIGTERM): a failed run leaves nothing behind. A normal return keeps them."""
    made: list[Path] = []
    _runs.append(made)
    try:
        yield made
    except BaseException:
        remove(made)
        raise
    finally:
        _runs.remove(made)


def remove(paths: Iterable[Path]) -> None:
    for path in reversed(list(paths)):
        with contextlib.suppress(OSError):
            os.unlink(path)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, so it unwinds (and cleans up) like Ctrl-C."""

    exit_code = 128 + signal.SIGTERM


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises ``Terminated`` in the block; a second one while cleaning up is ignored
    (the first already stops the run). Only the main thread can take signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
