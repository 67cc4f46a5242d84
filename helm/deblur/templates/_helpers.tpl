{{/* Names and shared snippets. */}}

{{/* 47 characters at most: KubeRay rejects RayJob names longer than that (it appends 6
     characters for clusters it creates, and RayCluster names stop at 53). */}}
{{- define "deblur.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 47 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "deblur.name" .) | trunc 47 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "deblur.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 47 | trimSuffix "-" -}}
{{- end -}}

{{- define "deblur.labels" -}}
app.kubernetes.io/name: {{ include "deblur.name" . }}
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

{{/* Whether the KubeRay autoscaler runs: asked for, and a range to scale in. min == max is a
     fixed pool, so the autoscaler would only cost a container. */}}
{{- define "deblur.autoscale" -}}
{{- if and .Values.autoscaler.enabled (lt (int .Values.workers.minReplicas) (int .Values.workers.maxReplicas)) -}}
true
{{- end -}}
{{- end -}}

{{/* Most worker actors the driver may ask for: every GPU of every pod, divided by the GPUs
     one actor takes (fractions allowed). More would only queue actors that never get a node. */}}
{{- define "deblur.maxWorkers" -}}
{{- $gpus := mulf .Values.workers.maxReplicas .Values.workers.gpusPerPod -}}
{{- $perActor := .Values.job.config.worker.gpus_per_worker | default 1.0 -}}
{{- max 1 (floor (divf $gpus $perActor) | int) -}}
{{- end -}}

{{/* Ray token authentication: every Ray process (head, workers, autoscaler, submitter) needs
     the same token. Only a reference to the Secret is rendered, never the token. */}}
{{- define "deblur.authEnv" -}}
{{- if .Values.auth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ include "deblur.authSecretName" . | quote }}, key: token}
{{- end }}
{{- end -}}

{{/* S3 for the pods that read and write images (head runs the driver, workers the model).
     Keys only by secretKeyRef; with IRSA / workload identity there are none at all. */}}
{{- define "deblur.s3Env" -}}
- name: AWS_REGION
  value: {{ .Values.s3.region | quote }}
{{- with .Values.s3.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: AWS_ACCESS_KEY_ID}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef: {name: {{ . | quote }}, key: AWS_SECRET_ACCESS_KEY}
{{- end }}
{{- end -}}

{{- define "deblur.env" -}}
{{ include "deblur.s3Env" . }}
{{- include "deblur.authEnv" . }}
{{- end -}}

{{/* The job's id and ledger root, fixed by the release so that every try of the RayJob (a
     submitter retry after the head restarted, a RayJob deleted and re-created by
     `helm upgrade`) resumes the same job instead of planning a new one and redoing every
     image. <namespace>.<release>: unique in the cluster (a namespace has no dots), and a
     valid deblur job id (letters, digits, '.', '-'; 64 characters at most). */}}
{{- define "deblur.jobId" -}}
{{- printf "%s.%s" .Release.Namespace .Release.Name | trunc 64 | trimSuffix "-" | trimSuffix "." -}}
{{- end -}}

{{- define "deblur.jobRoot" -}}
{{- default (printf "%s/_deblur/%s/" (trimSuffix "/" .Values.job.destination) (include "deblur.jobId" .)) .Values.job.jobRoot -}}
{{- end -}}

{{/* Shell-quote each argument (keys and prefixes may hold spaces). */}}
{{- define "deblur.quoteArgs" -}}
{{- range . }}{{ squote . }} {{ end -}}
{{- end -}}
