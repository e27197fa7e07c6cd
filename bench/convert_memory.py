"""Peak memory of a streaming conversion, side by side with the model's F16 size.

    python bench/convert_memory.py HF_DIR [--outtype q4_k_m]

Runs `edge-metastone convert` in a child process and reports its peak RSS (ru_maxrss), the F16
size of the weights, and their ratio; the streaming converter should stay far below 1.0.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf_dir", type=Path)
    ap.add_argument("--outtype", default="q4_k_m")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from edge_metastone.converters.hf_checkpoint import SafetensorsCheckpoint

    ckpt = SafetensorsCheckpoint(args.hf_dir)
    n_params = 0
    for name in ckpt.names():
        n = 1
        for d in ckpt.shape(name):
            n *= d
        n_params += n
    f16_bytes = 2 * n_params
    with tempfile.TemporaryDirectory(dir=args.hf_dir.parent) as tmp:
        out = Path(tmp) / f"model-{args.outtype}.gguf"
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "edge_metastone",
                "convert",
                str(args.hf_dir),
                "-o",
                str(out),
                "--outtype",
                args.outtype,
                "--no-progress",
            ],
            check=True,
        )
        seconds = time.perf_counter() - t0
        out_bytes = out.stat().st_size
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    gib = 2**30
    print(f"parameters        {n_params / 1e9:.3f} B")
    print(f"F16 size          {f16_bytes / gib:.2f} GiB")
    print(f"{args.outtype} file      {out_bytes / gib:.2f} GiB")
    print(f"peak RSS          {peak / gib:.2f} GiB")
    print(f"peak RSS / F16    {peak / f16_bytes:.3f}")
    print(f"wall time         {seconds:.1f} s")


if __name__ == "__main__":
    main()
