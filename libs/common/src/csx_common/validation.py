"""Request validation from the rules declared in the protos (protovalidate), and the checks a
consumer makes of an event before acting on it.

Hostile input must come back as INVALID_ARGUMENT, never as a crash: a rule whose expression cannot
be evaluated on a value (a date that does not exist, such as 2010-02-29, given to `timestamp()`) is a
violation of that rule, and a timestamp outside the range the protobuf runtime can convert is a
violation too (protovalidate does not check it; the handler's `ToDatetime` would raise).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from functools import cache

import protovalidate
from google.protobuf import message as pb_message
from google.protobuf import timestamp_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from csx_common.errors import FieldViolation, InvalidArgument
from csx_common.sensitivity import DataClass, descriptor_of, registry

_validator = protovalidate.Validator()

# google.protobuf.Timestamp's documented range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799
_RULE_ID = re.compile(r"error evaluating ([A-Za-z0-9_.]+)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


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


def _field_path(descriptor: Descriptor, name: str, prefix: str = "", depth: int = 0) -> str | None:
    """Where a field called `name` is in a message type (its own fields first, then nested CSX
    messages in order), e.g. child.date_of_birth."""
    if name in descriptor.fields_by_name:
        return prefix + name
    if depth > 4:
        return None
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.full_name.startswith("csx."):
            found = _field_path(field.message_type, name, f"{prefix}{field.name}.", depth + 1)
            if found is not None:
                return found
    return None


def _unevaluable(msg: pb_message.Message, error: protovalidate.EvaluationError) -> FieldViolation:
    """A rule that could not be evaluated on the value given. The error's text names the rule id
    (ours start with the field they are about) and never goes back to the caller."""
    match = _RULE_ID.search(str(error))
    path = ""
    if match:
        path = _field_path(descriptor_of(msg), match.group(1).split(".")[0]) or ""
    return FieldViolation(path, "is not a value this field's rule can check (e.g. a date that does not exist)")


def _messages(msg: pb_message.Message, prefix: str = "") -> Iterator[tuple[str, pb_message.Message]]:
    """Every message set inside `msg` (itself included), with its path."""
    yield prefix, msg
    for field, value in msg.ListFields():
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        path = f"{prefix}{field.name}"
        if field.is_repeated:
            for i, item in enumerate(value):
                yield from _messages(item, f"{path}[{i}].")
        else:
            yield from _messages(value, f"{path}.")


def _timestamp_violations(msg: pb_message.Message) -> list[FieldViolation]:
    found = []
    for path, inner in _messages(msg):
        if isinstance(inner, timestamp_pb2.Timestamp) and not (
            _MIN_SECONDS <= inner.seconds <= _MAX_SECONDS and 0 <= inner.nanos <= 999_999_999
        ):
            found.append(FieldViolation(path.rstrip("."), "must be a valid timestamp (years 0001 to 9999)"))
    return found


# Text rules, by the field's declared data class (one place for every contract).
# Names, identifiers and contact details: one line of printable text. No control characters, no
# format characters (bidi overrides such as U+202E make a name read differently from what is
# stored; zero-width ones make two names look alike), no private-use or unassigned characters, and
# not blank. Accepted values are NFC-normalised, so one name typed two ways is stored one way.
_SHORT_CLASSES = frozenset({DataClass.DATA_CLASS_IDENTITY, DataClass.DATA_CLASS_CONTACT})
_REFUSED_IN_SHORT = frozenset({"Cc", "Cf", "Co", "Cs", "Cn"})
# Free text (narratives, reasons, minutes) keeps line breaks and tabs, but no other control
# character and no bidi embedding, override or isolate (the "Trojan Source" characters).
_FREE_TEXT_CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_FREE_TEXT_MESSAGE = "must not contain control characters (other than line breaks and tabs) or bidi controls"
_SHORT_MESSAGE = "must not contain control, format (bidi or zero-width), private-use or unassigned characters"


@cache
def _is_short(field: FieldDescriptor) -> bool:
    return registry().field(field).data_class in _SHORT_CLASSES


def _refused_in_short(value: str) -> bool:
    # isprintable() is False for every refused category (and for separators other than the space),
    # so most values need no character-by-character look-up.
    return not value.isprintable() and any(unicodedata.category(c) in _REFUSED_IN_SHORT for c in value)


def _strings(msg: pb_message.Message) -> Iterator[tuple[str, pb_message.Message, FieldDescriptor]]:
    """Every set string field inside `msg` (csx messages only), with its path."""
    for path, inner in _messages(msg):
        if not inner.DESCRIPTOR.full_name.startswith("csx."):
            continue
        for field, _ in inner.ListFields():
            if field.type == FieldDescriptor.TYPE_STRING:
                yield path + field.name, inner, field


def normalise_text(msg: pb_message.Message) -> None:
    """NFC-normalise, in place, every name, identifier and contact detail in `msg`."""
    for _, holder, field in _strings(msg):
        if not _is_short(field):
            continue
        if field.is_repeated:
            values = getattr(holder, field.name)
            if not all(unicodedata.is_normalized("NFC", v) for v in values):
                values[:] = [unicodedata.normalize("NFC", v) for v in values]
        else:
            value = getattr(holder, field.name)
            if not unicodedata.is_normalized("NFC", value):
                setattr(holder, field.name, unicodedata.normalize("NFC", value))


def _text_violations(msg: pb_message.Message) -> list[FieldViolation]:
    found = []
    for path, holder, field in _strings(msg):
        values = list(getattr(holder, field.name)) if field.is_repeated else [getattr(holder, field.name)]
        if _is_short(field):
            if any(_refused_in_short(v) for v in values):
                found.append(FieldViolation(path, _SHORT_MESSAGE))
            elif any(v and not v.strip() for v in values):
                found.append(FieldViolation(path, "must not be blank"))
        elif any(_FREE_TEXT_CONTROLS.search(v) for v in values):
            found.append(FieldViolation(path, _FREE_TEXT_MESSAGE))
    return found


def violations(msg: pb_message.Message) -> list[FieldViolation]:
    found = _timestamp_violations(msg) + _text_violations(msg)
    try:
        found += [FieldViolation(_path(msg, v), v.proto.message) for v in _validator.collect_violations(msg)]
    except protovalidate.EvaluationError as error:
        found.append(_unevaluable(msg, error))
    return found


def validate(msg: pb_message.Message) -> None:
    found = violations(msg)
    if found:
        raise InvalidArgument(found)


def event_violations(event: pb_message.Message) -> list[FieldViolation]:
    """What is wrong with an event a consumer is about to act on. Its rules are its contract's
    (`(buf.validate)` on the event message and the types inside it: ids that are UUIDs, required
    fields set, enums defined and no unspecified value in a list of them, strings and lists bounded,
    and cross-field CEL rules such as a sharing decision's lawful basis), plus what holds for every
    event: timestamps in range, and no control character in any string (events carry ids, codes
    and dates only)."""
    found = violations(event)
    for path, holder, field in _strings(event):
        values = list(getattr(holder, field.name)) if field.is_repeated else [getattr(holder, field.name)]
        if any(_CONTROL.search(v) for v in values):
            found.append(FieldViolation(path, "must not contain control characters"))
    return found


def check_event(event: pb_message.Message) -> None:
    """Raise InvalidArgument for an event that breaks its contract: the inbox consumer parks it in
    dead_letters at once (it can never be applied), leaving no effect and no event behind, before
    anything else is done with it. The violations name fields and rules, never a value. It is
    every Route's `check` unless a route says otherwise."""
    found = event_violations(event)
    if found:
        raise InvalidArgument(found, "event is malformed")
