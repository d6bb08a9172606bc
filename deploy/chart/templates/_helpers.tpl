{{- define "sis.name" -}}{{ .Chart.Name | trunc 63 | trimSuffix "-" }}{{- end -}}

{{- define "sis.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "sis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sis.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sis.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{ include "sis.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "sis.secretName" -}}
{{- .Values.secrets.existingSecret | default (include "sis.fullname" .) -}}
{{- end -}}

{{/* SIGTERM → readiness false, serving for the delay, then the drain: the kubelet must wait for both. */}}
{{- define "sis.terminationGracePeriodSeconds" -}}
{{- add .Values.server.shutdownDelaySeconds .Values.http.shutdownGraceSeconds .Values.terminationGraceMarginSeconds -}}
{{- end -}}

{{- define "sis.sharedClaim" -}}
{{- .Values.sharedStore.existingClaim | default (printf "%s-shared" (include "sis.fullname" .)) -}}
{{- end -}}
