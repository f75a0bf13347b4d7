"""Read and write TFRecord files of ``tf.train.Example`` protos without TensorFlow.

TFRecord framing, per record, all integers little endian::

    uint64 length
    uint32 masked CRC-32C of the 8 length bytes
    bytes  data[length]
    uint32 masked CRC-32C of data

with ``masked(crc) = ((crc >> 15) | (crc << 17)) + 0xA282EAD8`` modulo 2**32.

The Example parser reads the protobuf wire format of the messages below and skips every other
field, at any level, so files written by newer producers with extra fields still parse::

    Example   { Features features = 1; }
    Features  { map<string, Feature> feature = 1; }
    Feature   { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
                             Int64List int64_list = 3; } }
    BytesList { repeated bytes value = 1; }
    FloatList { repeated float value = 1 [packed = true]; }
    Int64List { repeated int64 value = 1 [packed = true]; }

Repeated numbers are accepted packed and unpacked, as protobuf parsers must. As in protobuf, a
map key given twice keeps its last value, and so does a ``oneof`` set twice. Unknown fields
inside a map entry are skipped and the entry is kept, whereas protobuf 7's upb parser keeps such
an entry whole as an unknown field; TensorFlow never writes them.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np

HEADER_SIZE = 12  # uint64 length + uint32 length CRC
FOOTER_SIZE = 4  # uint32 data CRC
# Bytes read from the file at a time. Memory per open file stays below this plus one record.
# Chunks of 64 to 512 KiB read the YouTube-8M shards equally fast, and 1 MiB chunks took twice
# as long per record, likely because glibc maps buffers that large as fresh pages.
DEFAULT_BUFFER_SIZE = 1 << 18
CRC_MASK_DELTA = 0xA282EAD8

# Protobuf wire types.
VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5

_UINT64 = struct.Struct("<Q")
_UINT32 = struct.Struct("<I")
_HEADER = struct.Struct("<QI")


class TFRecordError(ValueError):
    """A TFRecord file with a corrupt or truncated record."""


class ExampleError(ValueError):
    """A record whose bytes are not a valid ``tf.train.Example``."""


# A parsed feature: list of bytes, float32 array (or its bytes), int64 array, or None for a
# Feature whose `kind` is unset.
FeatureValue = list | np.ndarray | bytes | None


def masked_crc32c(data: bytes) -> int:
    """Return the CRC-32C of ``data`` masked as TFRecord stores it."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + CRC_MASK_DELTA) & 0xFFFFFFFF


# Reading records.


def read_records(
    path: str | os.PathLike[str],
    verify_crc: bool = True,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
) -> Iterator[bytes]:
    """Yield the data of each record in ``path``, reading ``buffer_size`` bytes at a time.

    One ``read`` call per ``buffer_size`` bytes, instead of two calls per record, keeps the
    per-record cost to slicing. Memory stays below ``buffer_size`` plus the largest record,
    whatever the file size.

    Raises:
        TFRecordError: If a record is truncated or, with ``verify_crc``, a CRC does not match.
            The message names the file and the byte offset where the record starts.
    """
    if buffer_size < HEADER_SIZE:
        raise ValueError(f"buffer_size must be >= {HEADER_SIZE} bytes, got {buffer_size!r}.")
    return _iter_records(Path(path), verify_crc, verify_crc, buffer_size)


def count_records(path: str | os.PathLike[str], verify_crc: bool = True) -> int:
    """Count the records of ``path`` from their framing.

    The length CRCs are checked with ``verify_crc`` but the data CRCs are not: use
    :func:`read_records` for a full check.

    Raises:
        TFRecordError: If a length header is corrupt or a record extends past the end of the
            file.
    """
    return sum(1 for _ in _iter_records(Path(path), verify_crc, False, DEFAULT_BUFFER_SIZE))


def _iter_records(
    path: Path, check_length_crc: bool, check_data_crc: bool, buffer_size: int
) -> Iterator[bytes]:
    with open(path, "rb", buffering=0) as file:
        # A corrupt length can claim exabytes: it is checked against the file size before any
        # read, also when CRCs are not verified.
        file_size = os.fstat(file.fileno()).st_size
        buffer = b""
        start = 0  # index in `buffer` of the next record
        buffer_offset = 0  # file offset of buffer[0]
        while True:
            if len(buffer) - start < HEADER_SIZE:
                buffer_offset += start
                buffer, start = _refill(file, buffer[start:], HEADER_SIZE, buffer_size), 0
                if not buffer:
                    return
                if len(buffer) < HEADER_SIZE:
                    raise _truncated(path, buffer_offset, "length header", len(buffer))

            length, length_crc = _HEADER.unpack_from(buffer, start)
            if check_length_crc and masked_crc32c(buffer[start : start + 8]) != length_crc:
                raise _crc_error(path, buffer_offset + start, "length")

            record_end = start + HEADER_SIZE + length + FOOTER_SIZE
            if record_end > len(buffer):
                buffer_offset += start
                needed = record_end - start
                if buffer_offset + needed > file_size:
                    raise _truncated(
                        path, buffer_offset, "record", file_size - buffer_offset, needed
                    )
                buffer, start = _refill(file, buffer[start:], needed, buffer_size), 0
                record_end = needed
                if len(buffer) < needed:
                    raise _truncated(path, buffer_offset, "record", len(buffer), needed)

            data = buffer[start + HEADER_SIZE : record_end - FOOTER_SIZE]
            if check_data_crc:
                (data_crc,) = _UINT32.unpack_from(buffer, record_end - FOOTER_SIZE)
                if masked_crc32c(data) != data_crc:
                    raise _crc_error(path, buffer_offset + start, "data")
            start = record_end
            yield data


def _refill(file, remainder: bytes, needed: int, buffer_size: int) -> bytes:
    """Return ``remainder`` extended by reads until it has ``needed`` bytes or the file ends."""
    parts = [remainder]
    size = len(remainder)
    while size < needed:
        chunk = file.read(max(buffer_size, needed - size))
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


def _truncated(path: Path, offset: int, part: str, found: int, expected: int = HEADER_SIZE):
    return TFRecordError(
        f"Truncated TFRecord file {str(path)!r}: the {part} at byte offset {offset} needs "
        f"{expected} bytes but only {found} remain. The file was cut short, for example by an "
        f"interrupted download: fetch it again."
    )


def _crc_error(path: Path, offset: int, part: str) -> TFRecordError:
    return TFRecordError(
        f"Corrupt TFRecord file {str(path)!r}: the {part} CRC of the record at byte offset "
        f"{offset} does not match. The file is damaged: fetch it again, or compare it with its "
        f"published checksum."
    )


# Parsing tf.train.Example.


def parse_example(
    data: bytes, features: Collection[str] | None = None, raw_floats: bool = False
) -> dict[str, FeatureValue]:
    """Decode a serialised ``tf.train.Example``.

    Args:
        data: The record's bytes.
        features: Names of the features to decode; the others are skipped without decoding.
            None decodes all of them.
        raw_floats: Whether to return each FloatList as the ``bytes`` of its little-endian
            float32 values. A caller that copies the values into a larger array anyway saves
            creating one array per feature.

    Returns:
        One value per decoded feature: ``list[bytes]`` for a BytesList, a read-only float32
        array (or ``bytes`` with ``raw_floats``) for a FloatList, an int64 array for an
        Int64List, and None for a Feature with no kind set.

    Raises:
        ExampleError: If the bytes are not a valid protobuf message of this schema.

    Example:
        >>> record = encode_example({"labels": [3, 7], "mean_audio": np.zeros(2, np.float32)})
        >>> parse_example(record, features={"labels"})
        {'labels': array([3, 7])}
    """
    result: dict[str, FeatureValue] = {}
    parsers = _RAW_FLOAT_PARSERS if raw_floats else _LIST_PARSERS
    pos, end = 0, len(data)
    try:
        while pos < end:
            field, wire, pos = _read_tag(data, pos)
            if field == 1 and wire == LENGTH_DELIMITED:
                length, pos = _read_varint(data, pos)
                stop = _field_end(data, pos, length)
                _parse_features(data, pos, stop, features, parsers, result)
                pos = stop
            else:
                pos = _skip_unknown(data, pos, wire, field, "Example", (1,))
    except IndexError:
        # The fast paths below index without bounds checks and rely on this handler.
        raise ExampleError("The message ends inside a field.") from None
    return result


# The hot loops below first try the layout every serialiser writes: one-byte tags, each field
# once, in field order. They fall back to a general walk over the fields when it does not match.
# The fast path keeps parsing to a few Python calls per feature.


def _parse_features(
    data: bytes,
    pos: int,
    end: int,
    selected: Collection[str] | None,
    parsers: dict[int, Callable[[bytes, int, int], FeatureValue]],
    result: dict[str, FeatureValue],
) -> None:
    """Decode the map entries of one Features message into ``result``."""
    while pos < end:
        if data[pos] == 0x0A:  # field 1, length-delimited: a map entry
            length, pos = _read_varint(data, pos + 1)
        else:
            field, wire, pos = _read_tag(data, pos)
            if field != 1 or wire != LENGTH_DELIMITED:
                pos = _skip_unknown(data, pos, wire, field, "Features", (1,))
                continue
            length, pos = _read_varint(data, pos)
        entry_end = _field_end(data, pos, length)

        key, value_start, value_end = _split_map_entry(data, pos, entry_end)
        pos = entry_end
        name = _decode_name(key)
        if selected is None or name in selected:
            no_value = value_start < 0
            result[name] = (
                None if no_value else _parse_feature(data, value_start, value_end, parsers)
            )


def _split_map_entry(data: bytes, pos: int, end: int) -> tuple[bytes, int, int]:
    """Return the key of a map entry and the span of its value, (-1, -1) when it has none."""
    if end - pos >= 3 and data[pos] == 0x0A and data[pos + 1] < 0x80:
        key_end = pos + 2 + data[pos + 1]
        if key_end < end and data[key_end] == 0x12:
            length, value_start = _read_varint(data, key_end + 1)
            if value_start + length == end:
                return data[pos + 2 : key_end], value_start, end

    # The entry is {1: key, 2: value}, in any order and possibly repeated: the last one wins.
    key, value_start, value_end = b"", -1, -1
    while pos < end:
        field, wire, pos = _read_tag(data, pos)
        if field in (1, 2) and wire == LENGTH_DELIMITED:
            length, pos = _read_varint(data, pos)
            stop = _field_end(data, pos, length)
            if field == 1:
                key = data[pos:stop]
            else:
                value_start, value_end = pos, stop
            pos = stop
        else:
            pos = _skip_unknown(data, pos, wire, field, "a feature map entry", (1, 2))
    if pos != end:
        raise ExampleError("A feature map entry extends past its declared length.")
    return key, value_start, value_end


def _decode_name(key: bytes) -> str:
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ExampleError(f"Feature name {key!r} is not valid UTF-8.") from error


def _parse_feature(
    data: bytes, pos: int, end: int, parsers: dict[int, Callable[[bytes, int, int], FeatureValue]]
) -> FeatureValue:
    """Decode one Feature message: the last kind set wins, as for any protobuf ``oneof``."""
    if pos < end and data[pos] in parsers:
        length, start = _read_varint(data, pos + 1)
        if start + length == end:
            return parsers[data[pos]](data, start, end)

    value: FeatureValue = None
    while pos < end:
        field, wire, pos = _read_tag(data, pos)
        if field in (1, 2, 3) and wire == LENGTH_DELIMITED:
            length, pos = _read_varint(data, pos)
            stop = _field_end(data, pos, length)
            value = parsers[field << 3 | LENGTH_DELIMITED](data, pos, stop)
            pos = stop
        else:
            pos = _skip_unknown(data, pos, wire, field, "Feature", (1, 2, 3))
    return value


def _parse_bytes_list(data: bytes, pos: int, end: int) -> list[bytes]:
    values = []
    while pos < end:
        field, wire, pos = _read_tag(data, pos)
        if field == 1 and wire == LENGTH_DELIMITED:
            length, pos = _read_varint(data, pos)
            stop = _field_end(data, pos, length)
            values.append(data[pos:stop])
            pos = stop
        else:
            pos = _skip_unknown(data, pos, wire, field, "BytesList", (1,))
    return values


def _parse_float_bytes(data: bytes, pos: int, end: int) -> bytes:
    """Return the values of a FloatList as the bytes of little-endian float32 numbers."""
    if end - pos >= 2 and data[pos] == 0x0A:  # one packed field, as TensorFlow writes it
        length, start = _read_varint(data, pos + 1)
        if start + length == end and length % 4 == 0:
            return data[start:end]

    pieces = []
    while pos < end:
        field, wire, pos = _read_tag(data, pos)
        if field == 1 and wire == LENGTH_DELIMITED:  # packed
            length, pos = _read_varint(data, pos)
            stop = _field_end(data, pos, length)
            if length % 4:
                raise ExampleError(f"A packed float list has {length} bytes, not a multiple of 4.")
            pieces.append(data[pos:stop])
            pos = stop
        elif field == 1 and wire == FIXED32:  # one unpacked element
            stop = _field_end(data, pos, 4)
            pieces.append(data[pos:stop])
            pos = stop
        else:
            pos = _skip_unknown(data, pos, wire, field, "FloatList", (1,))
    return b"".join(pieces)


def _parse_float_list(data: bytes, pos: int, end: int) -> np.ndarray:
    return np.frombuffer(_parse_float_bytes(data, pos, end), dtype="<f4").astype(
        np.float32, copy=False
    )


def _parse_int64_list(data: bytes, pos: int, end: int) -> np.ndarray:
    values: list[int] = []
    if end - pos >= 2 and data[pos] == 0x0A:  # one packed field, as TensorFlow writes it
        length, start = _read_varint(data, pos + 1)
        if start + length == end:
            _read_packed_varints(data, start, end, values)
            return _int64_array(values)

    while pos < end:
        field, wire, pos = _read_tag(data, pos)
        if field == 1 and wire == LENGTH_DELIMITED:  # packed
            length, pos = _read_varint(data, pos)
            stop = _field_end(data, pos, length)
            pos = _read_packed_varints(data, pos, stop, values)
        elif field == 1 and wire == VARINT:  # one unpacked element
            value, pos = _read_varint(data, pos)
            values.append(value)
        else:
            pos = _skip_unknown(data, pos, wire, field, "Int64List", (1,))
    return _int64_array(values)


def _int64_array(values: list[int]) -> np.ndarray:
    # Varints hold int64 as two's complement in 64 bits, so negative numbers arrive >= 2**63.
    if values and max(values) >= 1 << 63:
        values = [v - (1 << 64) if v >= 1 << 63 else v for v in values]
    return np.array(values, dtype=np.int64)


def _read_packed_varints(data: bytes, pos: int, end: int, values: list[int]) -> int:
    """Append the varints in ``data[pos:end]`` to ``values`` and return ``end``."""
    while pos < end:
        byte = data[pos]
        if byte < 0x80:  # inline paths for one- and two-byte varints: class indices up to 16383
            values.append(byte)
            pos += 1
            continue
        second = data[pos + 1] if pos + 1 < end else 0x80
        if second < 0x80:
            values.append(byte & 0x7F | second << 7)
            pos += 2
            continue
        value, pos = _read_varint(data, pos)
        values.append(value)
    if pos != end:
        raise ExampleError("A packed int64 list ends inside a varint.")
    return pos


# Parser of each Feature kind, by its one-byte tag (field number << 3 | LENGTH_DELIMITED).
_LIST_PARSERS = {0x0A: _parse_bytes_list, 0x12: _parse_float_list, 0x1A: _parse_int64_list}
_RAW_FLOAT_PARSERS = {**_LIST_PARSERS, 0x12: _parse_float_bytes}


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """Return the varint at ``pos`` and the position after it."""
    try:
        byte = data[pos]
        if byte < 0x80:  # one-byte varints are the common case: tags, short lengths, labels
            return byte, pos + 1
        value = byte & 0x7F
        shift = 7
        pos += 1
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
            if shift >= 70:
                raise ExampleError("A varint is longer than 10 bytes.")
    except IndexError:
        raise ExampleError("The message ends inside a varint.") from None
    return value & 0xFFFFFFFFFFFFFFFF, pos


def _read_tag(data: bytes, pos: int) -> tuple[int, int, int]:
    tag, pos = _read_varint(data, pos)
    if tag >> 3 == 0:
        raise ExampleError("Field number 0 is invalid in a protobuf message.")
    return tag >> 3, tag & 7, pos


def _field_end(data: bytes, pos: int, length: int) -> int:
    end = pos + length
    if end > len(data):
        raise ExampleError(
            f"A field of {length} bytes at offset {pos} extends past the end of the message "
            f"({len(data)} bytes)."
        )
    return end


def _skip_field(data: bytes, pos: int, wire: int, field: int) -> int:
    """Return the position after a field that the schema does not use."""
    if wire == VARINT:
        return _read_varint(data, pos)[1]
    if wire == FIXED64:
        return _field_end(data, pos, 8)
    if wire == LENGTH_DELIMITED:
        length, pos = _read_varint(data, pos)
        return _field_end(data, pos, length)
    if wire == FIXED32:
        return _field_end(data, pos, 4)
    # Wire types 3 and 4 are the deprecated groups, which tf.train.Example never uses.
    raise ExampleError(f"Field {field} has unsupported wire type {wire}.")


def _skip_unknown(
    data: bytes, pos: int, wire: int, field: int, message: str, known: tuple[int, ...]
) -> int:
    """Skip a field the schema does not use, or raise if it is a known field of the wrong type.

    The callers handle each known field with its valid wire types, so a known field number that
    reaches this function carries a wire type that does not match its declared type.
    """
    if field in known:
        raise ExampleError(
            f"Field {field} of {message} has wire type {wire}, which does not match its type."
        )
    return _skip_field(data, pos, wire, field)


# Writing.


@dataclass(frozen=True)
class BytesList:
    """Feature values to encode as a BytesList; strings are encoded as UTF-8."""

    values: Sequence[bytes | str]


@dataclass(frozen=True)
class FloatList:
    """Feature values to encode as a FloatList of float32."""

    values: Sequence[float] | np.ndarray


@dataclass(frozen=True)
class Int64List:
    """Feature values to encode as an Int64List."""

    values: Sequence[int] | np.ndarray


FeatureInput = BytesList | FloatList | Int64List | bytes | str | Sequence | np.ndarray


def encode_example(features: Mapping[str, FeatureInput], packed: bool = True) -> bytes:
    """Serialise a ``tf.train.Example`` with the given features.

    Plain values get their kind from their type: ``bytes``, ``str`` and sequences of them become
    a BytesList, integer and boolean arrays or sequences of ``int`` an Int64List, and float
    arrays or sequences with any ``float`` a FloatList. Wrap a value in :class:`BytesList`,
    :class:`FloatList` or :class:`Int64List` to set the kind explicitly, as an empty list needs.

    Args:
        features: Feature values by name.
        packed: Whether repeated numbers are written packed (as TensorFlow writes them) or one
            field per element, which parsers must also accept.
    """
    entries = []
    for name, value in features.items():
        feature = _encode_feature(name, _as_feature(name, value), packed)
        entry = _length_delimited(1, name.encode("utf-8")) + _length_delimited(2, feature)
        entries.append(_length_delimited(1, entry))
    return _length_delimited(1, b"".join(entries))


def write_tfrecord(
    path: str | os.PathLike[str],
    examples: Iterable[Mapping[str, FeatureInput] | bytes],
    packed: bool = True,
) -> int:
    """Write ``examples`` to a TFRecord file and return the number of records.

    Each example is a mapping encoded by :func:`encode_example`, or ``bytes`` written as they
    are, for records serialised elsewhere.
    """
    count = 0
    with open(path, "wb") as file:
        for example in examples:
            data = example if isinstance(example, bytes) else encode_example(example, packed)
            file.write(frame_record(data))
            count += 1
    return count


def frame_record(data: bytes) -> bytes:
    """Return ``data`` framed as one TFRecord record: header, data and data CRC."""
    length = _UINT64.pack(len(data))
    return length + _UINT32.pack(masked_crc32c(length)) + data + _UINT32.pack(masked_crc32c(data))


def _as_feature(name: str, value: FeatureInput) -> BytesList | FloatList | Int64List:
    """Wrap a plain value in the feature list its type implies."""
    if isinstance(value, (BytesList, FloatList, Int64List)):
        return value
    if isinstance(value, (bytes, str)):
        return BytesList([value])
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "f":
            return FloatList(value)
        if value.dtype.kind in "iub":
            return Int64List(value)
        if value.dtype.kind in "SO":
            return BytesList(list(value))
    elif isinstance(value, Sequence) and value:
        if all(isinstance(item, (bytes, str)) for item in value):
            return BytesList(value)
        if all(isinstance(item, (int, np.integer)) for item in value):
            return Int64List(value)
        if all(isinstance(item, (int, float, np.integer, np.floating)) for item in value):
            return FloatList(value)
    raise TypeError(
        f"Feature {name!r} has a value of type {type(value).__name__} whose kind cannot be "
        f"inferred: {value!r}. Wrap it in BytesList, FloatList or Int64List."
    )


def _encode_feature(name: str, feature: BytesList | FloatList | Int64List, packed: bool) -> bytes:
    if isinstance(feature, BytesList):
        items = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in feature.values]
        return _length_delimited(1, b"".join(_length_delimited(1, item) for item in items))

    if isinstance(feature, FloatList):
        values = np.asarray(feature.values, dtype="<f4").ravel()
        if packed:
            body = _length_delimited(1, values.tobytes())
        else:
            tag = _varint(1 << 3 | FIXED32)
            body = b"".join(tag + value.tobytes() for value in values)
        return _length_delimited(2, body)

    values = np.asarray(feature.values).ravel()
    if values.size and values.dtype.kind not in "iub":
        raise TypeError(f"Feature {name!r}: Int64List needs integers, got dtype {values.dtype}.")
    varints = [_varint(int(v) & 0xFFFFFFFFFFFFFFFF) for v in values.tolist()]
    if packed:
        body = _length_delimited(1, b"".join(varints))
    else:
        tag = _varint(1 << 3 | VARINT)
        body = b"".join(tag + varint for varint in varints)
    return _length_delimited(3, body)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | LENGTH_DELIMITED) + _varint(len(payload)) + payload
