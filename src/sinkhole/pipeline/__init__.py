"""The pipeline: the engine (handed its steps), the step adapters, the registry (the one ordered list of steps) and analyze."""
