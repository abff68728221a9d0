{{/* Names: "<release>-pdserve" unless overridden, cut to 63 characters (a DNS label). */}}
{{- define "pdserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pdserve.fullname" -}}
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

{{/* Labels every object carries; the NetworkPolicy's "inside the release" is the instance label. */}}
{{- define "pdserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pdserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pdserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "pdserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The image of a pod; "gpu" picks the CUDA variant. */}}
{{- define "pdserve.image" -}}
{{- $ctx := index . 0 -}}{{- $gpu := index . 1 -}}
{{- $tag := default $ctx.Chart.AppVersion $ctx.Values.image.tag -}}
{{- printf "%s:%s%s" $ctx.Values.image.repository $tag (ternary $ctx.Values.image.gpuSuffix $ctx.Values.image.cpuSuffix $gpu) -}}
{{- end -}}

{{- define "pdserve.rayClusterName" -}}{{ include "pdserve.fullname" . }}-ray{{- end -}}
{{/* KubeRay names the head's Service "<raycluster>-head-svc". */}}
{{- define "pdserve.rayHeadService" -}}{{ include "pdserve.rayClusterName" . }}-head-svc{{- end -}}

{{/* The Secret and key holding the Redis URL. */}}
{{- define "pdserve.redisSecretName" -}}
{{- if and (not .Values.redis.bundled) .Values.redis.external.existingSecret -}}
{{- .Values.redis.external.existingSecret -}}
{{- else -}}
{{- include "pdserve.fullname" . }}-redis-url
{{- end -}}
{{- end -}}
{{- define "pdserve.redisSecretKey" -}}
{{- if and (not .Values.redis.bundled) .Values.redis.external.existingSecret -}}
{{- .Values.redis.external.existingSecretKey -}}
{{- else -}}url{{- end -}}
{{- end -}}

{{- define "pdserve.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "pdserve.fullname" .)) .Values.apiKeys.existingSecret -}}
{{- end -}}
{{- define "pdserve.apiKeysSecretKey" -}}
{{- if .Values.apiKeys.existingSecret -}}{{ .Values.apiKeys.existingSecretKey }}{{- else -}}api-keys{{- end -}}
{{- end -}}
{{- define "pdserve.hasApiKeys" -}}
{{- if or .Values.apiKeys.keys .Values.apiKeys.existingSecret -}}true{{- end -}}
{{- end -}}

{{/* The REDIS_URL environment variable, from its Secret. */}}
{{- define "pdserve.redisEnv" -}}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "pdserve.redisSecretName" . }}
      key: {{ include "pdserve.redisSecretKey" . }}
{{- end -}}

{{/* The model volume (none when the checkpoints are baked into the image). */}}
{{- define "pdserve.modelVolume" -}}
{{- if eq .Values.model.source "pvc" }}
- name: models
  persistentVolumeClaim:
    claimName: {{ required "model.pvc.claimName is required when model.source is pvc" .Values.model.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.model.source "hostPath" }}
- name: models
  hostPath:
    path: {{ required "model.hostPath.path is required when model.source is hostPath" .Values.model.hostPath.path }}
    type: {{ .Values.model.hostPath.type }}
{{- end }}
{{- end -}}
{{- define "pdserve.modelMount" -}}
{{- if ne .Values.model.source "image" }}
- name: models
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/*
The worker groups as a YAML list: one per model and pool of `config.models`, each with the pool's
tensor-parallel size, whether its model runs on CUDA, and its replica bounds (the autoscaling
policy's max_replicas for that pool, else its defaults', else 1; a `rayCluster.workers.groups` entry wins).
*/}}
{{- define "pdserve.workerGroups" -}}
{{- $policy := .Values.autoscaling.policy | default dict -}}
{{- $defaults := $policy.defaults | default dict -}}
{{- $engine := .Values.config.engine | default dict -}}
{{- $groups := list -}}
{{- range $m := .Values.config.models -}}
{{- $served := $m.name | default (base $m.path) -}}
{{- $modelEngine := $m.engine | default dict -}}
{{- $device := $modelEngine.device | default ($engine.device | default "cpu") -}}
{{- $pools := list (list "prefill" ($m.prefill_tp | default 1)) (list "decode" ($m.decode_tp | default 1)) -}}
{{- if eq ($m.mode | default "disaggregated") "unified" -}}
{{- $pools = list (list "unified" ($m.decode_tp | default 1)) -}}
{{- end -}}
{{- range $p := $pools -}}
{{- $pool := index $p 0 -}}
{{- $max := $defaults.max_replicas | default 1 -}}
{{- range $entry := $policy.pools | default list -}}
{{- if and (eq $entry.model $served) (eq $entry.pool $pool) -}}
{{- $max = $entry.max_replicas | default $max -}}
{{- end -}}
{{- end -}}
{{- $name := printf "%s-%s" ($served | lower | replace "_" "-" | replace "." "-" | replace "/" "-") $pool | trunc 50 | trimSuffix "-" -}}
{{- $group := dict "name" $name "model" $served "pool" $pool "tp" (index $p 1) "gpu" (hasPrefix "cuda" $device) "minReplicas" 0 "maxReplicas" $max -}}
{{- $groups = append $groups (merge (deepCopy (index $.Values.rayCluster.workers.groups $name | default dict)) $group) -}}
{{- end -}}
{{- end -}}
{{- toYaml $groups -}}
{{- end -}}
