"""Helpers of the test suite, imported as ``mmcurate.tests.support`` (tests/ lies inside the package folder).

``DATA`` is the real test data shipped with the repository (``tests/data``, each file with its license).
"""

from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"
