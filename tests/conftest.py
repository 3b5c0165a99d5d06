from __future__ import annotations

from pathlib import Path

import pytest

from builder.samples import make_sample_payload


@pytest.fixture(scope="session")
def sample_payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real payload: ONNX classifier, inference config and golden self-test data."""
    return make_sample_payload(tmp_path_factory.mktemp("payload"))
