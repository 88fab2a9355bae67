"""Sample construction, checked by hand on the hand-made dataset (see conftest.RATINGS).

User u1, in (timestamp, item_id) order — items "10" and "2" share t=300 and sort as strings:

    item   1    4    10   2    3    5
    rating 5    3    1    4    2    5
    t      100  200  300  300  400  500
    liked  yes  no   no   yes  no   yes     (rating > 3)
"""

import pandas as pd
import pytest

from apa import prompts
from apa.data import Dataset, normalise
from apa.errors import ConfigError, DatasetError
from apa.samples import Sample, build_samples, from_frame, labels, split_samples, to_frame
from tests.conftest import RATINGS, TITLES, raw_frames


def _by_id(samples: list[Sample]) -> dict[str, Sample]:
    return {s.sample_id: s for s in samples}


def test_normalise_orders_by_timestamp_then_item_id(dataset: Dataset) -> None:
    u1 = dataset.interactions[dataset.interactions["user_id"] == "u1"]
    assert u1["item_id"].tolist() == ["1", "4", "10", "2", "3", "5"]
    assert u1["timestamp"].tolist() == [100, 200, 300, 300, 400, 500]
    assert dataset.interactions["item_id"].map(type).eq(str).all()


def test_normalise_rejects_duplicates_and_unknown_items() -> None:
    interactions, items = raw_frames()
    with pytest.raises(DatasetError, match="duplicate"):
        normalise(pd.concat([interactions, interactions.iloc[:1]]), items, source="dup")
    with pytest.raises(DatasetError, match="no title"):
        normalise(interactions, items[items["item_id"] != "5"], source="untitled")
    with pytest.raises(DatasetError, match="lack column"):
        normalise(interactions.drop(columns=["rating"]), items, source="cols")


def test_samples_of_one_user_by_hand(dataset: Dataset) -> None:
    samples = [s for s in build_samples(dataset) if s.user_id == "u1"]
    assert [s.sample_id for s in samples] == ["u1:4:200", "u1:10:300", "u1:2:300", "u1:3:400", "u1:5:500"]
    assert [s.label for s in samples] == [0, 0, 1, 0, 1]
    last = samples[-1]
    assert last.target_item_id == "5"
    assert last.history_item_ids == ("1", "4", "10", "2", "3")
    assert last.history_liked == (True, False, False, True, False)
    assert last.interaction_keys == ("u1:1:100", "u1:4:200", "u1:10:300", "u1:2:300", "u1:3:400", "u1:5:500")
    first = samples[0]
    assert first.history_item_ids == ("1",)
    assert first.history_liked == (True,)
    assert first.interaction_keys == ("u1:1:100", "u1:4:200")


def test_max_history_keeps_the_most_recent_items(dataset: Dataset) -> None:
    last = _by_id(build_samples(dataset, max_history=3))["u1:5:500"]
    assert last.history_item_ids == ("10", "2", "3")
    assert last.history_liked == (False, True, False)
    assert last.interaction_keys == ("u1:10:300", "u1:2:300", "u1:3:400", "u1:5:500")


def test_min_history_and_counts(dataset: Dataset) -> None:
    every = build_samples(dataset)
    assert len(every) == sum(len(rows) - 1 for rows in RATINGS.values())  # 5 + 7 + 7 + 7
    u1 = [s.sample_id for s in build_samples(dataset, min_history=3) if s.user_id == "u1"]
    assert u1 == ["u1:2:300", "u1:3:400", "u1:5:500"]
    with pytest.raises(ConfigError):
        build_samples(dataset, min_history=0)
    with pytest.raises(ConfigError):
        build_samples(dataset, min_history=4, max_history=3)


def test_like_threshold(dataset: Dataset) -> None:
    sample = _by_id(build_samples(dataset, like_threshold=2.0))["u1:5:500"]
    assert sample.history_liked == (True, True, False, True, False)  # ratings 5, 3, 1, 4, 2 > 2


def test_labels_array(dataset: Dataset) -> None:
    samples = [s for s in build_samples(dataset) if s.user_id == "u1"]
    assert labels(samples).tolist() == [0, 0, 1, 0, 1]


def test_prompt_text(dataset: Dataset) -> None:
    sample = _by_id(build_samples(dataset))["u1:3:400"]  # history 1 (liked), 4, 10 (disliked), 2 (liked)
    text = sample.prompt(dataset.titles)
    assert f'User Preference: "{TITLES["1"]}", "{TITLES["2"]}"\n' in text
    assert f'User Unpreference: "{TITLES["4"]}", "{TITLES["10"]}"\n' in text
    assert f'Whether the user will like the target movie "{TITLES["3"]}"?' in text
    assert text.startswith(prompts.HEADER + "### Instruction:\n")
    assert 'answering "Yes." or "No."' in text
    assert text.endswith("### Response:\n")

    history = sample.history_prompt(dataset.titles)
    assert history.endswith(f'User Unpreference: "{TITLES["4"]}", "{TITLES["10"]}"\n\n### Response:\n')
    assert "target movie \"" not in history
    assert 'the target book "' in sample.prompt(dataset.titles, noun="book")


def test_prompt_with_no_dislikes() -> None:
    text = prompts.sample_prompt(["A", "B"], [], "D")
    assert 'User Preference: "A", "B"\nUser Unpreference: \nWhether the user will like the target movie "D"?' in text


def test_split_is_deterministic_and_disjoint(dataset: Dataset) -> None:
    samples = build_samples(dataset)
    first = split_samples(samples, n_train=10, n_valid=6, n_test=5, seed=7)
    again = split_samples(samples, n_train=10, n_valid=6, n_test=5, seed=7)
    other = split_samples(samples, n_train=10, n_valid=6, n_test=5, seed=8)
    ids = {name: [s.sample_id for s in part] for name, part in first.items()}
    assert ids == {name: [s.sample_id for s in part] for name, part in again.items()}
    assert ids != {name: [s.sample_id for s in part] for name, part in other.items()}
    assert [len(ids[n]) for n in ("train", "valid", "test")] == [10, 6, 5]
    everything = ids["train"] + ids["valid"] + ids["test"]
    assert len(set(everything)) == 21
    assert set(everything) <= {s.sample_id for s in samples}


def test_split_rejects_impossible_sizes(dataset: Dataset) -> None:
    samples = build_samples(dataset)
    with pytest.raises(ConfigError, match="only 26"):
        split_samples(samples, n_train=20, n_valid=5, n_test=2, seed=0)
    with pytest.raises(ConfigError):
        split_samples(samples, n_train=5, n_valid=0, n_test=2, seed=0)


def test_frame_round_trip(dataset: Dataset) -> None:
    splits = split_samples(build_samples(dataset), n_train=6, n_valid=3, n_test=3, seed=1)
    shards = {s.sample_id: i % 2 for i, s in enumerate(splits["train"])}
    frame = to_frame(splits, shards)
    assert len(frame) == 12
    assert set(frame.loc[frame["split"] != "train", "shard"]) == {-1}
    assert dict(zip(frame.loc[frame["split"] == "train", "sample_id"],
                    frame.loc[frame["split"] == "train", "shard"], strict=True)) == shards
    assert from_frame(frame) == splits


def test_a_users_samples_are_built_by_the_one_rule_and_round_trip_through_their_content(dataset) -> None:  # type: ignore[no-untyped-def]
    from apa.samples import from_content, user_samples

    built = [s for s in build_samples(dataset, max_history=3, min_history=2) if s.user_id == "u1"]
    frame = dataset.interactions[dataset.interactions["user_id"] == "u1"]
    timeline = list(zip(frame["item_id"], frame["rating"], frame["timestamp"], strict=True))
    again = user_samples("u1", timeline, range(2, len(timeline)), max_history=3)
    assert again == built
    assert [from_content(s.content()) for s in built] == built


def test_the_ingested_split_is_a_seeded_draw_of_the_fraction() -> None:
    from apa.samples import ingested_split

    ids = [f"u:{i}:1" for i in range(2000)]
    draws = [ingested_split(i, seed=0, valid_fraction=0.1) for i in ids]
    assert 150 < draws.count("valid") < 250
    assert draws == [ingested_split(i, seed=0, valid_fraction=0.1) for i in ids], "the same sample, the same split"
    assert draws != [ingested_split(i, seed=1, valid_fraction=0.1) for i in ids]
    assert {ingested_split(i, seed=0, valid_fraction=0.0) for i in ids} == {"train"}
    assert {ingested_split(i, seed=0, valid_fraction=1.0) for i in ids} == {"valid"}
