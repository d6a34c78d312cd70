"""What the core returns and the service stores, as pydantic models. Torch-free: the API imports
these (tests/test_layout.py checks that importing any of them loads no torch)."""
