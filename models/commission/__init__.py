"""`gatekeeper commission`: from a folder of a site's normal CT series to a gate calibrated at that site.

Stages, one module each: `split` (patient-wise split), `train` (detector and segmenter fine-tune),
`calibrate` (per-series measurements and the gate), `evaluate` (held-out normals, contours, abnormal
series), `report` (report.json, report.html); `cli` wires them and registers the command.
"""
