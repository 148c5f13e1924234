"""Code shared by the gateway (`api`) and the exporter (`export`): the input contract, the
preprocessing that reproduces FM-HCT training, the model card, and the local Triton launcher.

Nothing in this package imports torch.
"""
