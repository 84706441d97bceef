{{/*
nats.conf for the in-chart JetStream cluster. Checked with `nats-server -t` in tests/deploy.
Acknowledged data is protected three ways: file storage, R3 streams (config.streamReplicas) that
acknowledge a publish only once a majority has it, and sync_interval: always, which fsyncs every
write before the acknowledgement (the default fsyncs every 2 minutes).
*/}}
{{- define "csx.natsConf" -}}
{{- $nats := include "csx.natsFullname" . -}}
{{- $headless := printf "%s-headless" $nats -}}
{{- $domain := .Values.clusterDomain -}}
# Rendered by the CSX Helm chart.
server_name: $POD_NAME
listen: 0.0.0.0:4222
http: 0.0.0.0:8222
max_payload: {{ .Values.nats.maxPayload }}
pid_file: /var/run/nats/nats.pid
# On SIGTERM (preStop): stop accepting clients, then move them away over 30 s.
lame_duck_duration: 30s
lame_duck_grace_period: 10s

jetstream {
  store_dir: /data/jetstream
  max_file_store: {{ .Values.nats.jetstream.maxFileStore }}
  max_memory_store: {{ .Values.nats.jetstream.maxMemoryStore }}
  # fsync before acknowledging: an acknowledged concern survives the loss of power to every node.
  sync_interval: always
}
{{- if .Values.nats.tls.enabled }}

tls {
  cert_file: /etc/nats-tls/tls.crt
  key_file: /etc/nats-tls/tls.key
  ca_file: /etc/nats-tls/ca.crt
  timeout: 3
}
{{- end }}

cluster {
  name: {{ $nats }}
  listen: 0.0.0.0:6222
  routes: [
    {{- range $i := until (int .Values.nats.replicas) }}
    nats-route://{{ $nats }}-{{ $i }}.{{ $headless }}.{{ $.Release.Namespace }}.svc.{{ $domain }}:6222
    {{- end }}
  ]
  {{- if .Values.nats.tls.enabled }}
  # Routes authenticate each other with the same certificate (mutual TLS).
  tls {
    cert_file: /etc/nats-tls/tls.crt
    key_file: /etc/nats-tls/tls.key
    ca_file: /etc/nats-tls/ca.crt
    verify: true
    timeout: 3
  }
  {{- end }}
}

# Per-service users and their permissions (files/nats/accounts.conf).
include ./accounts.conf
{{- end -}}
