"""Every decoder of untrusted input under hypothesis (tests/fuzz_targets.py): only its own typed error
ever escapes, and no input takes long. A small budget here; tests/bench/bench_fuzz.py runs 100k each."""

from __future__ import annotations

import datetime
import os

import pytest
from hypothesis import HealthCheck, given, settings

from tests.fuzz_targets import TARGETS, Target

EXAMPLES = int(os.environ.get("MESHLLM_FUZZ_EXAMPLES", "300"))


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_decoders_raise_only_their_own_errors(target: Target) -> None:
    @settings(
        max_examples=EXAMPLES,
        deadline=datetime.timedelta(seconds=2),  # a hang or a blow-up shows as a deadline error
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(target.inputs())
    def fuzz(data: bytes | str) -> None:
        target.run(data)  # type: ignore[arg-type]

    fuzz()
