"""Project-wide test configuration."""

from importlib.metadata import entry_points

# The cmg_stack fixtures (cmg/pytest_plugin.py). Installed with its pytest11 entry point,
# pytest loads it by itself; until then (an install that predates it), load it here.
# pytester: tests/testing/test_plugin.py runs pytest on example files.
pytest_plugins = ["pytester"] + ([] if any(ep.value == "cmg.pytest_plugin" for ep in entry_points(group="pytest11"))
                                 else ["cmg.pytest_plugin"])
