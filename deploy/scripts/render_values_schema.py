"""Write deploy/helm/csx/values.schema.json, the schema Helm checks every value against.

    .venv/bin/python deploy/scripts/render_values_schema.py          # rewrite the file
    .venv/bin/python deploy/scripts/render_values_schema.py --check  # exit 1 if it is stale

The settings an operator may set (`config.*`, `services.<name>.settings.*`) come from the services'
settings classes (pydantic model_fields: names, types, enums and bounds), so a setting added to a
service appears here, and one that does not exist is refused. Settings the chart itself manages
(addresses, secrets and files it mounts) are left out, and a few get stricter bounds than the
class has, as chart policy (e.g. stream replicas 1, 3 or 5). tests/deploy fails while the file is
stale.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

TARGET = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "csx" / "values.schema.json"
SERVICES = ["referrals", "panel", "conferences", "actionplans"]

# Settings the chart sets itself: where to listen (the gRPC port, and the health port from the value
# healthPort), the database URL (a Secret), NATS (URL, user, password file), the files it mounts
# (keyring, certificate, token key), and development-only ones.
MANAGED = {
    "failpoints",  # chaos tests only: never a deployment value
    "grpc_address",
    "health_address",
    "database_url",
    "nats_url",
    "nats_user",
    "nats_password_file",
    "keyring_file",
    "tls_ca_file",
    "tls_cert_file",
    "tls_key_file",
    "token_public_key_file",
    "intake_key_file",
    "insecure_dev",
    "trace_file",
}

# Chart policy on top of what the settings classes allow.
POLICY: dict[str, dict[str, Any]] = {
    "max_concurrent_rpcs": {"minimum": 1},
    "max_message_bytes": {"minimum": 1024, "maximum": 67108864},
    "default_deadline_seconds": {"exclusiveMinimum": 0},
    "stream_replicas": {"enum": [1, 3, 5]},
    "stream_max_age_days": {"minimum": 1},
    "relay_poll_seconds": {"exclusiveMinimum": 0, "maximum": 60},
    "conferences_address": {"minLength": 1, "pattern": "^[^\\s:]+:[0-9]+$"},
    "conferences_timeout_seconds": {"exclusiveMinimum": 0},
    "panel_address": {"pattern": "^$|^[^\\s:]+:[0-9]+$"},
}
KEEP = ("type", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "pattern")


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def settings_class(service: str) -> type:
    from csx_common.settings import ServiceSettings

    module = importlib.import_module(f"csx_{service}.settings")
    (cls,) = [
        v
        for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, ServiceSettings) and v is not ServiceSettings
    ]
    return cls


def settings_properties(cls: type, only: set[str] | None = None, prefix: str = "") -> dict[str, Any]:
    """camelCase name -> JSON schema, for the settings of `cls` that an operator may set."""
    prefix = prefix or str(cls.model_config.get("env_prefix", ""))  # type: ignore[attr-defined]
    props: dict[str, Any] = {}
    for name, spec in cls.model_json_schema()["properties"].items():  # type: ignore[attr-defined]
        if name in MANAGED or (only is not None and name not in only):
            continue
        schema = {k: spec[k] for k in KEEP if k in spec}
        schema.update(POLICY.get(name, {}))
        schema["description"] = f"{prefix}{name.upper()}"
        props[camel(name)] = schema
    return props


def common_settings() -> dict[str, Any]:
    from csx_common.settings import ServiceSettings

    return settings_properties(
        settings_class("referrals"), only=set(ServiceSettings.model_fields), prefix="CSX_<SERVICE>_"
    )


def obj(
    props: dict[str, Any], required: list[str] | None = None, additional: bool = False, desc: str | None = None
) -> dict[str, Any]:
    d: dict[str, Any] = {"type": "object"}
    if desc:
        d["description"] = desc
    d["additionalProperties"] = additional
    d["properties"] = props
    if required:
        d["required"] = required
    return d


quantity = {
    "anyOf": [
        {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"},
        {"type": "number", "minimum": 0},
    ]
}
resources = obj(
    {
        "requests": obj(
            {"cpu": {"$ref": "#/definitions/quantity"}, "memory": {"$ref": "#/definitions/quantity"}},
            required=["cpu", "memory"],
        ),
        "limits": obj(
            {"cpu": {"$ref": "#/definitions/quantity"}, "memory": {"$ref": "#/definitions/quantity"}},
            required=["memory"],
        ),
    },
    required=["requests", "limits"],
    desc="Requests and limits are both required: no unbounded pods.",
)
peers = {"type": "array", "items": {"type": "object"}, "description": "NetworkPolicyPeers"}
size_str = {"type": "string", "pattern": "^[0-9]+(K|KB|M|MB|G|GB|T|TB)$"}


# Secret values only one service has: the referrals sealed-intake private key (docs/adr/0007).
SECRET_EXTRA: dict[str, dict[str, Any]] = {
    "referrals": {
        "intakeKey": {
            "type": "string",
            "pattern": "^$|^-----BEGIN PRIVATE KEY-----",
            "description": "X25519 private key (PEM) for sealed intake (intake.enabled)",
        }
    }
}


def service_def(name: str, common: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    return obj(
        {
            "enabled": {"type": "boolean"},
            "replicas": {"type": "integer", "minimum": 1, "description": "Pods (when autoscaling is off)"},
            "settings": obj(
                {**common, **extra}, desc="Per-service settings and overrides of config (camelCase field names)"
            ),
            "existingSecret": {
                "type": "string",
                "description": "Secret with database-url and keyring.json (and optionally migration-database-url)",
            },
            "secretValues": obj(
                {
                    "databaseUrl": {"type": "string", "pattern": "^$|^postgresql\\+(asyncpg|psycopg)://"},
                    "migrationDatabaseUrl": {"type": "string", "pattern": "^$|^postgresql\\+(asyncpg|psycopg)://"},
                    "natsPassword": {
                        "type": "string",
                        "pattern": "^$|^[A-Za-z0-9._~-]{16,}$",
                        "description": "URL-safe, at least 16 characters",
                    },
                    "keyring": {"type": "string"},
                    **SECRET_EXTRA.get(name, {}),
                }
            ),
            "tls": obj({"secretName": {"type": "string"}}),
            "resources": {"$ref": "#/definitions/resources"},
            "autoscaling": obj(
                {
                    "enabled": {"type": "boolean"},
                    "minReplicas": {"type": "integer", "minimum": 1},
                    "maxReplicas": {"type": "integer", "minimum": 1},
                    "targetCPUUtilizationPercentage": {"type": "integer", "minimum": 1, "maximum": 100},
                },
                required=["enabled", "minReplicas", "maxReplicas", "targetCPUUtilizationPercentage"],
            ),
            "podDisruptionBudget": obj(
                {
                    "enabled": {"type": "boolean"},
                    "maxUnavailable": {
                        "anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": "^[0-9]+%$"}]
                    },
                }
            ),
            "networkPolicy": obj(
                {
                    "ingressFrom": {"$ref": "#/definitions/peers"},
                    "extraEgress": {
                        "type": "array",
                        "items": {"type": "object"},
                        "description": "NetworkPolicyEgressRules",
                    },
                }
            ),
            "image": obj(
                {
                    "repository": {
                        "type": "string",
                        "description": "Full repository, overriding <registry>/csx-<service>",
                    },
                    "tag": {"type": "string"},
                    "digest": {"type": "string", "pattern": "^$|^sha256:[0-9a-f]{64}$"},
                }
            ),
            "affinity": {"type": "object"},
        },
        required=[
            "enabled",
            "replicas",
            "settings",
            "resources",
            "autoscaling",
            "podDisruptionBudget",
            "networkPolicy",
        ],
    )


def build() -> dict[str, Any]:
    common = common_settings()
    definitions = {"quantity": quantity, "resources": resources, "peers": peers}
    for s in SERVICES:
        definitions[f"{s}Service"] = service_def(s, common, settings_properties(settings_class(s)))

    # Conditions across keys.
    conditions = []
    # secrets.create: every enabled service needs its secret values.
    then_services = {}
    for s in SERVICES:
        then_services[s] = {
            "if": {"properties": {"enabled": {"const": True}}},
            "then": {
                "properties": {
                    "secretValues": {
                        "required": ["databaseUrl", "keyring"],
                        "properties": {"databaseUrl": {"minLength": 1}, "keyring": {"minLength": 2}},
                    }
                }
            },
        }
    conditions.append(
        {
            "if": {"properties": {"secrets": {"properties": {"create": {"const": True}}}}},
            "then": {"properties": {"services": {"properties": then_services}}},
        }
    )
    conditions.append(
        {
            "if": {
                "properties": {
                    "secrets": {"properties": {"create": {"const": True}}},
                    "nats": {"properties": {"auth": {"properties": {"enabled": {"const": True}}}}},
                }
            },
            "then": {
                "properties": {
                    "services": {
                        "properties": {
                            s: {
                                "if": {"properties": {"enabled": {"const": True}}},
                                "then": {
                                    "properties": {"secretValues": {"properties": {"natsPassword": {"minLength": 16}}}}
                                },
                            }
                            for s in SERVICES
                        }
                    }
                }
            },
        }
    )
    # In-chart NATS: auth required; external NATS: URL required.
    conditions.append(
        {
            "if": {"properties": {"nats": {"properties": {"install": {"const": True}}}}},
            "then": {"properties": {"nats": {"properties": {"auth": {"properties": {"enabled": {"const": True}}}}}}},
            "else": {"properties": {"nats": {"properties": {"external": {"properties": {"url": {"minLength": 1}}}}}}},
        }
    )

    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "CSX Helm chart values",
        "type": "object",
        "additionalProperties": False,
        "definitions": definitions,
        "properties": {
            "global": {"type": "object", "description": "Helm's global values (unused)"},
            "nameOverride": {"type": "string", "maxLength": 40},
            "fullnameOverride": {"type": "string", "maxLength": 40, "pattern": "^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
            "clusterDomain": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
            "commonLabels": {"type": "object", "additionalProperties": {"type": "string"}},
            "healthPort": {
                "type": "integer",
                "minimum": 1024,
                "maximum": 65535,
                "not": {"const": 50051},
                "description": "Plaintext health-only gRPC port (CSX_<SERVICE>_HEALTH_ADDRESS), for kubelet probes",
            },
            "image": obj(
                {
                    "registry": {"type": "string", "pattern": "^$|^[^\\s:/]+(:[0-9]+)?(/[a-z0-9._-]+)*$"},
                    "tag": {"type": "string", "pattern": "^$|^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"},
                    "pullPolicy": {"type": "string", "enum": ["Always", "IfNotPresent", "Never"]},
                },
                required=["registry", "tag", "pullPolicy"],
            ),
            "imagePullSecrets": {
                "type": "array",
                "items": obj({"name": {"type": "string", "minLength": 1}}, required=["name"]),
            },
            "config": obj(common, desc="Settings every service receives as CSX_<SERVICE>_<NAME>"),
            "telemetry": obj(
                {
                    "otlpEndpoint": {"type": "string", "pattern": "^$|^https?://"},
                    "sampler": {
                        "type": "string",
                        "enum": [
                            "always_on",
                            "always_off",
                            "traceidratio",
                            "parentbased_always_on",
                            "parentbased_always_off",
                            "parentbased_traceidratio",
                        ],
                    },
                    "samplerArg": {"type": "string", "pattern": "^$|^(0(\\.[0-9]+)?|1(\\.0+)?)$"},
                    "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                }
            ),
            "identity": obj(
                {
                    "tokenPublicKey": {"type": "string", "pattern": "^$|^-----BEGIN PUBLIC KEY-----"},
                    "existingConfigMap": {"type": "string"},
                    "key": {"type": "string", "minLength": 1},
                }
            ),
            "trustBundle": obj(
                {
                    "secretName": {"type": "string"},
                    "configMapName": {"type": "string"},
                    "key": {"type": "string", "minLength": 1},
                }
            ),
            "intake": obj(
                {"enabled": {"type": "boolean"}},
                required=["enabled"],
                desc="Sealed intake over NATS: referrals reads intake-key.pem from its Secret",
            ),
            "secrets": obj({"create": {"type": "boolean"}}, required=["create"]),
            "serviceAccount": obj(
                {
                    "create": {"type": "boolean"},
                    "name": {"type": "string"},
                    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                }
            ),
            "workloadAnnotations": {"type": "object", "additionalProperties": {"type": "string"}},
            "podAnnotations": {"type": "object", "additionalProperties": {"type": "string"}},
            "podLabels": {"type": "object", "additionalProperties": {"type": "string"}},
            "nodeSelector": {"type": "object", "additionalProperties": {"type": "string"}},
            "tolerations": {"type": "array", "items": {"type": "object"}},
            "topologySpread": {"type": "boolean"},
            "networkPolicy": obj(
                {
                    "enabled": {"type": "boolean"},
                    "dns": {"$ref": "#/definitions/peers"},
                    "database": obj(
                        {
                            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                            "to": {"$ref": "#/definitions/peers"},
                        }
                    ),
                    "telemetry": obj({"to": {"$ref": "#/definitions/peers"}}),
                    # Who may reach healthPort (empty: nobody; the kubelet probes from the pod's node).
                    "healthFrom": {"$ref": "#/definitions/peers"},
                }
            ),
            "migrations": obj(
                {
                    "enabled": {"type": "boolean"},
                    "secretKey": {"type": "string", "enum": ["database-url", "migration-database-url"]},
                    "backoffLimit": {"type": "integer", "minimum": 0, "maximum": 10},
                    "activeDeadlineSeconds": {"type": "integer", "minimum": 30},
                    "resources": {"$ref": "#/definitions/resources"},
                }
            ),
            "services": obj({s: {"$ref": f"#/definitions/{s}Service"} for s in SERVICES}, required=SERVICES),
            "nats": obj(
                {
                    "install": {"type": "boolean"},
                    "external": obj(
                        {
                            "url": {
                                "type": "string",
                                "pattern": "^$|^(nats|tls)://[^@/\\s]+$",
                                "description": "No credentials: each service has its own user and password file",
                            },
                            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                            "to": {"$ref": "#/definitions/peers"},
                        }
                    ),
                    "auth": obj(
                        {
                            "enabled": {"type": "boolean"},
                            "existingSecret": {"type": "string"},
                            "operatorPassword": {"type": "string", "pattern": "^$|^[A-Za-z0-9._~-]{16,}$"},
                        }
                    ),
                    "image": obj(
                        {
                            "repository": {"type": "string", "minLength": 1},
                            "tag": {"type": "string", "minLength": 1},
                            "pullPolicy": {"type": "string", "enum": ["Always", "IfNotPresent", "Never"]},
                        }
                    ),
                    "replicas": {
                        "type": "integer",
                        "enum": [3, 5],
                        "description": "A JetStream cluster: 3 or 5 servers",
                    },
                    "jetstream": obj(
                        {
                            "maxFileStore": size_str,
                            "maxMemoryStore": size_str,
                            "storage": obj(
                                {
                                    "size": {"type": "string", "pattern": "^[0-9]+(Mi|Gi|Ti)$"},
                                    "storageClassName": {"type": "string"},
                                }
                            ),
                        }
                    ),
                    "maxPayload": size_str,
                    "tls": obj({"enabled": {"type": "boolean"}, "secretName": {"type": "string"}}),
                    "resources": {"$ref": "#/definitions/resources"},
                    "podDisruptionBudget": obj(
                        {"enabled": {"type": "boolean"}, "maxUnavailable": {"type": "integer", "minimum": 1}}
                    ),
                    "networkPolicy": obj(
                        {
                            "clientsFrom": {"$ref": "#/definitions/peers"},
                            "monitoringFrom": {"$ref": "#/definitions/peers"},
                        }
                    ),
                    "affinity": {"type": "object"},
                }
            ),
            "tests": obj({"enabled": {"type": "boolean"}}),
        },
        "required": ["image", "config", "healthPort", "secrets", "services", "nats", "networkPolicy", "migrations"],
        "allOf": conditions,
    }

    return schema


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is not up to date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
