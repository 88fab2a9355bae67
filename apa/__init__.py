"""APA-Rec core: exact unlearning for LLM-based recommendation (Adapter Partition and Aggregation).

This package holds the method itself — data, samples, prompts, embeddings, partitioners, LoRA
training, aggregation, engines and evaluation. It imports no web or queue code.
"""

__version__ = "0.1.0"
