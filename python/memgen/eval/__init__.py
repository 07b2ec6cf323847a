"""`memgen eval`: offline batch evaluation of an `LLM` on a JSONL of prompts or
chat messages with references (boxed answers, exact match, aliases, code tests),
resumable, in one process or through Ray Data."""
from memgen.eval.records import InputError, ResultWriter, read_records
from memgen.eval.runner import (
    EvalConfig, add_eval_arguments, derive_seed, evaluate, process_batch, run_eval_from_args,
)
from memgen.eval.tasks import TASKS, Score, score

__all__ = [
    "TASKS", "EvalConfig", "InputError", "ResultWriter", "Score", "add_eval_arguments",
    "derive_seed", "evaluate", "process_batch", "read_records", "run_eval_from_args", "score",
]
