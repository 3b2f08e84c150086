"""Load and save an inline ONNX model one big initializer at a time.

``onnx.load`` reads the whole file into one bytes object and then parses it, so a model
briefly costs twice its size in memory (and ``SerializeToString`` does the same on save).
For models near the limits of the machine that is the difference between working and being
killed. This module walks the protobuf wire format with ``seek``/``read`` instead: on load
each large main-graph initializer is read alone and handed to ``take`` (which may replace it
by a small stub, e.g. an external-data reference), on save each initializer is serialized
alone after ``fill`` has supplied its data. Never are a large model's bytes and its parsed
proto held at the same time.

Wire format: a message is a run of fields, each a varint key ``number << 3 | wire_type``
then a varint (type 0), 8 bytes (1), 4 bytes (5) or a varint length and that many bytes (2).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from typing import BinaryIO

import onnx
from google.protobuf import unknown_fields
from google.protobuf.message import DecodeError, Message

from onnxprune.errors import OnnxpruneError

_MODEL_GRAPH = 7          # ModelProto.graph
_GRAPH_INITIALIZER = 5    # GraphProto.initializer
_LENGTH_DELIMITED = 2
_MASK64 = (1 << 64) - 1


class _Malformed(Exception):
    """The bytes are not a well-formed protobuf message; turned into an OnnxpruneError."""


def _encode_varint(value: int) -> bytes:
    """Base-128 varint, low group first; negative values as their 64-bit two's complement."""
    value &= _MASK64
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int, wire_type: int = _LENGTH_DELIMITED) -> bytes:
    return _encode_varint(number << 3 | wire_type)


def _read_varint(f: BinaryIO) -> int:
    """The varint at the file's position (at most 10 bytes: 64 bits)."""
    value = 0
    for shift in range(0, 70, 7):
        byte = f.read(1)
        if not byte:
            raise _Malformed("file ends inside a varint")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
    raise _Malformed("varint longer than 10 bytes")


def _read_exact(f: BinaryIO, start: int, end: int) -> bytes:
    f.seek(start)
    data = f.read(end - start)
    if len(data) != end - start:
        raise _Malformed(f"file ends at byte {start + len(data)}, expected {end}")
    return data


def _fields(f: BinaryIO, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(number, wire_type, field_start, payload_start, field_end) per field in [start, end)."""
    position = start
    while position < end:
        f.seek(position)
        key = _read_varint(f)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _read_varint(f)
            payload = field_end = f.tell()
        elif wire_type in (1, 5):
            payload = f.tell()
            field_end = payload + (8 if wire_type == 1 else 4)
        elif wire_type == _LENGTH_DELIMITED:
            length = _read_varint(f)
            payload = f.tell()
            field_end = payload + length
        else:
            raise _Malformed(f"unsupported wire type {wire_type} at byte {position}")
        if number == 0 or field_end > end:
            raise _Malformed(f"field {number} at byte {position} ends at {field_end}, past {end}")
        yield number, wire_type, position, payload, field_end
        position = field_end


def _rewrite(f: BinaryIO, start: int, end: int, special: int,
             handle: Callable[[int, int], bytes | None]) -> bytes:
    """The message in [start, end) with each length-delimited field ``special`` replaced by
    ``handle(payload_start, field_end)``, its new payload (None keeps the field as it is).
    The kept fields between two replaced ones are read with one read."""
    parts: list[bytes] = []
    kept_from = start
    for number, wire_type, field_start, payload, field_end in _fields(f, start, end):
        if number != special or wire_type != _LENGTH_DELIMITED:
            continue
        new = handle(payload, field_end)
        if new is not None:
            parts += [_read_exact(f, kept_from, field_start),
                      _key(number), _encode_varint(len(new)), new]
            kept_from = field_end
    parts.append(_read_exact(f, kept_from, end))
    return b"".join(parts)


def load_stubbed(path: str | os.PathLike, take: Callable[[onnx.TensorProto], onnx.TensorProto],
                 min_bytes: int) -> onnx.ModelProto:
    """The model in the inline ONNX file ``path``, each main-graph initializer of at least
    ``min_bytes`` encoded bytes replaced by ``take(tensor)``. Those are read and parsed one
    at a time; the rest of the file is kept as bytes and parsed at the end, so with a ``take``
    that returns a small stub memory stays near one big tensor plus the small remainder.
    With ``take`` returning its argument the result equals ``onnx.load(path)`` (external data,
    if the file refers to any, is not loaded). Nested subgraphs are not visited. Raises
    OnnxpruneError for a truncated or malformed file."""
    name = os.fspath(path)

    def tensor(payload: int, end: int) -> bytes | None:
        if end - payload < min_bytes:
            return None
        return take(onnx.TensorProto.FromString(_read_exact(f, payload, end))).SerializeToString()

    def graph(payload: int, end: int) -> bytes:
        return _rewrite(f, payload, end, _GRAPH_INITIALIZER, tensor)

    try:
        with open(name, "rb") as f:
            data = _rewrite(f, 0, os.fstat(f.fileno()).st_size, _MODEL_GRAPH, graph)
        return onnx.ModelProto.FromString(data)
    except (_Malformed, DecodeError) as exc:
        message = " ".join(str(exc).split())
        raise OnnxpruneError(f"{name}: not a valid ONNX file (truncated or corrupt: {message})"
                             ) from None


def _unknown_bytes(msg: Message) -> bytes:
    """The fields ``msg`` holds but its schema does not know, as protobuf would write them."""
    out = bytearray()
    for field in unknown_fields.UnknownFieldSet(msg):
        number, wire_type, data = field.field_number, field.wire_type, field.data
        out += _key(number, wire_type)
        if wire_type == 0:
            out += _encode_varint(data)
        elif wire_type in (1, 5):
            out += struct.pack("<Q" if wire_type == 1 else "<I", data)
        elif wire_type == _LENGTH_DELIMITED:
            out += _encode_varint(len(data)) + data
        else:
            raise OnnxpruneError(f"cannot stream a {type(msg).__name__} with unknown groups")
    return bytes(out)


def _units(msg: Message) -> Iterator[tuple[int, Message | bytes]]:
    """``msg``'s serialization in pieces, in field-number order as protobuf writes it: each
    element of a message field as (number, element), every other field and the unknown
    fields as (0, encoded bytes)."""
    for fd, value in sorted(msg.ListFields(), key=lambda pair: pair[0].number):
        if fd.type == fd.TYPE_MESSAGE:
            for element in value if fd.is_repeated else [value]:
                yield fd.number, element
        else:
            alone = type(msg)()
            if fd.is_repeated:
                getattr(alone, fd.name).extend(value)
            else:
                setattr(alone, fd.name, value)
            yield 0, alone.SerializeToString()
    yield 0, _unknown_bytes(msg)


def save_filled(model: onnx.ModelProto, path: str | os.PathLike,
                fill: Callable[[onnx.TensorProto], onnx.TensorProto | None]) -> None:
    """Write ``model`` to ``path`` as one inline protobuf file, each main-graph initializer
    replaced by ``fill(tensor)`` when that is not None (e.g. the tensor with its raw_data
    read back from elsewhere). The graph is length-delimited, so its size is needed before
    it is written: ``fill`` is called TWICE per initializer (once to size it, once to write
    it) and must return the same tensor both times; only one filled tensor is held at a
    time. With ``fill`` always None the file's bytes equal ``model.SerializeToString()``."""

    def payload(number: int, element: Message) -> bytes:
        if number == _GRAPH_INITIALIZER and isinstance(element, onnx.TensorProto):
            filled = fill(element)
            return (element if filled is None else filled).SerializeToString()
        return element.SerializeToString()

    def size(unit: tuple[int, Message | bytes]) -> int:
        number, element = unit
        if isinstance(element, bytes):
            return len(element)
        length = len(payload(number, element))
        return len(_key(number)) + len(_encode_varint(length)) + length

    with open(os.fspath(path), "wb") as f:
        for number, element in _units(model):
            if isinstance(element, bytes):
                f.write(element)
            elif number == _MODEL_GRAPH:    # the graph's pieces, initializers filled
                f.write(_key(number) + _encode_varint(sum(map(size, _units(element)))))
                for inner, part in _units(element):
                    data = part if isinstance(part, bytes) else payload(inner, part)
                    if not isinstance(part, bytes):
                        f.write(_key(inner) + _encode_varint(len(data)))
                    f.write(data)
                    del data
            else:
                data = element.SerializeToString()
                f.write(_key(number) + _encode_varint(len(data)) + data)
