"""Suite-wide test settings: deterministic hypothesis runs; files with slow tests first."""

from hypothesis import settings

# The same examples on every run (CI included): a failure is reproducible, never a fluke.
settings.register_profile("torchchat", derandomize=True, deadline=None)
settings.load_profile("torchchat")


def pytest_collection_modifyitems(items):
    """The files holding slow tests run first (their order otherwise kept): with the suite split
    over worker processes file by file, a long file started last would run alone at the end."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)
