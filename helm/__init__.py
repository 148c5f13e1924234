"""Helm chart tooling: `python -m helm.check` (make chart-check). The chart itself is helm/headct/."""
