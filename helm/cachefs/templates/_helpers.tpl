{{/*
Helpers of the cachefs chart. Every name starts with "cachefs." so that this chart can
be a subchart of another without its helpers colliding.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "cachefs.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every resource name. At most 40 characters: KubeRay derives pod and
service names from the RayCluster's name plus suffixes such as
"-cache-nodes-worker-xxxxx", and those must stay within 63.
*/}}
{{- define "cachefs.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* chart-version, for the helm.sh/chart label. */}}
{{- define "cachefs.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select this release's pods; never change them (selectors are immutable). */}}
{{- define "cachefs.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cachefs.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "cachefs.labels" -}}
helm.sh/chart: {{ include "cachefs.chart" . }}
{{ include "cachefs.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cachefs
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "cache-node"). */}}
{{- define "cachefs.componentSelectorLabels" -}}
{{ include "cachefs.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels of one component's resources: (dict "ctx" $ "component" "cache-node"). */}}
{{- define "cachefs.componentLabels" -}}
{{ include "cachefs.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* The image every component runs. */}}
{{- define "cachefs.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The Secret holding the reader token (pods, clients, the CSI plugin), and its key. */}}
{{- define "cachefs.tokenSecretName" -}}
{{- .Values.token.existingSecret | default (printf "%s-token" (include "cachefs.fullname" .)) }}
{{- end }}

{{- define "cachefs.tokenSecretKey" -}}
{{- if .Values.token.existingSecret }}{{ .Values.token.existingSecretKey }}{{ else }}token{{ end }}
{{- end }}

{{/* The Secret holding the admin token (the bootstrap and the operator only), and its key. */}}
{{- define "cachefs.adminTokenSecretName" -}}
{{- .Values.adminToken.existingSecret | default (printf "%s-admin-token" (include "cachefs.fullname" .)) }}
{{- end }}

{{- define "cachefs.adminTokenSecretKey" -}}
{{- if .Values.adminToken.existingSecret }}{{ .Values.adminToken.existingSecretKey }}{{ else }}token{{ end }}
{{- end }}

{{/* The Secret holding Ray's own auth token (every Ray container), and its key. */}}
{{- define "cachefs.rayTokenSecretName" -}}
{{- .Values.ray.auth.existingSecret | default (printf "%s-ray-token" (include "cachefs.fullname" .)) }}
{{- end }}

{{- define "cachefs.rayTokenSecretKey" -}}
{{- if .Values.ray.auth.existingSecret }}{{ .Values.ray.auth.existingSecretKey }}{{ else }}token{{ end }}
{{- end }}

{{/* The name node certificates are checked against (clients reach nodes by pod IP). */}}
{{- define "cachefs.tlsServerName" -}}
{{- .Values.tls.serverName | default (printf "%s.%s.svc" (include "cachefs.serviceName" .) .Release.Namespace) }}
{{- end }}

{{/* The Service in front of the cache nodes, and the URL clients use. */}}
{{- define "cachefs.serviceName" -}}
{{- include "cachefs.fullname" . }}
{{- end }}

{{- define "cachefs.endpoint" -}}
{{- printf "%s://%s.%s.svc:%d" (ternary "https" "http" .Values.tls.enabled) (include "cachefs.serviceName" .) .Release.Namespace (int .Values.cache.port) }}
{{- end }}

{{/* ServiceAccount name of a component: (dict "ctx" $ "component" "head" "sa" .Values.ray.head.serviceAccount). */}}
{{- define "cachefs.serviceAccountName" -}}
{{- if .sa.create }}
{{- .sa.name | default (printf "%s-%s" (include "cachefs.fullname" .ctx) .component) }}
{{- else }}
{{- .sa.name | default "default" }}
{{- end }}
{{- end }}

{{/* Environment every component reads: how to reach the cache, and where its home is. */}}
{{- define "cachefs.clientEnv" -}}
- name: CACHEFS_ENDPOINT
  value: {{ include "cachefs.endpoint" . | quote }}
- name: CACHEFS_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "cachefs.tokenSecretName" . }}
      key: {{ include "cachefs.tokenSecretKey" . }}
- name: CACHEFS_HOME
  value: /cachefs/home
{{- if .Values.tls.enabled }}
- name: CACHEFS_CA_BUNDLE
  value: /cachefs/tls-ca/ca.crt
- name: CACHEFS_TLS_SERVER_NAME
  value: {{ include "cachefs.tlsServerName" . | quote }}
{{- end }}
{{- end }}

{{/* The admin token: for the bootstrap (`cachefs up` hands it to the nodes) and the operator only. */}}
{{- define "cachefs.adminEnv" -}}
- name: CACHEFS_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "cachefs.adminTokenSecretName" . }}
      key: {{ include "cachefs.adminTokenSecretKey" . }}
{{- end }}

{{/* Ray's token auth, on every container that runs Ray or joins it (ray.auth.enabled). */}}
{{- define "cachefs.rayAuthEnv" -}}
{{- if .Values.ray.auth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "cachefs.rayTokenSecretName" . }}
      key: {{ include "cachefs.rayTokenSecretKey" . }}
{{- end }}
{{- end }}

{{/* The CA of the nodes' certificate, for clients (tls.enabled). */}}
{{- define "cachefs.tlsCaVolume" -}}
- name: tls-ca
  secret:
    secretName: {{ .Values.tls.secretName }}
    items:
      - {key: {{ .Values.tls.caKey }}, path: ca.crt}
{{- end }}

{{/* Origin credentials, for the head and the workers only. */}}
{{- define "cachefs.originEnvFrom" -}}
envFrom:
  - secretRef:
      name: {{ .Values.origin.existingSecret }}
{{- end }}

{{/* A container security context without privileges. */}}
{{- define "cachefs.restrictedContainer" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
{{- end }}

{{/* The namespaces the operator watches; empty list when it watches all. */}}
{{- define "cachefs.operatorNamespaces" -}}
{{- if not .Values.operator.watchAllNamespaces }}
{{- toJson (uniq (prepend .Values.operator.watchNamespaces .Release.Namespace)) }}
{{- else }}
{{- toJson list }}
{{- end }}
{{- end }}

{{/* `ray start` custom resources, in the quoting KubeRay passes through to the shell. */}}
{{- define "cachefs.rayResources" -}}
{{- printf "\"%s\"" (toJson . | replace "\"" "\\\"") }}
{{- end }}
