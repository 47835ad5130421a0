{{/* Names, labels and computed values shared by the templates. */}}

{{- define "kvr.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release prefix of every resource name (63-character DNS label limit). */}}
{{- define "kvr.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Component names: include "kvr.component" (list $ "node") */}}
{{- define "kvr.component" -}}
{{- $top := index . 0 -}}
{{- printf "%s-%s" (include "kvr.fullname" $top | trunc 50 | trimSuffix "-") (index . 1) -}}
{{- end -}}

{{- define "kvr.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kvr.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kvr
{{- end -}}

{{- define "kvr.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvr.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of one component: include "kvr.componentLabels" (list $ "node") */}}
{{- define "kvr.componentLabels" -}}
{{ include "kvr.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "kvr.componentSelector" -}}
{{ include "kvr.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/*
Labels of the Services Prometheus scrapes: kvr.io/job is the Prometheus job
name (ServiceMonitor jobLabel), fixed per component so the dashboards and
alerts can select kvr-node / kvr-worker / kvr-gateway in any release.
*/}}
{{- define "kvr.scrapeLabels" -}}
kvr.io/job: kvr-{{ index . 1 }}
kvr.io/scrape: "true"
{{- end -}}

{{/* Image reference: include "kvr.image" (list $ .Values.images.node) */}}
{{- define "kvr.image" -}}
{{- $top := index . 0 -}}
{{- $img := index . 1 -}}
{{- $tag := default $top.Chart.AppVersion $img.tag -}}
{{- if $top.Values.images.registry -}}
{{- printf "%s/%s:%s" $top.Values.images.registry $img.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" $img.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "kvr.imagePullSecrets" -}}
{{- with .Values.images.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
terminationGracePeriodSeconds for a server draining drainSeconds after a
preStop sleep: always longer than the drain, so SIGKILL never cuts it.
*/}}
{{- define "kvr.gracePeriod" -}}
{{- $top := index . 0 -}}
{{- $drain := index . 1 -}}
{{- add (int $top.Values.termination.preStopSleepSeconds) (ceil $drain | int) (int $top.Values.termination.terminationExtraSeconds) -}}
{{- end -}}

{{- define "kvr.preStop" -}}
{{- if gt (int .Values.termination.preStopSleepSeconds) 0 }}
lifecycle:
  preStop:
    exec:
      command: ["sleep", "{{ int .Values.termination.preStopSleepSeconds }}"]
{{- end }}
{{- end -}}

{{/*
Retrieval node container memory (request = limit, bytes):
budget * (100 + percent) / 100 + fixedBytes + uploadMemoryBytes (+ the UCX
in-flight bytes when UCX is on), in integer arithmetic.
*/}}
{{- define "kvr.nodeMemoryBytes" -}}
{{- $n := .Values.node -}}
{{- $ucx := 0 -}}
{{- if $n.ucx.enabled }}{{ $ucx = int64 $n.ucx.maxInflightBytes }}{{ end -}}
{{- add (div (mul (int64 $n.memoryBudgetBytes) (add 100 (int64 $n.memoryOverhead.percent))) 100) (int64 $n.memoryOverhead.fixedBytes) (int64 $n.uploadMemoryBytes) $ucx -}}
{{- end -}}

{{- define "kvr.nodeHeadless" -}}
{{- include "kvr.component" (list . "node") }}-headless
{{- end -}}

{{- define "kvr.workerHeadless" -}}
{{- include "kvr.component" (list . "worker") }}-headless
{{- end -}}

{{/* The worker's --nodes value (see worker.nodeDiscovery). */}}
{{- define "kvr.workerNodesFlag" -}}
{{- $svc := printf "%s.%s.svc.%s" (include "kvr.nodeHeadless" .) .Release.Namespace .Values.clusterDomain -}}
{{- if eq .Values.worker.nodeDiscovery "dns" -}}
{{- printf "dns:///%s:%d" $svc (int .Values.node.grpcPort) -}}
{{- else -}}
{{- $node := include "kvr.component" (list . "node") -}}
{{- $addrs := list -}}
{{- range $i := until (int .Values.node.replicas) -}}
{{- $addrs = append $addrs (printf "%s-%d=%s-%d.%s:%d" $node $i $node $i $svc (int $.Values.node.grpcPort)) -}}
{{- end -}}
{{- join "," $addrs -}}
{{- end -}}
{{- end -}}

{{/* The gateway's --workers value: the workers' headless Service, re-resolved. */}}
{{- define "kvr.gatewayWorkersFlag" -}}
{{- printf "dns:///%s.%s.svc.%s:%d" (include "kvr.workerHeadless" .) .Release.Namespace .Values.clusterDomain (int .Values.worker.grpcPort) -}}
{{- end -}}

{{/* Pod anti-affinity across hosts for one component. */}}
{{- define "kvr.antiAffinity" -}}
{{- $top := index . 0 -}}
{{- $component := index . 1 -}}
{{- $mode := index . 2 -}}
{{- if eq $mode "hard" }}
affinity:
  podAntiAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      - topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "kvr.componentSelector" (list $top $component) | nindent 12 }}
{{- else if eq $mode "soft" }}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "kvr.componentSelector" (list $top $component) | nindent 14 }}
{{- end }}
{{- end -}}

{{/* "true" when the components run with mTLS (the chart's default). */}}
{{- define "kvr.tls" -}}
{{- if not .Values.insecure }}true{{ end -}}
{{- end -}}

{{/* The Secret with a role's certificate: include "kvr.tlsSecret" (list $ "node") */}}
{{- define "kvr.tlsSecret" -}}
{{- $top := index . 0 -}}
{{- $role := index . 1 -}}
{{- default (printf "%s-tls" (include "kvr.component" (list $top $role))) (index $top.Values.tls $role).secretName -}}
{{- end -}}

{{/*
The mTLS flags of a role's server (include "kvr.tlsArgs" (list $ "node")):
cert, key and CA from the mounted Secret, the reload period, and
--tls_allowed_peers when the values name peers.
*/}}
{{- define "kvr.tlsArgs" -}}
{{- $top := index . 0 -}}
{{- $role := index . 1 -}}
{{- $dir := $top.Values.tls.mountPath -}}
{{- if include "kvr.tls" $top }}
- --tls_cert_file={{ $dir }}/tls.crt
- --tls_key_file={{ $dir }}/tls.key
- --tls_ca_file={{ $dir }}/ca.crt
- --tls_reload_seconds={{ int $top.Values.tls.reloadSeconds }}
{{- with (index $top.Values.tls $role).allowedPeers | default "" }}
- --tls_allowed_peers={{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Volume of a role's certificate Secret (key files readable by the pod's group only). */}}
{{- define "kvr.tlsVolume" -}}
{{- $top := index . 0 -}}
{{- if include "kvr.tls" $top }}
- name: tls
  secret:
    secretName: {{ include "kvr.tlsSecret" . }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{/* Mounted as a directory (not subPath) so that rotated certificates reach the pod. */}}
{{- define "kvr.tlsVolumeMount" -}}
{{- if include "kvr.tls" . }}
- name: tls
  mountPath: {{ .Values.tls.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/*
A probe's handler (include "kvr.probeHandler" (list $ port service timeoutSeconds)):
kubelet's native gRPC probe when insecure; with mTLS (which kubelet's gRPC
probe cannot speak) an exec of the image's kvr_health_probe against
127.0.0.1 with the role's certificate, its deadline inside the probe's
timeout.
*/}}
{{- define "kvr.probeHandler" -}}
{{- $top := index . 0 -}}
{{- $port := int (index . 1) -}}
{{- $service := index . 2 -}}
{{- $timeout := int (index . 3) -}}
{{- if include "kvr.tls" $top -}}
{{- $dir := $top.Values.tls.mountPath -}}
exec:
  command:
    - /usr/local/bin/kvr_health_probe
    - --addr=127.0.0.1:{{ $port }}
    {{- with $service }}
    - --service={{ . }}
    {{- end }}
    - --timeout_ms={{ div (mul $timeout 3000) 4 }}
    - --tls_cert_file={{ $dir }}/tls.crt
    - --tls_key_file={{ $dir }}/tls.key
    - --tls_ca_file={{ $dir }}/ca.crt
{{- else -}}
grpc:
  port: {{ $port }}
  {{- with $service }}
  service: {{ . }}
  {{- end }}
{{- end -}}
{{- end -}}

{{/* UCX on nodes and workers: refused with TLS unless explicitly allowed unencrypted. */}}
{{- define "kvr.ucxArgs" -}}
{{- if and .Values.node.ucx.enabled (include "kvr.tls" .) }}
{{- if not .Values.node.ucx.allowUnencrypted -}}
{{- fail "node.ucx.enabled with TLS on (insecure: false) needs node.ucx.allowUnencrypted: true: UCX traffic is not encrypted" -}}
{{- end }}
- --ucx_allow_unencrypted
{{- end }}
{{- end -}}

{{/* "true" when the gateway checks API keys (see apiKeys in values.yaml). */}}
{{- define "kvr.apiKeys" -}}
{{- $k := .Values.apiKeys -}}
{{- if and $k.enabled (or (not .Values.insecure) $k.existingSecret $k.keys) }}true{{ end -}}
{{- end -}}

{{- define "kvr.apiKeysSecret" -}}
{{- default (printf "%s-api-keys" (include "kvr.component" (list . "gateway"))) .Values.apiKeys.existingSecret -}}
{{- end -}}
