"""One process-wide lock around the CPU's heavy phases, so they take turns instead of overlapping.

llama.cpp's decode threads busy-wait at every graph barrier: a thread of theirs preempted by other
work on the same cores stalls the whole decode, so a 2-core machine decoding on 2 threads loses
far more to a concurrent Python phase (a chat template, answer checks, a result's JSON) than the
phase itself costs. The shared context's step thread holds this lock for each `llama_decode`; a
request holds it for its own heavy phases between decodes (`Reasoner`): encoding the prompt and
choosing among the candidates. One request alone never waits on it.
"""

from __future__ import annotations

import threading

heavy = threading.Lock()
