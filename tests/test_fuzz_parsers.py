"""Fuzzing in CI (hypothesis, a few seconds per target): the bundle manifest parser and verifier, the REST event
and recommendation parsers, and the gRPC request handlers (targets in tests/fuzz_targets.py; the long run is
bench/fuzz.py). Each target fails on its first input that breaks its rule, and hypothesis shrinks it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fuzz_targets import FuzzEnv, make_targets

EXAMPLES = {"manifest": 400, "rest_events": 150, "rest_recommendations": 150, "grpc_handlers": 400}


@pytest.fixture(scope="module")
def env() -> Iterator[FuzzEnv]:
    fuzz_env = FuzzEnv()
    yield fuzz_env
    fuzz_env.close()


OUTCOMES: Counter[tuple[str, str]] = Counter()
# What each run must have reached besides refusals, so that a target cannot pass by never getting past the
# first check (e.g. every manifest refused as invalid JSON, every request refused by validation).
MUST_REACH = {
    "manifest": {"accepted", "BundleMismatch"},
    "rest_events": {"200", "422"},
    "rest_recommendations": {"200", "422"},
    "grpc_handlers": {"Search OK", "Search INVALID_ARGUMENT", "Recommend OK", "Track OK", "Track INVALID_ARGUMENT"},
}
MIN_METHODS_OK = 5  # of the 7 servicer methods, this many answered at least one input normally


@pytest.fixture(scope="module")
def targets(env: FuzzEnv) -> dict[str, Any]:
    return make_targets(env, EXAMPLES, OUTCOMES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_fuzz(targets: dict[str, Any], name: str) -> None:
    targets[name]()  # FuzzFailure (shrunk by hypothesis) on an input that breaks the target's rule
    reached = {outcome for (target, outcome), n in OUTCOMES.items() if target == name}
    assert MUST_REACH[name] <= reached, sorted(reached)
    if name == "grpc_handlers":
        assert len({o.split()[0] for o in reached if o.endswith(" OK")}) >= MIN_METHODS_OK, sorted(reached)
