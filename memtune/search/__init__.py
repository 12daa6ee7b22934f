"""The choice, pure: the rungs of the ladder (`ladder`), what "fits" means (`verdict`) and the walk to the
fastest configuration that fits (`choose`). Predictions and trials are injected.
"""
