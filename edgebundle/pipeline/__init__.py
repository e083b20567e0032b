"""Recipe, stages, cache, measurement and the bundle writer."""
