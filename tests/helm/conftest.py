"""tests/helm needs helm: tools/install_helm.sh installs the pinned one. Missing, every test here fails
(it does not skip): a chart nobody rendered is a chart nobody checked."""

from __future__ import annotations

import pytest
from helm_chart import helm_binary


@pytest.fixture(autouse=True)
def _require_helm() -> None:
    if helm_binary() is None:
        pytest.fail("helm not found: run tools/install_helm.sh (installs it into .tools/) or set HELM")
