"""The Helm chart deploy/helm/csx, rendered offline under a matrix of values (helm-python-sdk) and
every manifest validated against the Kubernetes schemas (kubernetes-validate, strict); then the
properties operators rely on: hardened pods, native gRPC probes of the health-only port, resources,
labels, NetworkPolicies, hooks, no secret values outside Secrets, and the schema rejecting wrong
values."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import (
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    RELEASE,
    SERVICES,
    Rendered,
    chart,
    container_env,
    deep_merge,
    render,
    validate_manifest,
)

KEYRING = json.dumps(
    {
        "primary": "k00000001",
        "keys": [{"id": "k00000001", "material": "A" * 43 + "="}],
        "blind_index_key": "B" * 43 + "=",
    }
)


GRPC_SERVICES = {
    "referrals": "ReferralsService",
    "panel": "PanelService",
    "conferences": "ConferencesService",
    "actionplans": "ActionPlansService",
}

# A throwaway X25519 key: the referrals sealed-intake key (intake.enabled).
INTAKE_KEY = (
    "-----BEGIN PRIVATE KEY-----\n"
    "MC4CAQAwBQYDK2VuBCIEIGCa47AM2Qj5+bBAEoidhtPAmp+rwusEynG6+W2SVUl9\n"
    "-----END PRIVATE KEY-----\n"
)
TOKEN_PUBLIC_KEY = (
    "-----BEGIN PUBLIC KEY-----\n"
    "MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n"
    "-----END PUBLIC KEY-----\n"
)


def secret_values(service: str) -> dict[str, str]:
    values = {
        "databaseUrl": f"postgresql+asyncpg://csx_{service}:db-secret-{service}@db.internal:5432/csx_{service}",
        "migrationDatabaseUrl": f"postgresql+asyncpg://ddl_{service}:ddl-secret-{service}@db.internal/csx_{service}",
        "natsPassword": f"nats-secret-{service}-0123456789",
        "keyring": KEYRING,
    }
    if service == "referrals":
        values["intakeKey"] = INTAKE_KEY
    return values


ALL_SETTINGS = {
    "referrals": {"logLevel": "DEBUG", "reflection": True, "maxMessageBytes": 4194304},
    "panel": {"flagThresholdChildren": 5, "relayPollSeconds": 0.25},
    "conferences": {"contextualReviewWorkingDays": 20, "defaultDeadlineSeconds": 7.5},
    "actionplans": {"conferencesTimeoutSeconds": 3, "maxConcurrentRpcs": 512},
}

# The values matrix: name -> values. Every case renders, validates, and satisfies the invariants.
MATRIX: dict[str, dict[str, Any]] = {
    "defaults": {},
    "all-services-all-settings": {
        "services": {s: {"enabled": True, "settings": ALL_SETTINGS[s]} for s in SERVICES},
        "config": {"streamMaxAgeDays": 90},
    },
    "network-policies-with-peers": {
        "networkPolicy": {
            "enabled": True,
            "database": {"port": 5432, "to": [{"ipBlock": {"cidr": "10.20.0.5/32"}}]},
            "telemetry": {"to": [{"namespaceSelector": {"matchLabels": {"name": "observability"}}}]},
        },
        "telemetry": {
            "otlpEndpoint": "http://otel-collector.observability:4317",
            "samplerArg": "0.5",
            "sampler": "parentbased_traceidratio",
        },
        "services": {
            "referrals": {
                "networkPolicy": {
                    "ingressFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}]
                }
            },
            "actionplans": {
                "networkPolicy": {
                    "extraEgress": [
                        {"to": [{"ipBlock": {"cidr": "10.30.0.0/24"}}], "ports": [{"port": 443, "protocol": "TCP"}]}
                    ]
                }
            },
        },
        "nats": {"networkPolicy": {"monitoringFrom": [{"podSelector": {"matchLabels": {"app": "prometheus"}}}]}},
    },
    "network-policies-off": {"networkPolicy": {"enabled": False}, "tests": {"enabled": False}},
    "external-nats": {
        "nats": {
            "install": False,
            "external": {"url": "tls://nats.partnership.example:4222", "to": [{"ipBlock": {"cidr": "10.40.0.0/24"}}]},
        },
        "config": {"streamReplicas": 3},
        "trustBundle": {"configMapName": "partnership-ca", "key": "ca.crt"},
    },
    "external-nats-without-auth": {
        "nats": {"install": False, "auth": {"enabled": False}, "external": {"url": "nats://nats.local:4222"}},
        "config": {"streamReplicas": 1},
    },
    "autoscaling": {
        "services": {s: {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 8}} for s in SERVICES},
        "workloadAnnotations": {"secret.reloader.stakater.com/reload": "csx-referrals-tls,csx-nats-tls"},
    },
    "chart-made-secrets": {
        "secrets": {"create": True},
        "services": {s: {"secretValues": secret_values(s)} for s in SERVICES},
        "nats": {"auth": {"operatorPassword": "operator-secret-0123456789"}},
        "migrations": {"secretKey": "migration-database-url"},
        "identity": {"tokenPublicKey": TOKEN_PUBLIC_KEY},
        "trustBundle": {"secretName": "partnership-ca"},
    },
    "only-referrals-and-panel": {
        "services": {"conferences": {"enabled": False}, "actionplans": {"enabled": False}},
        "nats": {"replicas": 5, "tls": {"enabled": False}},
        "image": {"registry": "registry.partnership.example/csx", "tag": "0.1.0-rc1"},
    },
    "health-port-from-nodes": {
        "healthPort": 9091,
        "networkPolicy": {"healthFrom": [{"ipBlock": {"cidr": "10.0.0.0/24"}}]},
        "services": {
            "referrals": {
                "networkPolicy": {
                    "ingressFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}]
                }
            }
        },
    },
    "actionplans-without-conferences": {
        "services": {
            "conferences": {"enabled": False},
            "actionplans": {"settings": {"conferencesAddress": "conferences.other:50051"}},
        },
        "migrations": {"enabled": False},
        "serviceAccount": {"create": False},
        "topologySpread": False,
    },
}

SECRET_STRINGS = [
    *(v for s in SERVICES for k, v in secret_values(s).items() if k != "keyring"),
    "operator-secret-0123456789",
    "A" * 43,
]


@pytest.fixture(scope="module", params=list(MATRIX), ids=list(MATRIX))
def rendered(request: pytest.FixtureRequest) -> Rendered:
    return render(MATRIX[request.param])


def enabled_services(r: Rendered) -> list[str]:
    values = chart().merge_values(r.values)
    return [s for s in SERVICES if values["services"][s]["enabled"]]


def merged(r: Rendered) -> dict[str, Any]:
    return chart().merge_values(r.values)


# --- every manifest is valid Kubernetes ------------------------------------------------------------------


def test_every_manifest_validates_against_kubernetes_schema(rendered: Rendered) -> None:
    assert rendered.objects
    for obj in rendered.objects:
        try:
            validate_manifest(obj)
        except Exception as exc:  # pragma: no cover - the message is the point
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} is not valid Kubernetes {KUBE_VERSION}: {exc}")


def test_lint_passes_on_the_chart() -> None:
    import helm_python

    report = helm_python.lint(CHART, strict=True, kube_version=f"v{KUBE_VERSION}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


def test_names_are_unique_and_fit_kubernetes_limits(rendered: Rendered) -> None:
    seen = set()
    for obj in rendered.objects:
        key = (obj["kind"], obj["metadata"]["name"])
        assert key not in seen, f"{key} rendered twice"
        seen.add(key)
        assert len(obj["metadata"]["name"]) <= 63
        assert obj["metadata"].get("namespace", NAMESPACE) == NAMESPACE


# --- labels ------------------------------------------------------------------------------------------------

RECOMMENDED = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)
STABLE = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component"}


def test_recommended_labels_everywhere_and_selectors_use_only_stable_ones(rendered: Rendered) -> None:
    for obj in rendered.objects:
        labels = obj["metadata"].get("labels", {})
        missing = [k for k in RECOMMENDED if k not in labels]
        assert not missing, f"{obj['kind']}/{obj['metadata']['name']} lacks {missing}"
        selector = obj.get("spec", {}).get("selector")
        if obj["kind"] in ("Deployment", "StatefulSet", "PodDisruptionBudget"):
            assert set(selector["matchLabels"]) == STABLE, obj["metadata"]["name"]
        if obj["kind"] == "Service":
            assert set(selector) == STABLE, obj["metadata"]["name"]
    for obj, pod in rendered.workloads():
        if obj["kind"] in ("Deployment", "StatefulSet"):
            pod_labels = obj["spec"]["template"]["metadata"]["labels"]
            assert obj["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


# --- pods are hardened (Pod Security Standard "restricted") ------------------------------------------------


def test_every_pod_meets_the_restricted_pod_security_standard(rendered: Rendered) -> None:
    for obj, pod in rendered.workloads():
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        assert pod.get("automountServiceAccountToken") is False, where
        assert pod.get("hostNetwork") is not True and pod.get("hostPID") is not True, where
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0, where
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        for volume in pod.get("volumes", []):
            assert "hostPath" not in volume, where
        for container in pod["containers"] + pod.get("initContainers", []):
            csc = container["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False, where
            assert csc["readOnlyRootFilesystem"] is True, where
            assert csc["capabilities"]["drop"] == ["ALL"], where
            assert not csc["capabilities"].get("add"), where
            assert csc.get("privileged") is not True, where
            resources = container["resources"]
            assert resources["requests"]["cpu"] and resources["requests"]["memory"], where
            assert resources["limits"]["memory"], where
            assert ":" in container["image"] or "@" in container["image"], where
            assert not container["image"].endswith(":latest"), where


def test_services_have_native_grpc_probes_and_roll_on_config_change(rendered: Rendered) -> None:
    """The gRPC port takes mutual TLS only, which the kubelet's native gRPC probe cannot speak, so
    every probe is a native `grpc:` probe of the plaintext health-only port (HEALTH_ADDRESS, the
    value healthPort): start-up and liveness ask for the server, readiness for this service by name.
    No TCP or exec probes are left."""
    values = merged(rendered)
    health_port = values["healthPort"]
    assert health_port != 50051
    for svc in enabled_services(rendered):
        deployment = rendered.get("Deployment", f"{RELEASE}-{svc}")
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        ports = {p["name"]: p for p in container["ports"]}
        assert list(ports) == ["grpc", "health"]
        assert ports["grpc"]["containerPort"] == 50051
        assert ports["health"] == {"name": "health", "containerPort": health_port, "protocol": "TCP"}
        env = container_env(rendered, container)
        assert env[f"CSX_{svc.upper()}_HEALTH_ADDRESS"] == f"0.0.0.0:{health_port}"
        assert env[f"CSX_{svc.upper()}_GRPC_ADDRESS"] == "0.0.0.0:50051"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            spec = container[probe]
            assert not {"tcpSocket", "exec", "httpGet"} & spec.keys(), (svc, probe)
            # The kubelet's gRPC probe takes a port number only (no named ports), and no TLS.
            assert spec["grpc"]["port"] == health_port, (svc, probe)
            assert spec["timeoutSeconds"] < spec["periodSeconds"], (svc, probe)
        assert container["readinessProbe"]["grpc"]["service"] == f"csx.{svc}.v1.{GRPC_SERVICES[svc]}"
        for probe in ("startupProbe", "livenessProbe"):
            assert container[probe]["grpc"].get("service", "") == "", (svc, probe)
        # Start-up covers a migration (the whole of it when the Job is off): as long as the Job may run.
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= values["migrations"]["activeDeadlineSeconds"]
        liveness = container["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert len(annotations["checksum/config"]) == 64
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        service = rendered.get("Service", f"{RELEASE}-{svc}")
        assert service["spec"]["ports"] == [
            {"name": "grpc", "port": 50051, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"}
        ]


def test_health_port_is_on_no_service(rendered: Rendered) -> None:
    """The plaintext health port is for the kubelet only: no Service of the release exposes it (so
    none of type NodePort or LoadBalancer can), and every Service is a ClusterIP one."""
    health_port = merged(rendered)["healthPort"]
    services = rendered.of_kind("Service")
    assert services
    for service in services:
        where = service["metadata"]["name"]
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", where
        assert "externalIPs" not in service["spec"], where
        for port in service["spec"]["ports"]:
            assert port["port"] != health_port, where
            assert port.get("targetPort", port["port"]) not in (health_port, "health"), where
            assert "nodePort" not in port, where


def test_health_port_must_differ_from_the_grpc_port() -> None:
    import helm_python

    with pytest.raises(helm_python.HelmValuesError):
        chart().render({"healthPort": 50051}, name=RELEASE, namespace=NAMESPACE)
    r = render({"healthPort": 9000})
    (container,) = r.get("Deployment", f"{RELEASE}-panel")["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["grpc"]["port"] == 9000
    assert r.get("ConfigMap", f"{RELEASE}-panel")["data"]["CSX_PANEL_HEALTH_ADDRESS"] == "0.0.0.0:9000"


def test_grpc_service_names_match_the_services() -> None:
    """The names the readiness probe asks for are the ones each service registers with health."""
    import importlib

    for svc, name in GRPC_SERVICES.items():
        module = importlib.import_module(f"csx.{svc}.v1.{svc}_pb2")
        assert module.DESCRIPTOR.services_by_name[name].full_name == f"csx.{svc}.v1.{name}"


def test_config_checksum_changes_when_a_setting_changes() -> None:
    def checksum(values: dict[str, Any]) -> str:
        r = render(values)
        return r.get("Deployment", f"{RELEASE}-panel")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum({}) != checksum({"services": {"panel": {"settings": {"flagThresholdChildren": 4}}}})


def test_replicas_autoscaling_and_disruption_budgets(rendered: Rendered) -> None:
    values = merged(rendered)
    for svc in enabled_services(rendered):
        block = values["services"][svc]
        deployment = rendered.get("Deployment", f"{RELEASE}-{svc}")
        hpas = [h for h in rendered.of_kind("HorizontalPodAutoscaler") if h["metadata"]["name"] == f"{RELEASE}-{svc}"]
        if block["autoscaling"]["enabled"]:
            assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
            (hpa,) = hpas
            assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
            assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        else:
            assert deployment["spec"]["replicas"] == block["replicas"]
            assert not hpas
        pdb = rendered.get("PodDisruptionBudget", f"{RELEASE}-{svc}")
        assert pdb["spec"]["selector"] == deployment["spec"]["selector"]


# --- secrets --------------------------------------------------------------------------------------------------


def test_no_secret_value_outside_secrets(rendered: Rendered) -> None:
    texts = [rendered.notes] + [yaml.safe_dump(o) for o in rendered.objects if o["kind"] != "Secret"]
    for text in texts:
        for secret in SECRET_STRINGS:
            assert secret not in text


def test_secret_references_resolve(rendered: Rendered) -> None:
    """Every Secret a pod reads is either rendered by the chart or one the operator is told about."""
    values = merged(rendered)
    rendered_secrets = {s["metadata"]["name"]: s for s in rendered.of_kind("Secret")}
    for obj, pod in rendered.workloads():
        refs: list[tuple[str, str | None]] = []
        for container in pod["containers"]:
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.append((ref["name"], ref["key"]))
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                for item in volume["secret"].get("items", [{"key": None}]):
                    refs.append((volume["secret"]["secretName"], item["key"]))
        for name, key in refs:
            if values["secrets"]["create"] and name in rendered_secrets:
                data = rendered_secrets[name]["data"]
                assert key is None or key in data, f"{obj['metadata']['name']} reads {name}/{key}"
            else:
                assert f"Secret {name}:" in rendered.notes, f"{name} is neither rendered nor listed in NOTES.txt"
        rendered_maps = {c["metadata"]["name"]: c for c in rendered.of_kind("ConfigMap")}
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                name = volume["configMap"]["name"]
                if name in rendered_maps:
                    for item in volume["configMap"].get("items", []):
                        assert item["key"] in rendered_maps[name]["data"], (name, item["key"])
                else:
                    assert f"ConfigMap {name}:" in rendered.notes, f"{name} is neither rendered nor in NOTES.txt"


def test_chart_made_secrets_are_hooks_that_run_before_the_migrations() -> None:
    r = render(MATRIX["chart-made-secrets"])
    for secret in r.of_kind("Secret"):
        annotations = secret["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
        assert int(annotations["helm.sh/hook-weight"]) < 0
    import base64

    auth = r.get("Secret", f"{RELEASE}-nats-auth")["data"]
    assert base64.b64decode(auth["referrals-password"]).decode() == "nats-secret-referrals-0123456789"
    assert set(auth) == {f"{s}-password" for s in SERVICES} | {"operator-password"}


# --- migrations -----------------------------------------------------------------------------------------------


def test_migrations_run_as_pre_install_and_pre_upgrade_jobs(rendered: Rendered) -> None:
    values = merged(rendered)
    jobs = {j["metadata"]["labels"]["csx.io/service"]: j for j in rendered.of_kind("Job")}
    if not values["migrations"]["enabled"]:
        assert not jobs
        return
    assert set(jobs) == set(enabled_services(rendered))
    for svc, job in jobs.items():
        annotations = job["metadata"]["annotations"]
        assert set(annotations["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert container["command"] == ["python", "-m", f"csx_{svc}.migrate"]
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
        # Hooks run before the chart's ServiceAccount exists.
        assert job["spec"]["template"]["spec"]["serviceAccountName"] == "default"
        url = next(e for e in container["env"] if e["name"] == f"CSX_{svc.upper()}_DATABASE_URL")
        assert url["valueFrom"]["secretKeyRef"]["key"] == (
            "migration-database-url"
            if values["migrations"]["secretKey"] == "migration-database-url"
            else "database-url"
        )


# --- network policies ----------------------------------------------------------------------------------------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if not selector:
        return True
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        value = labels.get(expr["key"])
        if expr["operator"] == "In" and value not in expr["values"]:
            return False
        if expr["operator"] == "NotIn" and value in expr["values"]:
            return False
        if expr["operator"] == "Exists" and value is None:
            return False
    return True


def _pod_labels(obj: dict[str, Any]) -> dict[str, str]:
    if obj["kind"] == "Pod":
        return obj["metadata"]["labels"]
    return obj["spec"]["template"]["metadata"]["labels"]


def _ingress_allowed(policies: list[dict[str, Any]], src: dict[str, str], dst: dict[str, str], port: int) -> bool:
    for policy in policies:
        if not _selects(policy["spec"]["podSelector"], dst):
            continue
        for rule in policy["spec"].get("ingress") or []:
            ports = [p["port"] for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            peers = rule.get("from")
            if not peers or any(
                "podSelector" in p and "namespaceSelector" not in p and _selects(p["podSelector"], src) for p in peers
            ):
                return True
    return False


def _egress_allowed(policies: list[dict[str, Any]], src: dict[str, str], dst: dict[str, str] | None, port: int) -> bool:
    """dst None: an address outside the cluster's pods (matched by rules without `to` or with ipBlock)."""
    for policy in policies:
        if not _selects(policy["spec"]["podSelector"], src):
            continue
        for rule in policy["spec"].get("egress") or []:
            ports = [p["port"] for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            peers = rule.get("to")
            if not peers:
                return True
            for p in peers:
                if dst is None and "ipBlock" in p:
                    return True
                if (
                    dst is not None
                    and "podSelector" in p
                    and "namespaceSelector" not in p
                    and _selects(p["podSelector"], dst)
                ):
                    return True
    return False


# Service-to-service gRPC calls the chart allows (each also granted by the callee, `service_calls`).
CALLS = {("actionplans", "conferences"), ("conferences", "panel")}


def test_network_policies_deny_by_default_and_allow_only_what_is_needed(rendered: Rendered) -> None:
    values = merged(rendered)
    policies = rendered.of_kind("NetworkPolicy")
    if not values["networkPolicy"]["enabled"]:
        assert not policies
        return
    deny = rendered.get("NetworkPolicy", f"{RELEASE}-default-deny")
    assert deny["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]
    pods = {_pod_labels(o)["app.kubernetes.io/component"]: _pod_labels(o) for o, _ in rendered.workloads()}
    # Every pod of the release is under the default deny.
    for labels in pods.values():
        assert _selects(deny["spec"]["podSelector"], labels)
    services = enabled_services(rendered)
    port = 50051
    for svc in services:
        # Services reach NATS (in-chart pods or the external address) and the database, not each other.
        if values["nats"]["install"]:
            assert _egress_allowed(policies, pods[svc], pods["nats"], 4222)
            assert _ingress_allowed(policies, pods[svc], pods["nats"], 4222)
        else:
            assert _egress_allowed(policies, pods[svc], None, values["nats"]["external"]["port"])
        assert _egress_allowed(policies, pods[svc], None, values["networkPolicy"]["database"]["port"])
        # The only calls between services: actionplans -> conferences, conferences -> panel.
        for other in services:
            allowed = _ingress_allowed(policies, pods[other], pods[svc], port)
            assert allowed == ((other, svc) in CALLS), (other, "->", svc)
    for caller, callee in CALLS:
        if caller in services and callee in services:
            assert _egress_allowed(policies, pods[caller], pods[callee], port)
    if "migrations" in pods:
        assert _egress_allowed(policies, pods["migrations"], None, values["networkPolicy"]["database"]["port"])
        if values["nats"]["install"]:
            assert not _egress_allowed(policies, pods["migrations"], pods["nats"], 4222)
    if values["nats"]["install"]:
        assert _ingress_allowed(policies, pods["nats"], pods["nats"], 6222)
        assert not _ingress_allowed(policies, pods.get("migrations", {"x": "y"}), pods["nats"], 4222)
    if "test" in pods:
        for svc in services:
            assert _ingress_allowed(policies, pods["test"], pods[svc], port)
    # The health port: no pod of the release reaches it (the kubelet probes from the node).
    health_port = values["healthPort"]
    for svc in services:
        for source, labels in pods.items():
            assert not _ingress_allowed(policies, labels, pods[svc], health_port), (source, "->", svc, "health")


def test_network_policies_open_the_health_port_only_to_health_from(rendered: Rendered) -> None:
    """Every ingress rule of a service names its ports (a rule without ports would open the health
    port too), and the only rule with the health port is networkPolicy.healthFrom's, with that port
    alone: none by default, where the kubelet's probes from the pod's own node need no rule."""
    values = merged(rendered)
    if not values["networkPolicy"]["enabled"]:
        return
    health_port = values["healthPort"]
    health_from = values["networkPolicy"]["healthFrom"]
    for svc in enabled_services(rendered):
        policy = rendered.get("NetworkPolicy", f"{RELEASE}-{svc}")
        rules = policy["spec"]["ingress"]
        assert all(rule.get("ports") for rule in rules), svc
        health_rules = [r for r in rules if any(p["port"] == health_port for p in r["ports"])]
        if not health_from:
            assert not health_rules, svc
            continue
        (rule,) = health_rules
        assert rule == {"ports": [{"port": health_port, "protocol": "TCP"}], "from": health_from}, svc
        grpc_rules = [r for r in rules if r is not rule]
        assert all(p["port"] == 50051 for r in grpc_rules for p in r["ports"]), svc
    # Nothing else in the release opens it: not NATS, the migrations or the test pod.
    for policy in rendered.of_kind("NetworkPolicy"):
        if policy["metadata"]["labels"]["app.kubernetes.io/component"] in SERVICES:
            continue
        for rule in policy["spec"].get("ingress") or []:
            assert all(p["port"] != health_port for p in rule.get("ports", [])), policy["metadata"]["name"]
        for rule in policy["spec"].get("egress") or []:
            assert all(p["port"] != health_port for p in rule.get("ports", [])), policy["metadata"]["name"]


def test_referrals_ingress_peers_come_from_values() -> None:
    r = render(MATRIX["network-policies-with-peers"])
    policy = r.get("NetworkPolicy", f"{RELEASE}-referrals")
    peers = policy["spec"]["ingress"][0]["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}} in peers
    assert "ingressFrom is empty" not in r.notes
    assert "ingressFrom is empty" in render({}).notes


# --- NATS -------------------------------------------------------------------------------------------------------


def test_in_chart_nats_is_a_replicated_jetstream_cluster_with_tls(rendered: Rendered) -> None:
    values = merged(rendered)
    statefulsets = rendered.of_kind("StatefulSet")
    if not values["nats"]["install"]:
        assert not statefulsets
        return
    (sts,) = statefulsets
    assert sts["spec"]["replicas"] == values["nats"]["replicas"] >= 3
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == values["nats"]["jetstream"]["storage"]["size"]
    conf = rendered.get("ConfigMap", f"{RELEASE}-nats")["data"]["nats.conf"]
    assert "sync_interval: always" in conf
    assert "store_dir: /data/jetstream" in conf
    assert conf.count("nats-route://") == values["nats"]["replicas"]
    assert ("tls {" in conf) == values["nats"]["tls"]["enabled"]
    pdb = rendered.get("PodDisruptionBudget", f"{RELEASE}-nats")
    assert pdb["spec"]["maxUnavailable"] == 1


# --- values.schema.json rejects wrong values -----------------------------------------------------------------

BAD_VALUES = {
    "unknown top-level key": {"replicaCount": 3},
    "misspelt service": {"services": {"referals": {"enabled": True}}},
    "unknown service key": {"services": {"panel": {"replica": 3}}},
    "unknown setting": {"services": {"panel": {"settings": {"flagThreshold": 3}}}},
    "setting of another service": {"services": {"referrals": {"settings": {"flagThresholdChildren": 3}}}},
    "wrong setting type": {"config": {"maxConcurrentRpcs": "many"}},
    "bad log level": {"config": {"logLevel": "VERBOSE"}},
    "stream replicas 2": {"config": {"streamReplicas": 2}},
    "review days out of range": {"services": {"conferences": {"settings": {"contextualReviewWorkingDays": 90}}}},
    "replicas zero": {"services": {"referrals": {"replicas": 0}}},
    "replicas as string": {"services": {"referrals": {"replicas": "2"}}},
    "missing limits": {"services": {"referrals": {"resources": {"limits": None}}}},
    "bad cpu quantity": {"services": {"panel": {"resources": {"requests": {"cpu": "lots"}}}}},
    "hpa over 100%": {"services": {"panel": {"autoscaling": {"targetCPUUtilizationPercentage": 150}}}},
    "external nats without url": {"nats": {"install": False}},
    "external nats url with credentials": {"nats": {"install": False, "external": {"url": "tls://u:p@nats:4222"}}},
    "in-chart nats without auth": {"nats": {"auth": {"enabled": False}}},
    "nats with 2 servers": {"nats": {"replicas": 2}},
    "bad pull policy": {"image": {"pullPolicy": "Sometimes"}},
    "otlp endpoint without scheme": {"telemetry": {"otlpEndpoint": "collector:4317"}},
    "chart-made secrets without values": {"secrets": {"create": True}},
    "database url not postgres": {
        "secrets": {"create": True},
        "services": {"referrals": {"secretValues": {"databaseUrl": "mysql://x", "keyring": KEYRING}}},
    },
    "migration secret key": {"migrations": {"secretKey": "password"}},
    "health port is the grpc port": {"healthPort": 50051},
    "health port as string": {"healthPort": "8081"},
    "privileged health port": {"healthPort": 80},
    "health address as a setting": {"config": {"healthAddress": "0.0.0.0:8081"}},
    "health address as a service setting": {"services": {"panel": {"settings": {"healthAddress": "0.0.0.0:9"}}}},
    "health from not peers": {"networkPolicy": {"healthFrom": "10.0.0.0/24"}},
}


@pytest.mark.parametrize("values", list(BAD_VALUES.values()), ids=list(BAD_VALUES))
def test_schema_rejects_wrong_values(values: dict[str, Any]) -> None:
    import helm_python

    with pytest.raises(helm_python.HelmValuesError):
        chart().render(values, name=RELEASE, namespace=NAMESPACE)


def test_schema_is_generated_from_the_settings_classes() -> None:
    """values.schema.json is what render_values_schema.py makes from the settings classes, so a
    setting added to a service is accepted, and one that does not exist is refused."""
    import importlib.util

    path = CHART.parents[2] / "deploy" / "scripts" / "render_values_schema.py"
    spec = importlib.util.spec_from_file_location("render_values_schema", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (CHART / "values.schema.json").read_text() == module.render(), "run deploy/scripts/render_values_schema.py"


def test_schema_and_jsonschema_agree_on_the_defaults() -> None:
    """values.yaml satisfies its own schema (checked by an independent validator too)."""
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(defaults)]
    assert not errors
    for name, values in BAD_VALUES.items():
        assert list(jsonschema.Draft7Validator(schema).iter_errors(deep_merge(defaults, values))), name


TEMPLATE_FAILURES = {
    "actionplans needs conferences somewhere": (
        {"services": {"conferences": {"enabled": False}}},
        "conferencesAddress is required",
    ),
    "more stream replicas than NATS servers": (
        {"config": {"streamReplicas": 5}},
        "streamReplicas 5 is more than nats.replicas 3",
    ),
    "autoscaling bounds": (
        {"services": {"panel": {"autoscaling": {"enabled": True, "minReplicas": 4, "maxReplicas": 2}}}},
        "maxReplicas is below minReplicas",
    ),
    "nothing enabled": ({"services": {s: {"enabled": False} for s in SERVICES}}, "no service is enabled"),
    "keyring that is not one": (
        deep_merge(MATRIX["chart-made-secrets"], {"services": {"panel": {"secretValues": {"keyring": "{}"}}}}),
        "is not a CSX keyring",
    ),
}


@pytest.mark.parametrize("case", list(TEMPLATE_FAILURES), ids=list(TEMPLATE_FAILURES))
def test_templates_refuse_inconsistent_values(case: str) -> None:
    import helm_python

    values, message = TEMPLATE_FAILURES[case]
    with pytest.raises(helm_python.HelmError, match=message):
        chart().render(values, name=RELEASE, namespace=NAMESPACE)


# --- the chart README documents every value ----------------------------------------------------------------


def _leaf_paths(values: Any, prefix: str = "") -> list[str]:
    if isinstance(values, dict) and values:
        out = []
        for key, value in values.items():
            out += _leaf_paths(value, f"{prefix}.{key}" if prefix else key)
        return out
    return [prefix]


def test_readme_documents_every_value() -> None:
    readme = (CHART / "README.md").read_text()
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    paths = [p.replace("services.referrals.", "services.<name>.") for p in _leaf_paths(defaults)]
    paths = [
        p for p in paths if not p.startswith(("services.panel.", "services.conferences.", "services.actionplans."))
    ]
    # Requests and limits are documented as one value.
    paths = sorted({p.split(".resources.")[0] + ".resources" if ".resources." in p else p for p in paths})
    missing = [p for p in paths if f"`{p}`" not in readme]
    assert not missing, f"deploy/helm/csx/README.md does not document {missing}"
