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
