{{/* Labels on every object: the same selector label as deploy/kubernetes, plus the values'. */}}
{{- define "meshca.labels" -}}
app.kubernetes.io/name: meshca
{{- with .Values.labels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* metadata.labels and (when set) metadata.annotations. */}}
{{- define "meshca.meta" -}}
labels:
  {{- include "meshca.labels" . | nindent 2 }}
{{- with .Values.annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The ServiceAccount every binding names. */}}
{{- define "meshca.subject" -}}
- kind: ServiceAccount
  name: meshca
  namespace: {{ .Release.Namespace }}
{{- end }}

{{/* `key = value` lines for a map of meshca.toml settings (values as TOML via JSON). */}}
{{- define "meshca.settings" -}}
{{- range $k, $v := . }}
{{ $k }} = {{ toJson $v }}
{{- end }}
{{- end }}

{{/* The same, indented 4 under a line of the config (no blank or trailing-space lines). */}}
{{- define "meshca.settings4" -}}
{{- include "meshca.settings" . | trim | nindent 4 }}
{{- end }}
