"""The Triton backend on CPU: each op's tests again, in a subprocess under TRITON_INTERPRET=1
(the variable must be set before Triton is imported)."""
import xml.etree.ElementTree as ElementTree

import pytest

from skd_kernels.backends import triton_available

from conftest import HAS_CUDA, run_python

# test file: (minimum number of tests that must run, the only skip reason allowed). Their whole
# grids are small enough for the interpreter (numpy).
SUITES = {
    "tests/test_pixelwise.py": (100, "official form has no ignore mask"),  # skipped on every backend
    "tests/test_pairwise.py": (100, None),
    "tests/test_attention.py": (20, None),
}


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed (pip install --no-deps triton)")
@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the Triton tests run on it directly")
@pytest.mark.parametrize("suite", SUITES)
def test_triton_backend_passes_the_op_tests_in_the_interpreter(suite, tmp_path):
    report = tmp_path / "report.xml"
    code = ("import sys, pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', "
            f"{suite!r}, '-k', 'triton', '--junitxml', {str(report)!r}]))")
    result = run_python(code, env={"TRITON_INTERPRET": "1"}, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    testsuite = ElementTree.parse(report).getroot().find("testsuite")
    tests, skipped = int(testsuite.get("tests")), int(testsuite.get("skipped"))
    minimum, allowed_skip = SUITES[suite]
    assert tests - skipped >= minimum, (tests, skipped)
    skip_reasons = {case.find("skipped").get("message") for case in testsuite.iter("testcase")
                    if case.find("skipped") is not None}
    assert all(allowed_skip and allowed_skip in reason for reason in skip_reasons), skip_reasons
