"""The bottom layer: records and rules every other package shares (metrics and the accuracy contract)."""
