"""The multi-host rollout test's harness (tests/test_fleet.py): network namespaces as hosts, Redis and
Sentinel on them, HAProxy in front, and the client load whose every try is counted."""
