"""What each job takes: one config dataclass per job (its fields are the job's flags and YAML keys).

They live apart from the recipes (``lmstack/recipes/<job>.py`` runs the job) and import no torch, so
`lmstack --help`, `lmstack JOB --help` and every argument or config error answer without loading it.
A test keeps it so.
"""
