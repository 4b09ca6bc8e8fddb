"""Training and labeling produce bit-identical numbers to the recorded reference.

The reference (``equivalence_reference.json``, written by ``make_equivalence_reference.py``)
holds sha256 fingerprints of the student weights, the metrics lines and the label files of
tiny runs of every method and both tiny teachers. A refactoring that changes any of them
changed behaviour. Float results depend on torch's version and CPU kernels, so on another
torch build or CPU capability the comparison cannot hold and the test says so.
"""

import json

import pytest
from make_equivalence_reference import REFERENCE, compute_fingerprints, environment


def test_every_method_and_teacher_matches_the_reference(tmp_path):
    reference = json.loads(REFERENCE.read_text())
    if reference["environment"] != environment():
        pytest.skip(
            f"reference recorded on {reference['environment']}, this is {environment()}; "
            "regenerate it on the unchanged code to compare here"
        )
    runs = compute_fingerprints(tmp_path)
    assert sorted(runs) == sorted(reference["runs"])
    differ = [name for name in runs if runs[name] != reference["runs"][name]]
    assert not differ, f"changed numbers: {differ}"
