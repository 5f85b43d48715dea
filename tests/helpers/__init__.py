"""What the test modules share: real-program harnesses (registries, the Clair stand-in, the
API server over HTTP), test PKI and the console-script path. Test modules import from here,
never from each other."""
