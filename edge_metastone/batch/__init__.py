"""The offline batch runner: a file of problems through `Reasoner.reason`, resumable after any
crash, locally or on Ray, with a summary and, for a sweep, the test-time scaling picture.

`job` (the job and its units), `jobfile` (input lines, the output log), `runner` (the run, and
its local unit runner), `on_ray` (the Ray unit runner), `report` (the summary and the sweep)."""
