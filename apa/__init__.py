"""APA-Rec core: exact unlearning for LLM-based recommendation (Adapter Partition and Aggregation).

This package holds the method itself — data, samples, prompts, embeddings, partitioners, LoRA
training, aggregation, engines and evaluation. It imports no web or queue code.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("apa-rec")  # one source: pyproject.toml
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
