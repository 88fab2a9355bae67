"""Datasets in one canonical form: interactions (user_id, item_id, rating, timestamp) and items (item_id, title).

Ids are strings everywhere (MovieLens ids become decimal strings). A dataset lives in
``<APA_HOME>/datasets/<name>/{interactions,items}.parquet``; ``movielens-100k`` is built from the
fetched asset, anything else comes from ``apa data import PATH``.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from apa.assets import movielens_files
from apa.errors import DatasetError

MOVIELENS_100K = "movielens-100k"
INTERACTION_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]
ITEM_COLUMNS = ["item_id", "title"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Dataset:
    name: str
    interactions: pd.DataFrame  # user_id:str, item_id:str, rating:float, timestamp:int
    items: pd.DataFrame  # item_id:str, title:str

    @property
    def titles(self) -> dict[str, str]:
        return dict(zip(self.items["item_id"], self.items["title"], strict=True))


def interaction_key(user_id: str, item_id: str, timestamp: int) -> str:
    """The key of one interaction, ``<user_id>:<item_id>:<timestamp>`` (DESIGN.md, Artifacts)."""
    return f"{user_id}:{item_id}:{int(timestamp)}"


def normalise(interactions: pd.DataFrame, items: pd.DataFrame, *, source: str) -> Dataset:
    """Check columns and types, convert ids to strings, sort by user then (timestamp, item_id)."""
    missing = [c for c in INTERACTION_COLUMNS if c not in interactions.columns]
    if missing:
        raise DatasetError(f"{source}: interactions lack column(s) {missing}; need {INTERACTION_COLUMNS}")
    missing = [c for c in ITEM_COLUMNS if c not in items.columns]
    if missing:
        raise DatasetError(f"{source}: items lack column(s) {missing}; need {ITEM_COLUMNS}")
    frame = interactions[INTERACTION_COLUMNS].copy()
    if frame[INTERACTION_COLUMNS].isna().any().any():
        raise DatasetError(f"{source}: interactions have empty values")
    frame["user_id"] = frame["user_id"].astype(str).str.strip()
    frame["item_id"] = frame["item_id"].astype(str).str.strip()
    try:
        frame["rating"] = pd.to_numeric(frame["rating"]).astype(float)
        frame["timestamp"] = pd.to_numeric(frame["timestamp"]).astype("int64")
    except (ValueError, TypeError) as exc:
        raise DatasetError(f"{source}: rating and timestamp must be numeric ({exc})") from exc
    keys = frame[["user_id", "item_id", "timestamp"]]
    duplicated = keys.duplicated()
    if duplicated.any():
        first = keys[duplicated].iloc[0]
        raise DatasetError(
            f"{source}: {int(duplicated.sum())} duplicate interaction(s), e.g. "
            f"{interaction_key(first.user_id, first.item_id, first.timestamp)}"
        )
    catalogue = items[ITEM_COLUMNS].copy()
    catalogue["item_id"] = catalogue["item_id"].astype(str).str.strip()
    catalogue["title"] = catalogue["title"].astype(str).str.strip()
    if catalogue["item_id"].duplicated().any():
        raise DatasetError(f"{source}: item ids repeat in the items table")
    unknown = sorted(set(frame["item_id"]) - set(catalogue["item_id"]))
    if unknown:
        raise DatasetError(f"{source}: {len(unknown)} interacted item(s) have no title, e.g. {unknown[:5]}")
    frame = frame.sort_values(["user_id", "timestamp", "item_id"], kind="stable").reset_index(drop=True)
    return Dataset(name=source, interactions=frame, items=catalogue.reset_index(drop=True))


def _read_table(path: Path) -> pd.DataFrame:
    if path.suffix == ".csv":  # ids and titles stay text: "007" must not become user 7
        return pd.read_csv(path, dtype={"user_id": str, "item_id": str, "title": str})
    return pd.read_parquet(path)


def read_source(path: Path) -> Dataset:
    """Read a folder: MovieLens ``u.data`` + ``u.item``, or ``interactions`` + ``items`` (.csv/.parquet)."""
    if not path.is_dir():
        raise DatasetError(f"{path}: not a folder (expected u.data + u.item, or interactions + items files)")
    if (path / "u.data").is_file() and (path / "u.item").is_file():
        interactions = pd.read_csv(path / "u.data", sep="\t", names=INTERACTION_COLUMNS, dtype=str)
        items = pd.read_csv(path / "u.item", sep="|", header=None, encoding="latin-1", dtype=str,
                            usecols=[0, 1], names=ITEM_COLUMNS)
        return normalise(interactions, items, source=path.name)
    found: dict[str, Path] = {}
    for stem in ("interactions", "items"):
        candidates = [path / f"{stem}{ext}" for ext in (".parquet", ".csv")]
        existing = [c for c in candidates if c.is_file()]
        if not existing:
            raise DatasetError(f"{path}: no {stem}.parquet or {stem}.csv (or u.data + u.item)")
        found[stem] = existing[0]
    return normalise(_read_table(found["interactions"]), _read_table(found["items"]), source=path.name)


def movielens_100k(assets_dir: Path) -> Dataset:
    files = movielens_files(assets_dir)
    ratings = pd.read_parquet(files["data"]).rename(columns={"movie_id": "item_id"})
    items = pd.read_parquet(files["items"]).rename(columns={"movie_id": "item_id", "movie_title": "title"})
    return normalise(ratings, items, source=MOVIELENS_100K)


def save(dataset: Dataset, datasets_dir: Path, name: str) -> Path:
    if not _NAME.match(name):
        raise DatasetError(f"bad dataset name {name!r}: letters, digits, '.', '_' and '-' only")
    folder = datasets_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    dataset.interactions.to_parquet(folder / "interactions.parquet", index=False)
    dataset.items.to_parquet(folder / "items.parquet", index=False)
    return folder


def load(name_or_path: str, *, datasets_dir: Path, assets_dir: Path) -> Dataset:
    """A dataset by name (imported, or ``movielens-100k`` from the assets) or by folder path."""
    path = Path(name_or_path)
    if name_or_path == MOVIELENS_100K and not (datasets_dir / MOVIELENS_100K).is_dir():
        return movielens_100k(assets_dir)
    folder = datasets_dir / name_or_path
    if _NAME.match(name_or_path) and (folder / "interactions.parquet").is_file():
        return Dataset(
            name=name_or_path,
            interactions=pd.read_parquet(folder / "interactions.parquet"),
            items=pd.read_parquet(folder / "items.parquet"),
        )
    if path.is_dir():
        return read_source(path)
    raise DatasetError(
        f"unknown dataset {name_or_path!r}: not imported under {datasets_dir} and not a folder "
        "(import one with `apa data import PATH`)"
    )
