"""The clients of the systems mirrorgate talks to: Kubernetes, container registries, Clair."""
