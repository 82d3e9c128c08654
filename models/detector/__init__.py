"""The anomaly detector: one folder per family behind one interface (`interface.Family`), picked by
model.json (`family.family_name`) or by `train detector --recipe` (`family.family_for_recipe`).

* `stylegan2/` — the slice recipe, the shipped model (`default/`); `patch/` — the patch recipe
  (the best candidate, not shipped); `autoencoder/` — the autoencoder baselines.
* Shared: `data` (normal training series), `config` (command options), `metrics`, `baselines`
  (the HU histogram), `onnx_graph`, `evaluate` + `evaluation/`, `bench` + `bench_engine`,
  `diagnose` + `diagnosis_inputs`, `cli` (the `gatekeeper` subcommands), `__main__` (GPU machines).
"""
