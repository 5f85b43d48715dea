"""The pure core: what mirrorgate decides, as functions over plain data.

Image references, the config model, pod mutation, AdmissionReview in and out, the vulnerability
policy, the pull-secret plan and the permissions the server needs. Nothing here does network I/O
or imports aiohttp, kubernetes or prometheus_client (an import-linter contract keeps it so).
"""
