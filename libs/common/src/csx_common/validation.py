"""Request validation from the rules declared in the protos (protovalidate)."""

from __future__ import annotations

import protovalidate
from google.protobuf import message as pb_message

from csx_common.errors import FieldViolation, InvalidArgument

_validator = protovalidate.Validator()


def _path(msg: pb_message.Message, violation: protovalidate.Violation) -> str:
    parts: list[str] = []
    descriptor = msg.DESCRIPTOR
    elements = violation.proto.field.elements if violation.proto.field is not None else []
    for element in elements:
        part = element.field_name
        if element.subscript is not None:
            part += f"[{element.subscript.value}]"
        parts.append(part)
        field = descriptor.fields_by_name.get(element.field_name)
        if field is not None and field.message_type is not None:
            descriptor = field.message_type
    # Message-level rules carry no field; our rule ids start with the field they are about.
    head = violation.proto.rule_id.split(".")[0]
    if head in descriptor.fields_by_name and (not parts or parts[-1].split("[")[0] != head):
        parts.append(head)
    return ".".join(parts)


def violations(msg: pb_message.Message) -> list[FieldViolation]:
    return [FieldViolation(_path(msg, v), v.proto.message) for v in _validator.collect_violations(msg)]


def validate(msg: pb_message.Message) -> None:
    found = violations(msg)
    if found:
        raise InvalidArgument(found)
