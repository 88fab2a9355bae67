"""TALLRec prompts (Alpaca wrapper) and the Yes/No answer tokens."""

from collections.abc import Sequence

HEADER = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
INSTRUCTION = (
    "Given the user's preference and unpreference, identify whether the user will like the target "
    '{noun} by answering "Yes." or "No.".'
)
RESPONSE_MARKER = "### Response:\n"
YES, NO = "Yes", "No"


def _quoted(titles: Sequence[str]) -> str:
    return ", ".join(f'"{title}"' for title in titles)


def user_input(liked: Sequence[str], disliked: Sequence[str]) -> str:
    return f"User Preference: {_quoted(liked)}\nUser Unpreference: {_quoted(disliked)}"


def _wrap(instruction: str, input_text: str) -> str:
    return f"{HEADER}### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n{RESPONSE_MARKER}"


def sample_prompt(liked: Sequence[str], disliked: Sequence[str], target: str, *, noun: str = "movie") -> str:
    """The scored prompt: history split by like/dislike, then the target question. Ends at the answer."""
    question = f'Whether the user will like the target {noun} "{target}"?'
    return _wrap(INSTRUCTION.format(noun=noun), f"{user_input(liked, disliked)}\n{question}")


def history_prompt(liked: Sequence[str], disliked: Sequence[str], *, noun: str = "movie") -> str:
    """The same prompt without a target: embeds a user's history alone (per-user aggregation weights)."""
    return _wrap(INSTRUCTION.format(noun=noun), user_input(liked, disliked))
