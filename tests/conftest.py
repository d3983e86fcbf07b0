"""Suite-wide test settings: deterministic hypothesis runs."""

from hypothesis import settings

# The same examples on every run (CI included): a failure is reproducible, never a fluke.
settings.register_profile("torchchat", derandomize=True, deadline=None)
settings.load_profile("torchchat")
