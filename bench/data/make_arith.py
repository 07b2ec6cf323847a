"""Writes bench/data/arith50.jsonl: 50 arithmetic word problems for `memgen eval`,
the same file for the same seed. Each record is one user message in the
reference's GSM8K prompt format (spec §3.7) with an integer answer scored as
`boxed`.

    python bench/data/make_arith.py [--seed 0] [--n 50] [--out bench/data/arith50.jsonl]
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


def _problem(rng: random.Random) -> tuple[str, int]:
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(3, 40), rng.randint(2, 30)
        return f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?", a + b
    if kind == 1:
        a = rng.randint(20, 90)
        b = rng.randint(1, a - 1)
        return f"{name} had {a} {item} and gave {b} to {other}. How many {item} does {name} have left?", a - b
    if kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 15)
        return f"{name} fills {a} boxes with {b} {item} each. How many {item} are in the boxes?", a * b
    if kind == 3:
        b, q = rng.randint(2, 9), rng.randint(2, 12)
        return (f"{name} shares {b * q} {item} equally among {b} friends. "
                f"How many {item} does each friend get?"), q
    if kind == 4:
        a, b, c = rng.randint(5, 30), rng.randint(2, 6), rng.randint(1, 10)
        return (f"{name} has {a} {item}. {other} has {b} times as many, then loses {c}. "
                f"How many {item} does {other} have?"), a * b - c
    price, n, paid = rng.randint(2, 9), rng.randint(2, 8), 100
    return (f"{name} buys {n} {item} at {price} dollars each and pays with a {paid} dollar bill. "
            f"How much change does {name} get, in dollars?"), paid - n * price


def make(seed: int = 0, n: int = 50) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        question, answer = _problem(rng)
        records.append({
            "id": f"arith-{i:03d}",
            "messages": [{"role": "user", "content": f"{INSTRUCTION}Question: {question}\n"}],
            "answer": str(answer),
            "task": "boxed",
        })
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--out", default=str(Path(__file__).with_name("arith50.jsonl")))
    args = parser.parse_args()
    with open(args.out, "w") as f:
        for rec in make(args.seed, args.n):
            f.write(json.dumps(rec) + "\n")
    print(f"wrote {args.n} problems to {args.out}")


if __name__ == "__main__":
    main()
