"""The bad-input matrix's fast cases (benchmarks/robustness_matrix.py): each as a new user runs it, its exact message,
its exit code and no traceback."""

import pytest

from benchmarks.robustness_matrix import CASES, run_case

pytestmark = pytest.mark.slow  # each case is a fresh `python -m attrclf` (torch import: seconds each)

FAST = [case for case in CASES if case.fast]


@pytest.mark.parametrize("case", FAST, ids=[case.name for case in FAST])
def test_each_fast_case_gives_its_message_and_no_traceback(tmp_path, case):
    outcome = run_case(case, tmp_path)
    assert case.expect in outcome.message, outcome.message
    assert outcome.exit_code == case.exit_code and not outcome.traceback
    assert outcome.passed


def test_the_registry_names_each_case_once():
    names = [case.name for case in CASES]
    assert len(names) == len(set(names)) and len(FAST) >= 10
