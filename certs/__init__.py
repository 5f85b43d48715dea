"""The webhook PKI: a CA and serving certificates the API server can verify."""
