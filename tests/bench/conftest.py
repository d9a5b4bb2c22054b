import pytest


@pytest.fixture(autouse=True)
def _benchmarks_enabled(request):
    """setup.cfg disables pytest-benchmark (so that `pytest` alone never times anything); a bench test then
    skips with one line instead of failing on missing statistics. `make bench` enables them."""
    config = request.config
    if config.getoption("benchmark_disable") and not config.getoption("benchmark_enable"):
        pytest.skip("benchmarks are disabled by default; run them with `make bench` (--benchmark-enable)")
