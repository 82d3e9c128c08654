"""Closing the loop: retrain from the training pool, register candidates, compare them with the active models.

`segmenter` (`gatekeeper train segmenter --pool`), `detector` (`gatekeeper train detector --pool`),
`candidate` (`gatekeeper evaluate candidate KIND VERSION`); `pool` finds the pool and registers the
results in the model registry (`service.model_registry`).
"""
