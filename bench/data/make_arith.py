"""Arithmetic word problems, generated offline, the same files for the same seed.
Each record is one user message in the reference's GSM8K prompt format
(spec §3.7) with an integer answer scored as `boxed`; both `memgen eval` and
`memgen train sft` read them as they are.

    python bench/data/make_arith.py            # arith50.jsonl: 50 problems for `memgen eval`
    python bench/data/make_arith.py --splits   # arith_train.jsonl (600, with worked solutions) and
                                               # arith_heldout.jsonl (100): the demo checkpoint's data
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

INSTRUCTION = ("Solve the math problem with proper reasoning, and make sure to put "
               "the FINAL ANSWER inside \\boxed{}.")
NAMES = ["Ava", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena"]
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells"]
HERE = Path(__file__).resolve().parent


def _problem(rng: random.Random) -> tuple[str, int, str]:
    """(question, answer, worked solution). The solution strings consume no
    random numbers, so a seed gives the same questions as before they existed."""
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(3, 40), rng.randint(2, 30)
        return (f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?", a + b,
                f"{name} has {a} {item} and buys {b} more, so {a} + {b} = {a + b}.")
    if kind == 1:
        a = rng.randint(20, 90)
        b = rng.randint(1, a - 1)
        return (f"{name} had {a} {item} and gave {b} to {other}. How many {item} does {name} have left?", a - b,
                f"{name} had {a} {item} and gave away {b}, so {a} - {b} = {a - b}.")
    if kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 15)
        return (f"{name} fills {a} boxes with {b} {item} each. How many {item} are in the boxes?", a * b,
                f"There are {a} boxes with {b} {item} each, so {a} * {b} = {a * b}.")
    if kind == 3:
        b, q = rng.randint(2, 9), rng.randint(2, 12)
        return ((f"{name} shares {b * q} {item} equally among {b} friends. "
                 f"How many {item} does each friend get?"), q,
                f"{b * q} {item} shared among {b} friends is {b * q} / {b} = {q}.")
    if kind == 4:
        a, b, c = rng.randint(5, 30), rng.randint(2, 6), rng.randint(1, 10)
        return ((f"{name} has {a} {item}. {other} has {b} times as many, then loses {c}. "
                 f"How many {item} does {other} have?"), a * b - c,
                f"{other} has {b} * {a} = {a * b} {item}, then loses {c}, so {a * b} - {c} = {a * b - c}.")
    price, n, paid = rng.randint(2, 9), rng.randint(2, 8), 100
    return ((f"{name} buys {n} {item} at {price} dollars each and pays with a {paid} dollar bill. "
             f"How much change does {name} get, in dollars?"), paid - n * price,
            f"{n} {item} at {price} dollars cost {n} * {price} = {n * price} dollars, "
            f"so the change is {paid} - {n * price} = {paid - n * price}.")


def _record(i: int, question: str, answer: int, prefix: str = "arith") -> dict:
    return {"id": f"{prefix}-{i:03d}", "messages": [{"role": "user", "content": f"{INSTRUCTION}Question: {question}\n"}],
            "answer": str(answer), "task": "boxed"}


def make(seed: int = 0, n: int = 50) -> list[dict]:
    """arith50.jsonl's records (prompt, answer; no worked solution)."""
    rng = random.Random(seed)
    return [_record(i, *_problem(rng)[:2]) for i in range(n)]


def make_splits(n_train: int, n_heldout: int, seed: int = 1) -> tuple[list[dict], list[dict]]:
    """Train and held-out records with distinct questions, none of them one of
    arith50's. Train records carry a worked solution as "completion" (what
    `memgen train sft` learns); `memgen eval` ignores that field."""
    taken = {r["messages"][0]["content"] for r in make()}
    rng = random.Random(seed)
    train, heldout = [], []
    while len(train) < n_train or len(heldout) < n_heldout:
        question, answer, solution = _problem(rng)
        rec = _record(0, question, answer)
        if rec["messages"][0]["content"] in taken:
            continue
        taken.add(rec["messages"][0]["content"])
        # alternate held-out and train draws until the held-out set is full: both cover every kind
        if len(heldout) < n_heldout and (len(heldout) <= len(train) or len(train) >= n_train):
            heldout.append({**rec, "id": f"heldout-{len(heldout):03d}"})
        else:
            train.append({**rec, "id": f"train-{len(train):04d}",
                          "completion": f"{solution} The answer is \\boxed{{{answer}}}."})
    return train, heldout


def _write(path, records: list[dict]) -> None:
    with open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    print(f"wrote {len(records)} problems to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=None, help="default 0 (arith50), 1 (--splits)")
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--out", default=str(HERE / "arith50.jsonl"))
    parser.add_argument("--splits", action="store_true",
                        help="write arith_train.jsonl (worked solutions) and arith_heldout.jsonl instead")
    parser.add_argument("--train", type=int, default=600, help="--splits: training problems")
    parser.add_argument("--heldout", type=int, default=100, help="--splits: held-out problems")
    args = parser.parse_args()
    if args.splits:
        train, heldout = make_splits(args.train, args.heldout, 1 if args.seed is None else args.seed)
        _write(HERE / "arith_train.jsonl", train)
        _write(HERE / "arith_heldout.jsonl", heldout)
    else:
        _write(args.out, make(0 if args.seed is None else args.seed, args.n))


if __name__ == "__main__":
    main()
