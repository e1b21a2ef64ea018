{{/* The release's full name, at most 63 characters. */}}
{{- define "nexo.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels of objects that carry no selector labels. */}}
{{- define "nexo.labels" -}}
{{ include "nexo.baseLabels" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every object, beside its selector labels when it has them. */}}
{{- define "nexo.baseLabels" -}}
app.kubernetes.io/part-of: nexo
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "nexo.operator.selector" -}}
app.kubernetes.io/name: nexo-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "nexo.serviceAccountName" -}}
{{- default (include "nexo.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* An image reference: repository:tag, the tag defaulting to the appVersion. */}}
{{- define "nexo.image" -}}
{{- printf "%s:%s" .image.repository (default .appVersion .image.tag) -}}
{{- end -}}
