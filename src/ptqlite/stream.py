"""Streaming conversion (docs/architecture.md, "Streaming conversion"): a model whose weights are in external data
is loaded without them; each weight is read from a read-only memory map of the input's data file when a pass asks
for it, and each tensor a pass makes is appended to the output's data file as soon as it is made. The conversion
then holds a few tensors at a time, never the model; the input files are only read.

The output is written under temp names beside its targets (paths.temp_path), checked by the gate from there and
renamed last: `StagedOutput.publish`, or `discard` on any failure.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .errors import ConversionError
from .paths import remove_quietly, remove_stale_temps, temp_path, write_error

_ALIGN = 4096  # tensors start on page boundaries, so runtimes can map them
MIN_BYTES = 1024  # smaller tensors stay inline, as onnx.save_model does
_COPY_CHUNK = 64 << 20  # bytes copied at a time from the input's data file
_SCAN_CHUNK = 1 << 22  # values scanned at a time for NaN/Inf

# A streaming conversion loads the float model whole in ONNX Runtime (the input check) only up to this size with
# its external data: a session that prepacks holds every weight, so beyond it the conversion's peak memory would
# grow with the model. Larger models are checked tensor by tensor; the gate compares them when what the float
# session allocates fits in the memory available (verify.compare_memory: little where its weights stay mapped).
WHOLE_LOAD_BYTES = 1 << 30


def loads_whole(size: int) -> bool:
    """Whether a streaming conversion may load a model of `size` bytes (with its data) whole in ONNX Runtime."""
    return size <= WHOLE_LOAD_BYTES


def over_whole_load(size: int) -> str:
    return (f"the model takes {size / 1e9:.2f} GB with its external data, over the "
            f"{WHOLE_LOAD_BYTES / 2**30:.0f} GiB a streaming conversion loads whole")


_BASE: ContextVar[Path | None] = ContextVar("ptqlite_external_base", default=None)
_SINK: ContextVar[DataSink | None] = ContextVar("ptqlite_data_sink", default=None)


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def has_external_data(model: onnx.ModelProto, iter_tensors) -> bool:
    """Whether any tensor of `model` (iter_tensors: model.iter_tensors) keeps its data in an external file."""
    return any(is_external(t) for t in iter_tensors(model.graph))


def _entries(tensor: onnx.TensorProto) -> tuple[str, int, int | None]:
    info = {entry.key: entry.value for entry in tensor.external_data}
    if "location" not in info:
        raise ConversionError(f"tensor '{tensor.name}' keeps its data externally but names no location")
    length = info.get("length")
    return info["location"], int(info.get("offset", 0) or 0), int(length) if length else None


# ONNX Runtime reads an external tensor by mapping its data file from the page boundary below the tensor's offset
# (it copies the bytes only where the mapping fails), so on POSIX a tensor at any offset is read in place: measured
# on onnxruntime 1.32, tensors 1, 2, 8 and 100 bytes past a page boundary added no allocated memory, as page-aligned
# ones (docs/results.md, "The gate's float model mapped"). On Windows the mapping must start at a multiple of the
# 64 KiB allocation granularity.
_MAP_GRANULARITY = 1 if os.name == "posix" else 64 << 10


def read_in_place(tensor: onnx.TensorProto) -> bool:
    """Whether ONNX Runtime reads an external tensor from a memory map of its data file (clean file pages the
    kernel can drop and read again) rather than into allocated memory."""
    if not is_external(tensor):
        return False
    offset = _entries(tensor)[1]
    return (offset - offset % mmap.PAGESIZE) % _MAP_GRANULARITY == 0


def external_bytes(tensor: onnx.TensorProto) -> int:
    """Data bytes of an external tensor, from its dims and type (what it takes once read)."""
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def read_array(tensor: onnx.TensorProto, base: Path | None = None) -> np.ndarray:
    """The values of an external tensor: a read-only memory map of its bytes in the data file (nothing is
    copied until the caller computes with it; the mapping goes when the array does). `base` is the folder of
    the model file (default: the one `reading_from` set); tensors a pass already wrote are read from the
    output's data file."""
    sink = _SINK.get()
    location, offset, _ = _entries(tensor)
    if sink is not None and sink.owns(tensor):
        path = sink.path
    else:
        base = base or _BASE.get()
        if base is None:
            raise ConversionError(f"tensor '{tensor.name}' keeps its data in '{location}', but the model was given "
                                  "without the folder of its file: load it with its external data")
        path = base / location
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except (KeyError, TypeError, ValueError):
        raise ConversionError(f"tensor '{tensor.name}': external data of type "
                              f"{TensorProto.DataType.Name(tensor.data_type)} cannot be read lazily") from None
    if tensor.data_type in (TensorProto.INT4, TensorProto.UINT4, TensorProto.STRING):
        raise ConversionError(f"tensor '{tensor.name}': external data of type "
                              f"{TensorProto.DataType.Name(tensor.data_type)} cannot be read lazily")
    shape = tuple(int(d) for d in tensor.dims)
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return np.zeros(shape, dtype)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ConversionError(f"tensor '{tensor.name}': cannot read its data file {path} "
                              f"({exc.strerror or exc})") from None
    if offset + count * dtype.itemsize > size:
        raise ConversionError(f"tensor '{tensor.name}': its data file {path} holds {size} bytes, but the tensor "
                              f"needs {count * dtype.itemsize} from offset {offset}")
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as handle:
        mapping = mmap.mmap(handle.fileno(), offset + count * dtype.itemsize - start, access=mmap.ACCESS_READ,
                            offset=start)
    # read-only (a pass cannot write into the input); the mapping closes when the array is garbage
    return np.frombuffer(mapping, dtype.newbyteorder("<"), count, offset - start).reshape(shape)


def release_pages(array: np.ndarray, start: int, stop: int) -> None:
    """Drop from this process's memory the pages of elements [start, stop) of a C-contiguous array that
    read_array mapped (the kernel reads them again from the file if they are touched later); anything else is
    left alone. Streaming reads a large weight once, front to back: without this the whole weight would stay
    resident until its array goes."""
    mapping = array
    while mapping is not None and not isinstance(mapping, mmap.mmap):
        mapping = mapping.obj if isinstance(mapping, memoryview) else getattr(mapping, "base", None)
    if mapping is None or not array.flags.c_contiguous:
        return
    origin = np.frombuffer(mapping, np.uint8).ctypes.data
    first = array.ctypes.data - origin + start * array.itemsize
    last = array.ctypes.data - origin + stop * array.itemsize
    first -= first % mmap.PAGESIZE
    if last > first:
        mapping.madvise(mmap.MADV_DONTNEED, first, min(last, len(mapping)) - first)


def all_finite_external(tensor: onnx.TensorProto, base: Path) -> tuple[int, int]:
    """(NaN count, Inf count) of an external float tensor, scanned a chunk at a time from its memory map."""
    values = read_array(tensor, base).reshape(-1)
    nan = inf = 0
    for start in range(0, values.size, _SCAN_CHUNK):
        part = np.asarray(values[start:start + _SCAN_CHUNK])
        release_pages(values, max(0, start - _SCAN_CHUNK), start)
        if part.dtype not in (np.float32, np.float64, np.float16):
            part = part.astype(np.float32)
        with np.errstate(invalid="ignore", over="ignore"):
            # a sum in the values' own type (no float64 conversion of every value): finite only when every value
            # is; one that overflows (finite values only) is counted below like any other chunk
            if np.isfinite(np.add.reduce(part, dtype=np.float32 if part.dtype == np.float16 else None)):
                continue
        nan += int(np.isnan(part).sum())
        inf += int(np.isinf(part).sum())
    return nan, inf


@contextlib.contextmanager
def reading_from(base: Path, sink: DataSink | None = None):
    """While the block runs, external tensors are read relative to `base` and `spill` moves new tensors into
    `sink`."""
    tokens = _BASE.set(base), _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(tokens[1])
        _BASE.reset(tokens[0])


def spill(tensors: list[onnx.TensorProto], trim: bool = True) -> list[onnx.TensorProto]:
    """When a streaming conversion runs, write the data of each large tensor to the output's data file and return
    new messages that keep only the reference (protobuf holds a message's bytes until the message itself goes,
    even once the field is cleared, so the callers must keep the returned ones). Else returns `tensors`.
    `trim=False` leaves the freed heap to the caller's next weight (which trims once at the end): a weight whose
    temporaries come back from the system each time faults every page in again."""
    sink = _SINK.get()
    if sink is None:
        return tensors
    spilled = []
    for tensor in tensors:
        if sink.put(tensor):
            light = onnx.TensorProto()
            light.CopyFrom(tensor)
            tensor = light
        spilled.append(tensor)
    if trim:
        trim_heap()
    return spilled


def raw_tensor(name: str, data_type: int, dims, data: np.ndarray) -> onnx.TensorProto | None:
    """While a streaming conversion runs, a tensor whose raw data is the bytes of `data` (C-contiguous, MIN_BYTES
    or more), written to the output's data file at once: the message only refers to them. Else None (the caller
    makes the inline tensor). A raw-data message, spilled, costs three copies of its bytes on the way (the bytes
    object, protobuf's own, and the read of the field), each a large weight's codes in fresh memory."""
    sink = _SINK.get()
    if sink is None or data.nbytes < MIN_BYTES:
        return None
    tensor = onnx.TensorProto()
    tensor.name, tensor.data_type = name, data_type
    tensor.dims.extend(int(d) for d in dims)
    sink.put_array(tensor, np.ascontiguousarray(data))
    return tensor


def trim_heap() -> None:
    """Give freed heap memory back to the system. glibc raises its mmap threshold after a large array is freed,
    so the next weights' temporaries come from the heap and stay there: without this the resident memory grew
    by about 6 MB per weight of a 2048-wide decoder. convert() and the gate call it between stages too (an
    ONNX Runtime session's load leaves its freed scratch in the heap)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


# glibc's mallopt parameters, and the values its own dynamic threshold reaches once a temporary of 32 MB or more is
# freed (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, the trim threshold twice that)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_TEMPORARIES = 32 << 20


def heap_temporaries() -> None:
    """Have glibc serve temporaries up to 32 MB from its heap, reused from one array to the next, instead of a fresh
    mapping each, whose every page faults in zeroed (no-op without glibc). glibc's dynamic threshold gets there
    itself only once a large enough temporary has been freed, so a pass's CPU time depended on what ran before it:
    MiniLM's mixed-bit pass took 1.4 M page faults and 4.5 s of system time where the input checks freed no large
    buffer, 0.2 M and 1.4 s after one. trim_heap still gives the free heap back between stages."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_TEMPORARIES)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * _HEAP_TEMPORARIES)


def _libc():
    """glibc through ctypes, or None where there is none (other C libraries, other systems)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            libc.malloc_trim, libc.mallopt  # noqa: B018  (both present: glibc)
            _LIBC = libc
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


_LIBC = None


def streaming() -> bool:
    return _SINK.get() is not None


class DataSink:
    """The output's data file while the conversion runs (written under its temp name, page-aligned tensors)."""

    def __init__(self, path: Path):
        self.path = path
        self.handle = open(path, "w+b")  # noqa: SIM115  (closed by close())

    def owns(self, tensor: onnx.TensorProto) -> bool:
        """Whether this sink wrote `tensor`: by its location, the temp data file's name (no input's data file has
        it: an output whose data file is the input's is refused up front), not by its name, which a pass may
        still change after spilling (the mixed-bit pass's short names)."""
        return is_external(tensor) and _entries(tensor)[0] == self.path.name

    def _start(self) -> int:
        self.handle.seek(0, os.SEEK_END)
        pad = -self.handle.tell() % _ALIGN
        if pad:
            self.handle.write(b"\0" * pad)
        return self.handle.tell()

    def _refer(self, tensor: onnx.TensorProto, offset: int, length: int) -> None:
        tensor.ClearField("raw_data")
        del tensor.external_data[:]
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value

    def put(self, tensor: onnx.TensorProto) -> bool:
        """Append an inline tensor of MIN_BYTES or more (raw data) and keep only the reference in its message;
        whether it did."""
        if is_external(tensor) or not tensor.HasField("raw_data"):
            return False
        data = tensor.raw_data  # each read of a bytes field copies it (upb): once, not three times
        if len(data) < MIN_BYTES:
            return False
        offset = self._start()
        self.handle.write(data)
        self._refer(tensor, offset, len(data))
        return True

    def put_array(self, tensor: onnx.TensorProto, data: np.ndarray) -> None:
        """Append the bytes of C-contiguous `data` as `tensor`'s data and give it the reference."""
        offset = self._start()
        self.handle.write(memoryview(data).cast("B"))
        self._refer(tensor, offset, data.nbytes)

    def copy_from(self, tensor: onnx.TensorProto, base: Path) -> None:
        """Copy an external tensor of the input (untouched by the pass) into the output's data file, in chunks."""
        location, offset, length = _entries(tensor)
        length = external_bytes(tensor) if length is None else length
        start = self._start()
        with open(base / location, "rb") as source:
            source.seek(offset)
            left = length
            while left:
                chunk = source.read(min(left, _COPY_CHUNK))
                if not chunk:
                    raise ConversionError(f"tensor '{tensor.name}': its data file {base / location} ends early")
                self.handle.write(chunk)
                left -= len(chunk)
        self._refer(tensor, start, length)

    def rename(self, location: str, tensors) -> None:
        """Point the tensors this sink wrote at `location` (the data file's final name)."""
        for tensor in tensors:
            if self.owns(tensor):
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = location

    def close(self) -> None:
        if not self.handle.closed:
            self.handle.close()


class StagedOutput:
    """The output model and its data file under temp names beside their targets, until publish() renames them
    (the data file first); discard() removes both. Nothing of them survives a failure or an interrupt."""

    def __init__(self, target: Path):
        self.target = target
        self.data_target = target.with_name(target.name + ".data")
        self.model_tmp, self.data_tmp = temp_path(target), temp_path(self.data_target)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(target)
            remove_stale_temps(self.data_target)
            self.sink = DataSink(self.data_tmp)
        except OSError as exc:
            raise write_error(target, "the output model", exc) from None

    def finish(self, model: onnx.ModelProto, base: Path, iter_tensors, iter_initializers) -> Path:
        """Write what the pass left: every external tensor of the input that the output still holds is copied
        into the output's data file, inline tensors of MIN_BYTES or more go there too, and the graph is written
        to the temp model file (naming the temp data file, so ONNX Runtime can load it from there). Returns the
        temp model file. (iter_tensors and iter_initializers: those of model.py.)"""
        try:
            for tensor in iter_tensors(model.graph):  # Constant values in external data too
                if is_external(tensor) and not self.sink.owns(tensor):
                    self.sink.copy_from(tensor, base)
            for tensor in iter_initializers(model.graph):
                self.sink.put(tensor)
            self.sink.handle.flush()
            self._write_graph(model)
        except OSError as exc:
            raise write_error(self.target, "the output model", exc) from None
        return self.model_tmp

    def _write_graph(self, model: onnx.ModelProto) -> None:
        try:
            data = model.SerializeToString(deterministic=True)
        except Exception as exc:  # noqa: BLE001  (protobuf raises several types)
            raise ConversionError(f"{self.target}: could not write the output model ({exc})") from None
        with open(self.model_tmp, "wb") as handle:
            handle.write(data)

    def publish(self, model: onnx.ModelProto, iter_tensors) -> None:
        """Name the final data file in the graph, write it again, and rename both files into place."""
        try:
            self.sink.rename(self.data_target.name, iter_tensors(model.graph))
            self.sink.close()
            self._write_graph(model)
            os.replace(self.data_tmp, self.data_target)
            os.replace(self.model_tmp, self.target)
        except OSError as exc:
            raise write_error(self.target, "the output model", exc) from None
        finally:
            self.discard()

    def discard(self) -> None:
        self.sink.close()
        remove_quietly(self.model_tmp)
        remove_quietly(self.data_tmp)
