"""Shared pytest set-up. Requirement ids (V-n, D-n, DR-n; docs/requirements.md) are attached
with ``@pytest.mark.spec("D-10")``; ``balloon-hint conformance`` reads them."""
