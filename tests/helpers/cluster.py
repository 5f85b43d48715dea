"""The users the end-to-end control plane is started with (token auth, bound by the tests)."""

# A user that exists (token auth) but is bound to nothing until a test binds it.
VIEWER = "viewer"
VIEWER_GROUPS = ("mirrorgate:e2e-viewers",)
# The identity `mirrorgate serve` runs as in the pull-secret tests: bound only to the RBAC rules
# webhook.core.rbac documents, never admin.
WEBHOOK_USER = "mirrorgate-webhook"
