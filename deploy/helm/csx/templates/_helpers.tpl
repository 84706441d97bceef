{{/*
Names, labels and the settings vocabulary shared by every template.
*/}}

{{- define "csx.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-csx, or the release name when it already contains the chart name. Kept short so
that "<fullname>-conferences-migrate" stays within 63 characters. */}}
{{- define "csx.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "csx.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The four services, in start order. */}}
{{- define "csx.serviceNames" -}}
referrals panel conferences actionplans
{{- end -}}

{{/* Stable selector labels: name, instance, component. Call with (dict "root" $ "component" "x"). */}}
{{- define "csx.selectorLabels" -}}
app.kubernetes.io/name: {{ include "csx.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The recommended labels. Call with (dict "root" $ "component" "x"). */}}
{{- define "csx.labels" -}}
{{ include "csx.selectorLabels" . }}
app.kubernetes.io/part-of: csx
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ include "csx.chart" .root }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels for the release as a whole (no component). */}}
{{- define "csx.releaseSelector" -}}
app.kubernetes.io/name: {{ include "csx.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "csx.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "csx.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* A service's image. Call with (dict "root" $ "svc" "referrals"). */}}
{{- define "csx.image" -}}
{{- $v := .root.Values -}}
{{- $img := (index $v.services .svc).image | default dict -}}
{{- $repo := $img.repository | default (ternary (printf "csx-%s" .svc) (printf "%s/csx-%s" $v.image.registry .svc) (empty $v.image.registry)) -}}
{{- $tag := $img.tag | default $v.image.tag | default .root.Chart.AppVersion -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $repo $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding a service's database-url and keyring.json. */}}
{{- define "csx.secretName" -}}
{{- $block := index .root.Values.services .svc -}}
{{- $block.existingSecret | default (printf "%s-%s" (include "csx.fullname" .root) .svc) -}}
{{- end -}}

{{- define "csx.natsAuthSecretName" -}}
{{- .Values.nats.auth.existingSecret | default (printf "%s-nats-auth" (include "csx.fullname" .)) -}}
{{- end -}}

{{- define "csx.natsTlsSecretName" -}}
{{- .Values.nats.tls.secretName | default (printf "%s-nats-tls" (include "csx.fullname" .)) -}}
{{- end -}}

{{- define "csx.natsFullname" -}}
{{- printf "%s-nats" (include "csx.fullname" .) -}}
{{- end -}}

{{/* The in-chart NATS client URL, or the external one (never with credentials). */}}
{{- define "csx.natsUrl" -}}
{{- if .Values.nats.install -}}
{{- printf "%s://%s.%s.svc:4222" (ternary "tls" "nats" .Values.nats.tls.enabled) (include "csx.natsFullname" .) .Release.Namespace -}}
{{- else -}}
{{- .Values.nats.external.url -}}
{{- end -}}
{{- end -}}

{{/* Where the trust bundle comes from: "secret", "configMap", or "" (the service's TLS Secret). */}}
{{- define "csx.trustSource" -}}
{{- if .Values.trustBundle.secretName -}}secret
{{- else if .Values.trustBundle.configMapName -}}configMap
{{- end -}}
{{- end -}}

{{/* The CA file for NATS and PostgreSQL TLS inside a pod. */}}
{{- define "csx.trustFile" -}}
{{- if include "csx.trustSource" . -}}/etc/csx/trust/ca.crt{{- else -}}/etc/csx/tls/ca.crt{{- end -}}
{{- end -}}

{{- define "csx.tlsSecretName" -}}
{{- $block := index .root.Values.services .svc -}}
{{- ($block.tls | default dict).secretName | default (printf "%s-%s-tls" (include "csx.fullname" .root) .svc) -}}
{{- end -}}

{{- define "csx.identityConfigMapName" -}}
{{- if .Values.identity.tokenPublicKey -}}
{{- printf "%s-identity" (include "csx.fullname" .) -}}
{{- else -}}
{{- .Values.identity.existingConfigMap | default (printf "%s-identity" (include "csx.fullname" .)) -}}
{{- end -}}
{{- end -}}

{{- define "csx.grpcPort" -}}50051{{- end -}}

{{/* The plaintext health-only port (grpc.health.v1 and nothing else), for the kubelet's probes. */}}
{{- define "csx.healthPort" -}}
{{- $port := .Values.healthPort | int -}}
{{- if eq $port (include "csx.grpcPort" . | int) -}}
{{- fail (printf "healthPort %d is the gRPC port: choose another (default 8081)" $port) -}}
{{- end -}}
{{- $port -}}
{{- end -}}

{{/* The gRPC service name each service registers with the health service. */}}
{{- define "csx.grpcServiceName" -}}
{{- $names := dict "referrals" "csx.referrals.v1.ReferralsService" "panel" "csx.panel.v1.PanelService" "conferences" "csx.conferences.v1.ConferencesService" "actionplans" "csx.actionplans.v1.ActionPlansService" -}}
{{- index $names . -}}
{{- end -}}

{{/* A setting's value as the string pydantic expects: booleans as true/false, whole numbers
without an exponent (Helm holds numbers as float64, and 1048576 would print as 1.048576e+06). */}}
{{- define "csx.settingValue" -}}
{{- $v := . -}}
{{- if kindIs "bool" $v -}}
{{- ternary "true" "false" $v -}}
{{- else if or (kindIs "float64" $v) (kindIs "int64" $v) (kindIs "int" $v) -}}
{{- if eq (float64 $v) (floor $v) -}}
{{- printf "%d" (int64 $v) -}}
{{- else -}}
{{- printf "%v" $v -}}
{{- end -}}
{{- else -}}
{{- printf "%v" $v -}}
{{- end -}}
{{- end -}}

{{/*
The non-secret environment of a service, as a YAML map of NAME: "value": the ConfigMap's data.
Names follow the service's settings class (CSX_<SERVICE>_<FIELD>) plus the standard OTEL_*,
SSL_CERT_FILE and PGSSLROOTCERT read by OpenTelemetry, OpenSSL and asyncpg. Secrets are files
(keyring, certificate, NATS password) or, for the database URL, a secretKeyRef in the Deployment.
Call with (dict "root" $ "svc" "referrals").
*/}}
{{- define "csx.serviceEnv" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $svc := .svc -}}
{{- $prefix := printf "CSX_%s_" (upper $svc) -}}
{{- $block := index $v.services $svc -}}
{{- $settings := merge (deepCopy ($block.settings | default dict)) (deepCopy $v.config) -}}
{{- if eq $svc "actionplans" -}}
{{- if not (hasKey $settings "conferencesAddress") -}}
{{- if not $v.services.conferences.enabled -}}
{{- fail "services.actionplans.settings.conferencesAddress is required when services.conferences.enabled is false" -}}
{{- end -}}
{{- $_ := set $settings "conferencesAddress" (printf "%s-conferences:%s" (include "csx.fullname" $root) (include "csx.grpcPort" $root)) -}}
{{- end -}}
{{- end -}}
{{- if and (eq $svc "conferences") $v.services.panel.enabled (not (hasKey $settings "panelAddress")) -}}
{{- $_ := set $settings "panelAddress" (printf "%s-panel:%s" (include "csx.fullname" $root) (include "csx.grpcPort" $root)) -}}
{{- end -}}
{{ $prefix }}GRPC_ADDRESS: {{ printf "0.0.0.0:%s" (include "csx.grpcPort" $root) | quote }}
{{ $prefix }}HEALTH_ADDRESS: {{ printf "0.0.0.0:%s" (include "csx.healthPort" $root) | quote }}
{{ $prefix }}KEYRING_FILE: "/etc/csx/keyring/keyring.json"
{{ $prefix }}NATS_URL: {{ include "csx.natsUrl" $root | quote }}
{{- if $v.nats.auth.enabled }}
{{ $prefix }}NATS_USER: {{ $svc | quote }}
{{ $prefix }}NATS_PASSWORD_FILE: "/etc/csx/nats/password"
{{- end }}
{{ $prefix }}TLS_CA_FILE: "/etc/csx/tls/ca.crt"
{{ $prefix }}TLS_CERT_FILE: "/etc/csx/tls/tls.crt"
{{ $prefix }}TLS_KEY_FILE: "/etc/csx/tls/tls.key"
{{ $prefix }}TOKEN_PUBLIC_KEY_FILE: "/etc/csx/identity/token-public-key.pem"
{{- if and (eq $svc "referrals") $v.intake.enabled }}
{{ $prefix }}INTAKE_KEY_FILE: "/etc/csx/intake/intake-key.pem"
{{- end }}
{{- range $key := keys $settings | sortAlpha }}
{{ $prefix }}{{ snakecase $key | upper }}: {{ include "csx.settingValue" (index $settings $key) | quote }}
{{- end }}
OTEL_SERVICE_NAME: {{ printf "csx-%s" $svc | quote }}
{{- if $v.telemetry.otlpEndpoint }}
OTEL_EXPORTER_OTLP_ENDPOINT: {{ $v.telemetry.otlpEndpoint | quote }}
OTEL_TRACES_SAMPLER: {{ $v.telemetry.sampler | quote }}
{{- if $v.telemetry.samplerArg }}
OTEL_TRACES_SAMPLER_ARG: {{ $v.telemetry.samplerArg | quote }}
{{- end }}
{{- end }}
SSL_CERT_FILE: {{ include "csx.trustFile" $root | quote }}
PGSSLROOTCERT: {{ include "csx.trustFile" $root | quote }}
{{- end -}}

{{/* The restricted Pod Security Standard, for pods and containers. */}}
{{- define "csx.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "csx.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Topology spread for a component. Call with (dict "root" $ "component" "x"). */}}
{{- define "csx.topologySpread" -}}
{{- if .root.Values.topologySpread }}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "csx.selectorLabels" . | nindent 8 }}
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "csx.selectorLabels" . | nindent 8 }}
{{- end }}
{{- end -}}

{{/* Egress to DNS, for NetworkPolicies. */}}
{{- define "csx.egressDns" -}}
- to:
    {{- toYaml .Values.networkPolicy.dns | nindent 4 }}
  ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{- end -}}

{{/* Egress to PostgreSQL. */}}
{{- define "csx.egressDatabase" -}}
- ports:
    - port: {{ .Values.networkPolicy.database.port }}
      protocol: TCP
  {{- with .Values.networkPolicy.database.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* The secret key the migration Job reads its database URL from. */}}
{{- define "csx.migrationUrlKey" -}}
{{- $block := index .root.Values.services .svc -}}
{{- if .root.Values.secrets.create -}}
{{- ternary "migration-database-url" "database-url" (not (empty $block.secretValues.migrationDatabaseUrl)) -}}
{{- else -}}
{{- .root.Values.migrations.secretKey -}}
{{- end -}}
{{- end -}}

{{/* The trust bundle volume (named "trust"), when there is one. */}}
{{- define "csx.trustVolume" -}}
{{- $trust := include "csx.trustSource" . -}}
{{- if eq $trust "secret" }}
- name: trust
  secret:
    secretName: {{ .Values.trustBundle.secretName }}
    items:
      - key: {{ .Values.trustBundle.key }}
        path: ca.crt
{{- else if eq $trust "configMap" }}
- name: trust
  configMap:
    name: {{ .Values.trustBundle.configMapName }}
    items:
      - key: {{ .Values.trustBundle.key }}
        path: ca.crt
{{- end }}
{{- end -}}
