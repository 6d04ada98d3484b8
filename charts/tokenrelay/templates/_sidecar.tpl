{{/*
Templates for adding tokenrelay to another chart's pod (mode: sidecar).

Add this chart as a dependency of your chart, set `tokenrelay.mode: sidecar` in your
values, and call these templates with the subchart's context, `.Subcharts.tokenrelay`
(use the alias as the key if you aliased the dependency):

  template:
    metadata:
      labels:
        {{- include "tokenrelay.sidecar.podLabels" .Subcharts.tokenrelay | nindent 8 }}
      annotations:
        {{- include "tokenrelay.sidecar.podAnnotations" .Subcharts.tokenrelay | nindent 8 }}
    spec:
      {{- with include "tokenrelay.sidecar.initContainers" .Subcharts.tokenrelay }}
      initContainers:
        {{- . | nindent 8 }}
      {{- end }}
      containers:
        - name: app
          ...
          {{- with include "tokenrelay.sidecar.tokenSinksVolumeMounts" .Subcharts.tokenrelay }}
          volumeMounts:
            {{- . | nindent 12 }}
          {{- end }}
        {{- with include "tokenrelay.sidecar.containers" .Subcharts.tokenrelay }}
        {{- . | nindent 8 }}
        {{- end }}
      volumes:
        {{- include "tokenrelay.sidecar.volumes" .Subcharts.tokenrelay | nindent 8 }}

The subchart itself renders the ConfigMap these containers mount, and the optional
PodMonitor, PrometheusRule and dashboard. See examples/app-with-sidecar.
*/}}

{{- define "tokenrelay.sidecar.assert" -}}
{{- if not (include "tokenrelay.isSidecar" .) }}
{{- fail "the tokenrelay.sidecar.* templates need the tokenrelay subchart in sidecar mode: set tokenrelay.mode=sidecar in your values" }}
{{- end }}
{{- include "tokenrelay.validate" . }}
{{- end }}

{{/*
Init containers to add to the app's pod: the tokenrelay native sidecar when
sidecar.native is true, nothing otherwise. Put it before init containers that call the
upstream through tokenrelay.
*/}}
{{- define "tokenrelay.sidecar.initContainers" -}}
{{- include "tokenrelay.sidecar.assert" . }}
{{- if .Values.sidecar.native -}}
- {{ include "tokenrelay.container" . | nindent 2 | trim }}
{{- end }}
{{- end }}

{{/*
Containers to add beside the app: the classic tokenrelay sidecar when sidecar.native is
false, nothing otherwise.
*/}}
{{- define "tokenrelay.sidecar.containers" -}}
{{- include "tokenrelay.sidecar.assert" . }}
{{- if not .Values.sidecar.native -}}
- {{ include "tokenrelay.container" . | nindent 2 | trim }}
{{- end }}
{{- end }}

{{/*
Volumes the tokenrelay container mounts: its config, its secret files and its state.
*/}}
{{- define "tokenrelay.sidecar.volumes" -}}
{{- include "tokenrelay.sidecar.assert" . }}
{{- include "tokenrelay.volumes" . }}
{{- end }}

{{/*
Volume mounts for the app's container: the token sink volume, read-only, at
tokenSinks.mountPath (when tokenSinks.enabled), else nothing. The app reads the files
that credentials' `sinks` name there.
*/}}
{{- define "tokenrelay.sidecar.tokenSinksVolumeMounts" -}}
{{- include "tokenrelay.sidecar.assert" . }}
{{- if .Values.tokenSinks.enabled -}}
- name: tokenrelay-tokens
  mountPath: {{ .Values.tokenSinks.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
Pod annotations: restart the pod when the tokenrelay config changes (configReload:
restart); none when tokenrelay watches its config (configReload: watch).
*/}}
{{- define "tokenrelay.sidecar.podAnnotations" -}}
{{- if eq (include "tokenrelay.configReload" .) "restart" }}
checksum/tokenrelay-config: {{ include "tokenrelay.configChecksum" . }}
{{- end }}
{{- end }}

{{/*
Pod labels: what the PodMonitor selects by default.
*/}}
{{- define "tokenrelay.sidecar.podLabels" -}}
tokenrelay-sidecar: {{ include "tokenrelay.fullname" . }}
{{- end }}
