"""The bundled deployer: renders and applies the registry, the webhook and its PKI from
``mirrorgate.yaml``.

``render`` is pure (config + secret material -> manifests), ``webhooks`` is the one place webhook
configurations are shaped, ``material`` decides which secrets to keep and which to generate,
``kubeapi`` talks to the API server, ``apply`` installs, reports and uninstalls, and ``commands``
is what ``mirrorgate deploy`` and ``mirrorgate certs`` run. ``monitoring/`` holds the alert rules
and dashboard (package data) rendered as PrometheusRule and dashboard ConfigMap.
"""
