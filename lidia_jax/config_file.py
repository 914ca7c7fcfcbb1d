"""A config file's `get_config(arg)`, loaded the way `--config=PATH:ARG` loads it.

For scripts and tests, which take the same config strings as `lidia_jax.main`
("demo", "smoke,fusion=early", "paper", ...) without going through absl flags.
"""

import importlib.util
import pathlib

# configs/lidia.py of the checkout this package runs from (the README installs it editable).
DEFAULT_PATH = pathlib.Path(__file__).resolve().parents[1] / "configs" / "lidia.py"


def load_config(arg=None, path=DEFAULT_PATH):
    """`path`'s get_config(arg): an ml_collections ConfigDict."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found (load_config(path=...) names "
                                f"another)")
    spec = importlib.util.spec_from_file_location("lidia_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
