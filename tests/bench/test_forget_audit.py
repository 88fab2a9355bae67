"""The forgetting audit's sample sets: who counts as a member and who as an outsider."""

import pandas as pd

from bench.forget_audit import audit_sets


def test_the_audit_sets_are_disjoint_and_the_own_test_samples_are_the_deleted_users() -> None:
    rows = [(f"s{i}", str(i % 5), split) for i, split in enumerate(["train"] * 12 + ["valid"] * 4 + ["test"] * 9)]
    frame = pd.DataFrame(rows, columns=["sample_id", "user_id", "split"])
    sets = audit_sets(frame, ["1", "3"])
    ids = {name: set(rows["sample_id"]) for name, rows in sets.items()}
    assert all(not ids[a] & ids[b] for a in ids for b in ids if a < b), "no sample in two sets"
    deleted_users = {"1", "3"}
    assert set(sets["deleted"]["user_id"]) == deleted_users and set(sets["deleted"]["split"]) == {"train"}
    assert set(sets["own_test"]["user_id"]) <= deleted_users and set(sets["own_test"]["split"]) == {"test"}
    assert len(sets["own_test"]) == sum(1 for _, u, s in rows if s == "test" and u in deleted_users) > 0
    assert not set(sets["never"]["user_id"]) & deleted_users and set(sets["never"]["split"]) == {"test"}
    assert not set(sets["kept"]["user_id"]) & deleted_users and set(sets["kept"]["split"]) == {"train"}
    assert len(sets["kept"]) == min(len(sets["never"]), 12 - len(sets["deleted"]))
    assert audit_sets(frame, ["1", "3"])["kept"].equals(sets["kept"]), "the kept sample is drawn the same way"
