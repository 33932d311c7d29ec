"""Importing tl_transplant changes nothing global: no logger level, no environment variable,
no warnings filter. The quieting of transformers during a load is scoped and restored."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tl_transplant.models.loading import quiet_loading

REPO = Path(__file__).resolve().parents[1]

_CHILD = textwrap.dedent(
    """
    import importlib, logging, os, pkgutil, sys, warnings

    def state():
        return (
            logging.getLogger("transformers").level,
            logging.getLogger().level,
            dict(os.environ),
            list(warnings.filters),
        )

    # as a user who imported torch and transformers first (torch adds warnings filters of
    # its own at import; transformers sets up its library logger at WARNING)
    import torch
    from transformers.utils import logging as hf_logging
    hf_logging.get_logger("transformers")
    # tl_transplant.harness.lm subclasses lm-eval's model class, so importing it imports
    # lm_eval, whose requests/urllib3 add warnings filters at import: theirs, not ours
    try:
        import lm_eval.api.model, requests  # noqa: F401
    except ImportError:
        pass
    before = state()
    import tl_transplant
    names = ["tl_transplant"]
    for m in pkgutil.walk_packages(tl_transplant.__path__, "tl_transplant."):
        if not m.name.endswith("__main__"):
            importlib.import_module(m.name)
            names.append(m.name)
    after = state()
    for label, a, b in zip(("transformers level", "root level", "environ", "warnings"),
                           before, after):
        if a != b:
            print(f"CHANGED {label}: {a!r} -> {b!r}")
            sys.exit(1)
    print(len(names), "modules imported, nothing changed")
    """
)


def test_importing_the_package_changes_no_global_state() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "nothing changed" in out.stdout
    assert int(out.stdout.split()[0]) > 30  # every module, not just the package root


@pytest.mark.parametrize("user_level", [logging.WARNING, logging.INFO, logging.CRITICAL])
def test_quiet_loading_is_scoped(user_level: int) -> None:
    """Inside a load, the default verbosity (WARNING) is raised to ERROR; a user's own INFO or
    CRITICAL is kept; the level is restored after, even when the load fails."""
    from transformers.utils import logging as hf_logging

    logger = hf_logging.get_logger("transformers")
    old = logger.level
    try:
        logger.setLevel(user_level)
        with pytest.raises(RuntimeError, match="boom"), quiet_loading():
            want = logging.ERROR if user_level == logging.WARNING else user_level
            assert logger.getEffectiveLevel() == want
            raise RuntimeError("boom")
        assert logger.level == user_level
    finally:
        logger.setLevel(old)
