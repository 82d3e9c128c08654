"""Liver segmenter: a 2.5-D U-Net trained on CT series with liver contours, exported to ONNX.

Split by purpose: `network` (the U-Net; eval-mode forward gives probabilities and bottleneck
features), `contours` (liver masks from DICOM-SEG or RTSTRUCT), `data` (pairs of CT series and
masks from any folder tree), `train` (loop, checkpoint, export, model.json), `evaluate_gate`
(how well each score predicts the segmenter's failures). Serving lives in `service.segmentation`.
"""
