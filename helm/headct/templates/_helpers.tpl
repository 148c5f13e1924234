{{/* Names ------------------------------------------------------------------------------------- */}}

{{- define "headct.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Resource-name prefix; component suffixes ("-gateway", "-triton-headless") must still fit 63. */}}
{{- define "headct.fullname" -}}
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

{{- define "headct.gateway.fullname" -}}{{ include "headct.fullname" . }}-gateway{{- end -}}
{{- define "headct.triton.fullname" -}}{{ include "headct.fullname" . }}-triton{{- end -}}

{{/* Prometheus job names: the monitors relabel `job` to these, and every rule selects on them. */}}
{{- define "headct.gateway.job" -}}{{ include "headct.gateway.fullname" . }}{{- end -}}
{{- define "headct.triton.job" -}}{{ include "headct.triton.fullname" . }}{{- end -}}

{{- define "headct.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels ------------------------------------------------------------------------------------ */}}

{{- define "headct.labels" -}}
helm.sh/chart: {{ include "headct.chart" . }}
app.kubernetes.io/name: {{ include "headct.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: headct-serve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "gateway"). */}}
{{- define "headct.selectorLabels" -}}
app.kubernetes.io/name: {{ include "headct.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "headct.componentLabels" -}}
{{ include "headct.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Images ------------------------------------------------------------------------------------ */}}

{{/* (dict "image" .Values.x.image "default" "tag-if-empty") */}}
{{- define "headct.image" -}}
{{- $tag := default .default .image.tag -}}
{{- if .image.digest -}}
{{- printf "%s:%s@%s" .image.repository $tag .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "headct.gateway.image" -}}
{{- include "headct.image" (dict "image" .Values.gateway.image "default" .Chart.AppVersion) -}}
{{- end -}}

{{- define "headct.triton.image" -}}
{{- include "headct.image" (dict "image" .Values.triton.image "default" "") -}}
{{- end -}}

{{- define "headct.engineBuild.image" -}}
{{- $default := printf "%s-triton%s" .Chart.AppVersion .Values.triton.image.tag -}}
{{- include "headct.image" (dict "image" .Values.engineBuild.image "default" $default) -}}
{{- end -}}

{{/* Service accounts ---------------------------------------------------------------------------- */}}

{{- define "headct.gateway.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create -}}
{{- default (include "headct.gateway.fullname" .) .Values.gateway.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.gateway.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "headct.triton.serviceAccountName" -}}
{{- if .Values.triton.serviceAccount.create -}}
{{- default (include "headct.triton.fullname" .) .Values.triton.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.triton.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Secrets ----------------------------------------------------------------------------------- */}}

{{- define "headct.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "headct.fullname" .)) .Values.gateway.auth.existingSecret -}}
{{- end -}}

{{- define "headct.tritonAdminSecretName" -}}
{{- default (printf "%s-triton-admin" (include "headct.fullname" .)) .Values.triton.server.adminKeySecret -}}
{{- end -}}

{{/* Triton ------------------------------------------------------------------------------------ */}}

{{- define "headct.triton.grpcUrl" -}}
{{- default (printf "%s:8001" (include "headct.triton.fullname" .)) .Values.gateway.config.tritonGrpcUrl -}}
{{- end -}}

{{/* True when an init container builds a TensorRT engine. */}}
{{- define "headct.engineBuild.active" -}}
{{- if and .Values.triton.gpu.enabled (eq .Values.triton.model.format "trt") -}}true{{- end -}}
{{- end -}}

{{- define "headct.engineCache.claimName" -}}
{{- default (printf "%s-engine-cache" (include "headct.fullname" .)) .Values.engineBuild.cache.existingClaim -}}
{{- end -}}

{{/* rclone remote for an object-store URL: s3://b/p -> :s3,env_auth=true:b/p */}}
{{- define "headct.objectStore.remote" -}}
{{- $url := .Values.triton.modelRepository.objectStore.url -}}
{{- if hasPrefix "s3://" $url -}}
{{- printf ":s3,env_auth=true:%s" (trimPrefix "s3://" $url) -}}
{{- else if hasPrefix "gs://" $url -}}
{{- printf ":gcs,env_auth=true:%s" (trimPrefix "gs://" $url) -}}
{{- else if hasPrefix "az://" $url -}}
{{- printf ":azureblob,env_auth=true:%s" (trimPrefix "az://" $url) -}}
{{- else -}}
{{- fail (printf "triton.modelRepository.objectStore.url must start with s3://, gs:// or az://, got %q" $url) -}}
{{- end -}}
{{- end -}}

{{/* Pod-level security context, with a per-component user: (dict "ctx" $ "user" 1000 "group" 1000) */}}
{{- define "headct.podSecurityContext" -}}
{{- $psc := deepCopy .ctx.Values.podSecurityContext -}}
{{- if .user }}{{- $_ := set $psc "runAsUser" .user -}}{{- end -}}
{{- if .group }}{{- $_ := set $psc "runAsGroup" .group -}}{{- $_ := set $psc "fsGroup" .group -}}{{- end -}}
{{- toYaml $psc -}}
{{- end -}}

{{/* Default topology spread: hard across nodes, soft across zones. */}}
{{- define "headct.topologySpread" -}}
{{- if .constraints -}}
{{- toYaml .constraints -}}
{{- else -}}
- maxSkew: 1
  topologyKey: kubernetes.io/hostname
  whenUnsatisfiable: DoNotSchedule
  labelSelector:
    matchLabels:
      {{- include "headct.selectorLabels" (dict "ctx" .ctx "component" .component) | nindent 6 }}
  matchLabelKeys: [pod-template-hash]
- maxSkew: 1
  topologyKey: topology.kubernetes.io/zone
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- include "headct.selectorLabels" (dict "ctx" .ctx "component" .component) | nindent 6 }}
  matchLabelKeys: [pod-template-hash]
{{- end -}}
{{- end -}}

{{/* Cross-value checks the JSON schema cannot express. */}}
{{- define "headct.validate" -}}
{{- if and (eq .Values.triton.modelRepository.source "objectStore") (not .Values.triton.modelRepository.objectStore.url) -}}
{{- fail "triton.modelRepository.source=objectStore needs triton.modelRepository.objectStore.url" -}}
{{- end -}}
{{- if and (eq .Values.triton.modelRepository.source "pvc") (not .Values.triton.modelRepository.pvc.claimName) -}}
{{- fail "triton.modelRepository.source=pvc needs triton.modelRepository.pvc.claimName" -}}
{{- end -}}
{{- if and .Values.gateway.autoscaling.enabled (gt (int .Values.gateway.autoscaling.minReplicas) (int .Values.gateway.autoscaling.maxReplicas)) -}}
{{- fail "gateway.autoscaling.minReplicas must not exceed maxReplicas" -}}
{{- end -}}
{{- if and .Values.triton.autoscaling.enabled (gt (int .Values.triton.autoscaling.minReplicas) (int .Values.triton.autoscaling.maxReplicas)) -}}
{{- fail "triton.autoscaling.minReplicas must not exceed maxReplicas" -}}
{{- end -}}
{{- if and .Values.ingress.enabled (not .Values.ingress.hosts) -}}
{{- fail "ingress.enabled needs at least one entry in ingress.hosts" -}}
{{- end -}}
{{- if and (not .Values.triton.gpu.enabled) (eq .Values.triton.model.format "trt") -}}
{{- fail "triton.model.format=trt needs triton.gpu.enabled=true (TensorRT engines are built and run on a GPU); use format=onnx for CPU-only Triton" -}}
{{- end -}}
{{- if lt (int .Values.gateway.terminationGracePeriodSeconds) (add (int .Values.gateway.preStopSleepSeconds) 5 | int) -}}
{{- fail "gateway.terminationGracePeriodSeconds must exceed preStopSleepSeconds by at least 5 s (time to drain)" -}}
{{- end -}}
{{- if lt (int .Values.triton.terminationGracePeriodSeconds) (add (int .Values.triton.preStopSleepSeconds) 5 | int) -}}
{{- fail "triton.terminationGracePeriodSeconds must exceed preStopSleepSeconds by at least 5 s (time to drain)" -}}
{{- end -}}
{{- end -}}
