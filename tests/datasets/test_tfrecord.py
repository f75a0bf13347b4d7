"""Tests of the TFRecord reader and writer and of the tf.train.Example parser.

CRCs are checked against a bitwise CRC-32C written here from the polynomial, and Examples against
the protobuf library with a schema declared here, so neither check reuses the code under test.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from datasets.tfrecord import (
    BytesList,
    ExampleError,
    FloatList,
    Int64List,
    TFRecordError,
    count_records,
    encode_example,
    frame_record,
    masked_crc32c,
    parse_example,
    read_records,
    write_tfrecord,
)

descriptor_pb2 = pytest.importorskip("google.protobuf.descriptor_pb2")
from google.protobuf import descriptor_pool, message_factory


def reference_crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), reflected polynomial 0x82F63B78, one bit at a time."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def reference_masked(data: bytes) -> int:
    crc = reference_crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) % 2**32


def example_classes(syntax: str):
    """Build Example message classes with the protobuf library: proto3 packs repeated numbers,
    proto2 writes one field per element."""
    field = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name=f"example_{syntax}.proto", package=f"ref_{syntax}", syntax=syntax
    )
    for name, kind in (
        ("BytesList", field.TYPE_BYTES),
        ("FloatList", field.TYPE_FLOAT),
        ("Int64List", field.TYPE_INT64),
    ):
        message = file.message_type.add(name=name)
        message.field.add(name="value", number=1, type=kind, label=field.LABEL_REPEATED)

    feature = file.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, name in enumerate(("bytes_list", "float_list", "int64_list"), start=1):
        type_name = f".ref_{syntax}." + "".join(part.title() for part in name.split("_"))
        feature.field.add(
            name=name, number=number, type=field.TYPE_MESSAGE, label=field.LABEL_OPTIONAL,
            type_name=type_name, oneof_index=0,
        )  # fmt: skip

    features = file.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    entry.field.add(
        name="value", number=2, type=field.TYPE_MESSAGE, label=field.LABEL_OPTIONAL,
        type_name=f".ref_{syntax}.Feature",
    )  # fmt: skip
    features.field.add(
        name="feature", number=1, type=field.TYPE_MESSAGE, label=field.LABEL_REPEATED,
        type_name=f".ref_{syntax}.Features.FeatureEntry",
    )  # fmt: skip

    example = file.message_type.add(name="Example")
    example.field.add(
        name="features", number=1, type=field.TYPE_MESSAGE, label=field.LABEL_OPTIONAL,
        type_name=f".ref_{syntax}.Features",
    )  # fmt: skip

    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"ref_{syntax}.Example"))


PackedExample = example_classes("proto3")
UnpackedExample = example_classes("proto2")


def reference_example(example_class, rgb, labels, video_id: bytes):
    example = example_class()
    feature = example.features.feature
    feature["id"].bytes_list.value.append(video_id)
    feature["labels"].int64_list.value.extend(labels)
    feature["mean_rgb"].float_list.value.extend(rgb)
    return example


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def field(number: int, wire: int, payload: bytes) -> bytes:
    """One protobuf field: tag, then the length for wire type 2, then the payload."""
    length = varint(len(payload)) if wire == 2 else b""
    return varint(number << 3 | wire) + length + payload


# CRC and framing.


def test_crc32c_known_vectors() -> None:
    # The check value of CRC-32C for "123456789" is 0xE3069283 (RFC 3720, appendix B.4).
    assert reference_crc32c(b"123456789") == 0xE3069283
    for data in (b"", b"123456789", bytes(range(256)) * 3):
        assert masked_crc32c(data) == reference_masked(data)


def test_frame_layout(tmp_path: Path) -> None:
    path = tmp_path / "one.tfrecord"
    write_tfrecord(path, [b"hello"])
    content = path.read_bytes()

    length = struct.pack("<Q", 5)
    expected = (
        length
        + struct.pack("<I", reference_masked(length))
        + b"hello"
        + struct.pack("<I", reference_masked(b"hello"))
    )
    assert content == expected
    assert frame_record(b"hello") == expected


@pytest.mark.parametrize("buffer_size", [12, 100, 1 << 20])
def test_read_records_round_trip(tmp_path: Path, buffer_size: int) -> None:
    records = [b"", b"a", bytes(range(256)) * 40, b"tail"]  # the third exceeds small buffers
    path = tmp_path / "records.tfrecord"
    assert write_tfrecord(path, records) == 4

    assert list(read_records(path, buffer_size=buffer_size)) == records
    assert count_records(path) == 4


def test_empty_file_has_no_records(tmp_path: Path) -> None:
    path = tmp_path / "empty.tfrecord"
    path.write_bytes(b"")

    assert list(read_records(path)) == []
    assert count_records(path) == 0


def record_offsets(records: list[bytes]) -> list[int]:
    offsets, offset = [], 0
    for record in records:
        offsets.append(offset)
        offset += 16 + len(record)
    return offsets


def test_bad_length_crc_names_file_and_offset(tmp_path: Path) -> None:
    records = [b"first", b"second", b"third"]
    path = tmp_path / "bad-length.tfrecord"
    write_tfrecord(path, records)
    offset = record_offsets(records)[1]
    content = bytearray(path.read_bytes())
    content[offset + 8] ^= 0xFF  # the length CRC of the second record
    path.write_bytes(bytes(content))

    with pytest.raises(
        TFRecordError, match=rf"bad-length\.tfrecord.*length CRC.*offset {offset}\b"
    ):
        list(read_records(path))
    with pytest.raises(TFRecordError, match=rf"length CRC.*offset {offset}\b"):
        count_records(path)


def test_bad_data_crc_names_file_and_offset(tmp_path: Path) -> None:
    records = [b"first", b"second", b"third"]
    path = tmp_path / "bad-data.tfrecord"
    write_tfrecord(path, records)
    offset = record_offsets(records)[2]
    content = bytearray(path.read_bytes())
    content[offset + 12] ^= 0x01  # one bit of the third record's data
    path.write_bytes(bytes(content))

    with pytest.raises(TFRecordError, match=rf"bad-data\.tfrecord.*data CRC.*offset {offset}\b"):
        list(read_records(path))
    # Without CRC checks the damaged data comes through, and only the CRC check catches it.
    assert list(read_records(path, verify_crc=False))[2] == b"uhird"
    assert count_records(path) == 3


def test_bad_length_crc_with_huge_length(tmp_path: Path) -> None:
    path = tmp_path / "huge.tfrecord"
    write_tfrecord(path, [b"record"])
    content = bytearray(path.read_bytes())
    content[7] = 0x7F  # the length becomes about 2**62 and no longer matches its CRC
    path.write_bytes(bytes(content))

    with pytest.raises(TFRecordError, match="length CRC.*offset 0"):
        list(read_records(path))
    with pytest.raises(TFRecordError, match="Truncated.*offset 0"):
        list(read_records(path, verify_crc=False))


@pytest.mark.parametrize(
    ("cut", "part"),
    [(5, "length header"), (12 + 3, "record"), (12 + 6 + 2, "record")],
    ids=["in-header", "in-data", "in-data-crc"],
)
def test_truncated_file(tmp_path: Path, cut: int, part: str) -> None:
    path = tmp_path / "cut.tfrecord"
    write_tfrecord(path, [b"first!", b"second"])
    offset = 16 + 6
    path.write_bytes(path.read_bytes()[: offset + cut])

    with pytest.raises(
        TFRecordError, match=rf"Truncated.*cut\.tfrecord.*{part} at byte offset {offset}\b"
    ):
        list(read_records(path))
    with pytest.raises(TFRecordError, match=rf"{part} at byte offset {offset}\b"):
        count_records(path)


def test_records_before_corruption_are_yielded(tmp_path: Path) -> None:
    path = tmp_path / "partial.tfrecord"
    write_tfrecord(path, [b"good", b"lost"])
    path.write_bytes(path.read_bytes()[:-3])
    records = read_records(path)

    assert next(records) == b"good"
    with pytest.raises(TFRecordError):
        next(records)


def test_read_records_rejects_tiny_buffer(tmp_path: Path) -> None:
    path = tmp_path / "x.tfrecord"
    write_tfrecord(path, [b"x"])
    with pytest.raises(ValueError, match="buffer_size must be >= 12"):
        read_records(path, buffer_size=4)


# Example parsing against the protobuf library.


@pytest.mark.parametrize(
    "example_class", [PackedExample, UnpackedExample], ids=["packed", "unpacked"]
)
def test_parse_protobuf_serialised_example(example_class) -> None:
    rgb = np.array([0.5, -1.25, 3.0e-8, 1e30], dtype=np.float32)
    labels = [0, 5, 127, 128, 3861, 16384, 2**40, -1, -(2**63)]
    data = reference_example(example_class, rgb, labels, b"ab12").SerializeToString()

    parsed = parse_example(data)

    assert set(parsed) == {"id", "labels", "mean_rgb"}
    assert parsed["id"] == [b"ab12"]
    np.testing.assert_array_equal(parsed["mean_rgb"], rgb)
    assert parsed["mean_rgb"].dtype == np.float32
    assert parsed["labels"].tolist() == labels
    assert parsed["labels"].dtype == np.int64


@pytest.mark.parametrize("packed", [True, False])
def test_encoded_example_parses_in_protobuf(packed: bool) -> None:
    rgb = np.linspace(-2, 2, 7, dtype=np.float32)
    data = encode_example(
        {"id": "x9", "labels": [1, 300, -7], "mean_rgb": rgb, "empty": FloatList([])},
        packed=packed,
    )
    example = PackedExample.FromString(data)
    feature = example.features.feature

    assert list(feature["id"].bytes_list.value) == [b"x9"]
    assert list(feature["labels"].int64_list.value) == [1, 300, -7]
    np.testing.assert_array_equal(np.array(feature["mean_rgb"].float_list.value, np.float32), rgb)
    assert feature["empty"].WhichOneof("kind") == "float_list"
    assert parse_example(data)["labels"].tolist() == [1, 300, -7]


@pytest.mark.parametrize("packed", [True, False])
def test_raw_floats_are_little_endian_bytes(packed: bool) -> None:
    rgb = np.array([0.5, -1.25, 7.0], dtype=np.float32)
    data = encode_example({"mean_rgb": rgb, "labels": [4]}, packed=packed)

    parsed = parse_example(data, raw_floats=True)

    assert parsed["mean_rgb"] == struct.pack("<3f", 0.5, -1.25, 7.0)
    assert parsed["labels"].tolist() == [4]


def test_parse_selected_features_only() -> None:
    data = encode_example({"a": [1], "b": [2.0], "c": b"x"})
    assert parse_example(data, features={"b", "missing"}) == {"b": pytest.approx(np.array([2.0]))}


def unknown_fields_example(in_map_entries: bool) -> bytes:
    """An Example with fields of every wire type that the schema does not declare."""
    unknown = (
        field(9, 0, varint(300))
        + field(10, 1, b"\x00" * 8)
        + field(11, 2, b"skip me")
        + field(12, 5, b"\x00" * 4)
    )
    entry_unknown = unknown if in_map_entries else b""
    float_list = field(1, 2, np.array([1.5, 2.5], "<f4").tobytes()) + unknown
    int64_list = unknown + field(1, 2, varint(7) + varint(8))
    bytes_list = field(1, 2, b"id") + unknown

    def entry(key: bytes, kind: int, body: bytes) -> bytes:
        return field(
            1, 2, field(1, 2, key) + entry_unknown + field(2, 2, field(kind, 2, body) + unknown)
        )

    features = (
        entry(b"mean_rgb", 2, float_list)
        + unknown
        + entry(b"labels", 3, int64_list)
        + entry(b"id", 1, bytes_list)
    )
    # Field 2 of Example, empty, as every record of the YouTube-8M release carries.
    return field(1, 2, features) + field(2, 2, b"") + unknown


@pytest.mark.parametrize("in_map_entries", [False, True])
def test_unknown_fields_ignored_at_every_level(in_map_entries: bool) -> None:
    parsed = parse_example(unknown_fields_example(in_map_entries))

    assert parsed["mean_rgb"].tolist() == [1.5, 2.5]
    assert parsed["labels"].tolist() == [7, 8]
    assert parsed["id"] == [b"id"]


def test_unknown_fields_example_is_valid_protobuf() -> None:
    # protobuf 7 (upb) keeps a map entry that has unknown fields as an unknown field of
    # Features, so the check against it leaves those out.
    example = PackedExample.FromString(unknown_fields_example(in_map_entries=False))
    assert list(example.features.feature["labels"].int64_list.value) == [7, 8]


def test_map_entry_value_before_key_and_repeated_key() -> None:
    first = field(3, 2, field(1, 2, varint(1)))
    second = field(3, 2, field(1, 2, varint(2)))
    reversed_entry = field(1, 2, field(2, 2, first) + field(1, 2, b"n"))
    repeated = field(1, 2, field(1, 2, b"n") + field(2, 2, second))
    data = field(1, 2, reversed_entry + repeated)

    # The last value of a map key wins, as protobuf parsers merge maps.
    assert parse_example(data)["n"].tolist() == [2]
    assert list(PackedExample.FromString(data).features.feature["n"].int64_list.value) == [2]


def test_features_message_split_in_two() -> None:
    part_one = field(
        1, 2, field(1, 2, field(1, 2, b"a") + field(2, 2, field(3, 2, field(1, 2, b"\x01"))))
    )
    part_two = field(
        1, 2, field(1, 2, field(1, 2, b"b") + field(2, 2, field(3, 2, field(1, 2, b"\x02"))))
    )

    assert {name: value.tolist() for name, value in parse_example(part_one + part_two).items()} == {
        "a": [1],
        "b": [2],
    }


def test_feature_without_kind_is_none() -> None:
    data = field(1, 2, field(1, 2, field(1, 2, b"empty") + field(2, 2, b"")))
    assert parse_example(data) == {"empty": None}


def test_packed_floats_split_over_fields() -> None:
    body = field(1, 2, np.array([1.0], "<f4").tobytes()) + field(
        1, 5, np.array([2.0], "<f4").tobytes()
    )
    data = field(1, 2, field(1, 2, field(1, 2, b"f") + field(2, 2, field(2, 2, body))))

    assert parse_example(data)["f"].tolist() == [1.0, 2.0]


def one_feature(name: bytes, feature: bytes) -> bytes:
    """An Example with one map entry whose Feature message is ``feature``."""
    return field(1, 2, field(1, 2, field(1, 2, name) + field(2, 2, feature)))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x0a\x05\x0a\x03", "past the end"),
        (b"\x0a\x80", "ends inside"),
        (field(1, 0, varint(1)), "Field 1 of Example has wire type 0"),
        (one_feature(b"f", field(2, 0, b"\x01")), "wire type 0"),
        (one_feature(b"f", field(2, 2, field(1, 2, b"abc"))), "not a multiple of 4"),
        (one_feature(b"f", field(3, 2, field(1, 2, b"\x80"))), "ends inside a varint"),
        (varint(7 << 3 | 3), "unsupported wire type 3"),
        (b"\x00", "Field number 0"),
        (field(1, 2, field(1, 2, field(1, 2, b"\xff\xfe"))), "not valid UTF-8"),
    ],
    ids=[
        "length-past-end", "cut-varint", "example-wire-type", "feature-wire-type", "float-bytes",
        "packed-cut-varint", "group", "field-zero", "bad-name",
    ],
)  # fmt: skip
def test_malformed_example_raises(data: bytes, message: str) -> None:
    with pytest.raises(ExampleError, match=message):
        parse_example(data)


# Writing.


def test_write_infers_kinds() -> None:
    data = encode_example(
        {
            "text": "héllo",
            "raw": [b"a", b"b"],
            "ints": np.array([1, 2], dtype=np.int32),
            "flags": np.array([True, False]),
            "floats": [1, 2.5],
            "explicit": Int64List([]),
            "strings": BytesList(["x"]),
        }
    )
    parsed = parse_example(data)

    assert parsed["text"] == ["héllo".encode()]
    assert parsed["raw"] == [b"a", b"b"]
    assert parsed["ints"].tolist() == [1, 2]
    assert parsed["flags"].tolist() == [1, 0]
    assert parsed["floats"].tolist() == [1.0, 2.5]
    assert parsed["explicit"].tolist() == []
    assert parsed["strings"] == [b"x"]


@pytest.mark.parametrize("value", [[], [b"a", 1], {"a": 1}, None])
def test_write_rejects_ambiguous_value(value) -> None:
    with pytest.raises(TypeError, match="Wrap it in BytesList, FloatList or Int64List"):
        encode_example({"feature": value})


def test_int64_list_rejects_floats() -> None:
    with pytest.raises(TypeError, match="Int64List needs integers"):
        encode_example({"feature": Int64List([1.5])})
