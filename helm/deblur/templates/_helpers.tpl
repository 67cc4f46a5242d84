{{/* Names and shared snippets. */}}
{{- define "deblur.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "deblur.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "deblur.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "deblur.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "deblur.authSecretName" -}}
{{- default (printf "%s-ray-token" (include "deblur.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{/* Environment shared by head and workers: S3 settings, credentials by reference only,
     and Ray token authentication. */}}
{{- define "deblur.env" -}}
- name: AWS_REGION
  value: {{ .Values.s3.region | quote }}
{{- with .Values.s3.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- if .Values.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ .Values.s3.existingSecret | quote }}, key: AWS_ACCESS_KEY_ID}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ .Values.s3.existingSecret | quote }}, key: AWS_SECRET_ACCESS_KEY}
{{- end }}
{{- if .Values.auth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ include "deblur.authSecretName" . | quote }}, key: token}
{{- end }}
{{- end -}}

{{/* Shell-quote each argument (keys and prefixes may hold spaces). */}}
{{- define "deblur.quoteArgs" -}}
{{- range . }}{{ squote . }} {{ end -}}
{{- end -}}
