"""Development tooling: `mirrorgate demo` and the throwaway local cluster the demo, the
end-to-end tests and bench/ run on 127.0.0.1. Installed from devtools/ by scripts/setup; never
part of the runtime package or the container image."""
