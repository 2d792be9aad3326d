"""File formats and file-level helpers shared across packages, standard library and numpy only (no torch):
TFRecord framing and the WOD-E2E protos (the synthetic writers and the replay readers), the bundle layout,
ONNX external data, file digests, and crash-safe writes (:mod:`blockpilot.atomic_io`). Nothing here
knows about the synthetic world."""
