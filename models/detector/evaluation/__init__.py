"""`gatekeeper evaluate detector`, by part: localisation, the methods' shared inputs, the HU histogram,
statistics, scoring every series, report.md and plots. The command itself: `models.detector.evaluate`."""
