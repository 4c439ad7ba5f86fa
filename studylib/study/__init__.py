"""The study: parameter files, the grid of runs, the stages, the run store and the runner that executes
stage notebooks."""
