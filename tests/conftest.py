"""Shared fixtures. Server fixtures live in their own plugin modules, one per server."""

pytest_plugins = [
    "tests.fixtures_servers",
    "tests.fixtures_models",
    "tests.fixtures_sqs",
]
