"""The bundled deployer: renders and applies the registry, the webhook and its PKI from
``mirrorgate.yaml``.

``config`` holds the deployer's sections of the file (and loads the whole file for every command),
``render`` is pure (config + secret material -> manifests), ``webhooks`` is the one place webhook
configurations are shaped, ``material`` decides which secrets to keep and which to generate,
``apply`` installs, reports and uninstalls through ``mirrorgate.webhook.adapters.kube`` (the one
Kubernetes client), and ``commands`` is what ``mirrorgate deploy`` and ``mirrorgate certs`` run.
``monitoring/`` holds the alert rules and dashboard (package data) rendered as PrometheusRule and
dashboard ConfigMap.
"""
