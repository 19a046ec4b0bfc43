"""nanodeltamem: a GPT backbone fitted with a delta-rule memory (work in progress)."""
IGNORE_INDEX = -1  # the one ignore index shared by model, data and tests
