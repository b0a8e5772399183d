"""The Triton backend on CPU: the pixel-wise tests again, in a subprocess under TRITON_INTERPRET=1
(the variable must be set before Triton is imported)."""
import xml.etree.ElementTree as ElementTree

import pytest

from skd_kernels.backends import triton_available

from conftest import HAS_CUDA, run_python

# The whole grid of test_pixelwise.py: its shapes are small enough for the interpreter (numpy).
SELECTION = "triton"


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed (pip install --no-deps triton)")
@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the Triton tests run on it directly")
def test_triton_backend_passes_the_pixelwise_tests_in_the_interpreter(tmp_path):
    report = tmp_path / "report.xml"
    code = ("import sys, pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/test_pixelwise.py', "
            f"'-k', {SELECTION!r}, '--junitxml', {str(report)!r}]))")
    result = run_python(code, env={"TRITON_INTERPRET": "1"}, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    suite = ElementTree.parse(report).getroot().find("testsuite")
    tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
    # Every selected test ran; the only skips are official-form cases with labels, skipped on all backends.
    assert tests - skipped >= 100, (tests, skipped)
    skip_reasons = {case.find("skipped").get("message") for case in suite.iter("testcase")
                    if case.find("skipped") is not None}
    assert all("official form has no ignore mask" in reason for reason in skip_reasons), skip_reasons


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed (pip install --no-deps triton)")
@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the Triton tests run on it directly")
def test_triton_backend_passes_the_attention_tests_in_the_interpreter(tmp_path):
    report = tmp_path / "report.xml"
    code = ("import sys, pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/test_attention.py', "
            f"'-k', {SELECTION!r}, '--junitxml', {str(report)!r}]))")
    result = run_python(code, env={"TRITON_INTERPRET": "1"}, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    suite = ElementTree.parse(report).getroot().find("testsuite")
    tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
    assert skipped == 0 and tests >= 20, (tests, skipped)  # every Triton case ran
