"""The TCC call proof: one proof opens one call of one participant."""

from __future__ import annotations

import pytest

from reliable_msg.tcc import Op, proof, proof_matches


def test_a_proof_opens_its_own_call() -> None:
    given = proof("t0ken", "g-1", "b-1", Op.TRY)
    assert proof_matches("t0ken", "g-1", "b-1", Op.TRY, given)


@pytest.mark.parametrize(
    ("token", "gid", "branch", "op"),
    [
        ("other", "g-1", "b-1", Op.TRY),
        ("t0ken", "g-2", "b-1", Op.TRY),
        ("t0ken", "g-1", "b-2", Op.TRY),
        ("t0ken", "g-1", "b-1", Op.CANCEL),
        ("t0ken", "g-1\nb", "-1", Op.TRY),
    ],
    ids=["token", "gid", "branch", "op", "shifted"],
)
def test_a_proof_opens_no_other_call(token: str, gid: str, branch: str, op: Op) -> None:
    given = proof("t0ken", "g-1", "b-1", Op.TRY)
    assert not proof_matches(token, gid, branch, op, given)
    assert not proof_matches("t0ken", "g-1", "b-1", Op.TRY, given.upper() + "0")
