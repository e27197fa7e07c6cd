"""Write MetaStone-nano problems as `edge-metastone batch` input lines.

    python bench/nano_problems.py -o nano200.jsonl [--n 200] [--seed 777]

Each line is `{"id": "nano-<seed>-<i>", "prompt": ..., "answer": ...}`; the held-out seed 777 is
the one bench/nano_eval.py uses (the model was trained on seeds 0-2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "nano"))

from task import problems


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=777)
    args = ap.parse_args(argv)
    lines = [
        json.dumps({"id": f"nano-{args.seed}-{i}", "prompt": p.prompt, "answer": p.answer})
        for i, p in enumerate(problems(args.seed, args.n))
    ]
    args.output.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} problems to {args.output}")


if __name__ == "__main__":
    main()
