{{/*
The release's full name, a DNS label of at most 63 characters (Service names are):
dots become dashes, and a longer name is cut and ends in a hash of the whole name,
so two long release names never share objects.
*/}}
{{- define "nexo.fullname" -}}
{{- $name := printf "%s-%s" .Release.Name .Chart.Name -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- $name = .Release.Name -}}
{{- end -}}
{{- $name = replace "." "-" $name -}}
{{- if le (len $name) 63 -}}
{{- $name -}}
{{- else -}}
{{- /* 63 less 8 hash digits and a dash */ -}}
{{- printf "%s-%s" (trunc 54 $name | trimSuffix "-") (sha256sum $name | trunc 8) -}}
{{- end -}}
{{- end -}}

{{/*
`<fullname>-<suffix>` (call as `include "nexo.suffixedName" (list . "operator")`),
at most 63 characters: when longer, the full name is cut and a hash of the whole
name goes before the suffix (`<cut fullname>-<hash>-<suffix>`), as the operator
shortens the names it derives from a pool.
*/}}
{{- define "nexo.suffixedName" -}}
{{- $base := include "nexo.fullname" (index . 0) -}}
{{- $suffix := index . 1 -}}
{{- $name := printf "%s-%s" $base $suffix -}}
{{- if le (len $name) 63 -}}
{{- $name -}}
{{- else -}}
{{- /* 63 less the suffix, 8 hash digits and 2 dashes */ -}}
{{- $keep := int (sub 53 (len $suffix)) -}}
{{- printf "%s-%s-%s" (trunc $keep $base | trimSuffix "-") (sha256sum $name | trunc 8) $suffix -}}
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

{{/*
An image reference: repository:tag, the tag defaulting to the appVersion; with a
digest, repository@digest, or repository:tag@digest when a tag is given.
*/}}
{{- define "nexo.image" -}}
{{- if .image.digest -}}
{{- if .image.tag -}}
{{- printf "%s:%s@%s" .image.repository .image.tag .image.digest -}}
{{- else -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- end -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (default .appVersion .image.tag) -}}
{{- end -}}
{{- end -}}
