{{/*
Chart name, truncated to the 63 characters Kubernetes names allow.
*/}}
{{- define "tokenrelay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: RELEASE-NAME unless the release name already contains the
chart name. Truncated to 63 characters.
*/}}
{{- define "tokenrelay.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, as used by the helm.sh/chart label.
*/}}
{{- define "tokenrelay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "tokenrelay.labels" -}}
helm.sh/chart: {{ include "tokenrelay.chart" . }}
{{ include "tokenrelay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: proxy
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels (immutable for a Deployment: keep them minimal).
*/}}
{{- define "tokenrelay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tokenrelay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Name of the ServiceAccount to use.
*/}}
{{- define "tokenrelay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tokenrelay.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Container image reference: repository@digest when a digest is set, else repository:tag.
*/}}
{{- define "tokenrelay.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}
{{- end }}

{{/*
Fixed paths inside the container.
*/}}
{{- define "tokenrelay.configDir" -}}/etc/tokenrelay{{- end }}
{{- define "tokenrelay.configPath" -}}/etc/tokenrelay/config.yaml{{- end }}
{{- define "tokenrelay.secretsDir" -}}/run/secrets/tokenrelay{{- end }}

{{/*
Non-empty when a credential item keeps a refresh token that must be bootstrapped once
(authorize --code or seed): grant refresh_token, or no grant and no preset whose grant is
another one (the jwt_bearer presets need no bootstrap).
*/}}
{{- define "tokenrelay.needsBootstrap" -}}
{{- if .grant -}}
{{- if eq (toString .grant) "refresh_token" }}true{{ end -}}
{{- else if not (has (toString .provider) (list "google_service_account" "salesforce_jwt")) -}}
true
{{- end -}}
{{- end }}

{{- define "tokenrelay.isSidecar" -}}
{{- if eq .Values.mode "sidecar" }}true{{ end }}
{{- end }}

{{/*
Name of the container port of the admin listener. In sidecar mode it shares the pod with
the app's ports, so it carries a prefix.
*/}}
{{- define "tokenrelay.adminPortName" -}}
{{- if include "tokenrelay.isSidecar" . }}relay-admin{{ else }}admin{{ end }}
{{- end }}

{{/*
Secret files the container mounts, as a YAML list of
{credential, upstream, configKey, secretName, secretKey, path}; path is relative to
secretsDir. Projected without subPath, so rotated keys and certificates reach the files.
*/}}
{{- define "tokenrelay.secretFiles" -}}
{{- $files := list }}
{{- $refs := list (list "clientSecretRef" "client_secret_file" "client-secret") (list "passwordRef" "password_file" "password") (list "tokenRef" "token_file" "token") (list "clientAssertionKeyRef" "client_assertion_key_file" "client-assertion-key.pem") (list "assertionKeyRef" "assertion_key_file" "assertion-key.pem") (list "serviceAccountRef" "service_account_file" "service-account.json") (list "clientCertRef" "client_cert_file" "client.crt") (list "clientKeyRef" "client_key_file" "client.key") }}
{{- range $up := .Values.upstreams }}
{{- range $r := list (list "clientCertRef" "client_cert_file" "client.crt") (list "clientKeyRef" "client_key_file" "client.key") }}
{{- $ref := index $up (index $r 0) }}
{{- if $ref }}
{{- $files = append $files (dict "credential" "" "upstream" $up.name "configKey" (index $r 1) "secretName" $ref.name "secretKey" $ref.key "path" (printf "upstreams/%s/%s" $up.name (index $r 2))) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $cred := .Values.credentials }}
{{- range $r := $refs }}
{{- $ref := index $cred (index $r 0) }}
{{- if $ref }}
{{- $files = append $files (dict "credential" $cred.name "configKey" (index $r 1) "secretName" $ref.name "secretKey" $ref.key "path" (printf "credentials/%s/%s" $cred.name (index $r 2))) }}
{{- end }}
{{- end }}
{{- end }}
{{- with .Values.store.passwordSecretRef }}
{{- if .name }}
{{- $files = append $files (dict "credential" "" "configKey" "password_file" "secretName" .name "secretKey" .key "path" "store/password") }}
{{- end }}
{{- end }}
{{- with .Values.store.encryptionKeySecretRef }}
{{- if .name }}
{{- $files = append $files (dict "credential" "" "configKey" "encryption_key_file" "secretName" .name "secretKey" .key "path" "store/encryption-key") }}
{{- end }}
{{- end }}
{{- with .Values.admin.tokenSecretRef }}
{{- if .name }}
{{- $files = append $files (dict "credential" "" "admin" true "configKey" "token_file" "secretName" .name "secretKey" .key "path" "admin/token") }}
{{- end }}
{{- end }}
{{- toYaml $files }}
{{- end }}

{{/*
Fail early with a clear message on values the schema cannot check.
*/}}
{{- define "tokenrelay.validate" -}}
{{- $credNames := list }}
{{- range .Values.credentials }}
{{- if has .name $credNames }}
{{- fail (printf "credentials: the name %q is used twice" .name) }}
{{- end }}
{{- $credNames = append $credNames .name }}
{{- end }}
{{- $ports := list (int .Values.admin.port) }}
{{- $upNames := list }}
{{- range .Values.upstreams }}
{{- if has .name $upNames }}
{{- fail (printf "upstreams: the name %q is used twice" .name) }}
{{- end }}
{{- $upNames = append $upNames .name }}
{{- if has (int .port) $ports }}
{{- fail (printf "upstreams.%s.port: port %d is already used by the admin listener or another upstream" .name (int .port)) }}
{{- end }}
{{- $ports = append $ports (int .port) }}
{{- if and .credential (not (has .credential $credNames)) }}
{{- fail (printf "upstreams.%s.credential: no credential named %q in credentials" .name .credential) }}
{{- end }}
{{- end }}
{{- if and (eq .Values.store.type "redis") (not .Values.store.redis.urlSecretRef.name) }}
{{- fail "store.redis.urlSecretRef.name: the redis store needs an existing Secret holding its URL" }}
{{- end }}
{{- if and (eq .Values.store.type "etcd") (not .Values.store.etcd.endpoints) }}
{{- fail "store.etcd.endpoints: the etcd store needs at least one endpoint" }}
{{- end }}
{{- if and (not (include "tokenrelay.isSidecar" .)) (eq .Values.store.type "file") (gt (int .Values.replicaCount) 1) }}
{{- fail "replicaCount: the file store holds a credential for one process only; use store.type=redis or etcd to run more than one replica" }}
{{- end }}
{{- $grace := include "tokenrelay.durationSeconds" (.Values.runtime.shutdown_grace | default "15s") | int }}
{{- if and (not (include "tokenrelay.isSidecar" .)) (le (int .Values.terminationGracePeriodSeconds) $grace) }}
{{- fail (printf "terminationGracePeriodSeconds: %d must exceed runtime.shutdown_grace (%s), or in-flight requests are cut off at shutdown" (int .Values.terminationGracePeriodSeconds) (toString .Values.runtime.shutdown_grace)) }}
{{- end }}
{{- include "tokenrelay.validateSinks" . }}
{{- if and (include "tokenrelay.isSidecar" .) .Values.sidecar.native (not (semverCompare ">=1.29.0-0" .Capabilities.KubeVersion.Version)) }}
{{- fail (printf "sidecar.native: native sidecars need Kubernetes 1.29 or later (cluster: %s); set sidecar.native=false" .Capabilities.KubeVersion.Version) }}
{{- end }}
{{- end }}

{{/*
Token sinks: the shared volume is for the app's containers, so sidecar mode only; every
sink file is in a directory the container can write (the root filesystem is read-only):
tokenSinks.mountPath, or under one of extraVolumeMounts.
*/}}
{{- define "tokenrelay.validateSinks" -}}
{{- $sinks := .Values.tokenSinks }}
{{- if and $sinks.enabled (not (include "tokenrelay.isSidecar" .)) }}
{{- fail "tokenSinks.enabled: the token sink volume is shared with the app's containers, which only sidecar mode has (mode: sidecar); in standalone mode mount a volume with extraVolumes/extraVolumeMounts" }}
{{- end }}
{{- range $cred := .Values.credentials }}
{{- range $i, $sink := $cred.sinks }}
{{- $dir := dir (toString $sink.file) }}
{{- $writable := and $sinks.enabled (eq $dir (clean $sinks.mountPath)) }}
{{- range $.Values.extraVolumeMounts }}
{{- if and (not .readOnly) (or (eq $dir (clean .mountPath)) (hasPrefix (printf "%s/" (clean .mountPath)) $dir)) }}
{{- $writable = true }}
{{- end }}
{{- end }}
{{- if not $writable }}
{{- if $sinks.enabled }}
{{- fail (printf "credentials.%s.sinks[%d].file: %s is not in tokenSinks.mountPath (%s), the only directory the tokenrelay container can write besides extraVolumeMounts" $cred.name $i (toString $sink.file) $sinks.mountPath) }}
{{- else }}
{{- fail (printf "credentials.%s.sinks[%d].file: the tokenrelay container's root filesystem is read-only; set tokenSinks.enabled=true (mountPath %s) or mount a writable volume at %s with extraVolumes/extraVolumeMounts" $cred.name $i $sinks.mountPath $dir) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The tokenrelay configuration file (config.yaml), rendered from values. toYaml sorts
keys, so the output is stable and its checksum changes only when the config does.
*/}}
{{- define "tokenrelay.config" -}}
{{- $bind := ternary "127.0.0.1" "0.0.0.0" (eq .Values.mode "sidecar") }}
{{- $secretsDir := include "tokenrelay.secretsDir" . }}
{{- $files := include "tokenrelay.secretFiles" . | fromYamlArray }}
{{- /* store */}}
{{- $store := dict "type" .Values.store.type }}
{{- if eq .Values.store.type "file" }}
{{- $_ := set $store "path" .Values.store.file.path }}
{{- else if eq .Values.store.type "redis" }}
{{- $_ := set $store "url" "${TOKENRELAY_REDIS_URL}" }}
{{- else if eq .Values.store.type "etcd" }}
{{- $_ := set $store "endpoints" .Values.store.etcd.endpoints }}
{{- end }}
{{- range $files }}
{{- if and (not .credential) (not .upstream) (not .admin) }}
{{- $_ := set $store .configKey (printf "%s/%s" $secretsDir .path) }}
{{- end }}
{{- end }}
{{- $store = merge $store (deepCopy .Values.store.extraConfig) }}
{{- /* credentials */}}
{{- $credentials := dict }}
{{- range .Values.credentials }}
{{- $_ := set $credentials .name (omit (deepCopy .) "name" "clientSecretRef" "passwordRef" "tokenRef" "clientAssertionKeyRef" "assertionKeyRef" "serviceAccountRef" "clientCertRef" "clientKeyRef") }}
{{- end }}
{{- range $files }}
{{- if .credential }}
{{- $_ := set (index $credentials .credential) .configKey (printf "%s/%s" $secretsDir .path) }}
{{- end }}
{{- end }}
{{- /* upstreams */}}
{{- $upstreams := dict }}
{{- range .Values.upstreams }}
{{- $u := omit (deepCopy .) "name" "port" "clientCertRef" "clientKeyRef" }}
{{- if not (hasKey $u "listen") }}
{{- $_ := set $u "listen" (printf "%s:%d" $bind (int .port)) }}
{{- end }}
{{- $_ := set $upstreams .name $u }}
{{- end }}
{{- range $files }}
{{- if .upstream }}
{{- $_ := set (index $upstreams .upstream) .configKey (printf "%s/%s" $secretsDir .path) }}
{{- end }}
{{- end }}
{{- $admin := dict "listen" (printf "0.0.0.0:%d" (int .Values.admin.port)) }}
{{- range $files }}
{{- if .admin }}
{{- $_ := set $admin .configKey (printf "%s/%s" $secretsDir .path) }}
{{- end }}
{{- end }}
{{- $config := dict "admin" $admin "store" $store "credentials" $credentials "upstreams" $upstreams }}
{{- with .Values.log }}
{{- $_ := set $config "log" (deepCopy .) }}
{{- end }}
{{- with .Values.runtime }}
{{- $_ := set $config "runtime" (deepCopy .) }}
{{- end }}
{{- $config = merge $config (deepCopy .Values.extraConfig) }}
{{- toYaml $config }}
{{- end }}

{{/*
Whole seconds in a duration such as 15s, 1m30s, 250ms or a bare number of seconds.
*/}}
{{- define "tokenrelay.durationSeconds" -}}
{{- $s := toString . }}
{{- $total := 0.0 }}
{{- if regexMatch "^[0-9]+$" $s }}
{{- $total = float64 $s }}
{{- else }}
{{- range regexFindAll "[0-9.]+(ms|h|m|s)" $s -1 }}
{{- $n := regexFind "^[0-9.]+" . }}
{{- $unit := trimPrefix $n . }}
{{- $scale := get (dict "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0) $unit }}
{{- $total = addf $total (mulf (float64 $n) $scale) }}
{{- end }}
{{- end }}
{{- ceil $total | int }}
{{- end }}

{{- define "tokenrelay.configChecksum" -}}
{{- include "tokenrelay.config" . | sha256sum }}
{{- end }}

{{/*
HTTP GET probe on the admin port. Argument: (list $ctx $probeValues path).
*/}}
{{- define "tokenrelay.probe" -}}
{{- $ctx := index . 0 }}
{{- $p := index . 1 -}}
httpGet:
  path: {{ index . 2 }}
  port: {{ include "tokenrelay.adminPortName" $ctx }}
  scheme: HTTP
{{- with $p.initialDelaySeconds }}
initialDelaySeconds: {{ . }}
{{- end }}
periodSeconds: {{ $p.periodSeconds }}
timeoutSeconds: {{ $p.timeoutSeconds }}
failureThreshold: {{ $p.failureThreshold }}
{{- with $p.successThreshold }}
successThreshold: {{ . }}
{{- end }}
{{- end }}

{{/*
The tokenrelay container, shared by the standalone Deployment and the sidecar templates.
*/}}
{{- define "tokenrelay.container" -}}
{{- $sidecar := include "tokenrelay.isSidecar" . }}
{{- $native := and $sidecar .Values.sidecar.native -}}
name: {{ ternary .Values.sidecar.containerName "tokenrelay" (not (empty $sidecar)) }}
image: {{ include "tokenrelay.image" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
{{- if $native }}
# A native sidecar: an init container that keeps running beside the app containers.
restartPolicy: Always
{{- end }}
args:
  - run
  - --config
  - {{ include "tokenrelay.configPath" . }}
  {{- if eq (include "tokenrelay.configReload" .) "watch" }}
  - --watch-config
  {{- end }}
  {{- range .Values.extraArgs }}
  - {{ . | quote }}
  {{- end }}
ports:
  - name: {{ include "tokenrelay.adminPortName" . }}
    containerPort: {{ .Values.admin.port }}
    protocol: TCP
  {{- if not $sidecar }}
  {{- range .Values.upstreams }}
  - name: {{ printf "proxy-%d" (int .port) }}
    containerPort: {{ .port }}
    protocol: TCP
  {{- end }}
  {{- end }}
{{- if or (eq .Values.store.type "redis") .Values.env }}
env:
  {{- if eq .Values.store.type "redis" }}
  - name: TOKENRELAY_REDIS_URL
    valueFrom:
      secretKeyRef:
        name: {{ .Values.store.redis.urlSecretRef.name }}
        key: {{ .Values.store.redis.urlSecretRef.key }}
  {{- end }}
  {{- with .Values.env }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
{{- with .Values.envFrom }}
envFrom:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if or $native .Values.startupProbe.enabled }}
startupProbe:
  {{- include "tokenrelay.probe" (list . .Values.startupProbe "/readyz") | nindent 2 }}
{{- end }}
{{- if .Values.livenessProbe.enabled }}
livenessProbe:
  {{- include "tokenrelay.probe" (list . .Values.livenessProbe "/healthz") | nindent 2 }}
{{- end }}
{{- if .Values.readinessProbe.enabled }}
readinessProbe:
  {{- include "tokenrelay.probe" (list . .Values.readinessProbe "/readyz") | nindent 2 }}
{{- end }}
{{- if and $sidecar (not .Values.sidecar.native) (gt (int .Values.sidecar.preStopSleepSeconds) 0) }}
lifecycle:
  preStop:
    sleep:
      seconds: {{ int .Values.sidecar.preStopSleepSeconds }}
{{- end }}
{{- with .Values.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumeMounts:
  - name: tokenrelay-config
    mountPath: {{ include "tokenrelay.configDir" . }}
    readOnly: true
  {{- if include "tokenrelay.secretFiles" . | fromYamlArray }}
  - name: tokenrelay-secrets
    mountPath: {{ include "tokenrelay.secretsDir" . }}
    readOnly: true
  {{- end }}
  {{- if eq .Values.store.type "file" }}
  - name: tokenrelay-state
    mountPath: {{ .Values.store.file.path }}
  {{- end }}
  {{- if .Values.tokenSinks.enabled }}
  - name: tokenrelay-tokens
    mountPath: {{ .Values.tokenSinks.mountPath }}
  {{- end }}
  {{- with .Values.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/*
Pod volumes of the tokenrelay container (a YAML list).
*/}}
{{- define "tokenrelay.volumes" -}}
- name: tokenrelay-config
  configMap:
    name: {{ include "tokenrelay.fullname" . }}
{{- with include "tokenrelay.secretFiles" . | fromYamlArray }}
- name: tokenrelay-secrets
  projected:
    {{- /* Group-readable only when the pod's fsGroup owns the files (standalone mode);
    a sidecar cannot rely on the app pod's fsGroup. */}}
    defaultMode: {{ ternary "0440" "0444" (and (not (include "tokenrelay.isSidecar" $)) (not (empty $.Values.podSecurityContext.fsGroup))) }}
    sources:
      {{- range . }}
      - secret:
          name: {{ .secretName }}
          items:
            - key: {{ .secretKey }}
              path: {{ .path }}
      {{- end }}
{{- end }}
{{- if eq .Values.store.type "file" }}
- name: tokenrelay-state
  {{- if .Values.persistence.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.persistence.existingClaim }}
  {{- else }}
  emptyDir:
    {{- with .Values.persistence.emptyDir.medium }}
    medium: {{ . }}
    {{- end }}
    {{- with .Values.persistence.emptyDir.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
  {{- end }}
{{- end }}
{{- if .Values.tokenSinks.enabled }}
- name: tokenrelay-tokens
  emptyDir:
    {{- with .Values.tokenSinks.medium }}
    medium: {{ . }}
    {{- end }}
    {{- with .Values.tokenSinks.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Label matchers (each followed by a comma) that scope the alerts to this release's
series: the namespace, and the job the ServiceMonitor (service name) or PodMonitor
(namespace/name) gives its targets. metrics.prometheusRule.selector overrides them.
*/}}
{{- define "tokenrelay.metricsSelector" -}}
{{- with .Values.metrics.prometheusRule.selector }}
{{- printf "%s," (trimSuffix "," .) }}
{{- else }}
{{- $job := include "tokenrelay.fullname" . }}
{{- if include "tokenrelay.isSidecar" . }}
{{- $job = printf "%s/%s" (.Values.metrics.podMonitor.namespace | default .Release.Namespace) $job }}
{{- end }}
{{- printf "namespace=%q,job=%q," .Release.Namespace $job }}
{{- end }}
{{- end }}

{{/*
How config changes reach running pods: "restart" (checksum annotation) or "watch"
(--watch-config, no annotation).
*/}}
{{- define "tokenrelay.configReload" -}}
{{- $mode := .Values.configReload | default "restart" -}}
{{- if not (has $mode (list "restart" "watch")) -}}
{{- fail (printf "configReload must be restart or watch, not %q" $mode) -}}
{{- end -}}
{{- $mode -}}
{{- end }}
