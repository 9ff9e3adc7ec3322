"""Turning sample bytes into padded pixel batches: DALI (``dali``), nvJPEG and PIL
(``torch_loader``), the pixels of streamed batches (``stream_pixels``), the shared size and
normalisation rules (``images``) and damaged-sample handling (``damage``)."""
