{{/* Names and labels shared by every template. */}}

{{- define "meshfed.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "meshfed.fullname" -}}
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

{{/* A resource name with a suffix, kept within the 63-character DNS label limit. */}}
{{- define "meshfed.resourceName" -}}
{{- printf "%s-%s" (include "meshfed.fullname" .root | trunc (int (sub 62 (len .suffix))) | trimSuffix "-") .suffix }}
{{- end }}

{{- define "meshfed.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "meshfed.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: meshfed
meshfed.io/zone: {{ include "meshfed.zoneName" . | quote }}
{{- end }}

{{- define "meshfed.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshfed.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "meshfed.controllerSelectorLabels" -}}
{{ include "meshfed.selectorLabels" . }}
app.kubernetes.io/component: controller
{{- end }}

{{/*
The pods of the gateway Deployment (gateway.deployment.enabled: `meshfed gateway` replicas). Their
component differs from the controller's, so neither Deployment, PodDisruptionBudget nor
NetworkPolicy ever selects the other's pods.
*/}}
{{- define "meshfed.gatewayPodSelectorLabels" -}}
{{ include "meshfed.selectorLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{/*
Pods behind the gateway Service: the gateway Deployment's with gateway.deployment.enabled (every
Ready replica serves), else the controller's, whose `meshfed up` runs the gateway in its own
process (with highAvailability, the leader's only).
*/}}
{{- define "meshfed.gatewaySelectorLabels" -}}
{{- if .Values.gateway.deployment.enabled }}
{{- include "meshfed.gatewayPodSelectorLabels" . }}
{{- else }}
{{- include "meshfed.servingSelectorLabels" . }}
{{- end }}
{{- end }}

{{/*
Whether the gateway runs as its own Deployment; fails the render, in one line, when it cannot: the
replicas serve what the leader publishes beside the zone's state in Secrets (highAvailability).
*/}}
{{- define "meshfed.gatewayDeployment" -}}
{{- if .Values.gateway.deployment.enabled }}
{{- if not .Values.highAvailability.enabled }}
{{- fail "gateway.deployment.enabled needs highAvailability.enabled=true: set it too (the gateway pods serve the config the leader publishes beside the zone's state in Secrets)" }}
{{- end }}
{{- if eq (include "meshfed.gatewayServiceAccountName" .) (include "meshfed.serviceAccountName" .) }}
{{- fail "gateway.deployment.serviceAccount.name must name a ServiceAccount other than the controller's (serviceAccount.name), which may read the zone's CA key: set it" }}
{{- end }}
{{- true }}
{{- end }}
{{- end }}

{{/*
Pods a Service sends traffic to: the controller's; with highAvailability only the one that leads,
which labels its own pod meshfed.io/leader=true once its zone is ready (meshfed up --leader-pod;
a follower labels itself false and is Ready, so the Deployment is Available).
*/}}
{{- define "meshfed.servingSelectorLabels" -}}
{{ include "meshfed.controllerSelectorLabels" . }}
{{- if .Values.highAvailability.enabled }}
meshfed.io/leader: "true"
{{- end }}
{{- end }}

{{- define "meshfed.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "meshfed.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The gateway pods' ServiceAccount, never the controller's (which may read the zone's CA key):
gateway.deployment.serviceAccount.name, else <fullname>-gateway when serviceAccount.create, else
"default" (with serviceAccount.create=false name one, as for the controller).
*/}}
{{- define "meshfed.gatewayServiceAccountName" -}}
{{- $name := .Values.gateway.deployment.serviceAccount.name }}
{{- if .Values.serviceAccount.create }}
{{- default (include "meshfed.resourceName" (dict "root" . "suffix" "gateway")) $name }}
{{- else }}
{{- default "default" $name }}
{{- end }}
{{- end }}

{{- define "meshfed.image" -}}
{{- $repository := required "set image.repository to where you pushed the image built from gateways/Dockerfile (no image is published; see gateways/README.md)" .Values.image.repository }}
{{- printf "%s:%s" $repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "meshfed.adminTokenSecretName" -}}
{{- default (include "meshfed.resourceName" (dict "root" . "suffix" "admin-token")) .Values.adminToken.existingSecret }}
{{- end }}

{{- define "meshfed.readTokenSecretName" -}}
{{- default (include "meshfed.resourceName" (dict "root" . "suffix" "read-token")) .Values.readToken.existingSecret }}
{{- end }}

{{/* The Secret holding a highly available zone's state (meshfed up --state-secret; its pieces are <name>-<digest>). */}}
{{- define "meshfed.stateSecretName" -}}
{{- include "meshfed.resourceName" (dict "root" . "suffix" "state") }}
{{- end }}

{{/* The Secret a leader with `meshfed up --gateway-feed` publishes its gateway's config (SVID and key included) in. */}}
{{- define "meshfed.gatewayFeedSecretName" -}}
{{- printf "%s-gateway" (include "meshfed.stateSecretName" .) }}
{{- end }}

{{- define "meshfed.claimName" -}}
{{- default (include "meshfed.resourceName" (dict "root" . "suffix" "zone")) .Values.persistence.existingClaim }}
{{- end }}

{{/* The namespace mirrored imports are written to: the chart always pins one, for least privilege. */}}
{{- define "meshfed.mirrorNamespace" -}}
{{- default .Release.Namespace .Values.catalog.kubernetes.mirrorNamespace }}
{{- end }}

{{/* Where things live inside the pod. */}}
{{- define "meshfed.dataDir" -}}/var/lib/meshfed{{- end }}
{{- define "meshfed.zoneDir" -}}/var/lib/meshfed/zone{{- end }}
{{- define "meshfed.consulTokenFile" -}}/etc/meshfed/consul-token/token{{- end }}
{{- define "meshfed.consulTlsDir" -}}/etc/meshfed/consul-tls{{- end }}
{{- define "meshfed.apiTlsDir" -}}/etc/meshfed/api-tls{{- end }}

{{/*
Where the API listens in the pod: loopback unless it serves TLS (api.tls.secretName), so a plain-HTTP
API is never on the pod network. Probes and Prometheus use the metrics listener either way.
*/}}
{{- define "meshfed.apiHost" -}}
{{- if .Values.api.tls.secretName }}0.0.0.0{{ else }}127.0.0.1{{ end }}
{{- end }}

{{/* The zone name: zone.name, else the release name (already a DNS label). */}}
{{- define "meshfed.zoneName" -}}
{{- default .Release.Name .Values.zone.name }}
{{- end }}

{{/* The trust domain: zone.trustDomain, else "<zone name>.mesh". */}}
{{- define "meshfed.trustDomain" -}}
{{- default (printf "%s.mesh" (include "meshfed.zoneName" .)) .Values.zone.trustDomain }}
{{- end }}

{{/* Hardening of every container; fixed, not a value, so no values file can weaken it. */}}
{{- define "meshfed.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The pod securityContext of every pod of the chart (the container's is meshfed.containerSecurityContext). */}}
{{- define "meshfed.podSecurityContext" -}}
runAsNonRoot: true
{{- with .Values.securityContext.runAsUser }}
runAsUser: {{ . }}
{{- end }}
{{- with .Values.securityContext.runAsGroup }}
runAsGroup: {{ . }}
{{- end }}
{{- with .Values.securityContext.fsGroup }}
# Volumes and Secret files belong to this group, so the non-root user can write the zone and read them.
fsGroup: {{ . }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "meshfed.commonVolumeMounts" -}}
- name: config
  mountPath: /etc/meshfed/config
  readOnly: true
- name: admin-token
  mountPath: /etc/meshfed/admin-token
  readOnly: true
- name: read-token
  mountPath: /etc/meshfed/read-token
  readOnly: true
- name: data
  mountPath: {{ include "meshfed.dataDir" . }}
- name: tmp
  mountPath: /tmp
{{- end }}

{{/*
The host peers dial for peering, written into tokens: peering.advertiseHost, else the peering
Service's DNS name in the cluster (reachable from other namespaces of this cluster; a peer in
another cluster needs advertiseHost set to the Service's external address).
*/}}
{{- define "meshfed.peeringAdvertiseHost" -}}
{{- if .Values.peering.advertiseHost -}}
{{- .Values.peering.advertiseHost -}}
{{- else -}}
{{- include "meshfed.resourceName" (dict "root" . "suffix" "peering") }}.{{ .Release.Namespace }}.svc
{{- end -}}
{{- end }}

{{/* A NetworkPolicy's egress rules with networkPolicy.egress.restrict: DNS, then the values' rules. */}}
{{- define "meshfed.networkPolicyEgress" -}}
# DNS, wherever the cluster's resolver is.
- ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{- with .Values.networkPolicy.egress.rules }}
{{ toYaml . }}
{{- end }}
{{- end }}
