"""The sensitivity registry: every field's data class, read once from the proto options.

docs/security.md: sensitivity is declared once, in the protos, and this registry is the only place
that reads it. It drives encryption at rest (which fields are sealed), redaction in logs and
spans, and later the disclosure policy.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import cast

from google.protobuf import message as pb_message
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor

import csx
from csx.options.v1 import options_pb2

DataClass = options_pb2.DataClass


@dataclass(frozen=True, slots=True)
class FieldClass:
    full_name: str
    data_class: DataClass.ValueType
    encrypt: bool
    blind_index: bool

    @property
    def personal(self) -> bool:
        return self.data_class not in (DataClass.DATA_CLASS_OPERATIONAL,)


def _load_all_csx_modules() -> list[FileDescriptor]:
    files = []
    for info in pkgutil.walk_packages(csx.__path__, prefix="csx."):
        # csx.options describes the annotation itself; it carries no data.
        if info.name.endswith("_pb2") and not info.name.startswith("csx.options."):
            files.append(importlib.import_module(info.name).DESCRIPTOR)
    return files


def descriptor_of(msg: pb_message.Message) -> Descriptor:
    """`msg`'s descriptor. The stubs type Message.DESCRIPTOR as a union with google._upb's
    Descriptor, which google.protobuf.descriptor.Descriptor is at runtime (C descriptors)."""
    return cast(Descriptor, msg.DESCRIPTOR)


def _walk(descriptor: Descriptor) -> Iterator[Descriptor]:
    yield descriptor
    for nested in descriptor.nested_types:
        if not nested.GetOptions().map_entry:
            yield from _walk(nested)


class SensitivityRegistry:
    def __init__(self, files: list[FileDescriptor]) -> None:
        self._fields: dict[str, FieldClass | None] = {}
        self.messages: list[Descriptor] = []
        for file in files:
            for top in file.message_types_by_name.values():
                for desc in _walk(top):
                    self.messages.append(desc)
                    for field in desc.fields:
                        self._fields[field.full_name] = self._classify(field)

    @staticmethod
    def _classify(field: FieldDescriptor) -> FieldClass | None:
        options = field.GetOptions()
        if not options.HasExtension(options_pb2.sensitivity):
            return None
        s = options.Extensions[options_pb2.sensitivity]
        if s.data_class == DataClass.DATA_CLASS_UNSPECIFIED:
            return None
        return FieldClass(field.full_name, s.data_class, s.encrypt, s.blind_index)

    def unclassified(self) -> list[str]:
        return sorted(name for name, fc in self._fields.items() if fc is None)

    def field(self, field: FieldDescriptor) -> FieldClass:
        fc = self._fields.get(field.full_name)
        if fc is None:
            raise KeyError(f"field {field.full_name} has no data class")
        return fc

    def sealed_paths(self, descriptor: Descriptor, prefix: str = "") -> list[str]:
        """Paths of the scalar fields under `descriptor` that are encrypted at rest."""
        return [path for path, fc in self.leaf_fields(descriptor, prefix) if fc.encrypt]

    def leaf_fields(self, descriptor: Descriptor, prefix: str = "") -> Iterator[tuple[str, FieldClass]]:
        for field in descriptor.fields:
            path = f"{prefix}{field.name}"
            if (
                field.type == FieldDescriptor.TYPE_MESSAGE
                and field.message_type is not None
                and field.message_type.file.package.startswith("csx.")
            ):
                yield from self.leaf_fields(field.message_type, path + ".")
            else:
                yield path, self.field(field)

    def redacted(self, msg: pb_message.Message) -> dict[str, object]:
        """A loggable view of a message: operational fields as they are, every other field's value
        replaced by its data class name. Repeated message fields show their count."""
        out: dict[str, object] = {}
        for field, value in msg.ListFields():
            fc = self.field(field)
            if (
                field.type == FieldDescriptor.TYPE_MESSAGE
                and field.message_type is not None
                and field.message_type.file.package.startswith("csx.")
            ):
                if field.is_repeated:
                    out[field.name] = [self.redacted(v) for v in value]
                else:
                    out[field.name] = self.redacted(value)
            elif fc.personal:
                out[field.name] = f"<{DataClass.Name(fc.data_class).removeprefix('DATA_CLASS_').lower()}>"
            elif field.is_repeated:
                out[field.name] = list(value)
            else:
                out[field.name] = value
        return out

    def personal_field_names(self) -> frozenset[str]:
        """Short names of every field that holds personal data anywhere (for log key redaction)."""
        return frozenset(name.rsplit(".", 1)[1] for name, fc in self._fields.items() if fc is not None and fc.personal)


@cache
def registry() -> SensitivityRegistry:
    return SensitivityRegistry(_load_all_csx_modules())
