"""A large model's weights held once, in one file on disk, for the whole run (issue 16).

Every copy of the model a run makes (the gated model, the gradient graph, the cut, the
verification graphs) and every ONNX Runtime session over them would otherwise hold the
weights again. Instead, the large initializers of a big model are moved into one temporary
file when it is loaded, and the protos keep *stubs*: external-data references (location,
offset, length) into that file, a few bytes each, which copy for free.

- numpy reads a stub as a read-only view of one memory map of the file (``tensor_array``);
- ONNX Runtime sessions get the same views as shared initializers (``session_weights``),
  so N sessions cost one copy, not N; prepacking is off for them (a packed copy per session
  is what sharing avoids);
- weights a run creates (a cut's sliced matrices, re-fitted ones) are appended to the same
  file (``WeightStore.put``);
- writing the result reads each stub back from the file (``filled``).

The file lives in a private temporary folder, removed when the store is closed, at exit,
or when the run is interrupted.
"""

from __future__ import annotations

import atexit
import mmap
import os
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Container, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.errors import OnnxpruneError

# a model whose large tensors hold less than this stays in memory as it is (small models
# run faster with ONNX Runtime's prepacked weights, and hold little)
STORE_MIN_BYTES = 64 * 2**20
# tensors smaller than this stay inline: shape constants, biases, norms (shape inference
# and the analysis read them freely)
TENSOR_MIN_BYTES = 64 * 1024
_ALIGN = 64
_STORES: dict[str, WeightStore] = {}   # stub location -> its store


class WeightStore:
    """One append-only file of tensor bytes, and its memory map."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(tempfile.mkdtemp(prefix="onnxprune-weights-", dir=folder))
        self.location = f"weights-{uuid.uuid4().hex[:12]}.bin"
        self.path = self.folder / self.location
        self._file = open(self.path, "w+b")   # noqa: SIM115 (closed by close())
        self.size = 0          # bytes written
        self.capacity = 0      # the file's length
        self._map: np.ndarray | None = None   # the whole file, read-only
        self._mmap: mmap.mmap | None = None
        self._views: dict[tuple[int, int, int, tuple[int, ...]], np.ndarray] = {}
        _STORES[self.location] = self
        self._finalizer = weakref.finalize(self, _remove, self.location, self.folder)

    # -- writing ---------------------------------------------------------------------------
    def put(self, tensor: onnx.TensorProto) -> None:
        """Move ``tensor``'s data into the file; ``tensor`` becomes a stub (in place)."""
        data = tensor.raw_data if tensor.HasField("raw_data") else \
            numpy_helper.to_array(tensor).tobytes()
        make_stub(tensor, self.location, *self._write(data))

    def put_array(self, name: str, value: np.ndarray) -> onnx.TensorProto:
        """A stub named ``name`` of ``value``, written straight from the array: a tensor
        built first with ``numpy_helper.from_array`` would keep its bytes in the
        protobuf's arena for as long as the stub lives, even once they are cleared."""
        value = np.ascontiguousarray(value)
        tensor = onnx.TensorProto(name=name, dims=value.shape,
                                  data_type=onnx.helper.np_dtype_to_tensor_dtype(value.dtype))
        make_stub(tensor, self.location, *self._write(memoryview(value).cast("B")))
        return tensor

    def _write(self, data: bytes | memoryview) -> tuple[int, int]:
        """Append ``data`` (aligned); its offset and length."""
        offset = -(-self.size // _ALIGN) * _ALIGN
        try:
            if offset + len(data) > self.capacity:
                self.reserve(max(2 * self.capacity, offset + len(data)))
            self._file.seek(offset)
            self._file.write(data)
            self._file.flush()
        except OSError as exc:
            raise OnnxpruneError(f"cannot hold the weights in {self.folder} "
                                 f"({exc.strerror or exc}); set TMPDIR to a folder with "
                                 f"room for the model") from exc
        self.size = offset + len(data)
        return offset, len(data)

    def reserve(self, capacity: int) -> None:
        """Make the file ``capacity`` bytes long (sparse: no disk used until written), so
        that weights added later fit in the memory map that views already point into."""
        if capacity > self.capacity:
            os.ftruncate(self._file.fileno(), capacity)
            self.capacity = capacity
            self._map = self._mmap = None     # remapped on the next read

    # -- reading ---------------------------------------------------------------------------
    def array(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The stub's values: a read-only view of the file (no copy)."""
        offset, length = _extent(tensor)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        key = (offset, length, tensor.data_type, tuple(tensor.dims))
        view = self._views.get(key)
        if view is None:
            if self._map is None:
                self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
                self._map = np.frombuffer(self._mmap, np.uint8)
                self._views.clear()
            view = self._map[offset:offset + length].view(dtype).reshape(tuple(tensor.dims))
            self._views[key] = view
        return view

    def release(self) -> None:
        """Drop the file's pages from this process's resident set (they come back from the
        page cache on the next read): a stage's weights (the original's, before the cut)
        stop counting once the next stage no longer reads them."""
        if self._mmap is not None:
            self._mmap.madvise(mmap.MADV_DONTNEED)

    def read(self, tensor: onnx.TensorProto) -> bytes:
        """The stub's bytes, read from the file (without touching the memory map)."""
        offset, length = _extent(tensor)
        return os.pread(self._file.fileno(), length, offset)

    def close(self) -> None:
        self._views.clear()
        self._map = self._mmap = None
        self._file.close()
        self._finalizer()


def _remove(location: str, folder: Path) -> None:
    _STORES.pop(location, None)
    shutil.rmtree(folder, ignore_errors=True)


def live_stores() -> list[WeightStore]:
    return list(_STORES.values())


@contextmanager
def stores_closed_after(keep: bool = False) -> Iterator[None]:
    """Close the stores made inside the block when it ends (unless ``keep``): a command or
    API call that loaded a large model owns its store, and a long-lived process (a
    notebook, a test session) would otherwise keep each one, and its file, until exit."""
    before = set(_STORES)
    try:
        yield
    finally:
        if not keep:
            for location in set(_STORES) - before:
                store = _STORES.get(location)
                if store is not None:
                    store.close()


def release_pages() -> None:
    """:meth:`WeightStore.release` for every live store."""
    for store in list(_STORES.values()):
        store.release()


@atexit.register
def _close_all() -> None:
    for store in list(_STORES.values()):
        store.close()


def make_stub(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                  "uint64_data", "string_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)),
                       ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _extent(tensor: onnx.TensorProto) -> tuple[int, int]:
    entries = _entries(tensor)
    return int(entries["offset"]), int(entries["length"])


def store_of(tensor: onnx.TensorProto) -> WeightStore | None:
    """The live store ``tensor`` is a stub of; None for an ordinary tensor."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return _STORES.get(_entries(tensor).get("location", ""))


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """A tensor's values: a read-only view for a stub, ``numpy_helper.to_array`` otherwise."""
    store = store_of(tensor)
    return store.array(tensor) if store is not None else numpy_helper.to_array(tensor)


# -- models ------------------------------------------------------------------------------

def is_large(tensor: onnx.TensorProto, least: int | None = None) -> bool:
    """Whether ``tensor`` is an inline tensor of ``least`` bytes or more (one a store
    takes)."""
    if tensor.data_type == onnx.TensorProto.STRING or store_of(tensor) is not None \
            or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return False
    size = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    least = TENSOR_MIN_BYTES if least is None else least
    return size * int(np.prod(tensor.dims, dtype=np.int64)) >= least


def offload(model: onnx.ModelProto, min_total: int = STORE_MIN_BYTES,
            folder: str | os.PathLike | None = None,
            names: Container[str] | None = None) -> WeightStore | None:
    """Move ``model``'s large initializers (or exactly those ``names`` gives) into a new
    store (in place) when they hold ``min_total`` bytes or more; the store, or None when
    the model stays as it is."""
    large = [t for t in model.graph.initializer
             if (is_large(t) if names is None else t.name in names)]
    total = sum(_nbytes(t) for t in large)
    if not large or total < min_total:
        return None
    store = WeightStore(folder)
    store.reserve(2 * total + (1 << 20))   # room for a cut's new weights
    for tensor in large:
        store.put(tensor)
    return store


def model_store(model: onnx.ModelProto) -> WeightStore | None:
    """The store ``model``'s stubs point into (None: it has none)."""
    return next((s for s in map(store_of, model.graph.initializer) if s is not None), None)


def filled(tensor: onnx.TensorProto) -> onnx.TensorProto | None:
    """A stub with its data back inline (a copy); None for an ordinary tensor."""
    store = store_of(tensor)
    if store is None:
        return None
    out = onnx.TensorProto()
    out.CopyFrom(tensor)
    del out.external_data[:]
    out.ClearField("data_location")   # as an inline tensor is written: field unset
    out.raw_data = store.read(tensor)
    return out


def materialised(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself when it holds no stub, else a copy with every stub filled in."""
    if model_store(model) is None:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    fill_in(out.graph.initializer)
    return out


def fill_in(tensors: Iterable[onnx.TensorProto]) -> None:
    """Fill every stub of ``tensors`` in place."""
    for tensor in tensors:
        full = filled(tensor)
        if full is not None:
            tensor.CopyFrom(full)


def session_weights(model: onnx.ModelProto) -> tuple[Path | None, dict[str, np.ndarray]]:
    """The folder of ``model``'s store and the views of its stubs, by name, to hand to an
    ONNX Runtime session as shared initializers (empty: the model has no stub)."""
    views = {t.name: (store, t) for t in model.graph.initializer
             if (store := store_of(t)) is not None}
    if not views:
        return None, {}
    folders = {store.folder for store, _ in views.values()}
    if len(folders) > 1:
        raise OnnxpruneError("internal: one model refers to weights of two runs")
    return folders.pop(), {name: store.array(t) for name, (store, t) in views.items()}


def _nbytes(tensor: onnx.TensorProto) -> int:
    size = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return size * int(np.prod(tensor.dims, dtype=np.int64))


def full_size(model: onnx.ModelProto) -> int:
    """``model``'s serialised size with its stubs filled in (bytes)."""
    return model.ByteSize() + sum(_extent(t)[1] for t in model.graph.initializer
                                  if store_of(t) is not None)


def tensor_bytes(tensor: onnx.TensorProto) -> bytes | None:
    """The data of a stub, or of an inline tensor held in ``raw_data``; None for a tensor
    whose values sit in typed fields."""
    store = store_of(tensor)
    if store is not None:
        return store.read(tensor)
    return tensor.raw_data if tensor.HasField("raw_data") else None


def check_model(model: onnx.ModelProto, full_check: bool = False) -> None:
    """``onnx.checker.check_model`` for a model that may hold stubs: onnx looks for a
    stub's file beside the model, so such a model is checked from a file in its store's
    folder (the model without its weights: a few kilobytes)."""
    store = model_store(model)
    if store is None:
        onnx.checker.check_model(model, full_check=full_check)
        return
    path = store.folder / f"check-{uuid.uuid4().hex[:8]}.onnx"
    try:
        onnx.save_model(model, path)
        onnx.checker.check_model(str(path), full_check=full_check)
    finally:
        path.unlink(missing_ok=True)
