"""Code shared by the gateway (`api`) and the exporter (`export`): the input contract (`contract`), the
model card (`model_card`), the preprocessing that reproduces FM-HCT training (`preprocess/`), volumes and
DICOM geometry, file helpers (`files`), the client SDK and CLI (`client/`) and the local launchers
(`local/`).

Nothing in this package imports torch; `contract` and `files` use the standard library only (they also
run inside NVIDIA's Triton image).
"""
