"""The `recsys` console script: the top floor, the only module that knows every package."""
