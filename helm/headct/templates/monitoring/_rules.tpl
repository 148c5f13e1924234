{{/*
The Prometheus rule groups of this chart, as a plain rules file body (`groups:`). Used by
prometheusrule.yaml; chart-check renders it into a file for `promtool check rules / test rules`.
Every series is selected by namespace + job (the monitors relabel `job`), so several releases can share
one Prometheus. Recorded series keep (namespace, job[, pod]) so HPA (prometheus-adapter) and KEDA can
select them per pod.
*/}}
{{- define "headct.ruleGroups" -}}
{{- $m := .Values.monitoring.prometheusRule -}}
{{- $th := $m.thresholds -}}
{{- $ns := .Release.Namespace -}}
{{- $G := printf "namespace=%q, job=%q" $ns (include "headct.gateway.job" .) -}}
{{- $T := printf "namespace=%q, job=%q, model=%q" $ns (include "headct.triton.job" .) .Values.modelName -}}
{{- $Tup := printf "namespace=%q, job=%q" $ns (include "headct.triton.job" .) -}}
{{- $P := printf "%s, route=\"/v1/predict\"" $G -}}
{{- $runbook := $m.runbookBaseUrl -}}
groups:
  - name: headct-autoscaling.rules
    interval: {{ $m.interval }}
    rules:
      # Time requests wait in Triton's queue per unit of compute time, per pod: ~0 idle, ~1 when the
      # queue holds about one batch of work, growing without bound when the pod cannot keep up.
      # Independent of GPU type and model size (NVIDIA tutorials' queue:compute ratio).
      - record: headct:triton_queue_compute:ratio
        expr: |-
          sum by (namespace, job, pod) (rate(nv_inference_queue_duration_us{ {{- $T -}} }[1m]))
          /
          clamp_min(sum by (namespace, job, pod) (rate(nv_inference_compute_infer_duration_us{ {{- $T -}} }[1m])), 1)
      - record: headct:triton_pending_requests:sum
        expr: sum by (namespace, job, pod) (nv_inference_pending_request_count{ {{- $T -}} })
      - record: headct:gateway_inflight_requests:sum
        expr: sum by (namespace, job, pod) (headct_inflight_requests{ {{- $G -}} })
      - record: headct:gateway_queue_depth:sum
        expr: sum by (namespace, job, pod) (headct_queue_depth{ {{- $G -}} })
  - name: headct-slo.rules
    interval: {{ $m.interval }}
    rules:
      - record: headct:request_duration_seconds:p95_rate5m
        expr: histogram_quantile(0.95, sum by (namespace, job, route, le) (rate(headct_request_duration_seconds_bucket{ {{- $G -}} }[5m])))
      - record: headct:request_duration_seconds:p99_rate5m
        expr: histogram_quantile(0.99, sum by (namespace, job, route, le) (rate(headct_request_duration_seconds_bucket{ {{- $G -}} }[5m])))
      # Per priority lane (stat, routine, bulk), REST and gRPC together: what STAT callers get.
      - record: headct:prediction_duration_seconds:p95_rate5m
        expr: histogram_quantile(0.95, sum by (namespace, job, lane, le) (rate(headct_prediction_duration_seconds_bucket{ {{- $G -}} }[5m])))
      - record: headct:stage_duration_seconds:p95_rate5m
        expr: histogram_quantile(0.95, sum by (namespace, job, stage, le) (rate(headct_stage_duration_seconds_bucket{ {{- $G -}} }[5m])))
      - record: headct:predict_requests:rate5m
        expr: sum by (namespace, job) (rate(headct_requests_total{ {{- $P -}} }[5m]))
      # Server faults (500, 502, 504) per predict request; 503 is capacity and counts as a rejection.
      # "or ... * 0" makes the ratio 0, not absent, while there is traffic but no error.
      - record: headct:predict_errors:ratio_rate5m
        expr: |-
          (
            sum by (namespace, job) (rate(headct_requests_total{ {{- $P -}}, status=~"5..", status!="503"}[5m]))
            or
            sum by (namespace, job) (rate(headct_requests_total{ {{- $P -}} }[5m])) * 0
          )
          /
          sum by (namespace, job) (rate(headct_requests_total{ {{- $P -}} }[5m]))
      # Capacity rejections (429 over quota/queue, 503 model unavailable or Triton queue full).
      - record: headct:predict_rejections:ratio_rate5m
        expr: |-
          (
            sum by (namespace, job) (rate(headct_requests_total{ {{- $P -}}, status=~"429|503"}[5m]))
            or
            sum by (namespace, job) (rate(headct_requests_total{ {{- $P -}} }[5m])) * 0
          )
          /
          sum by (namespace, job) (rate(headct_requests_total{ {{- $P -}} }[5m]))
      - record: headct:rejections:rate5m
        expr: sum by (namespace, job, code) (rate(headct_rejections_total{ {{- $G -}} }[5m]))
      - record: headct:triton_batch_size:avg_rate5m
        expr: |-
          sum by (namespace, job) (rate(nv_inference_count{ {{- $T -}} }[5m]))
          /
          sum by (namespace, job) (rate(nv_inference_exec_count{ {{- $T -}} }[5m]))
      - record: headct:triton_request_duration_seconds:avg_rate5m
        expr: |-
          sum by (namespace, job) (rate(nv_inference_request_duration_us{ {{- $T -}} }[5m])) / 1e6
          /
          sum by (namespace, job) (rate(nv_inference_request_success{ {{- $T -}} }[5m]))
  - name: headct-drift.rules
    interval: 5m
    rules:
      # Share of scans whose probability for a finding is >= 0.5, over 1 h and over 1 d.
      - record: headct:finding_positive:ratio_rate1h
        expr: |-
          1 - sum by (namespace, job, finding) (rate(headct_finding_probability_bucket{ {{- $G -}}, le="0.5"}[1h]))
          / sum by (namespace, job, finding) (rate(headct_finding_probability_count{ {{- $G -}} }[1h]))
      - record: headct:finding_positive:ratio_rate1d
        expr: |-
          1 - sum by (namespace, job, finding) (rate(headct_finding_probability_bucket{ {{- $G -}}, le="0.5"}[1d]))
          / sum by (namespace, job, finding) (rate(headct_finding_probability_count{ {{- $G -}} }[1d]))
      - record: headct:finding_predictions:increase1h
        expr: sum by (namespace, job, finding) (increase(headct_finding_probability_count{ {{- $G -}} }[1h]))
      # In the drift group, after the records it reads: rule groups run independently, so an alert in
      # another group would see these records from one evaluation earlier or later, at random.
      - alert: HeadCTFindingDrift
        expr: |-
          abs(headct:finding_positive:ratio_rate1h{ {{- $G -}} } - headct:finding_positive:ratio_rate1d{ {{- $G -}} }) > {{ $th.findingDrift }}
          and on (namespace, job, finding)
          headct:finding_predictions:increase1h{ {{- $G -}} } >= {{ $th.findingDriftMinRequests }}
        for: 2h
        labels:
          {{- include "headct.alertLabels" (dict "ctx" . "severity" "warning" "component" "model") | nindent 10 }}
        annotations:
          summary: 'Positive share of {{`{{ $labels.finding }}`}} moved by {{`{{ $value | humanizePercentage }}`}}'
          description: 'The share of scans scored >= 0.5 for {{`{{ $labels.finding }}`}} in the last hour differs from that of the last day by more than {{ $th.findingDrift }}, for 2 hours. Check the input population and the scanners before the model.'
          runbook_url: {{ $runbook }}#headctfindingdrift
  - name: headct.alerts
    rules:
      - alert: HeadCTGatewayDown
        expr: absent(up{ {{- $G -}} } == 1)
        for: 5m
        labels:
          {{- include "headct.alertLabels" (dict "ctx" . "severity" "critical" "component" "gateway") | nindent 10 }}
        annotations:
          summary: 'No HeadCT gateway pod is up in {{ $ns }}'
          description: 'Prometheus has scraped no healthy gateway target (job {{ include "headct.gateway.job" . }}) for 5 minutes; the API is down.'
          runbook_url: {{ $runbook }}#headctgatewaydown
      - alert: HeadCTTritonDown
        expr: absent(up{ {{- $Tup -}} } == 1)
        for: 5m
        labels:
          {{- include "headct.alertLabels" (dict "ctx" . "severity" "critical" "component" "triton") | nindent 10 }}
        annotations:
          summary: 'No Triton pod is up in {{ $ns }}'
          description: 'Prometheus has scraped no healthy Triton metrics target (job {{ include "headct.triton.job" . }}) for 5 minutes; predictions fail.'
          runbook_url: {{ $runbook }}#headcttritondown
      - alert: HeadCTModelNotReady
        expr: max by (namespace, job, pod) (headct_model_ready{ {{- $G -}} }) == 0
        for: 10m
        labels:
          {{- include "headct.alertLabels" (dict "ctx" . "severity" "warning" "component" "triton") | nindent 10 }}
        annotations:
          summary: 'Gateway {{`{{ $labels.pod }}`}} sees model {{ .Values.modelName }} not ready'
          description: 'The gateway pod has reported the Triton model {{ .Values.modelName }} not ready for 10 minutes (it answers 503 model_unavailable).'
          runbook_url: {{ $runbook }}#headctmodelnotready
      - alert: HeadCTPredictErrorRatioHigh
        expr: headct:predict_errors:ratio_rate5m{ {{- $G -}} } > {{ $th.errorRatio }}
        for: 10m
        labels:
          {{- include "headct.alertLabels" (dict "ctx" . "severity" "critical" "component" "gateway") | nindent 10 }}
        annotations:
          summary: '{{`{{ $value | humanizePercentage }}`}} of predictions fail with a server error'
          description: 'More than {{ $th.errorRatio }} of POST /v1/predict requests answered 500/502/504 over 5 minutes, for 10 minutes.'
          runbook_url: {{ $runbook }}#headctpredicterrorratiohigh
      - alert: HeadCTPredictRejectionRatioHigh
        expr: headct:predict_rejections:ratio_rate5m{ {{- $G -}} } > {{ $th.rejectionRatio }}
        for: 15m
        labels:
          {{- include "headct.alertLabels" (dict "ctx" . "severity" "warning" "component" "gateway") | nindent 10 }}
        annotations:
          summary: '{{`{{ $value | humanizePercentage }}`}} of predictions are turned away (429/503)'
          description: 'More than {{ $th.rejectionRatio }} of POST /v1/predict requests were rejected for capacity over 5 minutes, for 15 minutes.'
          runbook_url: {{ $runbook }}#headctpredictrejectionratiohigh
      - alert: HeadCTPredictLatencyHigh
        expr: headct:request_duration_seconds:p95_rate5m{ {{- $P -}} } > {{ $th.latencyP95Seconds }}
        for: 15m
        labels:
          {{- include "headct.alertLabels" (dict "ctx" . "severity" "warning" "component" "gateway") | nindent 10 }}
        annotations:
          summary: 'Predict p95 latency is {{`{{ $value | humanizeDuration }}`}}'
          description: 'The 95th percentile of POST /v1/predict latency has been above {{ $th.latencyP95Seconds }} s for 15 minutes.'
          runbook_url: {{ $runbook }}#headctpredictlatencyhigh
      - alert: HeadCTStatLatencyHigh
        expr: headct:prediction_duration_seconds:p95_rate5m{ {{- $G -}}, lane="stat"} > {{ $th.statLatencyP95Seconds }}
        for: 5m
        labels:
          {{- include "headct.alertLabels" (dict "ctx" . "severity" "critical" "component" "gateway") | nindent 10 }}
        annotations:
          summary: 'STAT prediction p95 latency is {{`{{ $value | humanizeDuration }}`}}'
          description: 'The 95th percentile of STAT (emergency) prediction latency has been above {{ $th.statLatencyP95Seconds }} s for 5 minutes.'
          runbook_url: {{ $runbook }}#headctstatlatencyhigh
      - alert: HeadCTTritonQueueBacklog
        expr: avg by (namespace, job) (headct:triton_queue_compute:ratio{ {{- $Tup -}} }) > {{ $th.queueComputeRatio }}
        for: 15m
        labels:
          {{- include "headct.alertLabels" (dict "ctx" . "severity" "warning" "component" "triton") | nindent 10 }}
        annotations:
          summary: 'Triton requests queue {{`{{ $value | printf "%.1f" }}`}}x longer than they compute'
          description: 'The average queue:compute ratio of the Triton pods has been above {{ $th.queueComputeRatio }} for 15 minutes; autoscaling is not keeping up or is off.'
          runbook_url: {{ $runbook }}#headcttritonqueuebacklog
      - alert: HeadCTTritonInferenceFailures
        expr: sum by (namespace, job, reason) (rate(nv_inference_request_failure{ {{- $T -}}, reason!~"REJECTED|CANCELED"}[5m])) > 0
        for: 10m
        labels:
          {{- include "headct.alertLabels" (dict "ctx" . "severity" "warning" "component" "triton") | nindent 10 }}
        annotations:
          summary: 'Triton inference failures ({{`{{ $labels.reason }}`}})'
          description: 'Triton has reported failed inferences of {{ .Values.modelName }} (reason {{`{{ $labels.reason }}`}}) for 10 minutes.'
          runbook_url: {{ $runbook }}#headcttritoninferencefailures
      {{- if or .Values.gateway.autoscaling.enabled .Values.triton.autoscaling.enabled }}
      - alert: HeadCTAutoscalerAtMax
        expr: |-
          kube_horizontalpodautoscaler_status_current_replicas{namespace={{ $ns | quote }}, horizontalpodautoscaler=~{{ printf "%s|%s" (include "headct.gateway.fullname" .) (include "headct.triton.fullname" .) | quote }}}
          >=
          kube_horizontalpodautoscaler_spec_max_replicas{namespace={{ $ns | quote }}, horizontalpodautoscaler=~{{ printf "%s|%s" (include "headct.gateway.fullname" .) (include "headct.triton.fullname" .) | quote }}}
        for: 30m
        labels:
          {{- include "headct.alertLabels" (dict "ctx" . "severity" "warning" "component" "autoscaling") | nindent 10 }}
        annotations:
          summary: 'Autoscaler {{`{{ $labels.horizontalpodautoscaler }}`}} has been at its maximum for 30 minutes'
          description: 'The HorizontalPodAutoscaler cannot add pods; raise maxReplicas or capacity (needs kube-state-metrics).'
          runbook_url: {{ $runbook }}#headctautoscaleratmax
      {{- end }}
{{- end -}}

{{- define "headct.alertLabels" -}}
severity: {{ .severity }}
component: {{ .component }}
{{- with .ctx.Values.monitoring.prometheusRule.alertLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}
