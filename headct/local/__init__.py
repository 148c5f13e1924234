"""Local launchers for development, tests and benchmarks: the bundled tritonserver binary
(`headct.local.triton`), the gateway as a subprocess (`headct.local.gateway`) and `make serve`
(`headct.local.serve`)."""
