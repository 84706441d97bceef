"""Errors a use case raises, and how each becomes a gRPC status with google.rpc details.

Messages are for developers and never carry personal data: they name fields and rules, not
values. `reason` strings are stable for agency integrators to branch on (ErrorInfo).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

DOMAIN = "csx.safeguarding"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class CsxError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason:
            self.reason = reason

    def details(self) -> list[Message]:
        return [error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN)]


class InvalidArgument(CsxError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation], message: str = "request is invalid") -> None:
        super().__init__(message)
        self.violations = violations

    def details(self) -> list[Message]:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in self.violations
            ]
        )
        return [bad, *super().details()]


class NotFound(CsxError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class FailedPrecondition(CsxError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"

    def __init__(self, message: str, *, subject: str = "", type_: str = "STATE", reason: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.subject = subject
        self.type_ = type_

    def details(self) -> list[Message]:
        pf = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type=self.type_, subject=self.subject, description=self.message
                )
            ]
        )
        return [pf, *super().details()]


class AlreadyExists(CsxError):
    """What the request would create exists already, with other content (e.g. an agency reference
    already used for a different concern)."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class PermissionDenied(CsxError):
    """The caller is identified but may not do this (e.g. record consent from outside social care)."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class Aborted(CsxError):
    """A stale version (optimistic concurrency) or a conflicting concurrent write."""

    code = grpc.StatusCode.ABORTED
    reason = "STALE_VERSION"


class DataLoss(CsxError):
    code = grpc.StatusCode.DATA_LOSS
    reason = "CIPHERTEXT_INVALID"


class Unavailable(CsxError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "DEPENDENCY_UNAVAILABLE"


def to_status(error: CsxError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    """(code, message, trailing metadata carrying grpc-status-details-bin)."""
    status = status_pb2.Status(code=getattr(code_pb2, error.code.name), message=error.message)
    for detail in error.details():
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    return error.code, error.message, (("grpc-status-details-bin", status.SerializeToString()),)


def status_details(rpc_error: grpc.RpcError) -> status_pb2.Status | None:
    """Client side: the google.rpc.Status of a failed call, if it carried one."""
    for key, value in rpc_error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    return None


def field_violations(rpc_error: grpc.RpcError) -> list[tuple[str, str]]:
    status = status_details(rpc_error)
    out: list[tuple[str, str]] = []
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.extend((v.field, v.description) for v in bad.field_violations)
    return out


def error_reason(rpc_error: grpc.RpcError) -> str | None:
    """Client side: the stable `reason` of a failed call's ErrorInfo (what integrators branch on)."""
    status = status_details(rpc_error)
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason: str = info.reason
            return reason
    return None
