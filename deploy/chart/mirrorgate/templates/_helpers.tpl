{{/*
What the templates share: the config as the release uses it, the model derived from it (the same
derivations as mirrorgate.deploy.config and mirrorgate.deploy.render), the secret material
(generated once per render, kept across upgrades through `lookup`) and labels.

tests/test_chart.py renders this chart and `mirrorgate deploy render` for the same configs and
requires the same objects; a change to either side that is not made to the other fails there.
*/}}

{{/* mirrorgate.yaml as the release uses it: deploy.name defaults to the release name, and
deploy.namespace is the release namespace. */}}
{{- define "mirrorgate.config" -}}
{{- $c := deepCopy (.Values.config | default dict) -}}
{{- $d := $c.deploy | default dict -}}
{{- $_ := set $d "name" ($d.name | default .Release.Name) -}}
{{- $_ = set $d "namespace" .Release.Namespace -}}
{{- $_ = set $c "deploy" $d -}}
{{- toJson $c -}}
{{- end -}}

{{/* "2s", "500ms", "1m", "1h" or a number of seconds -> seconds (webhook.core.config). */}}
{{- define "mirrorgate.seconds" -}}
{{- $v := toString . | trim -}}
{{- $units := dict "ms" 0.001 "s" 1.0 "m" 60.0 "h" 3600.0 "" 1.0 -}}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" $v -}}
{{- $unit := trimPrefix $num $v -}}
{{- mulf (float64 $num) (get $units $unit) -}}
{{- end -}}

{{/* "365d", "2160h", "10m", "45s" -> whole days, at least 1 (certificate lifetimes). */}}
{{- define "mirrorgate.days" -}}
{{- $v := toString . | trim -}}
{{- $units := dict "s" 1.0 "m" 60.0 "h" 3600.0 "d" 86400.0 -}}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" $v -}}
{{- $unit := trimPrefix $num $v -}}
{{- max 1 (floor (divf (mulf (float64 $num) (get $units $unit)) 86400.0)) -}}
{{- end -}}

{{/* "365d", "2160h", "10m", "45s" -> "<hours>h", rounded up (cert-manager durations). */}}
{{- define "mirrorgate.hours" -}}
{{- $v := toString .value | trim -}}
{{- $units := dict "s" 1.0 "m" 60.0 "h" 3600.0 "d" 86400.0 -}}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" $v -}}
{{- $unit := trimPrefix $num $v -}}
{{- printf "%dh" (int (ceil (divf (mulf (float64 $num) (get $units $unit)) (mulf 3600.0 .divisor)))) -}}
{{- end -}}

{{/* Everything the templates derive from the config, as JSON. */}}
{{- define "mirrorgate.model" -}}
{{- $c := include "mirrorgate.config" . | fromJson -}}
{{- $d := $c.deploy -}}
{{- /* Room for the longest suffix ("-registry-auth") within 63 characters. */ -}}
{{- if gt (len $d.name) 40 -}}
{{- fail (printf "config.deploy.name: %q is longer than 40 characters (it defaults to the release name): set config.deploy.name" $d.name) -}}
{{- end -}}
{{- $m := dict "release" $d.name "ns" $d.namespace -}}
{{- $_ := set $m "image" ($d.image | default (printf "mirrorgate:%s" .Chart.AppVersion)) -}}
{{- $_ = set $m "replicas" (int (ternary $d.replicas 2 (hasKey $d "replicas"))) -}}
{{- $_ = set $m "failurePolicy" ($d.failurePolicy | default "Fail") -}}
{{- $_ = set $m "secretMounts" ($d.secretMounts | default list) -}}
{{- $certs := $c.certs | default dict -}}
{{- $_ = set $m "certs" (dict "mode" ($certs.mode | default "builtin") "caDuration" ($certs.caDuration | default "365d") "servingDuration" ($certs.servingDuration | default "90d")) -}}
{{- $_ = set $m "events" (ternary $c.events true (hasKey $c "events")) -}}
{{- $_ = set $m "scan" (hasKey $c "scan") -}}
{{- /* The gate watches the digests pods run (scan.running, running verdicts). */ -}}
{{- $_ = set $m "running" (hasKey $c "scan") -}}
{{- $vt := include "mirrorgate.seconds" (ternary $c.verifyTimeout "2" (hasKey $c "verifyTimeout")) | float64 -}}
{{- $_ = set $m "mutateTimeout" (min 30 (max 5 (add (int (ceil $vt)) 3))) -}}
{{- if $c.scan -}}
{{- $budget := include "mirrorgate.seconds" ($c.scan.admissionBudget | default "3") | float64 -}}
{{- $_ = set $m "validateTimeout" (min 30 (max 10 (add (int (ceil $budget)) 5))) -}}
{{- end -}}
{{- $ns := $c.namespaces | default dict -}}
{{- $_ = set $m "optIn" (eq ($ns.mode | default "optIn") "optIn") -}}
{{- $exclude := list "kube-system" -}}
{{- range ($ns.exclude | default list) -}}
{{- $exclude = append $exclude . -}}
{{- end -}}
{{- $own := list -}}
{{- with $c.registry -}}
{{- $own = append $own (.namespace | default "docker-registry") -}}
{{- end -}}
{{- $own = append $own $d.namespace -}}
{{- range $own -}}
{{- $exclude = append $exclude . -}}
{{- end -}}
{{- $_ = set $m "exclude" (uniq $exclude) -}}
{{- with $c.pullSecret -}}
{{- $ps := dict "name" .name "patchServiceAccounts" (.patchServiceAccounts | default false) -}}
{{- with .source -}}
{{- $parts := splitList "/" . -}}
{{- $_ = set $ps "sourceNamespace" (index $parts 0) -}}
{{- $_ = set $ps "sourceName" (index $parts 1) -}}
{{- end -}}
{{- $_ = set $m "pullSecret" $ps -}}
{{- end -}}
{{- with $c.registry -}}
{{- $r := dict "namespace" (.namespace | default "docker-registry") -}}
{{- $_ = set $r "image" (.image | default "docker.io/library/registry:2.8.3") -}}
{{- $_ = set $r "pullPath" (.pullPath | default "nodePort") -}}
{{- $_ = set $r "nodePort" .nodePort -}}
{{- $_ = set $r "username" ((.auth | default dict).username | default "mirrorgate") -}}
{{- $_ = set $r "gcSchedule" (.gcSchedule | default "30 3 * * 0") -}}
{{- $storage := .storage | default (dict "filesystem" dict) -}}
{{- if hasKey $storage "s3" -}}
{{- $_ = set $r "s3" $storage.s3 -}}
{{- else -}}
{{- $fs := $storage.filesystem | default dict -}}
{{- $_ = set $r "filesystem" (dict "size" ($fs.size | default "20Gi") "storageClass" ($fs.storageClass | default "")) -}}
{{- end -}}
{{- $ingressPath := false -}}
{{- with .ingress -}}
{{- $tls := .tls | default dict -}}
{{- $_ = set $r "ingress" (dict "host" .host "className" (.className | default "nginx") "secretName" ($tls.secretName | default (printf "%s-tls" (replace "." "-" .host))) "issuer" ($tls.issuer | default "") "issuerKind" ($tls.issuerKind | default "ClusterIssuer")) -}}
{{- $ingressPath = eq $r.pullPath "ingress" -}}
{{- end -}}
{{- $_ = set $r "ingressPath" $ingressPath -}}
{{- $hosted := ternary (($r.ingress | default dict).host) (printf "127.0.0.1:%v" .nodePort) $ingressPath -}}
{{- $_ = set $r "hostedHost" $hosted -}}
{{- $hosts := list $hosted -}}
{{- $proxies := list -}}
{{- range (.proxies | default list) -}}
{{- $up := lower .upstream -}}
{{- if eq $up "index.docker.io" -}}{{- $up = "docker.io" -}}{{- end -}}
{{- $slug := regexReplaceAll "[^a-z0-9]+" $up "-" | trimAll "-" -}}
{{- $host := ternary (.host | default (printf "%s.%s" $slug (($r.ingress | default dict).host))) (printf "127.0.0.1:%v" .nodePort) $ingressPath -}}
{{- $hosts = append $hosts $host -}}
{{- $proxies = append $proxies (dict "upstream" $up "slug" $slug "name" (printf "registry-proxy-%s" $slug) "host" $host "nodePort" .nodePort "remoteURL" (trimSuffix "/" .remoteURL) "credentialsSecret" (.credentialsSecret | default "")) -}}
{{- end -}}
{{- $_ = set $r "proxies" $proxies -}}
{{- $_ = set $r "hosts" $hosts -}}
{{- $_ = set $r "notify" (hasKey $c "scan") -}}
{{- $_ = set $m "registry" $r -}}
{{- end -}}
{{- $_ = set $m "config" $c -}}
{{- toJson $m -}}
{{- end -}}

{{/* Labels of every object (mirrorgate.deploy.render.labels). Args: release, component,
name (default mirrorgate). */}}
{{- define "mirrorgate.labels" -}}
app.kubernetes.io/name: {{ .name | default "mirrorgate" }}
app.kubernetes.io/instance: {{ .release }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: mirrorgate
{{- /* Helm sets this label to Helm on everything it applies. */}}
app.kubernetes.io/managed-by: Helm
{{- end -}}

{{- define "mirrorgate.selector" -}}
app.kubernetes.io/name: {{ .name | default "mirrorgate" }}
app.kubernetes.io/instance: {{ .release }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The secret material, generated once per render and cached in the values (templates are
rendered one after another with the same values). Kept from the cluster when it is there, so an
upgrade changes none of it: the registry password (unless registryPassword changes it), its
htpasswd line, http.secret, the events token and the webhook's certificates. */}}
{{- define "mirrorgate.material" -}}
{{- if not (hasKey .Values "__mirrorgateMaterial") -}}
{{- $m := include "mirrorgate.model" . | fromJson -}}
{{- $out := dict -}}
{{- with $m.registry -}}
{{- $creds := (lookup "v1" "Secret" .namespace "registry-credentials").data | default dict -}}
{{- $keptUser := b64dec ($creds.username | default "") -}}
{{- $keptPassword := b64dec ($creds.password | default "") -}}
{{- $password := $.Values.registryPassword | default "" -}}
{{- if not $password -}}
{{- $password = ternary $keptPassword (randAlphaNum 32) (and (ne $keptPassword "") (eq $keptUser .username)) -}}
{{- end -}}
{{- $htpasswd := "" -}}
{{- $kept := (lookup "v1" "Secret" .namespace "registry-auth").data | default dict -}}
{{- if and $kept.htpasswd (eq $password $keptPassword) (eq $keptUser .username) -}}
{{- $htpasswd = b64dec $kept.htpasswd -}}
{{- else -}}
{{- $htpasswd = htpasswd .username $password -}}
{{- end -}}
{{- $registrySecrets := (lookup "v1" "Secret" .namespace "registry-secrets").data | default dict -}}
{{- $httpSecret := b64dec (get $registrySecrets "http-secret" | default "") | default (randAlphaNum 64) -}}
{{- $_ := set $out "username" .username -}}
{{- $_ = set $out "password" $password -}}
{{- $_ = set $out "htpasswd" $htpasswd -}}
{{- $_ = set $out "httpSecret" $httpSecret -}}
{{- $auth := b64enc (printf "%s:%s" .username $password) -}}
{{- $auths := dict -}}
{{- range .hosts -}}
{{- $_ = set $auths . (dict "auth" $auth) -}}
{{- end -}}
{{- $_ = set $out "dockerConfig" (dict "auths" $auths | toJson) -}}
{{- end -}}
{{- if $m.scan -}}
{{- $events := (lookup "v1" "Secret" $m.ns (printf "%s-events" $m.release)).data | default dict -}}
{{- $_ := set $out "eventsToken" (b64dec ($events.token | default "") | default (randAlphaNum 43)) -}}
{{- end -}}
{{- if eq $m.certs.mode "builtin" -}}
{{- $tls := lookup "v1" "Secret" $m.ns (printf "%s-tls" $m.release) | default dict -}}
{{- $data := $tls.data | default dict -}}
{{- if and (get $data "tls.crt") (get $data "ca.crt") (get $data "ca-signing.key") -}}
{{- $_ := set $out "tls" $data -}}
{{- $annotations := dict -}}
{{- range $k, $v := (($tls.metadata | default dict).annotations | default dict) -}}
{{- if hasPrefix "mirrorgate.io/" $k -}}{{- $_ = set $annotations $k $v -}}{{- end -}}
{{- end -}}
{{- $_ = set $out "tlsAnnotations" $annotations -}}
{{- else -}}
{{- $caKey := genPrivateKey "ecdsa" -}}
{{- $ca := genCAWithKey "mirrorgate-webhook-ca" (int (include "mirrorgate.days" $m.certs.caDuration)) $caKey -}}
{{- $names := list $m.release (printf "%s.%s" $m.release $m.ns) (printf "%s.%s.svc" $m.release $m.ns) (printf "%s.%s.svc.cluster.local" $m.release $m.ns) -}}
{{- $servingDays := int (min (int (include "mirrorgate.days" $m.certs.servingDuration)) (int (include "mirrorgate.days" $m.certs.caDuration))) -}}
{{- $cert := genSignedCertWithKey (index $names 0) list $names $servingDays $ca (genPrivateKey "ecdsa") -}}
{{- $_ := set $out "tls" (dict "tls.crt" (b64enc $cert.Cert) "tls.key" (b64enc $cert.Key) "ca.crt" (b64enc $ca.Cert) "ca-signing.crt" (b64enc $ca.Cert) "ca-signing.key" (b64enc $ca.Key)) -}}
{{- $_ = set $out "tlsAnnotations" dict -}}
{{- end -}}
{{- $_ := set $out "caBundle" (get $out.tls "ca.crt") -}}
{{- else -}}
{{- /* cert-manager writes ca.crt into the serving Secret; empty until it has issued. */ -}}
{{- $tls := (lookup "v1" "Secret" $m.ns (printf "%s-tls" $m.release)).data | default dict -}}
{{- $_ := set $out "caBundle" (get $tls "ca.crt" | default "") -}}
{{- end -}}
{{- $_ := set .Values "__mirrorgateMaterial" $out -}}
{{- end -}}
{{- toJson (get .Values "__mirrorgateMaterial") -}}
{{- end -}}

{{/* The in-cluster mirrorgate.yaml (mirrorgate.deploy.render.in_cluster_config): the config
plus how the webhook reaches the deployed registries through their Services, and where the
events token is mounted. */}}
{{- define "mirrorgate.inClusterConfig" -}}
{{- $m := include "mirrorgate.model" . | fromJson -}}
{{- $doc := $m.config -}}
{{- with $m.registry -}}
{{- $registries := $doc.registries | default dict -}}
{{- $endpoints := list (list .hostedHost "registry") -}}
{{- range .proxies -}}
{{- $endpoints = append $endpoints (list .host .name) -}}
{{- end -}}
{{- $ns := .namespace -}}
{{- range $endpoints -}}
{{- if not (hasKey $registries (index . 0)) -}}
{{- $_ := set $registries (index . 0) (dict "endpoint" (printf "http://%s.%s.svc:5000" (index . 1) $ns) "plainHTTP" true "dockerConfigFile" "/etc/mirrorgate/registry/.dockerconfigjson") -}}
{{- end -}}
{{- end -}}
{{- $_ := set $doc "registries" $registries -}}
{{- end -}}
{{- if $m.scan -}}
{{- $scan := $doc.scan -}}
{{- $events := $scan.events | default dict -}}
{{- $_ := set $events "tokenFile" "/etc/mirrorgate/events/token" -}}
{{- $_ = set $scan "events" $events -}}
{{- end -}}
{{- toYaml $doc -}}
{{- end -}}

{{/* Whether the Prometheus Operator's objects are rendered. */}}
{{- define "mirrorgate.monitoring" -}}
{{- $enabled := (.Values.monitoring | default dict).enabled -}}
{{- if kindIs "invalid" $enabled -}}
{{- ternary "true" "" (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor") -}}
{{- else -}}
{{- ternary "true" "" $enabled -}}
{{- end -}}
{{- end -}}
