"""The one decode loop both runtimes run (`loop.py`), the per-candidate bookkeeping it drives
(`candidate.py`, `text.py`), the small named steps a runtime supplies (`steps.py`), and the backend
base class that puts them behind `edge_metastone.backend.Backend` (`backend.py`)."""
