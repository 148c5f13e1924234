"""Reference implementations used only by tests and benchmarks (may import torch / MONAI)."""
