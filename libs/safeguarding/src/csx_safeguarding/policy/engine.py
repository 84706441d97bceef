"""The disclosure policy decision point: default deny, forbid beats permit, every decision names
its rule (docs/security.md; docs/adr/0004-disclosure-policy.md).

The policy is data (`policy.yaml` beside this module, reviewed like code). Loading validates it
strictly and compiles each rule's conditions into tuples of (fact index, test, value); a decision
computes a small tuple of facts for the field and walks the forbids, then the permits.

Commands are decided here too (`permits_command`): the `commands` section names each command a
service runs and which agencies, roles and purposes may run it; a command it does not name is a
programming error (UnknownCommandError), never a silent allow.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import yaml

from csx_safeguarding.policy.model import (
    AGENCY_BY_NAME,
    DATA_CLASS_BY_NAME,
    DATA_CLASS_NAME,
    HANDLING_NONE,
    ConsentStatus,
    Decision,
    DisclosureContext,
    FieldSpec,
    FieldSubject,
    HandlingCode,
    Involvement,
    LawfulBasis,
    PolicyRequest,
    Purpose,
    Role,
    SharingDecision,
)

DEFAULT_POLICY = "policy.yaml"
DEFAULT_DENY = "default-deny"
DEFAULT_DENY_REASON = "No rule permits this disclosure (default deny)."

_RULE_ID = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_OBLIGATION = re.compile(r"^[a-z0-9]+(_[a-z0-9]+)*$")


class PolicyError(ValueError):
    """The policy file is invalid. The message names the file and the rule."""


class UnknownCommandError(LookupError):
    """A service asked about a command the policy does not name: a programming error (the command
    is refused; add it to the `commands` section, reviewed like the rest of the policy)."""


# ------------------------------------------------------------------------------------------ facts
# A field's facts, as a tuple in this order (the compiled conditions index into it).
(
    _AGENCY,
    _ROLE,
    _PURPOSE,
    _DATA_CLASS,
    _SUBJECT,
    _CONSENT,
    _INVOLVED,
    _REFERRING,
    _BASES,
    _NOT_TO_SHARE,
    _HANDLING,
    _HANDLING_PERMITS,
    _BREAK_GLASS,
) = range(13)

_IN, _IS, _ANY_OF = 0, 1, 2  # fact in set / fact == bool / set fact intersects set


@dataclass(frozen=True, slots=True)
class _Key:
    index: int
    kind: int
    vocabulary: Mapping[str, Any] | None  # None: a boolean condition


_HANDLING_VOCAB = {code: code for code in (*(c.value for c in HandlingCode), HANDLING_NONE)}

_CONDITIONS: dict[str, _Key] = {
    "agencies": _Key(_AGENCY, _IN, AGENCY_BY_NAME),
    "roles": _Key(_ROLE, _IN, {r.value: r.value for r in Role}),
    "purposes": _Key(_PURPOSE, _IN, {p.value: p.value for p in Purpose}),
    "data_classes": _Key(_DATA_CLASS, _IN, DATA_CLASS_BY_NAME),
    "field_subjects": _Key(_SUBJECT, _IN, {s.value: s.value for s in FieldSubject}),
    "consent": _Key(_CONSENT, _IN, {c.value: c.value for c in ConsentStatus}),
    "involved": _Key(_INVOLVED, _IS, None),
    "referring_agency": _Key(_REFERRING, _IS, None),
    "sharing_basis": _Key(_BASES, _ANY_OF, {b.value: b.value for b in LawfulBasis}),
    "decision_not_to_share": _Key(_NOT_TO_SHARE, _IS, None),
    "handling_codes": _Key(_HANDLING, _IN, _HANDLING_VOCAB),
    "handling_permits_agency": _Key(_HANDLING_PERMITS, _IS, None),
    "break_glass": _Key(_BREAK_GLASS, _IS, None),
}

Check = tuple[int, int, Any]
Conditions = tuple[Check, ...]


def _matches(checks: Conditions, facts: tuple[Any, ...]) -> bool:
    for index, kind, value in checks:
        fact = facts[index]
        if kind == _IN:
            if fact not in value:
                return False
        elif kind == _IS:
            if fact != value:
                return False
        elif value.isdisjoint(fact):
            return False
    return True


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    effect: str  # "permit" | "forbid"
    description: str
    when: Conditions
    unless: tuple[Conditions, ...]

    def applies(self, facts: tuple[Any, ...]) -> bool:
        if not _matches(self.when, facts):
            return False
        return not any(_matches(u, facts) for u in self.unless)


@dataclass(frozen=True, slots=True)
class Obligation:
    id: str
    obligation: str
    description: str
    when: Conditions
    unless: tuple[Conditions, ...]

    def applies(self, facts: tuple[Any, ...]) -> bool:
        return _matches(self.when, facts) and not any(_matches(u, facts) for u in self.unless)


# ---------------------------------------------------------------------------------- validation


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (a reviewed file must mean what it says)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise PolicyError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1}")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _names(where: str, key: str, raw: Any, vocabulary: Mapping[str, Any]) -> list[Any]:
    if not isinstance(raw, list) or not raw:
        raise PolicyError(f"{where}: {key!r} must be a non-empty list")
    out = []
    for item in raw:
        if not isinstance(item, str) or item not in vocabulary:
            raise PolicyError(f"{where}: {key!r} has unknown value {item!r}; expected one of {sorted(vocabulary)}")
        out.append(vocabulary[item])
    if len(set(out)) != len(out):
        raise PolicyError(f"{where}: {key!r} lists a value twice")
    return out


def _compile_conditions(where: str, raw: Any) -> Conditions:
    if not isinstance(raw, dict) or not raw:
        raise PolicyError(f"{where}: conditions must be a non-empty mapping")
    checks: list[Check] = []
    for key, value in raw.items():
        spec = _CONDITIONS.get(key)
        if spec is None:
            raise PolicyError(f"{where}: unknown condition {key!r}; expected one of {sorted(_CONDITIONS)}")
        if spec.vocabulary is None:
            if not isinstance(value, bool):
                raise PolicyError(f"{where}: {key!r} must be true or false, not {value!r}")
            checks.append((spec.index, spec.kind, value))
        else:
            checks.append((spec.index, spec.kind, frozenset(_names(where, key, value, spec.vocabulary))))
    return tuple(checks)


def _compile_unless(where: str, raw: Any) -> tuple[Conditions, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise PolicyError(f"{where}: 'unless' must be a non-empty list of condition mappings")
    return tuple(_compile_conditions(f"{where} unless[{i}]", entry) for i, entry in enumerate(raw))


def _check_keys(where: str, raw: Mapping[str, Any], required: set[str], optional: set[str]) -> None:
    unknown = set(raw) - required - optional
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {sorted(unknown)}; allowed {sorted(required | optional)}")
    missing = required - set(raw)
    if missing:
        raise PolicyError(f"{where}: missing key(s) {sorted(missing)}")


def _description(where: str, raw: Any) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise PolicyError(f"{where}: 'description' must be non-empty text (say why, cite the source)")
    return " ".join(raw.split())


def _compile_rule(source: str, index: int, raw: Any) -> Rule:
    if not isinstance(raw, dict):
        raise PolicyError(f"{source}: rules[{index}] must be a mapping")
    rule_id = raw.get("id")
    if not isinstance(rule_id, str) or not _RULE_ID.match(rule_id):
        raise PolicyError(f"{source}: rules[{index}]: 'id' must be kebab-case text, got {rule_id!r}")
    where = f"{source}: rule {rule_id!r}"
    if rule_id == DEFAULT_DENY:
        raise PolicyError(f"{where}: {DEFAULT_DENY!r} is reserved for the built-in default")
    _check_keys(where, raw, {"id", "effect", "description", "when"}, {"unless"})
    effect = raw["effect"]
    if effect not in ("permit", "forbid"):
        raise PolicyError(f"{where}: 'effect' must be permit or forbid, not {effect!r}")
    return Rule(
        id=rule_id,
        effect=effect,
        description=_description(where, raw["description"]),
        when=_compile_conditions(where, raw["when"]),
        unless=_compile_unless(where, raw.get("unless")),
    )


def _compile_obligation(source: str, index: int, raw: Any) -> Obligation:
    if not isinstance(raw, dict):
        raise PolicyError(f"{source}: obligations[{index}] must be a mapping")
    ob_id = raw.get("id")
    if not isinstance(ob_id, str) or not _RULE_ID.match(ob_id):
        raise PolicyError(f"{source}: obligations[{index}]: 'id' must be kebab-case text, got {ob_id!r}")
    where = f"{source}: obligation {ob_id!r}"
    _check_keys(where, raw, {"id", "obligation", "description", "when"}, {"unless"})
    name = raw["obligation"]
    if not isinstance(name, str) or not _OBLIGATION.match(name):
        raise PolicyError(f"{where}: 'obligation' must be snake_case text, got {name!r}")
    return Obligation(
        id=ob_id,
        obligation=name,
        description=_description(where, raw["description"]),
        when=_compile_conditions(where, raw["when"]),
        unless=_compile_unless(where, raw.get("unless")),
    )


_ROLES = frozenset(r.value for r in Role)
_PURPOSES = frozenset(p.value for p in Purpose)


def _role_agencies(source: str, raw: Any) -> dict[str, list[int]]:
    where = f"{source}: roles"
    if not isinstance(raw, dict) or not raw:
        raise PolicyError(f"{where} must be a non-empty mapping of role -> agencies")
    unknown = sorted(set(raw) - _ROLES)
    if unknown:
        raise PolicyError(f"{where}: unknown role(s) {unknown}; expected some of {sorted(_ROLES)}")
    missing = sorted(_ROLES - set(raw))
    if missing:
        raise PolicyError(f"{where}: role(s) {missing} are not placed in any agency")
    return {role: _names(f"{where}: {role}", "agencies", agencies, AGENCY_BY_NAME) for role, agencies in raw.items()}


def _involvement(source: str, raw: Any) -> list[Involvement]:
    where = f"{source}: involvement"
    known = {i.value: i for i in Involvement}
    if not isinstance(raw, dict) or not raw:
        raise PolicyError(f"{where} must be a non-empty mapping of basis -> description")
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise PolicyError(f"{where}: unknown basis {unknown}; expected some of {sorted(known)}")
    for basis, text in raw.items():
        _description(f"{where}: {basis}", text)
    return [known[basis] for basis in raw]


# ------------------------------------------------------------------------------------ commands
# Who may run a command is a statement about the caller only: their agency, role and purpose.
_COMMAND_CONDITIONS = ("agencies", "roles", "purposes")
_COMMAND_NAME = _OBLIGATION  # snake_case, as the use case is named


class CommandCaller(Protocol):
    """What a command decision reads of the caller (csx_common.identity.Principal has it)."""

    @property
    def agency(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def purpose(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Command:
    """One entry of the `commands` section: the caller may run it when any `permit` entry matches
    (every condition of the entry); `system`: a call with no originating user may run it."""

    name: str
    description: str
    system: bool
    permit: tuple[Conditions, ...]

    @property
    def rule(self) -> str:
        return "command-" + self.name.replace("_", "-")

    def permits(self, facts: tuple[Any, Any, Any] | None) -> bool:
        if facts is None:
            return self.system
        return any(_matches(entry, facts) for entry in self.permit)


def _compile_command(source: str, name: Any, raw: Any) -> Command:
    if not isinstance(name, str) or not _COMMAND_NAME.match(name):
        raise PolicyError(f"{source}: commands: a command's name must be snake_case text, got {name!r}")
    where = f"{source}: command {name!r}"
    if not isinstance(raw, dict):
        raise PolicyError(f"{where} must be a mapping")
    _check_keys(where, raw, {"description", "permit"}, {"system"})
    system = raw.get("system", False)
    if not isinstance(system, bool):
        raise PolicyError(f"{where}: 'system' must be true or false, not {system!r}")
    permit = raw["permit"]
    if not isinstance(permit, list) or not permit:
        raise PolicyError(f"{where}: 'permit' must be a non-empty list of condition mappings")
    entries = []
    for i, entry in enumerate(permit):
        at = f"{where} permit[{i}]"
        if isinstance(entry, dict):
            unknown = sorted(set(entry) - set(_COMMAND_CONDITIONS))
            if unknown:
                raise PolicyError(
                    f"{at}: unknown condition(s) {unknown}; a command is decided on {list(_COMMAND_CONDITIONS)}"
                )
        entries.append(_compile_conditions(at, entry))
    return Command(name, _description(where, raw["description"]), system, tuple(entries))


def _commands(source: str, raw: Any) -> list[Command]:
    if not isinstance(raw, dict) or not raw:
        raise PolicyError(f"{source}: commands must be a non-empty mapping of command -> who may run it")
    return [_compile_command(source, name, entry) for name, entry in raw.items()]


# -------------------------------------------------------------------------------------- engine


@dataclass(frozen=True, slots=True)
class _ContextFacts:
    """The per-read part of the facts, computed once per context (not per field)."""

    head: tuple[Any, Any, Any]  # agency, role, purpose
    tail: tuple[Any, Any, Any, Any]  # involved, referring, handling code, handling permits
    break_glass: bool
    consent: Any
    shares: tuple[Any, ...]  # active decisions to share
    refusals: tuple[Any, ...]  # active decisions not to share


class PolicyEngine:
    """Decides one field class (`decide`) or a whole record (`decide_fields`)."""

    def __init__(
        self,
        rules: Iterable[Rule],
        obligations: Iterable[Obligation] = (),
        *,
        c_default_agencies: Iterable[int] = (),
        c_always_agencies: Iterable[int] = (),
        referrer_path_segments: Iterable[str] = (),
        role_agencies: Mapping[str, Iterable[int]] | None = None,
        involvement: Iterable[Involvement] | None = None,
        commands: Iterable[Command] = (),
        source: str = "<policy>",
    ) -> None:
        rules, obligations = list(rules), list(obligations)
        ids = [r.id for r in rules] + [o.id for o in obligations]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise PolicyError(f"{source}: duplicate rule id(s) {dupes}")
        self.source = source
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.forbids: tuple[Rule, ...] = tuple(r for r in rules if r.effect == "forbid")
        self.permits: tuple[Rule, ...] = tuple(r for r in rules if r.effect == "permit")
        self.obligations: tuple[Obligation, ...] = tuple(obligations)
        self.c_default_agencies = frozenset(c_default_agencies)
        self.c_always_agencies = frozenset(c_always_agencies)
        self.referrer_path_segments = frozenset(referrer_path_segments)
        # The recorded decisions that give an agency a basis for a child (None: a policy built in a
        # test without the section, where every basis the caller reports counts).
        self.involvement_bases = frozenset(Involvement) if involvement is None else frozenset(involvement)
        # None: no `roles` section (a policy built in a test), every role in every agency.
        self.role_agencies = (
            None if role_agencies is None else {role: frozenset(a) for role, a in role_agencies.items()}
        )
        self._default_deny = Decision(False, DEFAULT_DENY, DEFAULT_DENY_REASON)
        # Who may run each command (no `commands` section: no command may be asked about).
        self.commands: dict[str, Command] = {c.name: c for c in commands}

    # ---------------------------------------------------------------------------- loading
    @classmethod
    def from_mapping(cls, raw: Any, source: str = "<policy>") -> PolicyEngine:
        if not isinstance(raw, dict):
            raise PolicyError(f"{source}: the policy must be a mapping")
        _check_keys(
            source,
            raw,
            {"version", "rules"},
            {"intelligence_handling", "referrer_path_segments", "obligations", "roles", "involvement", "commands"},
        )
        if raw["version"] != 1:
            raise PolicyError(f"{source}: unsupported version {raw['version']!r} (expected 1)")
        if not isinstance(raw["rules"], list) or not raw["rules"]:
            raise PolicyError(f"{source}: 'rules' must be a non-empty list")
        rules = [_compile_rule(source, i, r) for i, r in enumerate(raw["rules"])]
        obligations_raw = raw.get("obligations") or []
        if not isinstance(obligations_raw, list):
            raise PolicyError(f"{source}: 'obligations' must be a list")
        obligations = [_compile_obligation(source, i, o) for i, o in enumerate(obligations_raw)]

        handling = raw.get("intelligence_handling") or {}
        where = f"{source}: intelligence_handling"
        if not isinstance(handling, dict):
            raise PolicyError(f"{where} must be a mapping")
        _check_keys(where, handling, set(), {"c_default_agencies", "c_always_agencies"})
        c_default = (
            _names(where, "c_default_agencies", handling["c_default_agencies"], AGENCY_BY_NAME)
            if "c_default_agencies" in handling
            else []
        )
        c_always = (
            _names(where, "c_always_agencies", handling["c_always_agencies"], AGENCY_BY_NAME)
            if "c_always_agencies" in handling
            else []
        )
        segments = raw.get("referrer_path_segments") or []
        if not isinstance(segments, list) or not all(isinstance(s, str) and s for s in segments):
            raise PolicyError(f"{source}: 'referrer_path_segments' must be a list of names")
        return cls(
            rules,
            obligations,
            c_default_agencies=c_default,
            c_always_agencies=c_always,
            referrer_path_segments=segments,
            role_agencies=_role_agencies(source, raw["roles"]) if "roles" in raw else None,
            involvement=_involvement(source, raw["involvement"]) if "involvement" in raw else None,
            commands=_commands(source, raw["commands"]) if "commands" in raw else (),
            source=source,
        )

    def admits(self, agency: str, role: str, purpose: str) -> bool:
        """May a user of `agency` hold `role` (and read for `purpose`)? Names as in a user token."""
        if agency not in AGENCY_BY_NAME or role not in _ROLES or purpose not in _PURPOSES:
            return False
        return self.role_agencies is None or AGENCY_BY_NAME[agency] in self.role_agencies.get(role, ())

    def _command(self, command: str) -> Command:
        entry = self.commands.get(command)
        if entry is None:
            raise UnknownCommandError(
                f"{self.source}: no command {command!r} in the policy's `commands` section; every command a "
                f"service runs is named there (known: {sorted(self.commands)})"
            )
        return entry

    def require_commands(self, commands: Iterable[str]) -> None:
        """Fail at start-up, not at the first call, when a service runs a command the policy does not
        name (UnknownCommandError)."""
        for command in commands:
            self._command(command)

    def permits_command(self, command: str, agency: str | None, role: str | None, purpose: str | None) -> Decision:
        """May this caller run `command`? Names as in a user token; `agency` None: no originating
        user (a service's own work, or INSECURE_DEV), decided by the command's `system`. The
        decision names the command's rule (`command-<name>`) and its reason. A command the policy
        does not name raises UnknownCommandError (a programming error: nothing runs)."""
        entry = self._command(command)
        facts = None if agency is None else (AGENCY_BY_NAME.get(agency), role, purpose)
        return Decision(entry.permits(facts), entry.rule, entry.description)

    def permits_caller(self, command: str, caller: CommandCaller | None) -> Decision:
        """`permits_command` for a call's originating user (None: no user)."""
        if caller is None:
            return self.permits_command(command, None, None, None)
        return self.permits_command(command, caller.agency, caller.role, caller.purpose)

    @classmethod
    def from_text(cls, text: str, source: str = "<policy>") -> PolicyEngine:
        try:
            raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
        except PolicyError as exc:
            raise PolicyError(f"{source}: {exc}") from None
        except yaml.YAMLError as exc:
            raise PolicyError(f"{source}: not valid YAML: {exc}") from None
        return cls.from_mapping(raw, source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> PolicyEngine:
        path = Path(path)
        return cls.from_text(path.read_text(encoding="utf-8"), source=str(path))

    @classmethod
    def default(cls) -> PolicyEngine:
        """The partnership's reviewed policy, shipped with the package."""
        text = resources.files("csx_safeguarding.policy").joinpath(DEFAULT_POLICY).read_text(encoding="utf-8")
        return cls.from_text(text, source=DEFAULT_POLICY)

    # ---------------------------------------------------------------------------- deciding
    def _context_facts(self, context: DisclosureContext, now: datetime) -> _ContextFacts:
        r = context.requester
        agency = r.agency
        handling = context.handling
        if handling is None:
            code, permits = HANDLING_NONE, False
        elif handling.code is HandlingCode.C:
            allowed = handling.agencies or self.c_default_agencies
            code, permits = HandlingCode.C.value, agency in allowed or agency in self.c_always_agencies
        else:
            code, permits = handling.code.value, True
        bg = context.break_glass
        shares: list[SharingDecision] = []
        refusals: list[SharingDecision] = []
        for d in context.sharing_decisions:
            if d.active(now) and (d.agencies is None or agency in d.agencies):
                (shares if d.share else refusals).append(d)
        # Prefer Sch.1 para 18 when several decisions to share apply (it is what lifts a refusal).
        shares.sort(key=lambda d: d.lawful_basis is not LawfulBasis.SCH1_PARA18)
        bases = self.involvement_bases
        involved = bool(context.involvement & bases) or (Involvement.SHARING_DECISION in bases and bool(shares))
        return _ContextFacts(
            head=(agency, r.role.value, r.purpose.value),
            tail=(involved, bool(context.referring_agency), code, permits),
            break_glass=bg is not None and bg.active_for(r.user_id, now),
            consent=context.consent,
            shares=tuple(shares),
            refusals=tuple(refusals),
        )

    def _decide(self, cf: _ContextFacts, data_class: int, subject: str) -> Decision:
        agency = cf.head[0]
        shares = [d for d in cf.shares if d.data_classes is None or data_class in d.data_classes]
        refusal = next((d for d in cf.refusals if d.data_classes is None or data_class in d.data_classes), None)
        involved, referring, code, permits = cf.tail
        facts = (
            *cf.head,
            data_class,
            subject,
            cf.consent.effective(agency, data_class).value,
            involved,
            referring,
            frozenset(d.lawful_basis.value for d in shares),
            refusal is not None,
            code,
            permits,
            cf.break_glass,
        )
        for rule in self.forbids:
            if rule.applies(facts):
                return Decision(
                    False,
                    rule.id,
                    rule.description,
                    sharing_decision_id=refusal.decision_id if refusal is not None else None,
                )
        for rule in self.permits:
            if rule.applies(facts):
                obligations = tuple(o.obligation for o in self.obligations if o.applies(facts))
                basis = shares[0] if shares else None
                return Decision(
                    True,
                    rule.id,
                    rule.description,
                    obligations,
                    lawful_basis=basis.lawful_basis.value if basis is not None else None,
                    sharing_decision_id=basis.decision_id if basis is not None else None,
                )
        return self._default_deny

    @staticmethod
    def _now(context: DisclosureContext) -> datetime:
        return context.at if context.at is not None else datetime.now(UTC)

    def decide(self, request: PolicyRequest) -> Decision:
        ctx = request.context
        cf = self._context_facts(ctx, self._now(ctx))
        return self._decide(cf, request.data_class, request.field_subject.value)

    def visible(self, context: DisclosureContext) -> Decision:
        """May the caller know this record exists at all? (Its operational data, about the child.)
        A deny here answers NOT_FOUND."""
        return self.decide(PolicyRequest(context, DATA_CLASS_BY_NAME["operational"]))

    def subject_of(self, path: str) -> FieldSubject:
        """Whose data a field path holds: referrer if any segment (indices stripped) is a referrer
        segment, e.g. `referrer.name` or `concerns[2].referrer.email`."""
        if self.referrer_path_segments:
            for segment in path.split("."):
                if segment.split("[", 1)[0] in self.referrer_path_segments:
                    return FieldSubject.REFERRER
        return FieldSubject.CHILD

    def decide_fields(self, context: DisclosureContext, fields: Mapping[str, int | FieldSpec]) -> dict[str, Decision]:
        """One decision per field path. `fields` maps path → data class (the subject then follows
        from the path, see `subject_of`) or → FieldSpec. The context is evaluated once and each
        (data class, subject) once."""
        cf = self._context_facts(context, self._now(context))
        cache: dict[tuple[int, str], Decision] = {}
        out: dict[str, Decision] = {}
        for path, spec in fields.items():
            if isinstance(spec, FieldSpec):
                key = (spec.data_class, FieldSubject(spec.subject).value)
            else:
                key = (spec, self.subject_of(path).value)
            decision = cache.get(key)
            if decision is None:
                if key[0] not in DATA_CLASS_NAME:
                    raise ValueError(f"field {path!r}: unknown or unspecified data class {key[0]!r}")
                decision = cache[key] = self._decide(cf, key[0], key[1])
            out[path] = decision
        return out
